"""The stage configs: one frozen dataclass per command, named after the paper's symbols.

Each field is an `option` with its help text and CLI spelling; `__post_init__` checks the values
and names the fix. `stages/cli.py` generates every command's options from these fields, so a new
field is a new option."""

from __future__ import annotations

from dataclasses import dataclass

from pipeline.config.options import (
    CHECKPOINTS,
    CRITERIA,
    DEVICE_HELP,
    OUT_HELP,
    PROBES,
    SCHEDULER_HELP,
    SEED_HELP,
    SELECT_METRICS,
    WORKERS_HELP,
    _check_device,
    _check_seed_system,
    _check_workers,
    check_mine_params,
    option,
    parse_fraction,
)


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
