"""Audit: precision of mined sets against ground truth (paper Table 6, Fig. 1b), and sweeps.

The stage's work lives in `pipeline/audit/report.py`; this module is the command's
entry point (`ppap-pipe audit` calls `run`).
"""

from __future__ import annotations

from typing import Any

from pipeline.audit import report as _stage
from pipeline.config.schema import AuditConfig


def run(cfg: AuditConfig) -> Any:
    """Run the stage with a resolved config (see `pipeline/audit/report.py`)."""
    return _stage.run(cfg)
