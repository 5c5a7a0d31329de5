"""`ppap-pipe` command line. Each command resolves a config and calls one stage's `run(cfg)`.

Resolution: defaults <- --preset <- --config FILE <- flags given on the command line.
"""

from __future__ import annotations

import errno
import logging
import sys
from typing import List, Optional

import typer

from pipeline import __version__
from pipeline.config import (
    AuditConfig, EvalConfig, FeaturesConfig, MineConfig, PRESETS, ShowConfig, SweepConfig,
    TrainConfig, resolve, upgrade_names,
)

app = typer.Typer(
    add_completion=False,
    no_args_is_help=True,
    help="Offline PPAP pipeline: features -> mine -> train -> eval, plus audit/show/export.",
    context_settings={"help_option_names": ["-h", "--help"]},
)

log = logging.getLogger("ppap.cli")

# shared option declarations -----------------------------------------------------------
OUT = typer.Option(None, "--out", help="Run directory (default data_cache/<preset or demo>).")
PRESET = typer.Option(None, "--preset", help=f"One of: {', '.join(PRESETS)}.")
CONFIG = typer.Option(None, "--config", help="TOML/JSON file of option values (flat, or [stage] tables).")
DEVICE = typer.Option(None, "--device", help="cpu, cuda or cuda:N.")
WORKERS = typer.Option(None, "--workers", help="Local dask worker processes (0 = in this process).")
SCHEDULER = typer.Option(None, "--scheduler", help="Address of an existing dask scheduler.")
SEED = typer.Option(None, "--seed", help="Seed for every random choice of this stage.")


def _default_out(preset: Optional[str], out: Optional[str]) -> Optional[str]:
    if out is not None:
        return out
    return f"data_cache/{preset or 'demo'}"


class _TerminalHandler(logging.StreamHandler):
    """On a terminal, log lines go through tqdm.write: live bars are cleared and redrawn around
    them instead of being glued to them (log files get whole-line progress, executor.progress)."""

    def emit(self, record: logging.LogRecord) -> None:
        from tqdm import tqdm

        try:
            tqdm.write(self.format(record), file=self.stream)
        except Exception:  # noqa: BLE001 - logging must never raise
            self.handleError(record)


def _setup_logging(verbose: bool) -> None:
    stream = sys.stderr
    tty = hasattr(stream, "isatty") and stream.isatty()
    handler = _TerminalHandler(stream) if tty else logging.StreamHandler(stream)
    handler.setFormatter(logging.Formatter("%(asctime)s %(name)s %(levelname)s %(message)s",
                                           datefmt="%H:%M:%S"))
    logging.basicConfig(level=logging.DEBUG if verbose else logging.INFO, handlers=[handler])
    if not verbose:  # faiss logs which SIMD build it probes for at import (not our business)
        logging.getLogger("faiss.loader").setLevel(logging.WARNING)


def _resolve(cls, stage: str, preset, config, **flags):
    """Flags given (not None), former flag names renamed (config.upgrade_names), resolved."""
    flags = upgrade_names(stage, {k: v for k, v in flags.items() if v is not None}, "command line",
                          flags=True)
    flags["out"] = _default_out(preset, flags.get("out"))
    return resolve(cls, preset=preset, config_file=config, stage=stage, **flags)


@app.callback()
def _main(
    verbose: bool = typer.Option(False, "--verbose", "-v", help="Debug logging."),
    version: bool = typer.Option(False, "--version", help="Print the version and exit."),
):
    if version:
        typer.echo(__version__)
        raise typer.Exit()
    _setup_logging(verbose)


@app.command()
def features(
    out: Optional[str] = OUT,
    preset: Optional[str] = PRESET,
    config: Optional[str] = CONFIG,
    dataset: Optional[str] = typer.Option(None, help="cocostuff27, cityscapes, potsdam, camvid, folder or demo."),
    data_root: Optional[str] = typer.Option(None, help="Dataset folder (not needed for demo)."),
    classes: Optional[str] = typer.Option(None, help="Class-list file (folder dataset)."),
    backbone: Optional[str] = typer.Option(None, help="dino_vits16, dino_vits8, dino_vitb16, dino_vitb8, dinov2_vits14, dinov2_vits14_offline, vit_tiny_random."),
    weights: Optional[str] = typer.Option(None, help="Local checkpoint (.pth / .safetensors); default: the backbone's own source."),
    splits: Optional[List[str]] = typer.Option(None, "--splits", help="train and/or val (repeatable)."),
    train_size: Optional[int] = typer.Option(None, help="Five-crop side (224)."),
    eval_size: Optional[int] = typer.Option(None, help="Evaluation side (320)."),
    chunk_size: Optional[int] = typer.Option(None, help="Source images per resumable chunk."),
    batch_size: Optional[int] = typer.Option(None, help="Crops per backbone forward pass."),
    limit: Optional[int] = typer.Option(None, help="At most this many images per split."),
    workers: Optional[int] = WORKERS,
    scheduler: Optional[str] = SCHEDULER,
    device: Optional[str] = DEVICE,
    seed: Optional[int] = SEED,
):
    """Stage 1: cache the frozen backbone's tokens of a dataset in Zarr (resumable)."""
    from stages import features as stage

    cfg = _resolve(FeaturesConfig, "features", preset, config, out=out, dataset=dataset,
                   data_root=data_root, classes=classes, backbone=backbone, weights=weights,
                   splits=tuple(splits) if splits else None, train_size=train_size,
                   eval_size=eval_size, chunk_size=chunk_size, batch_size=batch_size, limit=limit,
                   workers=workers, scheduler=scheduler, device=device, seed=seed)
    stage.run(cfg)


@app.command()
def mine(
    out: Optional[str] = OUT,
    preset: Optional[str] = PRESET,
    config: Optional[str] = CONFIG,
    name: Optional[str] = typer.Option(None, help="Name of the mined sets (default: the criterion)."),
    criterion: Optional[str] = typer.Option(None, help="ppap, p0, hp, kmeans, primaps or eigen."),
    phi0: Optional[float] = typer.Option(None, "--phi0", help="Initial positive threshold Φ0."),
    psi0: Optional[float] = typer.Option(None, "--psi0", help="Initial ambiguity threshold Ψ0."),
    prop_iters: Optional[int] = typer.Option(None, help="Propagation steps T."),
    sigma_pos: Optional[float] = typer.Option(None, help="σpos: Φ -= d/σpos."),
    sigma_amb: Optional[float] = typer.Option(None, help="σamb: Ψ += d/σamb."),
    batch_size: Optional[int] = typer.Option(None, help="Crops per mined batch."),
    anchors_per_image: Optional[str] = typer.Option(None, help="Fraction of patches as anchors, e.g. 1/16, or 'all'."),
    plans: Optional[int] = typer.Option(None, help="Batch plans to mine (one seeded permutation each)."),
    epochs: Optional[int] = typer.Option(None, "--epochs", help="Deprecated: use --plans."),
    holdout: Optional[float] = typer.Option(None, help="Fraction of training images (whole, seeded) kept out of mining and training, for selection (0.1)."),
    hp_pool_size: Optional[int] = typer.Option(None, help="HP criterion reference pool size R."),
    kmeans_k: Optional[int] = typer.Option(None, help="Clusters of kmeans, class prototypes of primaps, clusters of eigen (default: classes)."),
    primaps_psi: Optional[float] = typer.Option(None, "--primaps-psi", help="PriMaPs mask threshold: cosine to the mask seed > psi x max (default 0.4, as PriMaPs)."),
    primaps_coverage: Optional[float] = typer.Option(None, "--primaps-coverage", help="PriMaPs stops once this fraction of a crop is covered (default 0.95, as PriMaPs); the rest is unassigned = ambiguous."),
    eigen_dim: Optional[int] = typer.Option(None, "--eigen-dim", help="Eigenfunctions K of the eigen criterion (default: the cluster count)."),
    eigen_steps: Optional[int] = typer.Option(None, "--eigen-steps", help="NeuralEF training steps of the eigen criterion (1500)."),
    eigen_kernel_power: Optional[float] = typer.Option(None, "--eigen-kernel-power", help="Eigen kernel affinity max(0, cos)^p (1 = Deng et al.; DINOv2 presets: 4)."),
    backend: Optional[str] = typer.Option(None, help="faiss or torch."),
    mem_budget_mb: Optional[int] = typer.Option(None, help="Working memory for similarity blocks."),
    workers: Optional[int] = WORKERS,
    scheduler: Optional[str] = SCHEDULER,
    device: Optional[str] = DEVICE,
    seed: Optional[int] = SEED,
):
    """Stage 2: mine PPAP (or P0/HP/k-means/PriMaPs/eigen) sets on fixed seeded batches into shards."""
    from stages import mine as stage

    cfg = _resolve(MineConfig, "mine", preset, config, out=out, name=name, criterion=criterion,
                   phi0=phi0, psi0=psi0, prop_iters=prop_iters, sigma_pos=sigma_pos,
                   sigma_amb=sigma_amb, batch_size=batch_size, anchors_per_image=anchors_per_image,
                   plans=plans, epochs=epochs,
                   holdout=holdout, hp_pool_size=hp_pool_size, kmeans_k=kmeans_k,
                   primaps_psi=primaps_psi, primaps_coverage=primaps_coverage, eigen_dim=eigen_dim,
                   eigen_steps=eigen_steps, eigen_kernel_power=eigen_kernel_power, backend=backend,
                   mem_budget_mb=mem_budget_mb, workers=workers, scheduler=scheduler,
                   device=device, seed=seed)
    stage.run(cfg)


@app.command()
def export(
    out: Optional[str] = OUT,
    preset: Optional[str] = PRESET,
    mined: str = typer.Option("ppap", help="Name of the mined sets."),
    epoch: int = typer.Option(0, help="Batch plan."),
    batch: int = typer.Option(0, help="Batch within the plan."),
    to: str = typer.Option(..., "--to", "--file", help="Output .npz file."),
):
    """Write one mined batch as .npz: features, anchors, CSR positive/ambiguous sets, proxies."""
    from stages import mine as stage

    stage.export(_default_out(preset, out), mined, epoch, batch, to)


@app.command()
def train(
    out: Optional[str] = OUT,
    preset: Optional[str] = PRESET,
    config: Optional[str] = CONFIG,
    mined: Optional[str] = typer.Option(None, help="Mined sets to train on (name under out/mine/)."),
    name: Optional[str] = typer.Option(None, help="Training run name (default: the mined name)."),
    epochs: Optional[int] = typer.Option(None, help="Training epochs (epoch e uses batch plan e)."),
    tau: Optional[float] = typer.Option(None, help="Temperature τ of Eq. 8."),
    parity_factor: Optional[bool] = typer.Option(None, "--parity-factor/--no-parity-factor", help="Multiply the loss by τ/0.07 like the authors' code."),
    optimizer: Optional[str] = typer.Option(None, help="adam or adamw."),
    lr: Optional[float] = typer.Option(None, help="Network learning rate."),
    weight_decay: Optional[float] = typer.Option(None, help="Network weight decay."),
    probe_lr: Optional[float] = typer.Option(None, help="Linear probe learning rate."),
    cluster_lr: Optional[float] = typer.Option(None, help="Cluster probe learning rate."),
    grad_clip: Optional[float] = typer.Option(None, help="Gradient-norm clip."),
    anchor_chunk: Optional[int] = typer.Option(None, help="Anchors per loss chunk (memory only)."),
    ckpt_every: Optional[int] = typer.Option(None, help="Steps between checkpoints."),
    max_steps: Optional[int] = typer.Option(None, help="Stop after this many steps."),
    amp: Optional[bool] = typer.Option(None, "--amp/--no-amp", help="Autocast on CUDA (never on CPU)."),
    holdout: Optional[float] = typer.Option(None, help="Held-out fraction of training images (fixed when mining; default: the mined sets', another value is refused)."),
    select_every: Optional[int] = typer.Option(None, help="Score the run on the held-out images every N steps (0 = never); keeps best.pt."),
    select_metric: Optional[str] = typer.Option(None, help="What best.pt maximises: cluster_miou, linear_miou or labelfree."),
    rank_floor: Optional[float] = typer.Option(None, help="Label-free rule: the last point before held-out effective rank < rank_floor x frozen."),
    collapse_ratio: Optional[float] = typer.Option(None, help="Warn when effective rank < this x the frozen features'."),
    amb_weight: Optional[float] = typer.Option(None, help="Loss variant: ambiguous rows as weak negatives with this weight (0 = Eq. 8)."),
    device: Optional[str] = DEVICE,
    seed: Optional[int] = SEED,
):
    """Stage 3: train the last-block copy + head from cached tokens and mined shards (resumable)."""
    from stages import train as stage

    cfg = _resolve(TrainConfig, "train", preset, config, out=out, mined=mined, name=name,
                   epochs=epochs, tau=tau, parity_factor=parity_factor, optimizer=optimizer, lr=lr,
                   weight_decay=weight_decay, probe_lr=probe_lr, cluster_lr=cluster_lr,
                   grad_clip=grad_clip, anchor_chunk=anchor_chunk, ckpt_every=ckpt_every,
                   max_steps=max_steps, amp=amp, holdout=holdout, select_every=select_every,
                   select_metric=select_metric, rank_floor=rank_floor,
                   collapse_ratio=collapse_ratio, amb_weight=amb_weight, device=device, seed=seed)
    stage.run(cfg)


@app.command("sweep-train")
def sweep_train(
    out: Optional[str] = OUT,
    preset: Optional[str] = PRESET,
    config: Optional[str] = CONFIG,
    mined: Optional[str] = typer.Option(None, help="Base mined sets (name under out/mine/); a grid over mining thresholds mines <mined>-<label> from it."),
    name: Optional[str] = typer.Option(None, help="Sweep name: runs train/<name>-<label>/, report sweep/<name>/ (default: sweep)."),
    grid: Optional[list[str]] = typer.Option(None, "--grid", help="NAME=V1,V2 or NAME=START:STOP:STEP; repeat for a grid. NAME: a training option (tau, lr, weight_decay, amb_weight, epochs, ...) or a mining threshold (phi0, psi0, prop_iters, sigma_pos, sigma_amb)."),
    fixed: Optional[list[str]] = typer.Option(None, "--fixed", help="NAME=VALUE training option shared by every run; repeatable."),
    epochs: Optional[int] = typer.Option(None, help="Training epochs of every run."),
    max_steps: Optional[int] = typer.Option(None, help="Stop every run after this many steps."),
    select_every: Optional[int] = typer.Option(None, help="Steps between held-out scorings (must be > 0)."),
    device: Optional[str] = DEVICE,
    seed: Optional[int] = SEED,
):
    """Train a grid of runs and tabulate their held-out (training-split) scores; never reads the evaluation split."""
    from stages import sweep as stage

    cfg = resolve(SweepConfig, config_file=config, stage="sweep-train",
                  out=_default_out(preset, out), mined=mined, name=name,
                  grid=tuple(grid) if grid else None, fixed=tuple(fixed) if fixed else None,
                  preset=preset, epochs=epochs, max_steps=max_steps, select_every=select_every,
                  device=device, seed=seed)
    stage.run(cfg)


@app.command("eval")
def evaluate(
    out: Optional[str] = OUT,
    preset: Optional[str] = PRESET,
    config: Optional[str] = CONFIG,
    trained: Optional[str] = typer.Option(None, help="Training run to evaluate (name under out/train/)."),
    baseline: Optional[str] = typer.Option(None, help="'frozen' evaluates the untrained features instead."),
    crf: Optional[bool] = typer.Option(None, "--crf/--no-crf", help="Also report metrics after dense CRF."),
    crf_workers: Optional[int] = typer.Option(None, "--crf-workers", help="CRF processes (0 = all cores)."),
    workers: Optional[int] = typer.Option(None, "--workers", help="Deprecated: use --crf-workers."),
    n_show: Optional[int] = typer.Option(None, help="Images in the prediction grid PNG."),
    probes: Optional[str] = typer.Option(
        None, "--probes",
        help="refit (default): fit the cluster probe (seeded spherical k-means) and a linear "
             "probe fitted to convergence on the training split's code of the evaluated model, "
             "exactly like the frozen baseline, so trained vs frozen compares representations. "
             "trained: the probes trained alongside the network (eval/<run>-<ckpt>-trained-probes/). "
             "No effect with --baseline frozen (it always fits)."),
    checkpoint: Optional[str] = typer.Option(
        None, "--checkpoint",
        help="best (default): selected during training on held-out training images; last; or "
             "labelfree: chosen by the label-free rank rule. Writes eval/<run>-<checkpoint>/."),
    probe: Optional[str] = typer.Option(
        None, "--probe",
        help="How the cluster probe is obtained. kmeans (default): spherical k-means on "
             "the training split's code (or the trained probe with --probes trained). primaps-em: PriMaPs-EM "
             "prototypes fitted on the training split's code (batch-wise cosine k-means, then "
             "focal loss against PriMaPs pseudo-labels with an EMA teacher). eigen: neural "
             "eigenfunctions of the code's affinity kernel, discretised by k-means. Non-default "
             "probes write eval/<name>-<probe>/."),
    primaps_psi: Optional[float] = typer.Option(None, "--primaps-psi", help="--probe primaps-em: mask threshold (0.4)."),
    primaps_coverage: Optional[float] = typer.Option(None, "--primaps-coverage", help="--probe primaps-em: stop fraction (0.95)."),
    em_steps: Optional[int] = typer.Option(None, "--em-steps", help="--probe primaps-em: EM steps (2000; 0 = the k-means init alone)."),
    eigen_dim: Optional[int] = typer.Option(None, "--eigen-dim", help="--probe eigen: eigenfunctions (default: classes)."),
    eigen_steps: Optional[int] = typer.Option(None, "--eigen-steps", help="--probe eigen: NeuralEF steps (1500)."),
    eigen_kernel_power: Optional[float] = typer.Option(None, "--eigen-kernel-power", help="--probe eigen: affinity max(0, cos)^p."),
    device: Optional[str] = DEVICE,
    seed: Optional[int] = SEED,
):
    """Stage 4: Hungarian-matched cluster and linear-probe metrics, with and without CRF."""
    from stages import evaluate as stage

    cfg = _resolve(EvalConfig, "eval", preset, config, out=out, trained=trained,
                   baseline=baseline, crf=crf,
                   crf_workers=crf_workers, workers=workers,
                   n_show=n_show, probes=probes,
                   checkpoint=checkpoint, probe=probe, primaps_psi=primaps_psi,
                   primaps_coverage=primaps_coverage, em_steps=em_steps, eigen_dim=eigen_dim,
                   eigen_steps=eigen_steps, eigen_kernel_power=eigen_kernel_power, device=device,
                   seed=seed)
    stage.run(cfg)


@app.command()
def audit(
    out: Optional[str] = OUT,
    preset: Optional[str] = PRESET,
    config: Optional[str] = CONFIG,
    mined: Optional[List[str]] = typer.Option(None, "--mined", help="Mined sets to compare (repeatable)."),
    epoch: Optional[int] = typer.Option(None, help="Batch plan to audit."),
    batches: Optional[int] = typer.Option(None, help="Audit the first N batches (a sample)."),
    max_anchors: Optional[int] = typer.Option(None, help="At most this many anchors per batch."),
    sweep: Optional[List[str]] = typer.Option(None, "--sweep", help="Grid to mine and audit, e.g. phi0=0.45:0.65:0.05 (repeatable)."),
    json_out: Optional[str] = typer.Option(None, "--json", help="JSON output path (default: <out>/audit/audit.json)."),
    plot: Optional[str] = typer.Option(None, help="Fig. 1b PNG path (default: <out>/audit/fig1b.png)."),
    backend: Optional[str] = typer.Option(None, help="faiss or torch (for --sweep)."),
    device: Optional[str] = DEVICE,
    seed: Optional[int] = SEED,
):
    """Precision of mined sets against ground truth, side by side (paper Table 6, Fig. 1b)."""
    from stages import audit as stage

    cfg = _resolve(AuditConfig, "audit", preset, config, out=out,
                   mined=tuple(mined) if mined else None, epoch=epoch, batches=batches,
                   max_anchors=max_anchors, sweep=tuple(sweep) if sweep else None, json=json_out,
                   plot=plot, backend=backend, device=device, seed=seed)
    stage.run(cfg)


@app.command()
def show(
    out: Optional[str] = OUT,
    preset: Optional[str] = PRESET,
    mined: Optional[str] = typer.Option(None, help="Mined sets to look at."),
    epoch: Optional[int] = typer.Option(None, help="Batch plan."),
    batch: Optional[int] = typer.Option(None, help="Batch within the plan."),
    anchor: Optional[List[int]] = typer.Option(None, "--anchor", help="Anchor position in the shard (repeatable)."),
    random: Optional[int] = typer.Option(None, "--random", help="Show this many seeded random anchors."),
    dest: Optional[str] = typer.Option(None, help="Folder for the PNGs."),
    seed: Optional[int] = SEED,
):
    """Render anchors with their positive and ambiguous patches on every image of the batch."""
    from stages import show as stage

    cfg = _resolve(ShowConfig, "show", preset, None, out=out, mined=mined, epoch=epoch,
                   batch=batch, anchors=tuple(anchor) if anchor else None, random=random,
                   dest=dest, seed=seed)
    for p in stage.run(cfg):
        typer.echo(str(p))


def main() -> None:
    """Entry point: clear one-line errors for bad input, exit code 2."""
    from pipeline.executor import StageInterrupted

    from pipeline.integrity import disk_full, is_disk_full

    try:
        app()
    except (ValueError, FileNotFoundError) as exc:
        typer.echo(f"error: {exc}", err=True)
        sys.exit(2)
    except OSError as exc:  # not caught where it happened: still name the path, no traceback
        if is_disk_full(exc):
            typer.echo(f"error: {disk_full(exc.filename or '.')}", err=True)
        elif isinstance(exc, PermissionError) or exc.errno == errno.EROFS:
            typer.echo(f"error: cannot write {exc.filename or 'an output file'}: {exc.strerror}; "
                       "use an --out you can write to", err=True)
        else:
            raise
        sys.exit(2)
    except (StageInterrupted, KeyboardInterrupt) as exc:
        typer.echo(f"interrupted: {exc or 'finished units are kept; rerun the same command to resume'}", err=True)
        sys.exit(130)


if __name__ == "__main__":
    main()
