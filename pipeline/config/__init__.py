"""Typed, frozen stage configs named after the paper, presets, and their resolution.

Resolution order: dataclass defaults <- preset <- config file (TOML or JSON) <- CLI flags.
The resolved config is written beside every output (`config.json`) and inside checkpoints.
Each field carries its command-line help text and spelling (`option`); `stages/cli.py`
generates every command's options from them, so a new field is a new option.
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

from pipeline import RELATIVE_OUT

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
    # (1, .93, .66, .49, .28, ...). Measured on training crops only (docs/results.md, eigen criterion).
    # Training recipe (tau 0.1, AdamW 1e-3, 2 epochs, selection every 10 steps): chosen by
    # `sweep-train` on held-out *training* images (docs/results.md, "choosing the training recipe"):
    # tau 0.8 collapses the code (held-out effective rank 0.5x frozen), tau <= 0.2 does not.
    "camvid": {
        "features": dict(dataset="camvid", data_root="../shared/camvid",
                         backbone="dinov2_vits14_offline"),
        "mine": {**_DINOV2_MINE, **_PAPER_MINE},
        "train": dict(_DINOV2_TRAIN),
        "eval": dict(eigen_kernel_power=4.0),
    },
    "demo": {  # the camvid recipe on the embedded mosaics, in batches of 16; a smoke test,
        # so one probe seed keeps `make features mine train eval` quick
        "features": dict(dataset="demo", backbone="dinov2_vits14_offline"),
        "mine": {**_DINOV2_MINE, "batch_size": 16},
        "train": dict(_DINOV2_TRAIN),
        "eval": dict(eigen_kernel_power=4.0, seeds=1),
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


def option(default: Any, help: str, *, flags: tuple[str, ...] | None = None,
           cli: bool = True) -> Any:
    """A config field with its command-line help text. `flags` spells the option when it is not
    `flag_name(field)`; `cli=False` keeps a field out of the command line (config files only)."""
    return dataclasses.field(default=default, metadata={"help": help, "flags": flags, "cli": cli})


def flag_name(name: str) -> str:
    """The command-line spelling of an option name: plans -> --plans, crf_workers -> --crf-workers."""
    return "--" + name.replace("_", "-")


def option_flags(f: dataclasses.Field) -> tuple[str, ...]:
    """The spellings of a config field's option: its `flags`, else `flag_name(name)`."""
    return f.metadata.get("flags") or (flag_name(f.name),)


# help texts shared by several stages' fields
OUT_HELP = "Run directory (default data_cache/<preset or demo>)."
DEVICE_HELP = "cpu, cuda or cuda:N."
WORKERS_HELP = "Local dask worker processes (0 = in this process)."
SCHEDULER_HELP = "Address of an existing dask scheduler."
SEED_HELP = "Seed for every random choice of this stage."


@dataclass(frozen=True)
class FeaturesConfig:
    out: str = option("data_cache/demo", OUT_HELP)  # the store is out/features.zarr
    dataset: str = option("demo", "cocostuff27, cityscapes, potsdam, camvid, folder or demo.")
    data_root: str | None = option(None, "Dataset folder (not needed for demo).")
    classes: str | None = option(None, "Class-list file (folder dataset).")
    backbone: str = option("dinov2_vits14_offline", "dino_vits16, dino_vits8, dino_vitb16, "
                           "dino_vitb8, dinov2_vits14, dinov2_vits14_offline, vit_tiny_random.")
    weights: str | None = option(None, "Local checkpoint (.pth / .safetensors); default: the "
                                 "backbone's own source.")
    splits: tuple[str, ...] = option(("train", "val"), "train and/or val (repeatable).")
    train_size: int = option(224, "Five-crop side (224).")  # docs/method.md §5
    eval_size: int = option(320, "Evaluation side (320).")  # docs/method.md §5
    # a unit of work (x5 crops for train)
    chunk_size: int = option(8, "Source images per resumable chunk.")
    batch_size: int = option(16, "Crops per backbone forward pass.")
    limit: int | None = option(None, "At most this many images per split.")  # quick tries
    workers: int = option(0, WORKERS_HELP)
    scheduler: str | None = option(None, SCHEDULER_HELP)
    device: str = option("cpu", DEVICE_HELP)
    seed: int = option(0, SEED_HELP)  # random-weight backbones and demo mosaics

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
    """Checks of the mining parameters, shared by MineConfig and pipeline.mining.engines.MineParams."""
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
    out: str = option("data_cache/demo", OUT_HELP)  # holding features.zarr
    name: str | None = option(None, "Name of the mined sets (default: the criterion).")
    # docs/method.md §7
    criterion: str = option("ppap", "ppap, p0, hp, kmeans, primaps or eigen.")
    phi0: float = option(0.55, "Initial positive threshold Φ0.")  # paper default
    psi0: float = option(0.15, "Initial ambiguity threshold Ψ0.")  # paper default
    prop_iters: int = option(2, "Propagation steps T.")
    sigma_pos: float = option(3.0, "σpos: Φ -= d/σpos.")
    sigma_amb: float = option(4.0, "σamb: Ψ += d/σamb.")
    batch_size: int = option(64, "Crops per mined batch.")
    anchors_per_image: str = option("1/4", "Fraction of patches as anchors, e.g. 1/16, or 'all'.")
    # training epoch e uses plan e
    plans: int = option(1, "Batch plans to mine (one seeded permutation each).")
    seed: int = option(0, SEED_HELP)
    # whole images, seeded by `seed`; `train` scores checkpoints on them to select without the
    # evaluation split
    holdout: float = option(0.1, "Fraction of training images (whole, seeded) kept out of mining "
                            "and training, for selection (0.1).")
    hp_pool_size: int = option(2048, "HP criterion reference pool size R.")
    kmeans_k: int | None = option(None, "Clusters of kmeans, class prototypes of primaps, "
                                  "clusters of eigen (default: classes).")
    # relative to the cosine map's max (paper)
    primaps_psi: float = option(0.4, "PriMaPs mask threshold: cosine to the mask seed > psi x max "
                                "(default 0.4, as PriMaPs).")
    primaps_coverage: float = option(0.95, "PriMaPs stops once this fraction of a crop is covered "
                                     "(default 0.95, as PriMaPs); the rest is unassigned = ambiguous.")
    eigen_dim: int | None = option(None, "Eigenfunctions K of the eigen criterion (default: the "
                                   "cluster count).")
    # NeuralEF optimisation steps (batches of 1024 patches)
    eigen_steps: int = option(1500, "NeuralEF training steps of the eigen criterion (1500).")
    eigen_kernel_power: float = option(1.0, "Eigen kernel affinity max(0, cos)^p (1 = Deng et al.; "
                                       "DINOv2 presets: 4).")
    # label-free thresholds for a new backbone (pipeline/mining/thresholds.py, docs/method.md §9.4)
    calibrate: bool = option(False, "Set phi0/psi0 from quantiles of the first batch's cosines "
                             "(--calibrate-pos / --calibrate-amb), no labels used.")
    calibrate_pos: float = option(0.99, "--calibrate: phi0 = this quantile of the cosines (0.99).")
    calibrate_amb: float = option(0.75, "--calibrate: psi0 = this quantile of the cosines (0.75).")
    force: bool = option(False, "Mine even when phi0 makes more than 25% of a batch positive for "
                         "a typical anchor (thresholds of another backbone).")
    backend: str = option("faiss", "faiss or torch.")
    device: str = option("cpu", DEVICE_HELP)
    workers: int = option(0, WORKERS_HELP)
    scheduler: str | None = option(None, SCHEDULER_HELP)
    mem_budget_mb: int = option(512, "Working memory for similarity blocks.")  # per batch
    # stored explicitly in shards for exact recovery; config files only
    band: float = option(1e-4, "|s - threshold| band stored explicitly in shards.", cli=False)

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
        if not 0.0 < self.calibrate_amb < self.calibrate_pos < 1.0:
            raise ValueError(f"calibrate_amb={self.calibrate_amb} and calibrate_pos="
                             f"{self.calibrate_pos} must satisfy 0 < amb < pos < 1")
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
    out: str = option("data_cache/demo", OUT_HELP)
    mined: str = option("ppap", "Mined sets to train on (name under out/mine/).")
    name: str | None = option(None, "Training run name (default: the mined name).")  # out/train/
    epochs: int = option(5, "Training epochs (epoch e uses batch plan e).")
    tau: float = option(0.8, "Temperature τ of Eq. 8.")
    parity_factor: bool = option(False, "Multiply the loss by τ/0.07 like the authors' code.")
    optimizer: str = option("adamw", "adam or adamw.")  # of the network
    lr: float = option(1e-3, "Network learning rate.")
    weight_decay: float = option(0.01, "Network weight decay.")
    probe_lr: float = option(1e-3, "Linear probe learning rate.")  # Adam
    cluster_lr: float = option(1e-3, "Cluster probe learning rate.")  # Adam
    grad_clip: float = option(10.0, "Gradient-norm clip.")
    # the result is unchanged
    anchor_chunk: int = option(1024, "Anchors per loss chunk (memory only).")
    n_clusters: int | None = option(None, "Cluster-probe size (default: the number of classes; "
                                    "27 for an unlabelled folder).")
    seed: int = option(0, SEED_HELP)
    device: str = option("cpu", DEVICE_HELP)
    amp: bool = option(True, "Autocast on CUDA (never on CPU).")
    # and at each epoch end
    ckpt_every: int = option(50, "Steps between checkpoints.")
    max_steps: int | None = option(None, "Stop after this many steps.")  # quick tries
    # fixed when mining: None = that of the mined sets; another value is refused
    holdout: float | None = option(None, "Held-out fraction of training images (fixed when "
                                   "mining; default: the mined sets', another value is refused).")
    select_every: int = option(25, "Score the run on the held-out images every N steps "
                               "(0 = never); keeps best.pt.")
    # one k-means fit of ~50k held-out patches moves by several points between selection points
    select_seeds: int = option(3, "k-means seeds averaged in the held-out cluster score (3).")
    select_metric: str = option("cluster_miou", "What best.pt maximises: cluster_miou, "
                                "linear_miou or labelfree.")
    rank_floor: float = option(0.9, "Label-free rule: the last point before held-out effective "
                               "rank < rank_floor x frozen.")
    collapse_ratio: float = option(0.5, "Warn when effective rank < this x the frozen features'.")
    amb_weight: float = option(0.0, "Loss variant: ambiguous rows as weak negatives with this "
                               "weight (0 = Eq. 8).")

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
        if self.select_seeds < 1:
            raise ValueError(f"select_seeds={self.select_seeds} must be at least 1")
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

    out: str = option("data_cache/demo", OUT_HELP)
    mined: str = option("ppap", "Base mined sets (name under out/mine/); a grid over mining "
                        "thresholds mines <mined>-<label> from it.")
    name: str = option("sweep", "Sweep name: runs train/<name>-<label>/, report sweep/<name>/ "
                       "(default: sweep).")
    # one per swept option
    grid: tuple[str, ...] = option((), "NAME=V1,V2 or NAME=START:STOP:STEP; repeat for a grid. "
                                   "NAME: a training option (tau, lr, weight_decay, amb_weight, "
                                   "epochs, ...) or a mining threshold (phi0, psi0, prop_iters, "
                                   "sigma_pos, sigma_amb).")
    fixed: tuple[str, ...] = option((), "NAME=VALUE training option shared by every run; "
                                    "repeatable.")
    # the command's own --preset and --config (stages/cli.py), passed on to every run
    preset: str | None = option(None, "Training preset under the grid (lr, tau, ... defaults).")
    config: str | None = option(None, "Config file under the grid.")
    epochs: int | None = option(None, "Training epochs of every run.")
    max_steps: int | None = option(None, "Stop every run after this many steps.")
    select_every: int | None = option(None, "Steps between held-out scorings (must be > 0).")
    seed: int = option(0, SEED_HELP)
    seeds: int = option(1, "Runs per grid point: seed i trains with seed+i on sets mined with "
                        "the base sets' seed + i (<mined>-seed<s>, mined when missing).")
    device: str = option("cpu", DEVICE_HELP)

    def __post_init__(self) -> None:
        if self.seeds < 1:
            raise ValueError(f"seeds={self.seeds} must be at least 1 (runs per grid point)")
        if not self.grid:
            raise ValueError("grid=(): give at least one --grid NAME=V1,V2 (e.g. --grid tau=0.1,0.2)")
        if not self.name or "/" in self.name:
            raise ValueError(f"name={self.name!r} must be a non-empty directory name")
        if self.max_steps is not None and self.max_steps <= 0:
            raise ValueError(f"max_steps={self.max_steps} must be positive")
        _check_device(self.device)


@dataclass(frozen=True)
class EvalConfig:
    out: str = option("data_cache/demo", OUT_HELP)
    # ignored for --baseline frozen
    trained: str | None = option("ppap", "Training run to evaluate (name under out/train/).")
    # none | frozen
    baseline: str = option("none", "'frozen' evaluates the untrained features instead.")
    crf: bool = option(True, "Also report metrics after dense CRF.")
    crf_workers: int = option(0, "CRF processes (0 = all cores).")
    device: str = option("cpu", DEVICE_HELP)
    seed: int = option(0, SEED_HELP)
    n_show: int = option(6, "Images in the prediction grid PNG.")
    # refit measures the representation: the same probes as the frozen baseline
    probes: str = option(
        "refit",
        "refit (default): fit the cluster probe (seeded spherical k-means) and a linear "
        "probe fitted to convergence on the training split's code of the evaluated model, "
        "exactly like the frozen baseline, so trained vs frozen compares representations. "
        "trained: the probes trained alongside the network (eval/<run>-<ckpt>-trained-probes/). "
        "No effect with --baseline frozen (it always fits).")
    checkpoint: str = option(
        "best",
        "best (default): selected during training on held-out training images; last; or "
        "labelfree: chosen by the label-free rank rule. Writes eval/<run>-<checkpoint>/.")
    # kmeans as before; primaps-em and eigen are fitted
    probe: str = option(
        "kmeans",
        "How the cluster probe is obtained. kmeans (default): spherical k-means on "
        "the training split's code (or the trained probe with --probes trained). primaps-em: PriMaPs-EM "
        "prototypes fitted on the training split's code (batch-wise cosine k-means, then "
        "focal loss against PriMaPs pseudo-labels with an EMA teacher). eigen: neural "
        "eigenfunctions of the code's affinity kernel, discretised by k-means. Non-default "
        "probes write eval/<name>-<probe>/.")
    primaps_psi: float = option(0.4, "--probe primaps-em: mask threshold (0.4).")
    primaps_coverage: float = option(0.95, "--probe primaps-em: stop fraction (0.95).")
    # 0 = the batch-wise k-means init only
    em_steps: int = option(2000, "--probe primaps-em: EM steps (2000; 0 = the k-means init alone).")
    eigen_dim: int | None = option(None, "--probe eigen: eigenfunctions (default: classes).")
    eigen_steps: int = option(1500, "--probe eigen: NeuralEF steps (1500).")
    eigen_kernel_power: float = option(1.0, "--probe eigen: affinity max(0, cos)^p.")
    # one k-means fit on ~100 images moves mIoU by about a point: report the spread
    seeds: int = option(3, "Probe seeds: fit the cluster probe (and a linear probe per distinct "
                        "seeded subsample) with seeds seed..seed+N-1; metrics.json reports their "
                        "mean, std and every seed (3; the demo preset: 1).")

    def __post_init__(self) -> None:
        if self.seeds < 1:
            raise ValueError(f"seeds={self.seeds} must be at least 1 (the number of probe fits)")
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
    out: str = option("data_cache/demo", OUT_HELP)
    # names under out/mine/
    mined: tuple[str, ...] = option(("ppap",), "Mined sets to compare (repeatable).")
    epoch: int = option(0, "Batch plan to audit.")
    batches: int = option(4, "Audit the first N batches (a sample).")
    # a seeded sample of anchors; None = all
    max_anchors: int | None = option(2000, "At most this many anchors per batch.")
    # e.g. ("phi0=0.45:0.65:0.05", "psi0=0.1:0.3:0.05")
    sweep: tuple[str, ...] = option((), "Grid to mine and audit, e.g. phi0=0.45:0.65:0.05 "
                                    "(repeatable).")
    name: str | None = option(None, "Output folder <out>/audit/<name>/ (default: the mined "
                              "sets' names joined by '+', then '-sweep-<swept names>').")
    json: str | None = option(None, "JSON output path (default: <out>/audit/<name>/audit.json).")
    plot: str | None = option(None, "Fig. 1b PNG path (default: <out>/audit/<name>/fig1b.png).")
    seed: int = option(0, SEED_HELP)
    backend: str = option("faiss", "faiss or torch (for --sweep).")
    device: str = option("cpu", DEVICE_HELP)

    def __post_init__(self) -> None:
        if not self.mined and not self.sweep:
            raise ValueError("give at least one --mined NAME (or a --sweep) to audit")
        if self.batches <= 0:
            raise ValueError(f"batches={self.batches} must be positive")
        if self.max_anchors is not None and self.max_anchors <= 0:
            raise ValueError(f"max_anchors={self.max_anchors} must be positive (or omitted for all)")
        if self.name is not None and (not self.name or "/" in self.name or self.name.startswith(".")):
            raise ValueError(f"name={self.name!r}: give a plain folder name (no '/', not hidden)")
        _check_device(self.device)

    @property
    def label(self) -> str:
        """The output folder under <out>/audit/: --name, or the mined sets (and swept names)."""
        if self.name:
            return self.name
        parts = "+".join(dict.fromkeys(self.mined))
        if self.sweep:
            swept = "+".join(dict.fromkeys(g.split("=", 1)[0].strip() for g in self.sweep))
            parts = f"{parts}-sweep-{swept}" if parts else f"sweep-{swept}"
        if len(parts) > 80:  # many mined sets: a short, stable name
            import hashlib
            parts = f"{parts[:60]}-{hashlib.sha256(parts.encode()).hexdigest()[:8]}"
        return parts


@dataclass(frozen=True)
class ShowConfig:
    out: str = option("data_cache/demo", OUT_HELP)
    mined: str = option("ppap", "Mined sets to look at.")
    epoch: int = option(0, "Batch plan.")
    batch: int = option(0, "Batch within the plan.")
    # positions 0..M-1 within the batch's shard
    anchors: tuple[int, ...] = option((), "Anchor position in the shard (repeatable).",
                                      flags=("--anchor",))
    random: int = option(0, "Show this many seeded random anchors.")  # drawn with `seed`
    seed: int = option(0, SEED_HELP)
    dest: str | None = option(None, "Folder for the PNGs.")  # default: out/show/<mined>/

    def __post_init__(self) -> None:
        if not self.anchors and self.random <= 0:
            raise ValueError("give --anchor I (repeatable) or --random N to choose anchors to show")


@dataclass(frozen=True)
class PredictConfig:
    """`predict`: label a folder of new images with a trained run."""

    # the run directory, as --out is for every other stage; --out here is the destination
    out: str = option("data_cache/demo", "Run directory holding the training run (default "
                      "data_cache/<preset or demo>).", flags=("--run-dir",))
    trained: str = option("ppap", "Training run (name under the run directory's train/).")
    checkpoint: str = option("best", "best, last or labelfree (best falls back to last for a run "
                             "that never selected).")
    images: str | None = option(None, "Folder of images to label (jpg/png/..., subfolders kept).")
    dest: str | None = option(None, "Output folder for the label, colour and overlay images.",
                              flags=("--out", "--dest"))
    probe: str = option("auto", "fitted: the k-means probe + matching saved by `eval` for this "
                        "checkpoint (class ids); trained: the run's own cluster probe (cluster "
                        "ids); auto: fitted when eval saved one, else trained.")
    head: str = option("cluster", "cluster or linear (the linear probe: class ids).")
    crf: bool = option(False, "Refine with the dense CRF (docs/method.md §6.4).")
    max_side: int = option(1280, "Longest side of the working size (px); the shorter side is the "
                           "cache's evaluation side.")
    device: str = option("cpu", DEVICE_HELP)

    def __post_init__(self) -> None:
        if not self.images:
            raise ValueError("images=None: give --images DIR, the folder of images to label")
        if not self.dest:
            raise ValueError("dest=None: give --out DIR, the folder to write the labels to")
        if self.checkpoint not in CHECKPOINTS:
            raise ValueError(f"checkpoint={self.checkpoint!r}: choose one of {', '.join(CHECKPOINTS)}")
        if self.probe not in ("auto", "fitted", "trained"):
            raise ValueError(f"probe={self.probe!r}: choose auto, fitted or trained")
        if self.head not in ("cluster", "linear"):
            raise ValueError(f"head={self.head!r}: choose cluster or linear")
        if self.max_side < 32:
            raise ValueError(f"max_side={self.max_side} must be at least 32 pixels")
        _check_device(self.device)


@dataclass(frozen=True)
class ExportConfig:
    """`export`: one mined batch as .npz (features, anchors, CSR positive/ambiguous sets, proxies)."""

    out: str = option("data_cache/demo", OUT_HELP)
    mined: str = option("ppap", "Name of the mined sets.")
    epoch: int = option(0, "Batch plan.")
    batch: int = option(0, "Batch within the plan.")
    to: str | None = option(None, "Output .npz file.", flags=("--to", "--file"))

    def __post_init__(self) -> None:
        if not self.to:
            raise ValueError("to=None: give --to FILE.npz, the file to write the batch to")


STAGE_CONFIGS = {
    "features": FeaturesConfig,
    "mine": MineConfig,
    "export": ExportConfig,
    "train": TrainConfig,
    "eval": EvalConfig,
    "predict": PredictConfig,
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
            o, n = flag_name(old), flag_name(new)
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
    if data.pop(RELATIVE_OUT, False) and isinstance(data.get("out"), str):
        # a config.json a stage saved: its `out` is relative to the file (the run may have moved)
        data["out"] = str((p.resolve().parent / data["out"]).resolve())
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


def check_types(cls: type, values: Mapping[str, Any],
                written: Mapping[str, str] | None = None) -> dict[str, Any]:
    """Values for `cls` with their declared types (ints stay ints, '0.5' is not a float, ...).

    Integral floats (3.0) pass as ints and ints as floats; lists become tuples; anything else of
    the wrong type raises ValueError naming the option as the user wrote it (`written`: field ->
    the former name it was given under), the value and the expected type.
    """
    import typing

    def fail(name: str, value: Any, want: str) -> ValueError:
        said = (written or {}).get(name, name)
        field = f"{cls.__name__}.{name}" + (f", formerly {said!r}" if said != name else "")
        return ValueError(f"{said}={value!r} ({type(value).__name__}) is not a valid value for "
                          f"{field}: expected {want}")

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
                raise fail(name, value, getattr(base[0], "__name__", str(base[0])))
            continue
        t = base[0]
        origin = typing.get_origin(t)
        if origin is tuple:
            inner = typing.get_args(t)[0]
            if isinstance(value, str) or not isinstance(value, (list, tuple)) or not all(
                    isinstance(v, inner) and not isinstance(v, bool) for v in value):
                raise fail(name, value, f"a list of {inner.__name__}")
            out[name] = tuple(value)
        elif t is bool:
            if not isinstance(value, bool):
                raise fail(name, value, "true or false")
        elif t is int:
            if isinstance(value, float) and value.is_integer():
                value = out[name] = int(value)
            if isinstance(value, bool) or not isinstance(value, int):
                raise fail(name, value, "an integer")
        elif t is float:
            if isinstance(value, bool) or not isinstance(value, (int, float)):
                raise fail(name, value, "a number")
            out[name] = float(value)
        elif t is str:
            if isinstance(value, (int, float)) and not isinstance(value, bool):
                out[name] = str(value)  # e.g. anchors_per_image = 0.25
            elif not isinstance(value, str):
                raise fail(name, value, "a string")
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
        written = {new: old for old, new in DEPRECATED_NAMES.get(stage, {}).items()
                   if old in section and new not in section}
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
            check_types(cls, from_file, written)
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
