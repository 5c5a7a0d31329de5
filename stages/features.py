"""Stage 1: run the frozen backbone once over a dataset and cache its tokens in Zarr.

The stage's work lives in `pipeline/cache/build.py`; this module is the command's
entry point (`ppap-pipe features` calls `run`).
"""

from __future__ import annotations

from typing import Any

from pipeline.cache import build as _stage
from pipeline.config.schema import FeaturesConfig


def run(cfg: FeaturesConfig) -> Any:
    """Run the stage with a resolved config (see `pipeline/cache/build.py`)."""
    return _stage.run(cfg)
