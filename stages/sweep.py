"""`ppap-pipe sweep-train`: a grid of training runs, scored on held-out *training* images only.

The stage's work lives in `pipeline/training/sweep.py`; this module is the command's
entry point (`ppap-pipe sweep-train` calls `run`).
"""

from __future__ import annotations

from typing import Any

from pipeline.config.schema import SweepConfig
from pipeline.training import sweep as _stage


def run(cfg: SweepConfig) -> Any:
    """Run the stage with a resolved config (see `pipeline/training/sweep.py`)."""
    return _stage.run(cfg)
