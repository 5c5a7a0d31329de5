"""Stage 3: train the fine-tuned branch and the probes from cached mid tokens and mined shards.

The stage's work lives in `pipeline/training/train.py`; this module is the command's
entry point (`ppap-pipe train` calls `run`).
"""

from __future__ import annotations

from typing import Any

from pipeline.config.schema import TrainConfig
from pipeline.training import train as _stage


def run(cfg: TrainConfig) -> Any:
    """Run the stage with a resolved config (see `pipeline/training/train.py`)."""
    return _stage.run(cfg)
