"""Stage 4: cluster and linear-probe metrics on the evaluation split, with and without CRF.

The stage's work lives in `pipeline/evaluation/evaluate.py`; this module is the command's
entry point (`ppap-pipe eval` calls `run`).
"""

from __future__ import annotations

from typing import Any

from pipeline.config.schema import EvalConfig
from pipeline.evaluation import evaluate as _stage


def run(cfg: EvalConfig) -> Any:
    """Run the stage with a resolved config (see `pipeline/evaluation/evaluate.py`)."""
    return _stage.run(cfg)
