"""`ppap-pipe export`: one mined batch as .npz in the documented export format."""

from __future__ import annotations

from pathlib import Path

from pipeline.config import ExportConfig


def run(cfg: ExportConfig) -> Path:
    """Write batch `cfg.batch` of plan `cfg.epoch` of the mined sets `cfg.mined` to `cfg.to`."""
    from stages import mine

    return mine.export(cfg.out, cfg.mined, cfg.epoch, cfg.batch, cfg.to)
