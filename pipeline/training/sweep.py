"""`ppap-pipe sweep-train`: a grid of training runs, scored on held-out *training* images only.

Every grid point is an ordinary training run (`<out>/train/<sweep>-<label>/`, resumable, with
its selection records); grid names may be training options (tau, lr, weight_decay, amb_weight,
epochs, ...) or mining thresholds (phi0, psi0, prop_iters, sigma_pos, sigma_amb), in which case
the mined sets are derived from the base `--mined` run with those values changed (same seed,
batches, anchors and holdout) and mined first as `<mined>-<label>` when they do not exist yet.
Nothing here reads the evaluation split.

`--seeds N` trains every grid point N times (seed i: training seed seed+i on sets mined with
the base run's seed + i, `<mined>[-<label>]-seed<s>`, mined first when missing), so each
point's figures are a mean ± std over seeds.

Writes `<out>/sweep/<sweep>/`: results.json (every run's config, seed and selection records),
table.md (one row per grid point: held-out cluster/linear mIoU of the best point and when, the
last point, the label-free point, rank ratios; mean ± std over its seeds) and sweep.png
(held-out cluster mIoU and effective-rank ratio against steps, one line per grid point with a
± std band over seeds, the frozen reference dashed).
"""

from __future__ import annotations

import dataclasses
import json
import logging
from typing import Any

from pipeline.artifacts.layout import RunLayout
from pipeline.artifacts.mined import MinedSets
from pipeline.artifacts.training import TrainRun
from pipeline.audit.metrics import SWEEP_MINE_PARAMS, parse_sweep, sweep_points
from pipeline.cache.store import atomic_write_bytes, atomic_write_json
from pipeline.config.resolve import resolve, to_dict
from pipeline.config.schema import SweepConfig, TrainConfig
from pipeline.evaluation.plots import sweep_png
from pipeline.evaluation.seeds import seed_list, spread

log = logging.getLogger("ppap.sweep")

MINE_PARAMS = SWEEP_MINE_PARAMS  # mining thresholds a grid may change
_TRAIN_SKIP = {"out", "mined", "name", "holdout", "device", "ckpt_every", "max_steps",
               "select_every", "select_metric", "rank_floor", "collapse_ratio", "anchor_chunk",
               "amp"}



def _settings(cfg: TrainConfig) -> dict:
    """A run's config for results.json, without where the run directory is (it may move)."""
    return {k: v for k, v in to_dict(cfg).items() if k != "out"}

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


def mined_for(cfg: SweepConfig, mine_values: dict[str, Any], offset: int = 0) -> str:
    """Name of the mined sets for these mining values and seed offset; mines them from the
    base run (seed + `offset`, everything else as the base) when they do not exist yet."""
    if not mine_values and not offset:
        return cfg.mined
    from pipeline.mining import mine as mine_stage

    base = MinedSets(cfg.out, cfg.mined)
    if not base.config_path.is_file():
        raise ValueError(f"the base mined sets {base.dir} do not exist; run `ppap-pipe mine --out "
                         f"{cfg.out} --name {cfg.mined}` first (the grid derives its sets from it)")
    if mine_values and base.criterion not in ("ppap", "p0"):
        raise ValueError(f"the grid changes mining thresholds, but {cfg.mined!r} was mined with "
                         f"criterion {base.criterion!r}; give a ppap or p0 run as --mined")
    changes = dict(mine_values)
    name = f"{cfg.mined}-{point_label(mine_values)}" if mine_values else cfg.mined
    if offset:
        changes["seed"] = base.mine_config().seed + offset
        name += f"-seed{changes['seed']}"
    mcfg = base.mine_config(**changes, name=name, out=cfg.out, device=cfg.device, workers=0,
                            scheduler=None)
    mine_stage.run(mcfg)  # resumable: finished shards are skipped
    return name


def run(cfg: SweepConfig) -> dict[str, Any]:
    """Train every grid point over `cfg.seeds` seeds (resuming finished/unfinished runs) and
    tabulate held-out scores.

    Seed i (0-based) of a point trains with seed cfg.seed + i on mined sets of mining seed
    base + i: seed 0 uses the base mined sets (or the point's thresholds mined from them), the
    others mine `<mined>[-<label>]-seed<s>` first (new batches, anchors and holdout), so the
    spread covers everything a seed decides.
    """
    from pipeline.training import train as train_stage

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
    seeds = seed_list(cfg.seed, cfg.seeds)
    log.info("sweep %s: %d runs (%d points x %d seeds) over %s", cfg.name,
             len(points) * len(seeds), len(points), len(seeds),
             ", ".join(f"{k}={v}" for k, v in grid.items()))
    results = []
    for i, point in enumerate(points):
        mine_values = {k: v for k, v in point.items() if k in MINE_PARAMS}
        train_values = {k: v for k, v in point.items() if k not in MINE_PARAMS}
        label = point_label(point)
        for offset, seed in enumerate(seeds):
            mined = mined_for(cfg, mine_values, offset)
            name = f"{cfg.name}-{label}" + (f"-seed{seed}" if offset else "")
            tcfg = dataclasses.replace(base, mined=mined, name=name, seed=seed, **train_values)
            log.info("sweep %s: point %d/%d %s, seed %d", cfg.name, i + 1, len(points), label, seed)
            summary = train_stage.run(tcfg)
            records = TrainRun(cfg.out, tcfg.run_name).selection_records()
            results.append({"label": label, "point": point, "seed": seed, "mined": mined,
                            "run": tcfg.run_name, "config": _settings(tcfg), "records": records,
                            "selection": summary.get("selection")})
    dest = RunLayout(cfg.out).sweep(cfg.name)
    report = {"name": cfg.name, "grid": grid, "fixed": fixed, "seeds": seeds,
              "base": _settings(base), "runs": results}
    atomic_write_json(dest / "results.json", report)
    table = format_table(results, list(grid))
    atomic_write_bytes(dest / "table.md", (table + "\n").encode())
    atomic_write_bytes(dest / "sweep.png", sweep_png(_groups(results), sweep_title(cfg, base, grid)))
    log.info("sweep %s: wrote %s\n%s", cfg.name, dest, table)
    return report


def sweep_title(cfg: SweepConfig, base: TrainConfig, grid: dict[str, list]) -> str:
    """What sweep.png shows: the sweep, its base mined sets, the grid and the fixed recipe."""
    fixed = {k: getattr(base, k) for k in ("lr", "tau", "epochs") if k not in grid}
    return (f"sweep/{cfg.name} on mine/{cfg.mined}: grid "
            + ", ".join(f"{k}={','.join(_fmt(v) for v in vs)}" for k, vs in grid.items())
            + "; " + ", ".join(f"{k} {_fmt(v)}" for k, v in fixed.items())
            + f"; seeds {cfg.seed}..{cfg.seed + cfg.seeds - 1} (held-out training images)")


def _groups(results: list[dict[str, Any]]) -> list[tuple[str, list[list[dict[str, Any]]]]]:
    """(label, [records of each seed's run]) per grid point, in grid order."""
    out: dict[str, list[list[dict[str, Any]]]] = {}
    for res in results:
        out.setdefault(res["label"], []).append(res["records"])
    return list(out.items())


def summarise_run(records: list[dict[str, Any]], rank_floor: float) -> dict[str, Any]:
    """Best (by held-out cluster mIoU), last and label-free points of one run's records."""
    from pipeline.training.selection import best_choice, labelfree_choice

    if not records:
        return {}
    metric = "cluster_miou" if "cluster_miou" in records[0] else "erank"
    bi = best_choice(records, metric)
    li = labelfree_choice(records, rank_floor)
    return {"frozen": records[0], "best": records[bi], "last": records[-1],
            "labelfree": records[li]}


def format_table(results: list[dict[str, Any]], names: list[str]) -> str:
    """Markdown: one row per grid point, each figure the mean ± std over its seeds' runs (the
    steps of best / label-free points listed per seed), plus the frozen reference (step 0)."""
    cols = names + ["seeds", "best cluster mIoU (steps)", "linear mIoU @best", "rank ratio @best",
                    "last cluster mIoU", "last rank ratio", "label-free steps",
                    "cluster mIoU @label-free"]
    lines = ["| " + " | ".join(cols) + " |", "|" + "---|" * len(cols)]
    groups: dict[str, list[dict[str, Any]]] = {}
    for res in results:
        groups.setdefault(res["label"], []).append(res)
    frozen: list[dict[str, Any]] = []
    for runs in groups.values():
        point = runs[0]["point"]
        summ = [summarise_run(r["records"], r["config"].get("rank_floor", 0.9)) for r in runs]
        summ = [x for x in summ if x]
        head = [_fmt(point[n]) for n in names]
        if not summ:
            lines.append("| " + " | ".join(head + [str(len(runs))] + ["—"] * 7) + " |")
            continue
        frozen += [x["frozen"] for x in summ]

        def cell(which: str, key: str, spec: str = ".1f") -> str:
            return spread(x[which].get(key) for x in summ).format(spec)

        steps = ",".join(str(x["best"]["step"]) for x in summ)
        lf_steps = ",".join(str(x["labelfree"]["step"]) for x in summ)
        row = head + [str(len(summ)), f"{cell('best', 'cluster_miou')} ({steps})",
                      cell("best", "linear_miou"), cell("best", "erank_ratio", ".2f"),
                      cell("last", "cluster_miou"), cell("last", "erank_ratio", ".2f"),
                      lf_steps, cell("labelfree", "cluster_miou")]
        lines.append("| " + " | ".join(row) + " |")
    if frozen:
        # the frozen features differ between seeds only through their held-out images
        by_seed = {json.dumps(f, sort_keys=True): f for f in frozen}
        fz = list(by_seed.values())
        lines.append("| " + " | ".join(["frozen"] + [""] * (len(names) - 1) + [
            str(len(fz)), f"{spread(f.get('cluster_miou') for f in fz).format()} (0)",
            spread(f.get("linear_miou") for f in fz).format(), "1.00", "", "", "", ""]) + " |")
    return "\n".join(lines)
