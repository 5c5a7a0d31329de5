"""`ppap-pipe predict`: segment a folder of new images with a trained run.

The stage's work lives in `pipeline/evaluation/predict.py`; this module is the command's
entry point (`ppap-pipe predict` calls `run`).
"""

from __future__ import annotations

from typing import Any

from pipeline.config.schema import PredictConfig
from pipeline.evaluation import predict as _stage


def run(cfg: PredictConfig) -> Any:
    """Run the stage with a resolved config (see `pipeline/evaluation/predict.py`)."""
    return _stage.run(cfg)
