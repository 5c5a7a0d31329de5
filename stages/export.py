"""`ppap-pipe export`: one mined batch as .npz in the documented export format.

The stage's work lives in `pipeline/mining/export.py`; this module is the command's
entry point (`ppap-pipe export` calls `run`).
"""

from __future__ import annotations

from typing import Any

from pipeline.config.schema import ExportConfig
from pipeline.mining import export as _stage


def run(cfg: ExportConfig) -> Any:
    """Run the stage with a resolved config (see `pipeline/mining/export.py`)."""
    return _stage.run(cfg)
