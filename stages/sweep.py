"""`ppap-pipe sweep-train`: a grid of training runs, scored on held-out *training* images only.

Every grid point is an ordinary training run (`<out>/train/<sweep>-<label>/`, resumable, with
its selection records); grid names may be training options (tau, lr, weight_decay, amb_weight,
epochs, ...) or mining thresholds (phi0, psi0, prop_iters, sigma_pos, sigma_amb), in which case
the mined sets are derived from the base `--mined` run with those values changed (same seed,
batches, anchors and holdout) and mined first as `<mined>-<label>` when they do not exist yet.
Nothing here reads the evaluation split.

Writes `<out>/sweep/<sweep>/`: results.json (every run's config and selection records),
table.md (one row per run: held-out cluster/linear mIoU of the best point and when, the
last point, the label-free point, rank ratios) and sweep.png (held-out cluster mIoU and
effective-rank ratio against steps, one line per run).
"""

from __future__ import annotations

import dataclasses
import logging
from pathlib import Path
from typing import Any

from pipeline.artifacts.layout import RunLayout
from pipeline.artifacts.mined import MinedSets
from pipeline.artifacts.training import TrainRun
from pipeline.audit import SWEEP_MINE_PARAMS, parse_sweep, sweep_points
from pipeline.config import SweepConfig, TrainConfig, resolve, to_dict
from pipeline.store import atomic_write_bytes, atomic_write_json

log = logging.getLogger("ppap.sweep")

MINE_PARAMS = SWEEP_MINE_PARAMS  # mining thresholds a grid may change
_TRAIN_SKIP = {"out", "mined", "name", "holdout", "device", "ckpt_every", "max_steps",
               "select_every", "select_metric", "rank_floor", "collapse_ratio", "anchor_chunk",
               "amp"}


def train_params() -> dict[str, type]:
    """Training options a grid may name, with their types."""
    out: dict[str, type] = {}
    for f in dataclasses.fields(TrainConfig):
        if f.name in _TRAIN_SKIP:
            continue
        t = {"float": float, "int": int}.get(str(f.type).split(" ")[0])
        if t is not None:
            out[f.name] = t
    return out


def grid_params() -> dict[str, type]:
    return {**MINE_PARAMS, **train_params()}


def _fmt(v: float | int) -> str:
    return f"{v:g}"


def point_label(point: dict[str, Any]) -> str:
    """'tau0.1_lr0.0001' — safe as a directory name, stable for a point."""
    return "_".join(f"{k}{_fmt(v)}" for k, v in point.items())


def _parse_fixed(specs: tuple[str, ...]) -> dict[str, Any]:
    params = train_params()
    out: dict[str, Any] = {}
    for spec in specs:
        name, sep, text = spec.partition("=")
        name = name.strip()
        if not sep or name not in params:
            raise ValueError(f"--fixed {spec!r}: write NAME=VALUE with NAME one of "
                             f"{', '.join(sorted(params))}")
        try:
            out[name] = params[name](text.strip())
        except ValueError:
            raise ValueError(f"--fixed {spec!r}: {text!r} is not a valid {params[name].__name__}") from None
    return out


def mined_for(cfg: SweepConfig, mine_values: dict[str, Any]) -> str:
    """Name of the mined sets for these mining values; mines them from the base run if needed."""
    if not mine_values:
        return cfg.mined
    from stages import mine as mine_stage

    base = MinedSets(cfg.out, cfg.mined)
    if not base.config_path.is_file():
        raise ValueError(f"the base mined sets {base.dir} do not exist; run `ppap-pipe mine --out "
                         f"{cfg.out} --name {cfg.mined}` first (the grid changes its thresholds)")
    if base.criterion not in ("ppap", "p0"):
        raise ValueError(f"the grid changes mining thresholds, but {cfg.mined!r} was mined with "
                         f"criterion {base.criterion!r}; give a ppap or p0 run as --mined")
    name = f"{cfg.mined}-{point_label(mine_values)}"
    mcfg = base.mine_config(**mine_values, name=name, out=cfg.out, device=cfg.device, workers=0,
                            scheduler=None)
    mine_stage.run(mcfg)  # resumable: finished shards are skipped
    return name


def run(cfg: SweepConfig) -> dict[str, Any]:
    """Train every grid point (resuming finished/unfinished runs) and tabulate held-out scores."""
    from stages import train as train_stage

    grid = parse_sweep(cfg.grid, params=grid_params())
    if not grid:
        raise ValueError("give at least one --grid NAME=V1,V2 (e.g. --grid tau=0.1,0.2)")
    fixed = _parse_fixed(cfg.fixed)
    points = sweep_points(grid)
    base = resolve(TrainConfig, preset=cfg.preset, config_file=cfg.config, stage="train",
                   out=cfg.out, mined=cfg.mined, device=cfg.device, seed=cfg.seed,
                   select_every=cfg.select_every, epochs=cfg.epochs, max_steps=cfg.max_steps,
                   **fixed)
    if base.select_every <= 0:
        raise ValueError("select_every=0: a sweep needs selection points; pass --select-every N")
    log.info("sweep %s: %d runs over %s", cfg.name, len(points),
             ", ".join(f"{k}={v}" for k, v in grid.items()))
    results = []
    for i, point in enumerate(points):
        mine_values = {k: v for k, v in point.items() if k in MINE_PARAMS}
        train_values = {k: v for k, v in point.items() if k not in MINE_PARAMS}
        mined = mined_for(cfg, mine_values)
        label = point_label(point)
        tcfg = dataclasses.replace(base, mined=mined, name=f"{cfg.name}-{label}", **train_values)
        log.info("sweep %s: run %d/%d %s", cfg.name, i + 1, len(points), label)
        summary = train_stage.run(tcfg)
        records = TrainRun(cfg.out, tcfg.run_name).selection_records()
        results.append({"label": label, "point": point, "mined": mined, "run": tcfg.run_name,
                        "config": to_dict(tcfg), "records": records,
                        "selection": summary.get("selection")})
    dest = RunLayout(cfg.out).sweep(cfg.name)
    report = {"name": cfg.name, "grid": grid, "fixed": fixed, "base": to_dict(base),
              "runs": results}
    atomic_write_json(dest / "results.json", report)
    table = format_table(results, list(grid))
    atomic_write_bytes(dest / "table.md", (table + "\n").encode())
    plot_sweep(results, dest / "sweep.png")
    log.info("sweep %s: wrote %s\n%s", cfg.name, dest, table)
    return report


def summarise_run(records: list[dict[str, Any]], rank_floor: float) -> dict[str, Any]:
    """Best (by held-out cluster mIoU), last and label-free points of one run's records."""
    from pipeline.selection import best_choice, labelfree_choice

    if not records:
        return {}
    metric = "cluster_miou" if "cluster_miou" in records[0] else "erank"
    bi = best_choice(records, metric)
    li = labelfree_choice(records, rank_floor)
    return {"frozen": records[0], "best": records[bi], "last": records[-1],
            "labelfree": records[li]}


def format_table(results: list[dict[str, Any]], names: list[str]) -> str:
    """Markdown: one row per run, plus the frozen reference (step 0 of the first run)."""
    cols = names + ["best cluster mIoU (step)", "linear mIoU @best", "rank ratio @best",
                    "last cluster mIoU", "last rank ratio", "label-free step", "cluster mIoU @label-free"]
    lines = ["| " + " | ".join(cols) + " |", "|" + "---|" * len(cols)]

    def num(r: dict[str, Any] | None, k: str, fmt: str = "{:.1f}") -> str:
        v = None if r is None else r.get(k)
        return "—" if v is None else fmt.format(v)

    frozen = None
    for res in results:
        s = summarise_run(res["records"], res["config"].get("rank_floor", 0.9))
        if not s:
            lines.append("| " + " | ".join([_fmt(res["point"][n]) for n in names] + ["—"] * 7) + " |")
            continue
        frozen = frozen or s["frozen"]
        b, last, lf = s["best"], s["last"], s["labelfree"]
        row = [_fmt(res["point"][n]) for n in names] + [
            f"{num(b, 'cluster_miou')} ({b['step']})", num(b, "linear_miou"),
            num(b, "erank_ratio", "{:.2f}"), num(last, "cluster_miou"),
            num(last, "erank_ratio", "{:.2f}"), str(lf["step"]), num(lf, "cluster_miou")]
        lines.append("| " + " | ".join(row) + " |")
    if frozen is not None:
        lines.append("| " + " | ".join(["frozen"] + [""] * (len(names) - 1) + [
            f"{num(frozen, 'cluster_miou')} (0)", num(frozen, "linear_miou"), "1.00",
            "", "", "", ""]) + " |")
    return "\n".join(lines)


def plot_sweep(results: list[dict[str, Any]], path: Path) -> Path:
    from matplotlib.backends.backend_agg import FigureCanvasAgg
    from matplotlib.figure import Figure

    fig = Figure(figsize=(12, 4.5), dpi=100, layout="constrained")
    FigureCanvasAgg(fig)
    ax1, ax2 = fig.subplots(1, 2)
    for res in results:
        recs = res["records"]
        if not recs:
            continue
        steps = [r["step"] for r in recs]
        key = "cluster_miou" if "cluster_miou" in recs[0] else "erank"
        ax1.plot(steps, [r.get(key) for r in recs], marker=".", label=res["label"])
        ax2.plot(steps, [r.get("erank_ratio") for r in recs], marker=".", label=res["label"])
    ax1.set_xlabel("step")
    ax1.set_ylabel("held-out cluster mIoU (patch level)")
    ax2.set_xlabel("step")
    ax2.set_ylabel("held-out effective rank / frozen")
    ax2.legend(fontsize=6, ncol=2)
    import io

    buf = io.BytesIO()
    fig.savefig(buf, format="png")
    atomic_write_bytes(path, buf.getvalue())
    return path
