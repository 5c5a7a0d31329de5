"""Pictures of mined sets (the paper's Fig. 5): one PNG per chosen anchor of one shard.

The stage's work lives in `pipeline/audit/show.py`; this module is the command's
entry point (`ppap-pipe show` calls `run`).
"""

from __future__ import annotations

from typing import Any

from pipeline.audit import show as _stage
from pipeline.config.schema import ShowConfig


def run(cfg: ShowConfig) -> Any:
    """Run the stage with a resolved config (see `pipeline/audit/show.py`)."""
    return _stage.run(cfg)
