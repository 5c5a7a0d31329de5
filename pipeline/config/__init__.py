"""Stage configs: typed, frozen, named after the paper; presets; their resolution.

- `options.py`: `option` (a field with its CLI help and spelling), allowed names, shared checks;
- `schema.py`: one config dataclass per stage (`STAGE_CONFIGS`);
- `presets.py`: the paper's and the DINOv2 presets, one table per stage;
- `resolve.py`: defaults <- preset <- config file (TOML or JSON) <- flags, renamed settings,
  type checks, the config hash;
- `tomlout.py`: a resolved config as TOML that `--config` reads back.

The resolved config is written beside every output (`config.json`) and inside checkpoints.
The names below are the package's public API, importable as `from pipeline.config import X`.
"""

from pipeline.config.options import (
    CHECKPOINTS,
    CRITERIA,
    PROBES,
    SELECT_METRICS,
    parse_fraction,
)
from pipeline.config.presets import PRESETS
from pipeline.config.resolve import config_hash, load_config_file, resolve, to_dict
from pipeline.config.schema import (
    STAGE_CONFIGS,
    AuditConfig,
    EvalConfig,
    ExportConfig,
    FeaturesConfig,
    MineConfig,
    PredictConfig,
    ShowConfig,
    SweepConfig,
    TrainConfig,
)

__all__ = [
    "CHECKPOINTS",
    "CRITERIA",
    "PRESETS",
    "PROBES",
    "SELECT_METRICS",
    "STAGE_CONFIGS",
    "AuditConfig",
    "EvalConfig",
    "ExportConfig",
    "FeaturesConfig",
    "MineConfig",
    "PredictConfig",
    "ShowConfig",
    "SweepConfig",
    "TrainConfig",
    "config_hash",
    "load_config_file",
    "parse_fraction",
    "resolve",
    "to_dict",
]
