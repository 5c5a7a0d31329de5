"""Every path under a run directory `<out>`, spelled in one place.

    <out>/features.zarr                 the feature cache (artifacts.features)
    <out>/features_manifest.json        its identity (a rerun must match it)
    <out>/features_config.json          resolved config of the last `features` run
    <out>/features_report.json          chunks computed, skipped images, timings
    <out>/markers/features/<key>.done   one marker per feature chunk, written last
    <out>/mine/<name>/                  mined sets (artifacts.mined)
    <out>/train/<name>/                 a training run and its checkpoints (artifacts.training)
    <out>/train/.frozen-holdout/        step-0 held-out scores shared by runs (a pure cache)
    <out>/eval/<name>/                  an evaluation report (artifacts.reports)
    <out>/audit/                        audit JSON and figures
    <out>/show/<mined>/                 pictures of mined sets
    <out>/sweep/<name>/                 a training sweep's table, results and plot

Stages and scripts ask this class (or the artifact classes built on it) for paths; none of
them joins these names by hand.
"""

from __future__ import annotations

from pathlib import Path

FEATURES_STORE = "features.zarr"
FEATURES_LOCK = ".features.lock"  # the features stage locks `<out>` under this name


class RunLayout:
    """The paths of one run directory `<out>` (nothing is created or read here)."""

    def __init__(self, out: str | Path):
        self.out = Path(out)

    def __repr__(self) -> str:
        return f"RunLayout({str(self.out)!r})"

    # ------------------------------------------------------------------ feature cache
    @property
    def features_store(self) -> Path:
        return self.out / FEATURES_STORE

    @property
    def features_manifest(self) -> Path:
        return self.out / "features_manifest.json"

    @property
    def features_config(self) -> Path:
        return self.out / "features_config.json"

    @property
    def features_report(self) -> Path:
        return self.out / "features_report.json"

    @property
    def markers(self) -> Path:
        return self.out / "markers"

    @property
    def feature_markers(self) -> Path:
        return self.markers / "features"

    def feature_marker(self, key: str) -> Path:
        """Completion marker of feature unit `key` (e.g. 'train-00003')."""
        return self.feature_markers / f"{key}.done"

    # ------------------------------------------------------------------ stage outputs
    @property
    def mine_root(self) -> Path:
        return self.out / "mine"

    def mined(self, name: str) -> Path:
        return self.mine_root / name

    def mined_names(self) -> list[str]:
        """Names of the mined-set directories that have a manifest (mining started)."""
        return sorted(p.parent.name for p in self.mine_root.glob("*/manifest.json"))

    @property
    def train_root(self) -> Path:
        return self.out / "train"

    def train(self, name: str) -> Path:
        return self.train_root / name

    @property
    def frozen_holdout(self) -> Path:
        return self.train_root / ".frozen-holdout"

    def eval(self, name: str) -> Path:
        return self.out / "eval" / name

    @property
    def audit(self) -> Path:
        return self.out / "audit"

    def show(self, mined: str) -> Path:
        return self.out / "show" / mined

    def sweep(self, name: str) -> Path:
        return self.out / "sweep" / name


class NamedRunDir:
    """Base of the artifacts that are one named directory of a run (`mine/<name>/`,
    `train/<name>/`, `eval/<name>/`): `SUBDIR` names the RunLayout method giving its path."""

    SUBDIR = ""

    def __init__(self, out: str | Path, name: str):
        self.out = Path(out)
        self.name = name
        self.layout = RunLayout(out)
        self.dir: Path = getattr(self.layout, self.SUBDIR)(name)

    def __repr__(self) -> str:
        return f"{type(self).__name__}({str(self.dir)!r})"

    @property
    def manifest_path(self) -> Path:
        return self.dir / "manifest.json"

    @property
    def config_path(self) -> Path:
        return self.dir / "config.json"
