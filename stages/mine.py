"""Stage 2: mine PPAP (or P⁰ / HP / k-means / PriMaPs / eigen) sets on fixed, seeded batches.

The stage's work lives in `pipeline/mining/mine.py`; this module is the command's
entry point (`ppap-pipe mine` calls `run`).
"""

from __future__ import annotations

from typing import Any

from pipeline.config.schema import MineConfig
from pipeline.mining import mine as _stage


def run(cfg: MineConfig) -> Any:
    """Run the stage with a resolved config (see `pipeline/mining/mine.py`)."""
    return _stage.run(cfg)
