"""Typed, frozen stage configs named after the paper, presets, and their resolution.

Resolution order: dataclass defaults <- preset <- config file (TOML or JSON) <- CLI flags.
The resolved config is written beside every output (`config.json`) and inside checkpoints.
"""

from __future__ import annotations

import dataclasses
import json
import logging
import math
from dataclasses import dataclass, fields
from fractions import Fraction
from pathlib import Path
from typing import Any, Mapping

log = logging.getLogger("ppap.config")

# ---------------------------------------------------------------------------------------
# Presets (docs/method.md §4 for the paper's; §9 for DINOv2 thresholds on CamVid/demo).
# A preset holds one table per stage (`features`, `mine`, `train`, `eval`); a stage config
# takes only its own table, so a key means one thing (the mining batch is not the forward-pass
# batch, mined plans are not training epochs). Every key must be a field of that stage's config
# (checked by `resolve`). dataset/backbone belong to `features` only: the later stages read them
# from the feature cache's manifest.
# ---------------------------------------------------------------------------------------

PRESET_TABLES = ("features", "mine", "train", "eval")

_PAPER_MINE = dict(batch_size=64)  # crops per mined batch = per training step
_PAPER_TRAIN = dict(grad_clip=10.0, probe_lr=1e-3, cluster_lr=1e-3)

# The DINOv2 presets' mining and training tables (camvid, demo); why: the comment at "camvid".
_DINOV2_MINE = dict(phi0=0.95, psi0=0.70, prop_iters=2, sigma_pos=3.0, sigma_amb=3.0,
                    anchors_per_image="1/16", plans=2, eigen_kernel_power=4.0)
_DINOV2_TRAIN = dict(tau=0.1, epochs=2, optimizer="adamw", lr=1e-3, weight_decay=0.01,
                     select_every=10, **_PAPER_TRAIN)

PRESETS: dict[str, dict[str, dict[str, Any]]] = {
    "cocostuff27-vits8": {
        "features": dict(dataset="cocostuff27", backbone="dino_vits8"),
        "mine": dict(phi0=0.55, psi0=0.20, prop_iters=2, sigma_pos=3.0, sigma_amb=3.0,
                     anchors_per_image="1/16", plans=5, **_PAPER_MINE),
        "train": dict(tau=0.8, epochs=5, optimizer="adamw", lr=1e-3, weight_decay=0.1,
                      **{**_PAPER_TRAIN, "cluster_lr": 5e-3}),
    },
    "cocostuff27-vits16": {
        "features": dict(dataset="cocostuff27", backbone="dino_vits16"),
        "mine": dict(phi0=0.55, psi0=0.15, prop_iters=2, sigma_pos=3.0, sigma_amb=4.0,
                     anchors_per_image="1/4", plans=5, **_PAPER_MINE),
        "train": dict(tau=0.8, epochs=5, optimizer="adamw", lr=1e-3, weight_decay=0.01,
                      **_PAPER_TRAIN),
    },
    "cityscapes-vitb8": {
        "features": dict(dataset="cityscapes", backbone="dino_vitb8"),
        "mine": dict(phi0=0.60, psi0=0.20, prop_iters=3, sigma_pos=3.0, sigma_amb=2.0,
                     anchors_per_image="1/16", plans=30, **_PAPER_MINE),
        "train": dict(tau=0.1, epochs=30, optimizer="adam", lr=1e-3, weight_decay=0.0,
                      **_PAPER_TRAIN),
    },
    "cityscapes-vits8": {
        "features": dict(dataset="cityscapes", backbone="dino_vits8"),
        "mine": dict(phi0=0.60, psi0=0.20, prop_iters=3, sigma_pos=3.0, sigma_amb=3.0,
                     anchors_per_image="1/16", plans=30, **_PAPER_MINE),
        "train": dict(tau=0.8, epochs=30, optimizer="adam", lr=1e-3, weight_decay=0.0,
                      **_PAPER_TRAIN),
    },
    "potsdam-vitb8": {
        "features": dict(dataset="potsdam", backbone="dino_vitb8"),
        "mine": dict(phi0=0.55, psi0=0.15, prop_iters=1, sigma_pos=5.0, sigma_amb=3.0,
                     anchors_per_image="1/16", plans=40, **_PAPER_MINE),
        "train": dict(tau=0.07, epochs=40, optimizer="adam", lr=5e-4, weight_decay=0.0,
                      **_PAPER_TRAIN),
    },
    # DINOv2 features share a large common component (median pairwise cosine 0.47 on
    # CamVid), so the DINO v1 thresholds collapse; 0.95/0.70 was picked with the audit
    # sweep on CamVid *training* crops (docs/method.md §9), never on the evaluation split.
    # eigen_kernel_power: with the DINOv2 common component, max(0, cos) gives a kernel whose
    # normalised spectrum collapses after ~3 eigenvalues (CamVid train: 1, .66, .21, .10, .05,
    # ...), so the later eigenfunctions are noise; max(0, cos)^4 keeps a gradual spectrum
    # (1, .93, .66, .49, .28, ...). Measured on training crops only (README, eigen criterion).
    # Training recipe (tau 0.1, AdamW 1e-3, 2 epochs, selection every 10 steps): chosen by
    # `sweep-train` on held-out *training* images (README, "choosing the training recipe"):
    # tau 0.8 collapses the code (held-out effective rank 0.5x frozen), tau <= 0.2 does not.
    "camvid": {
        "features": dict(dataset="camvid", data_root="../shared/camvid",
                         backbone="dinov2_vits14_offline"),
        "mine": {**_DINOV2_MINE, **_PAPER_MINE},
        "train": dict(_DINOV2_TRAIN),
        "eval": dict(eigen_kernel_power=4.0),
    },
    "demo": {  # the camvid recipe on the embedded mosaics, in batches of 16
        "features": dict(dataset="demo", backbone="dinov2_vits14_offline"),
        "mine": {**_DINOV2_MINE, "batch_size": 16},
        "train": dict(_DINOV2_TRAIN),
        "eval": dict(eigen_kernel_power=4.0),
    },
}


def parse_fraction(value: str | float | int) -> float:
    """'1/16' -> 0.0625, 'all' -> 1.0, '0.25' -> 0.25; must lie in (0, 1]."""
    if isinstance(value, str):
        text = value.strip().lower()
        if text == "all":
            return 1.0
        try:
            frac = float(Fraction(text))
        except (ValueError, ZeroDivisionError):
            raise ValueError(
                f"anchors_per_image={value!r} is not a fraction; use e.g. '1/16', '0.25' or 'all'"
            ) from None
    else:
        frac = float(value)
    if not (0.0 < frac <= 1.0) or math.isnan(frac):
        raise ValueError(
            f"anchors_per_image={value!r} must lie in (0, 1]; use e.g. '1/16' or 'all'"
        )
    return frac


def _check_device(device: str) -> None:
    if device != "cpu" and not device.startswith("cuda"):
        raise ValueError(f"device={device!r} is not supported; use 'cpu' or 'cuda' (or 'cuda:N')")


def _check_workers(workers: int, scheduler: str | None) -> None:
    if workers < 0:
        raise ValueError(f"workers={workers} must be >= 0 (0 runs in this process)")
    if scheduler is not None and workers:
        raise ValueError(
            f"give either workers={workers} or scheduler={scheduler!r}, not both"
        )


@dataclass(frozen=True)
class FeaturesConfig:
    out: str = "data_cache/demo"  # run directory; the store is out/features.zarr
    dataset: str = "demo"  # cocostuff27 | cityscapes | potsdam | camvid | folder | demo
    data_root: str | None = None  # dataset folder (not needed for demo)
    classes: str | None = None  # class-list file for the folder dataset
    backbone: str = "dinov2_vits14_offline"
    weights: str | None = None  # local checkpoint; None = the backbone's default source
    splits: tuple[str, ...] = ("train", "val")
    train_size: int = 224  # five-crop side (docs/method.md §5)
    eval_size: int = 320  # evaluation side (docs/method.md §5)
    chunk_size: int = 8  # source images per unit of work (a resumable chunk; x5 crops for train)
    batch_size: int = 16  # crops per backbone forward pass
    limit: int | None = None  # at most this many images per split (quick tries)
    workers: int = 0  # local dask worker processes; 0 = in this process
    scheduler: str | None = None  # address of an existing dask scheduler
    device: str = "cpu"
    seed: int = 0  # random-weight backbones and demo mosaics

    def __post_init__(self) -> None:
        for name in ("train_size", "eval_size", "chunk_size", "batch_size"):
            if getattr(self, name) <= 0:
                raise ValueError(f"{name}={getattr(self, name)} must be a positive integer")
        if self.limit is not None and self.limit <= 0:
            raise ValueError(f"limit={self.limit} must be positive (or omitted for all images)")
        bad = [s for s in self.splits if s not in ("train", "val")]
        if bad or not self.splits:
            raise ValueError(f"splits={self.splits!r}: use 'train', 'val' or both")
        _check_device(self.device)
        _check_workers(self.workers, self.scheduler)


CRITERIA = ("ppap", "p0", "hp", "kmeans", "primaps", "eigen")
PROBES = ("kmeans", "primaps-em", "eigen")  # how eval fits the cluster probe (EvalConfig.probe)


def _check_seed_system(cfg: Any) -> None:
    """Shared checks of the PriMaPs / eigenfunction options (MineConfig and EvalConfig)."""
    if not 0.0 <= cfg.primaps_psi < 1.0:
        raise ValueError(f"primaps_psi={cfg.primaps_psi} must lie in [0, 1) (PriMaPs uses 0.4)")
    if not 0.0 < cfg.primaps_coverage <= 1.0:
        raise ValueError(f"primaps_coverage={cfg.primaps_coverage} must lie in (0, 1] "
                         "(PriMaPs stops at 0.95)")
    if cfg.eigen_dim is not None and cfg.eigen_dim < 1:
        raise ValueError(f"eigen_dim={cfg.eigen_dim} must be at least 1 (or omitted = clusters)")
    if cfg.eigen_steps <= 0:
        raise ValueError(f"eigen_steps={cfg.eigen_steps} must be a positive integer")
    if not cfg.eigen_kernel_power > 0:
        raise ValueError(f"eigen_kernel_power={cfg.eigen_kernel_power} must be > 0")


SELECT_METRICS = ("cluster_miou", "linear_miou", "labelfree")
CHECKPOINTS = ("best", "last", "labelfree")  # train/<run>/<name>.pt


def check_mine_params(phi0: float, psi0: float, prop_iters: int, sigma_pos: float,
                      sigma_amb: float) -> None:
    """Checks of the mining parameters, shared by MineConfig and pipeline.mining.MineParams."""
    for name, v in (("phi0", phi0), ("psi0", psi0)):
        if not (-1.0 <= float(v) <= 1.0):
            raise ValueError(f"{name}={v} must be a cosine in [-1, 1]")
    if int(prop_iters) != prop_iters or prop_iters < 0:
        raise ValueError(f"prop_iters={prop_iters} must be an integer >= 0 (0 = anchor itself)")
    for name, v in (("sigma_pos", sigma_pos), ("sigma_amb", sigma_amb)):
        if not float(v) > 0:
            raise ValueError(f"{name}={v} must be > 0 (it divides the proxy movement)")


@dataclass(frozen=True)
class MineConfig:
    out: str = "data_cache/demo"  # run directory holding features.zarr
    name: str | None = None  # mined-set name under out/mine/ (default: the criterion)
    criterion: str = "ppap"  # ppap | p0 | hp | kmeans | primaps | eigen (docs/method.md §7)
    phi0: float = 0.55  # initial positive threshold Φ0 (paper default)
    psi0: float = 0.15  # initial ambiguity threshold Ψ0 (paper default)
    prop_iters: int = 2  # T, propagation steps
    sigma_pos: float = 3.0  # Φ -= d / σpos
    sigma_amb: float = 4.0  # Ψ += d / σamb
    batch_size: int = 64  # images (crops) per mined batch
    anchors_per_image: str = "1/4"  # fraction of each crop's patches used as anchors, or 'all'
    plans: int = 1  # number of batch plans (one seeded permutation each; training epoch e uses plan e)
    seed: int = 0
    # fraction of training source images (whole images, seeded by `seed`) kept out of mining
    # and training; `train` scores checkpoints on them to select without the evaluation split
    holdout: float = 0.1
    hp_pool_size: int = 2048  # HP criterion reference pool size R
    kmeans_k: int | None = None  # clusters of kmeans / primaps prototypes / eigen (default: classes)
    primaps_psi: float = 0.4  # PriMaPs mask threshold relative to the cosine map's max (paper)
    primaps_coverage: float = 0.95  # PriMaPs stops once this fraction of a crop is assigned
    eigen_dim: int | None = None  # eigenfunctions K of the eigen criterion (default: clusters)
    eigen_steps: int = 1500  # NeuralEF optimisation steps (batches of 1024 patches)
    eigen_kernel_power: float = 1.0  # kernel affinity max(0, cos)^power (1 = Deng et al.)
    backend: str = "faiss"  # faiss | torch
    device: str = "cpu"
    workers: int = 0
    scheduler: str | None = None
    mem_budget_mb: int = 512  # working memory per batch for similarity blocks
    band: float = 1e-4  # |s - threshold| band stored explicitly in shards (exact recovery)

    def __post_init__(self) -> None:
        if self.criterion not in CRITERIA:
            raise ValueError(f"criterion={self.criterion!r}: choose one of {', '.join(CRITERIA)}")
        check_mine_params(self.phi0, self.psi0, self.prop_iters, self.sigma_pos, self.sigma_amb)
        if self.criterion == "ppap" and self.psi0 >= self.phi0:
            raise ValueError(
                f"phi0={self.phi0} must be greater than psi0={self.psi0}; lower --psi0 or raise --phi0"
            )
        if self.kmeans_k is not None and self.kmeans_k <= 1:
            raise ValueError(f"kmeans_k={self.kmeans_k} must be at least 2")
        _check_seed_system(self)
        for name in ("batch_size", "plans", "hp_pool_size", "mem_budget_mb"):
            if getattr(self, name) <= 0:
                raise ValueError(f"{name}={getattr(self, name)} must be a positive integer")
        parse_fraction(self.anchors_per_image)
        if not (0.0 <= self.holdout < 1.0):
            raise ValueError(f"holdout={self.holdout} must lie in [0, 1): the fraction of training "
                             "images kept out of mining for selection (0 = none)")
        if self.backend not in ("faiss", "torch"):
            raise ValueError(f"backend={self.backend!r}: choose 'faiss' or 'torch'")
        if not (0 < self.band < 0.01):
            raise ValueError(f"band={self.band} must lie in (0, 0.01)")
        _check_device(self.device)
        _check_workers(self.workers, self.scheduler)

    @property
    def anchor_fraction(self) -> float:
        return parse_fraction(self.anchors_per_image)

    @property
    def run_name(self) -> str:
        return self.name or self.criterion


@dataclass(frozen=True)
class TrainConfig:
    out: str = "data_cache/demo"
    mined: str = "ppap"  # name of the mined sets under out/mine/
    name: str | None = None  # training run name under out/train/ (default: = mined)
    epochs: int = 5
    tau: float = 0.8  # temperature of Eq. 8
    parity_factor: bool = False  # multiply the loss by tau/0.07 as the authors' code does
    optimizer: str = "adamw"  # adam | adamw (network)
    lr: float = 1e-3
    weight_decay: float = 0.01
    probe_lr: float = 1e-3  # linear probe (Adam)
    cluster_lr: float = 1e-3  # cluster probe (Adam)
    grad_clip: float = 10.0
    anchor_chunk: int = 1024  # anchors per loss chunk (memory only; result is unchanged)
    n_clusters: int | None = None  # cluster-probe size; default = number of classes
    seed: int = 0
    device: str = "cpu"
    amp: bool = True  # autocast on CUDA only; ignored on CPU
    ckpt_every: int = 50  # steps between checkpoints (and at each epoch end)
    max_steps: int | None = None  # stop early (quick tries)
    # held-out fraction of training images: fixed when mining (None = that of the mined sets;
    # another value is refused)
    holdout: float | None = None
    select_every: int = 25  # steps between scorings on the held-out images (0 = never)
    select_metric: str = "cluster_miou"  # best.pt: cluster_miou | linear_miou | labelfree
    rank_floor: float = 0.9  # label-free rule: stop before held-out rank < rank_floor x frozen
    collapse_ratio: float = 0.5  # warn when effective rank < this x the frozen features'
    amb_weight: float = 0.0  # loss variant: ambiguous rows as weak negatives (0 = Eq. 8)

    def __post_init__(self) -> None:
        if self.epochs <= 0:
            raise ValueError(f"epochs={self.epochs} must be positive")
        if not self.tau > 0:
            raise ValueError(f"tau={self.tau} must be > 0")
        if self.optimizer not in ("adam", "adamw"):
            raise ValueError(f"optimizer={self.optimizer!r}: choose 'adam' or 'adamw'")
        for name in ("lr", "probe_lr", "cluster_lr", "grad_clip"):
            if not getattr(self, name) > 0:
                raise ValueError(f"{name}={getattr(self, name)} must be > 0")
        if self.weight_decay < 0:
            raise ValueError(f"weight_decay={self.weight_decay} must be >= 0")
        for name in ("anchor_chunk", "ckpt_every"):
            if getattr(self, name) <= 0:
                raise ValueError(f"{name}={getattr(self, name)} must be positive")
        if self.holdout is not None and not (0.0 <= self.holdout < 1.0):
            raise ValueError(f"holdout={self.holdout} must lie in [0, 1) (it must match the mined sets)")
        if self.select_every < 0:
            raise ValueError(f"select_every={self.select_every} must be >= 0 (0 = no selection)")
        if self.select_metric not in SELECT_METRICS:
            raise ValueError(f"select_metric={self.select_metric!r}: choose one of "
                             f"{', '.join(SELECT_METRICS)}")
        for name in ("rank_floor", "collapse_ratio"):
            if not (0.0 < getattr(self, name) <= 1.0):
                raise ValueError(f"{name}={getattr(self, name)} must lie in (0, 1]")
        if not (0.0 <= self.amb_weight <= 1.0):
            raise ValueError(f"amb_weight={self.amb_weight} must lie in [0, 1] (0 = Eq. 8)")
        _check_device(self.device)

    @property
    def run_name(self) -> str:
        return self.name or self.mined


@dataclass(frozen=True)
class SweepConfig:
    """`sweep-train`: a grid of training runs scored on the held-out training images only."""

    out: str = "data_cache/demo"
    mined: str = "ppap"  # base mined sets; mining-threshold grids derive `<mined>-<label>`
    name: str = "sweep"  # runs are train/<name>-<label>/, the report sweep/<name>/
    grid: tuple[str, ...] = ()  # NAME=V1,V2 or NAME=START:STOP:STEP, one per swept option
    fixed: tuple[str, ...] = ()  # NAME=VALUE training options shared by every run
    preset: str | None = None  # training preset under the grid (lr, tau, ... defaults)
    config: str | None = None  # config file under the grid
    epochs: int | None = None
    max_steps: int | None = None
    select_every: int | None = None
    seed: int = 0
    device: str = "cpu"

    def __post_init__(self) -> None:
        if not self.grid:
            raise ValueError("grid=(): give at least one --grid NAME=V1,V2 (e.g. --grid tau=0.1,0.2)")
        if not self.name or "/" in self.name:
            raise ValueError(f"name={self.name!r} must be a non-empty directory name")
        if self.max_steps is not None and self.max_steps <= 0:
            raise ValueError(f"max_steps={self.max_steps} must be positive")
        _check_device(self.device)


@dataclass(frozen=True)
class EvalConfig:
    out: str = "data_cache/demo"
    trained: str | None = "ppap"  # training run under out/train/ (ignored for --baseline frozen)
    baseline: str = "none"  # none | frozen
    crf: bool = True
    crf_workers: int = 0  # processes for the CRF (0 = all cores)
    device: str = "cpu"
    seed: int = 0
    n_show: int = 6  # images in the prediction grid
    # refit: k-means + a converged linear probe fitted on the run's training-split code, exactly
    # like the frozen baseline (measures the representation); trained: the probes trained with it
    probes: str = "refit"
    checkpoint: str = "best"  # best (selected on held-out training images) | last | labelfree
    probe: str = "kmeans"  # cluster probe: kmeans (as before) | primaps-em | eigen (fitted)
    primaps_psi: float = 0.4  # --probe primaps-em: mask threshold
    primaps_coverage: float = 0.95  # --probe primaps-em: stop fraction
    em_steps: int = 2000  # --probe primaps-em: EM steps (0 = the batch-wise k-means init only)
    eigen_dim: int | None = None  # --probe eigen: eigenfunctions (default: classes)
    eigen_steps: int = 1500  # --probe eigen: NeuralEF steps
    eigen_kernel_power: float = 1.0  # --probe eigen: affinity max(0, cos)^power

    def __post_init__(self) -> None:
        if self.baseline not in ("none", "frozen"):
            raise ValueError(f"baseline={self.baseline!r}: choose 'none' or 'frozen'")
        if self.probes not in ("trained", "refit"):
            raise ValueError(f"probes={self.probes!r}: choose 'trained' (the probes saved with the "
                             "run) or 'refit' (fitted on its training-split code like the baseline)")
        if self.checkpoint not in CHECKPOINTS:
            raise ValueError(f"checkpoint={self.checkpoint!r}: choose one of {', '.join(CHECKPOINTS)}")
        if self.crf_workers < 0:
            raise ValueError(f"crf_workers={self.crf_workers} must be >= 0 (0 = all cores)")
        if self.probe not in PROBES:
            raise ValueError(f"probe={self.probe!r}: choose one of {', '.join(PROBES)}")
        if self.em_steps < 0:
            raise ValueError(f"em_steps={self.em_steps} must be >= 0 (0 = k-means init only)")
        _check_seed_system(self)
        _check_device(self.device)


@dataclass(frozen=True)
class AuditConfig:
    out: str = "data_cache/demo"
    mined: tuple[str, ...] = ("ppap",)  # mined-set names under out/mine/ to compare
    epoch: int = 0  # batch plan to audit
    batches: int = 4  # audit the first this-many batches of the plan (a sample)
    max_anchors: int | None = 2000  # per batch, a seeded sample of anchors (None = all)
    sweep: tuple[str, ...] = ()  # e.g. ("phi0=0.45:0.65:0.05", "psi0=0.1:0.3:0.05")
    json: str | None = None  # JSON output (default: out/audit/audit.json)
    plot: str | None = None  # Fig. 1b PNG path (default: out/audit/fig1b.png)
    seed: int = 0
    backend: str = "faiss"
    device: str = "cpu"

    def __post_init__(self) -> None:
        if not self.mined and not self.sweep:
            raise ValueError("give at least one --mined NAME (or a --sweep) to audit")
        if self.batches <= 0:
            raise ValueError(f"batches={self.batches} must be positive")
        if self.max_anchors is not None and self.max_anchors <= 0:
            raise ValueError(f"max_anchors={self.max_anchors} must be positive (or omitted for all)")
        _check_device(self.device)


@dataclass(frozen=True)
class ShowConfig:
    out: str = "data_cache/demo"
    mined: str = "ppap"
    epoch: int = 0
    batch: int = 0
    anchors: tuple[int, ...] = ()  # anchor positions (0..M-1) within the batch's shard
    random: int = 0  # or this many anchors drawn with `seed`
    seed: int = 0
    dest: str | None = None  # PNG folder (default: out/show/<mined>/)

    def __post_init__(self) -> None:
        if not self.anchors and self.random <= 0:
            raise ValueError("give --anchor I (repeatable) or --random N to choose anchors to show")


STAGE_CONFIGS = {
    "features": FeaturesConfig,
    "mine": MineConfig,
    "train": TrainConfig,
    "eval": EvalConfig,
    "audit": AuditConfig,
    "show": ShowConfig,
    "sweep-train": SweepConfig,
}

# Former option names still accepted (with a warning) in a config file's [stage] table and on
# that stage's command line: {stage: {old name: new name}}.
DEPRECATED_NAMES: dict[str, dict[str, str]] = {
    "mine": {"epochs": "plans"},
    "eval": {"workers": "crf_workers"},
}


def stage_of(cls: type) -> str | None:
    """The stage (command) name of a config class, e.g. MineConfig -> 'mine'."""
    return next((k for k, v in STAGE_CONFIGS.items() if v is cls), None)


def preset_values(preset: str, cls: type) -> dict[str, Any]:
    """The `cls` stage's table of `preset` (empty for stages a preset does not set)."""
    if preset not in PRESETS:
        raise ValueError(f"preset={preset!r} is unknown; choose one of {', '.join(PRESETS)}")
    tables = PRESETS[preset]
    bad_tables = sorted(set(tables) - set(PRESET_TABLES))
    if bad_tables:
        raise ValueError(f"preset {preset!r} has unknown table(s) {bad_tables}; "
                         f"tables are {', '.join(PRESET_TABLES)}")
    stage = stage_of(cls)
    table = dict(tables.get(stage, {})) if stage else {}
    bad = sorted(set(table) - {f.name for f in fields(cls)})
    if bad:
        raise ValueError(f"preset {preset!r}: [{stage}] has unknown option(s) {bad}; "
                         f"the names are the fields of {cls.__name__}")
    return table


def upgrade_names(stage: str, values: Mapping[str, Any], where: str,
                  flags: bool = False) -> dict[str, Any]:
    """Rename deprecated option names of `stage` (DEPRECATED_NAMES) in `values`, warning once
    per name; giving both the old and the new name with different values is refused.

    `values` holds only the options that were given. `flags=True` words the messages for
    command-line flags (`--epochs 3`) instead of config keys (`epochs=3`).
    """
    out = dict(values)
    for old, new in DEPRECATED_NAMES.get(stage, {}).items():
        if old not in out:
            continue
        value = out.pop(old)
        if flags:
            o, n = "--" + old.replace("_", "-"), "--" + new.replace("_", "-")
            given, other = f"{o} {value}", f"{n} {out.get(new)}"
        else:
            o, n = old, new
            given, other = f"{old}={value!r}", f"{new}={out.get(new)!r}"
        if new in out and out[new] != value:
            raise ValueError(f"{where}: {given} and {other} name the same option of `{stage}` "
                             f"({o} is its former name); keep only {n}")
        if flags:
            log.warning("%s: %s is deprecated, use %s (same meaning)", where, o, n)
        else:
            log.warning("%s: %r is deprecated for `%s`, use %r (same meaning)", where, o, stage, n)
        out[new] = value
    return out


def mine_config_dict(d: Mapping[str, Any]) -> dict[str, Any]:
    """MineConfig fields of a mined run's config.json (runs mined before the rename say
    `epochs` for `plans`); other keys are dropped."""
    d = dict(d)
    if "plans" not in d and "epochs" in d:
        d["plans"] = d["epochs"]
    names = {f.name for f in fields(MineConfig)}
    return {k: v for k, v in d.items() if k in names}


def mined_plans(d: Mapping[str, Any]) -> int | None:
    """Batch plans a mined run's config.json asked for (`plans`, or `epochs` before the rename)."""
    value = mine_config_dict(d).get("plans")
    return None if value is None else int(value)


def load_config_file(path: str | Path) -> dict[str, Any]:
    """Read a flat TOML or JSON mapping; a [stage] table overrides the flat keys for that stage.

    A flat key applies to every stage whose config has a field of that name (e.g. `seed`,
    `device`); names that mean different things per stage are distinct (`plans` of mine vs
    `epochs` of train, `workers` = dask processes vs `crf_workers` of eval).
    """
    p = Path(path)
    if not p.is_file():
        raise ValueError(f"config file {str(p)!r} does not exist; pass an existing .toml or .json file")
    try:
        text = p.read_text()
    except UnicodeDecodeError:
        raise ValueError(f"config file {str(p)!r} is not a text file; pass a .toml or .json file") from None
    if p.suffix == ".json":
        try:
            data = json.loads(text)
        except json.JSONDecodeError as exc:
            raise ValueError(f"config file {str(p)!r} is not valid JSON: {exc}") from None
    else:
        import tomllib

        try:
            data = tomllib.loads(text)
        except tomllib.TOMLDecodeError as exc:
            raise ValueError(f"config file {str(p)!r} is not valid TOML: {exc}") from None
    if not isinstance(data, dict):
        raise ValueError(f"config file {str(p)!r} must hold a mapping of option names to values")
    tables = {k: v for k, v in data.items() if isinstance(v, dict)}
    unknown = sorted(set(tables) - set(STAGE_CONFIGS))
    if unknown:
        raise ValueError(
            f"config file {str(p)!r} has unknown table(s) {['[' + t + ']' for t in unknown]}; "
            f"tables are named after stages: {', '.join('[' + t + ']' for t in STAGE_CONFIGS)}")
    for stage, table in tables.items():
        names = {f.name for f in fields(STAGE_CONFIGS[stage])} | set(DEPRECATED_NAMES.get(stage, {}))
        bad = sorted(set(table) - names)
        if bad:
            raise ValueError(
                f"config file {str(p)!r}: [{stage}] has unknown option(s) {bad}; "
                f"see `ppap-pipe {stage} --help` for the names")
    return data


def _type_error(cls: type, name: str, value: Any, want: str) -> ValueError:
    return ValueError(f"{name}={value!r} ({type(value).__name__}) is not a valid value for "
                      f"{cls.__name__}.{name}: expected {want}")


def check_types(cls: type, values: Mapping[str, Any]) -> dict[str, Any]:
    """Values for `cls` with their declared types (ints stay ints, '0.5' is not a float, ...).

    Integral floats (3.0) pass as ints and ints as floats; lists become tuples; anything else of
    the wrong type raises ValueError naming the option, the value and the expected type.
    """
    import typing

    hints = typing.get_type_hints(cls)
    out = dict(values)
    for name, value in values.items():
        hint = hints.get(name)
        if hint is None:
            continue
        args = typing.get_args(hint)
        optional = type(None) in args
        base = [a for a in args if a is not type(None)] if optional else [hint]
        if value is None:
            if not optional:
                raise _type_error(cls, name, value, getattr(base[0], "__name__", str(base[0])))
            continue
        t = base[0]
        origin = typing.get_origin(t)
        if origin is tuple:
            inner = typing.get_args(t)[0]
            if isinstance(value, str) or not isinstance(value, (list, tuple)) or not all(
                    isinstance(v, inner) and not isinstance(v, bool) for v in value):
                raise _type_error(cls, name, value, f"a list of {inner.__name__}")
            out[name] = tuple(value)
        elif t is bool:
            if not isinstance(value, bool):
                raise _type_error(cls, name, value, "true or false")
        elif t is int:
            if isinstance(value, float) and value.is_integer():
                value = out[name] = int(value)
            if isinstance(value, bool) or not isinstance(value, int):
                raise _type_error(cls, name, value, "an integer")
        elif t is float:
            if isinstance(value, bool) or not isinstance(value, (int, float)):
                raise _type_error(cls, name, value, "a number")
            out[name] = float(value)
        elif t is str:
            if isinstance(value, (int, float)) and not isinstance(value, bool):
                out[name] = str(value)  # e.g. anchors_per_image = 0.25
            elif not isinstance(value, str):
                raise _type_error(cls, name, value, "a string")
    return out


def resolve(
    cls: type,
    preset: str | None = None,
    config_file: str | Path | None = None,
    stage: str | None = None,
    **overrides: Any,
):
    """defaults <- preset <- config file <- CLI overrides (None means 'not given').

    The preset contributes its table for this config's stage only (`preset_values`); a config
    file its flat keys that are fields of `cls`, then its `[stage]` table (deprecated names of
    that stage are renamed, with a warning: `upgrade_names`).
    """
    names = {f.name for f in fields(cls)}
    merged: dict[str, Any] = {}
    if preset is not None:
        merged.update(preset_values(preset, cls))
    if config_file is not None:
        data = load_config_file(config_file)
        section = data.get(stage, {}) if stage else {}
        section = upgrade_names(stage, section, f"config file {str(config_file)!r} [{stage}]")
        flat = {k: v for k, v in data.items() if not isinstance(v, dict)}
        unknown = set(flat) - _all_option_names()
        if unknown:
            raise ValueError(
                f"config file {str(config_file)!r} has unknown option(s) {sorted(unknown)}; "
                "see `ppap-pipe <stage> --help` for the names"
            )
        from_file = {**{k: v for k, v in flat.items() if k in names},
                     **{k: v for k, v in section.items() if k in names}}
        try:
            check_types(cls, from_file)
        except ValueError as exc:
            raise ValueError(f"config file {str(config_file)!r}: {exc}") from None
        merged.update(from_file)
    merged.update({k: v for k, v in overrides.items() if v is not None and k in names})
    for k in ("splits", "mined", "sweep", "anchors", "grid", "fixed"):
        if k in merged and isinstance(merged[k], list):
            merged[k] = tuple(merged[k])
    return cls(**check_types(cls, merged))


def _all_option_names() -> set[str]:
    out: set[str] = set()
    for c in STAGE_CONFIGS.values():
        out |= {f.name for f in fields(c)}
    return out


def to_dict(cfg: Any) -> dict[str, Any]:
    d = dataclasses.asdict(cfg)
    return {k: (list(v) if isinstance(v, tuple) else v) for k, v in d.items()}


def config_hash(d: Mapping[str, Any], ignore: tuple[str, ...] = ()) -> str:
    """Stable short hash of the settings that change results."""
    import hashlib

    keep = {k: v for k, v in sorted(d.items()) if k not in ignore}
    return hashlib.sha256(json.dumps(keep, sort_keys=True, default=str).encode()).hexdigest()[:16]
