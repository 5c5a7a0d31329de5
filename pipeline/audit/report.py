"""Audit: precision of mined sets against ground truth (paper Table 6, Fig. 1b), and sweeps.

For one or more mined runs `<out>/mine/<name>/` made on the same batch plan and anchors, the
first `batches` batches of plan `epoch` are audited on a seeded sample of at most
`max_anchors` anchors per batch (the same sample for every run). Sets are recovered exactly
from the shards; patch labels come from the feature cache (docs/method.md §8 rules, see
pipeline/audit/metrics.py). `--sweep` mines the same sampled anchors in memory for every point of a
grid of (phi0, psi0, prop_iters, sigma_pos, sigma_amb) and audits each, so thresholds can be
chosen for a new backbone on a small labelled training sample.

Writes `<out>/audit/<name>/audit.json` (or `--json`; <name> = --name or the mined sets joined by
'+'), the Fig. 1b PNG (`--plot`, default beside it: `fig1b.png`) and, for a sweep, a trade-off PNG
(`sweep.png`). An earlier audit of other settings in that folder is kept: the stage refuses.
"""

from __future__ import annotations

import dataclasses
import json
import logging
from dataclasses import dataclass
from pathlib import Path
from typing import Any, Sequence

import numpy as np

from pipeline.artifacts.features import FeatureStore
from pipeline.artifacts.layout import RunLayout
from pipeline.artifacts.mined import MinedSets, MiningPlan
from pipeline.audit.metrics import (
    AnchorStats,
    anchor_stats,
    audit_summary,
    batch_stats,
    concat,
    fig1b_curve,
    format_table,
    parse_sweep,
    sample_positions,
    subset_shard,
    sweep_points,
)
from pipeline.cache.integrity import hold_lock, releases_locks, require_device
from pipeline.cache.store import atomic_write_json, code_version
from pipeline.config.options import parse_fraction
from pipeline.config.presets import PRESETS
from pipeline.config.resolve import preset_values, to_dict
from pipeline.config.schema import AuditConfig, MineConfig
from pipeline.executor import timed

log = logging.getLogger("ppap.audit")


@dataclass
class PlannedBatch:
    batch: int
    images: np.ndarray  # (B,) crop indices into the train split
    anchors: np.ndarray  # (M,) rows of F
    positions: np.ndarray  # audited anchor positions (0..M-1), seeded sample


@dataclass
class SweepPoint:
    label: str  # e.g. "phi0=0.55 psi0=0.15"
    params: dict[str, float | int]  # the swept values
    config: MineConfig  # base config with the swept values


@dataclass
class Sweep:
    base: MineConfig
    grid: dict[str, list[float | int]]
    points: list[SweepPoint]
    skipped: list[dict[str, Any]]  # invalid grid points and why


# ---------------------------------------------------------------------------------------------
# inputs
# ---------------------------------------------------------------------------------------------


def _plan_identity(run: MinedSets) -> dict[str, Any]:
    c = run.config
    frac = parse_fraction(c["anchors_per_image"]) if "anchors_per_image" in c else None
    return {"seed": c.get("seed"), "batch_size": c.get("batch_size"), "anchor fraction": frac,
            "holdout": c.get("holdout", 0.0)}


def check_compatible(runs: Sequence[MinedSets]) -> None:
    """Refuse to compare runs whose batch plans or anchors differ."""
    first, ref = runs[0], _plan_identity(runs[0])
    for r in runs[1:]:
        other = _plan_identity(r)
        diffs = [f"{k}: {first.name}={ref[k]!r}, {r.name}={other[k]!r}" for k in ref if ref[k] != other[k]]
        if diffs:
            raise ValueError(
                f"mined runs {first.name!r} and {r.name!r} were mined on different batches/anchors ("
                + "; ".join(diffs) + "); audit them separately or re-mine with the same "
                "--seed, --batch-size, --anchors-per-image and --holdout"
            )


def batch_patch_labels(store: FeatureStore, images: np.ndarray) -> np.ndarray:
    """Patch labels of a batch in F's row order b*h*w + y*w + x (int64, -1 = ignore)."""
    arr = store.split("train")["patch_labels"]
    images = np.asarray(images, np.int64)
    order = np.argsort(images, kind="stable")
    lab = arr.get_orthogonal_selection((images[order], slice(None), slice(None)))
    out = np.empty_like(lab)
    out[order] = lab
    return out.reshape(-1).astype(np.int64)


def _positions(cfg: AuditConfig, batch: int, m: int) -> np.ndarray:
    rng = np.random.default_rng(np.random.SeedSequence([cfg.seed, cfg.epoch, batch]))
    return sample_positions(m, cfg.max_anchors, rng)


def _plan_from_shards(cfg: AuditConfig, runs: Sequence[MinedSets],
                      shard_maps: dict[str, dict[int, Path]]) -> list[PlannedBatch]:
    from pipeline.mining.shards import read_shard

    common = sorted(set.intersection(*(set(shard_maps[r.name]) for r in runs)))
    if not common:
        raise ValueError(
            f"no batch of epoch {cfg.epoch} is finished in every one of {[r.name for r in runs]}; "
            "finish mining (rerun `ppap-pipe mine`) first"
        )
    chosen = common[: cfg.batches]
    if len(chosen) < cfg.batches:
        log.warning("audit: only %d finished batch(es) common to all runs (asked for %d)",
                    len(chosen), cfg.batches)
    plan = []
    for k in chosen:
        sh = read_shard(shard_maps[runs[0].name][k])
        anchors = np.asarray(sh.anchors, np.int64)
        plan.append(PlannedBatch(k, np.asarray(sh.images, np.int64), anchors,
                                 _positions(cfg, k, anchors.shape[0])))
    return plan


def _plan_from_batching(cfg: AuditConfig, store: FeatureStore, base: MineConfig) -> list[PlannedBatch]:
    """The batches the mine stage would make with `base` (used when no mined run is given)."""
    from pipeline.mining.batching import anchor_rows

    plan = MiningPlan.for_config(store, base)
    n_items = len(plan.items)
    if n_items == 0:
        raise ValueError(f"the feature cache {store.path} has no finished training crops; "
                         "rerun `ppap-pipe features`")
    if base.batch_size > n_items:
        log.info("sweep: batch_size %d > %d training crops; using %d", base.batch_size, n_items, n_items)
        base = dataclasses.replace(base, batch_size=n_items)
        plan = dataclasses.replace(plan, batch_size=n_items)  # same crops, one batch
    h, w = store.grid("train")
    out = []
    for k in range(min(cfg.batches, plan.n_batches(cfg.epoch))):
        images = plan.batch_images(cfg.epoch, k)
        anchors = anchor_rows(base.seed, cfg.epoch, k, len(images), h * w, base.anchor_fraction)
        out.append(PlannedBatch(k, np.asarray(images, np.int64), anchors, _positions(cfg, k, len(anchors))))
    return out


def _matching_preset(manifest: dict[str, Any]) -> str | None:
    """The one preset made for this cache's dataset and backbone, if exactly one is."""
    hits = [n for n, p in PRESETS.items()
            if p.get("features", {}).get("dataset") == manifest.get("dataset")
            and p.get("features", {}).get("backbone") == manifest.get("backbone")]
    return hits[0] if len(hits) == 1 else None


def sweep_setup(cfg: AuditConfig, runs: Sequence[MinedSets], manifest: dict[str, Any]) -> Sweep:
    """Parse the grid; base parameters from the first mined ppap/p0 run, else the cache's preset."""
    grid = parse_sweep(cfg.sweep)
    base_run = next((r for r in runs if r.criterion in ("ppap", "p0")), None)
    if base_run is not None:
        base = base_run.mine_config()
        log.info("sweep: base parameters from mined run %r", base_run.name)
    else:
        preset = _matching_preset(manifest)
        values = preset_values(preset, MineConfig) if preset else {}
        base = MineConfig(**{**values, "seed": cfg.seed})
        log.info("sweep: base parameters from %s (no mined ppap/p0 run given)",
                 f"preset {preset!r}" if preset else "the defaults")
    base = dataclasses.replace(base, criterion=base.criterion if base.criterion in ("ppap", "p0") else "ppap",
                               backend=cfg.backend, device=cfg.device)
    sweep = Sweep(base, grid, [], [])
    for params in sweep_points(grid):
        label = " ".join(f"{k}={v:g}" for k, v in params.items())
        try:
            sweep.points.append(SweepPoint(label, params, dataclasses.replace(base, **params)))
        except ValueError as exc:  # e.g. psi0 >= phi0
            sweep.skipped.append({"params": params, "reason": str(exc)})
            log.info("sweep: skipping %s (%s)", label, exc)
    if not sweep.points:
        raise ValueError(f"every sweep point is invalid: {sweep.skipped[0]['reason']}")
    return sweep


def collect(
    cfg: AuditConfig, store: FeatureStore, runs: Sequence[MinedSets],
    shard_maps: dict[str, dict[int, Path]], plan: Sequence[PlannedBatch], sweep: Sweep | None,
) -> tuple[dict[str, AnchorStats], list[AnchorStats]]:
    """Per-anchor counts of every run and every sweep point over the planned batches."""
    from pipeline.mining.batch import mine_batch
    from pipeline.mining.recover import export_batch
    from pipeline.mining.sets import MineParams
    from pipeline.mining.shards import read_shard

    run_stats: dict[str, list[AnchorStats]] = {r.name: [] for r in runs}
    points = sweep.points if sweep else []
    sweep_stats: list[list[AnchorStats]] = [[] for _ in points]
    for pb in plan:
        F = store.mining_features(pb.images)
        labels = batch_patch_labels(store, pb.images)
        for r in runs:
            sh = read_shard(shard_maps[r.name][pb.batch])
            if not (np.array_equal(sh.images, pb.images) and np.array_equal(sh.anchors, pb.anchors)):
                raise ValueError(
                    f"batch {pb.batch} of {r.name!r} holds other images/anchors than {runs[0].name!r}; "
                    "the runs were mined on different batches (or feature caches) and cannot be "
                    "compared: audit them separately"
                )
            exported = export_batch(F, subset_shard(sh, pb.positions), patch_labels=labels)
            run_stats[r.name].append(batch_stats(exported))
        sub = pb.anchors[pb.positions]
        for i, pt in enumerate(points):
            mc = pt.config
            mb = mine_batch(F, sub, mc.criterion, MineParams.from_config(mc), backend=cfg.backend,
                            device=cfg.device, mem_budget_mb=mc.mem_budget_mb, band=mc.band)
            sweep_stats[i].append(anchor_stats(sub, mb.pos_indptr, mb.pos_indices, mb.amb_indptr,
                                               mb.amb_indices, labels))
        log.info("audit: batch %d (%d of %d anchors)", pb.batch, len(pb.positions), len(pb.anchors))
    return ({k: concat(v) for k, v in run_stats.items()}, [concat(v) for v in sweep_stats])


# ---------------------------------------------------------------------------------------------
# the stage
# ---------------------------------------------------------------------------------------------


@releases_locks
def run(cfg: AuditConfig) -> dict[str, Any]:
    """Audit mined runs (and/or a sweep); print the table, write JSON and PNGs."""
    require_device(cfg.device)
    out = Path(cfg.out)
    store = FeatureStore(out)
    if not store.has_labels or "patch_labels" not in store.split("train"):
        raise ValueError(
            f"the feature cache {store.path} has no labels; the audit compares mined sets with "
            "ground truth, so cache a labelled dataset (or a labelled subset) first"
        )
    log.info("audit: out=%s epoch=%d batches=%d max_anchors=%s seed=%d code=%s", out, cfg.epoch,
             cfg.batches, cfg.max_anchors, cfg.seed, code_version())

    runs: list[MinedSets] = []
    shard_maps: dict[str, dict[int, Path]] = {}  # run -> batch -> shard of the audited plan
    for name in dict.fromkeys(cfg.mined):
        if cfg.sweep and not MinedSets(out, name).exists():
            log.warning("audit: mined sets %r not found; sweeping without them", name)
            continue
        sets = MinedSets.open(store, name)
        shard_maps[name] = sets.finished_shards(cfg.epoch)
        runs.append(sets)
    if runs:
        check_compatible(runs)
    sweep = sweep_setup(cfg, runs, store.manifest) if cfg.sweep else None
    plan = (_plan_from_shards(cfg, runs, shard_maps) if runs
            else _plan_from_batching(cfg, store, sweep.base))
    with timed(f"audit of {len(plan)} batch(es)", log):
        run_stats, sweep_stats = collect(cfg, store, runs, shard_maps, plan, sweep)

    def result(s: AnchorStats) -> dict[str, Any]:
        return {**audit_summary(s, num_classes=store.num_classes, class_names=store.class_names),
                "curve": fig1b_curve(s)}

    def settings(d: dict[str, Any]) -> dict[str, Any]:  # where the run lives is not a setting
        return {k: v for k, v in d.items() if k != "out"}

    run_results = [{"name": r.name, "criterion": r.criterion, "config": settings(r.config),
                    **result(run_stats[r.name])} for r in runs]
    sweep_results = [{"name": pt.label, "criterion": pt.config.criterion, "params": pt.params,
                      "config": settings(to_dict(pt.config)), **result(st)}
                     for pt, st in zip(sweep.points if sweep else [], sweep_stats)]

    report: dict[str, Any] = {
        "audit_config": {**to_dict(cfg), "out": "."},  # paths relative to the run directory
        "features_fingerprint": store.manifest.get("fingerprint"),
        "code_version": code_version(),
        "epoch": cfg.epoch,
        "batches": [pb.batch for pb in plan],
        "anchors_audited": [int(len(pb.positions)) for pb in plan],
        "anchors_in_batches": [int(len(pb.anchors)) for pb in plan],
        "percent_units": "percentages are in [0, 100]; None = undefined (nothing to average)",
        "runs": run_results,
    }
    if sweep:
        report.update(sweep=sweep_results, sweep_grid=sweep.grid,
                      sweep_base=settings(to_dict(sweep.base)),
                      sweep_skipped=sweep.skipped)

    audit_dir = RunLayout(out).audit
    if run_results:
        print(f"Audit of epoch {cfg.epoch}, batches {report['batches']} "
              f"({sum(report['anchors_audited'])} anchors sampled):")
        print(format_table(run_results))
    if sweep:
        if sweep.skipped:
            print(f"sweep: skipped {len(sweep.skipped)} invalid point(s) (e.g. psi0 >= phi0)")
        print(f"Sweep of {sweep_results[0]['criterion']} on the same anchors:")
        print(format_table(sweep_results))

    json_path = Path(cfg.json) if cfg.json else audit_dir / cfg.label / "audit.json"
    hold_lock(json_path.parent, "audit output")
    _refuse_other_audit(json_path, cfg)
    atomic_write_json(json_path, report)
    plot_path = Path(cfg.plot) if cfg.plot else json_path.with_name("fig1b.png")
    report["json"] = str(json_path)
    report["plot"] = None
    title = _title(cfg, store, report)
    if run_results:
        plot_fig1b(run_results, plot_path, title=title)
        report["plot"] = str(plot_path)
    if sweep:
        sweep_png = plot_path.with_name("sweep.png" if cfg.plot is None else plot_path.stem + "_sweep.png")
        plot_sweep(sweep_results, sweep.grid, sweep_png, title=title)
        report["sweep_plot"] = str(sweep_png)
    written = [str(report[k]) for k in ("json", "plot", "sweep_plot") if report.get(k)]
    log.info("audit: wrote %s", ", ".join(written))
    return report


# settings that only say where results go: an audit differing in these alone is the same audit
_WHERE = ("out", "json", "plot", "name", "device", "backend")


def _refuse_other_audit(json_path: Path, cfg: AuditConfig) -> None:
    """An earlier audit.json of other settings is never overwritten: name the way out."""
    if not json_path.exists():
        return
    try:
        old = json.loads(json_path.read_text()).get("audit_config", {})
    except (OSError, ValueError):
        old = None  # unreadable: nothing worth keeping
    if old is None:
        return
    new = to_dict(cfg)
    diff = sorted(k for k in set(old) | set(new)
                  if k not in _WHERE and _norm(old.get(k)) != _norm(new.get(k)))
    if diff:
        raise ValueError(
            f"{json_path} holds an audit with other settings ({', '.join(f'{k}={old.get(k)!r}' for k in diff)}; "
            f"now {', '.join(f'{k}={new.get(k)!r}' for k in diff)}); it is kept: give this one "
            "another --name (or --json/--plot), or delete that folder to redo it")


def _norm(v: Any) -> Any:
    return list(v) if isinstance(v, (list, tuple)) else v


def _title(cfg: AuditConfig, store: FeatureStore, report: dict[str, Any]) -> str:
    """Names the run directory, the audited sets and the sample, for every figure."""
    b = report["batches"]
    batches = f"batch {b[0]}" if len(b) == 1 else f"batches {b[0]}-{b[-1]}"
    what = ", ".join(cfg.mined) if cfg.mined else "no mined set"
    if cfg.sweep:
        what += f"; sweep {' '.join(cfg.sweep)}"
    return (f"{Path(cfg.out).resolve().name} ({store.manifest.get('dataset')}, "
            f"{store.manifest.get('backbone')}): {what}\n"
            f"plan {cfg.epoch}, {batches}, {sum(report['anchors_audited'])} anchors")


def _legend(r: dict[str, Any]) -> str:
    c = r.get("config") or {}
    if c.get("criterion") in ("ppap", "p0"):
        return f"{r['name']} ({c['criterion']} {c.get('phi0')}/{c.get('psi0')})"
    return f"{r['name']} ({c.get('criterion', r.get('criterion'))})"


# ---------------------------------------------------------------------------------------------
# figures
# ---------------------------------------------------------------------------------------------


def _save(fig, path: Path) -> None:
    path.parent.mkdir(parents=True, exist_ok=True)
    tmp = path.with_name(f".{path.name}.tmp.png")
    fig.savefig(tmp, dpi=fig.dpi)
    tmp.replace(path)


def plot_fig1b(results: Sequence[dict[str, Any]], path: str | Path, title: str = "") -> Path:
    """Bars: mean |P| of the bottom q% anchors (sorted by |P|); lines: their precision."""
    from matplotlib.backends.backend_agg import FigureCanvasAgg
    from matplotlib.figure import Figure

    fig = Figure(figsize=(9, 4.5), dpi=100)
    FigureCanvasAgg(fig)
    ax = fig.add_subplot(1, 1, 1)
    ax2 = ax.twinx()
    n = len(results)
    width = 0.8 / max(n, 1)
    colours = [f"C{i % 10}" for i in range(n)]
    qs = results[0]["curve"]["q"] if results else []
    x = np.arange(len(qs), dtype=float)
    for i, (r, col) in enumerate(zip(results, colours)):
        c = r["curve"]
        mean_pos = [np.nan if v is None else v for v in c["mean_pos"]]
        prec = [np.nan if v is None else v for v in c["precision"]]
        ax.bar(x - 0.4 + width * (i + 0.5), mean_pos, width=width, color=col, alpha=0.45,
               label=f"{_legend(r)}: mean |P|")
        ax2.plot(x, prec, color=col, marker="o", markersize=3, label=f"{_legend(r)}: precision")
    ax.set_xticks(x)
    ax.set_xticklabels([f"{q:g}" for q in qs], fontsize=8)
    ax.set_xlabel("bottom q% of anchors, sorted by |P|")
    ax.set_ylabel("mean |P| (bars)")
    ax2.set_ylabel("precision of P, % (lines)")
    ax2.set_ylim(0, 105)
    h1, l1 = ax.get_legend_handles_labels()
    h2, l2 = ax2.get_legend_handles_labels()
    ax.legend(h1 + h2, l1 + l2, fontsize=8, loc="upper center", bbox_to_anchor=(0.5, -0.14),
              ncol=min(4, 2 * max(n, 1)), frameon=False)
    ax.set_title("Positives and their precision by anchor (paper Fig. 1b)"
                 + (f"\n{title}" if title else ""), fontsize=9)
    fig.tight_layout()
    path = Path(path)
    _save(fig, path)
    return path


def plot_sweep(results: Sequence[dict[str, Any]], grid: dict[str, list], path: str | Path,
               title: str = "") -> Path:
    """Precision of P and same-class share of N against mean |P|, one line per colour value."""
    from matplotlib import colormaps
    from matplotlib.backends.backend_agg import FigureCanvasAgg
    from matplotlib.figure import Figure

    names = list(grid)
    key = "psi0" if "psi0" in grid else names[0]
    values = sorted({r["params"][key] for r in results})
    cmap = colormaps["viridis"]
    colour = {v: cmap(i / max(len(values) - 1, 1)) for i, v in enumerate(values)}
    fig = Figure(figsize=(11, 4.5), dpi=100)
    FigureCanvasAgg(fig)
    axes = fig.subplots(1, 2)
    for ax, ykey, ylabel in ((axes[0], "tp_in_p", "% TP in P (precision)"),
                             (axes[1], "fp_in_n", "% same-class in N (FP in N)")):
        for v in values:
            pts = sorted(((r["n_pos"], r[ykey], r) for r in results
                          if r["params"][key] == v and r["n_pos"] is not None and r[ykey] is not None),
                         key=lambda t: (t[0], t[1]))
            if not pts:
                continue
            xs = [p[0] for p in pts]
            ys = [p[1] for p in pts]
            ax.plot(xs, ys, marker="o", color=colour[v], label=f"{key}={v:g}")
            others = [n for n in names if n != key]
            for xv, yv, r in pts:
                if others:
                    ax.annotate(" ".join(f"{n}={r['params'][n]:g}" for n in others), (xv, yv),
                                fontsize=6, xytext=(3, 3), textcoords="offset points")
        xs_all = [r["n_pos"] for r in results if r["n_pos"] is not None]
        if xs_all and min(xs_all) > 0:
            ax.set_xscale("log")
        else:
            ax.set_xscale("symlog", linthresh=1.0)
        ax.set_xlabel("mean |P|")
        ax.set_ylabel(ylabel)
        ax.grid(alpha=0.3)
    if axes[0].get_legend_handles_labels()[0]:
        axes[0].legend(fontsize=8)
    fig.suptitle("Threshold sweep: more positives vs precision (choose on training data)"
                 + (f"\n{title}" if title else ""), fontsize=10)
    fig.tight_layout()
    path = Path(path)
    _save(fig, path)
    return path
