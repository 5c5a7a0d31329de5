"""Side-by-side comparison of the six seed criteria (ppap, p0, hp, kmeans, primaps, eigen).

Runs the ordinary `ppap-pipe` stages (through `python -m stages.cli`, so the current code and
the preset's settings apply) and prints Markdown tables for the README. Finished stages are not
redone (every stage resumes), so rerunning after an interruption only does what is missing.

    # 1. audit table: mine one batch plan of every criterion, audit the same batches/anchors
    python scripts/compare_criteria.py audit --preset camvid --out data_cache/camvid

    # 2. cluster probes on the frozen features: k-means vs PriMaPs-EM vs eigenfunctions
    python scripts/compare_criteria.py probes --preset camvid --out data_cache/camvid

    # 3. train/eval table: mine the preset's plans, train on every criterion (held-out selection),
    #    evaluate its best and last checkpoints with probes refitted on its code, and the frozen
    #    baseline; --primaps-em adds a PriMaPs-EM cluster probe for every model
    python scripts/compare_criteria.py train-eval --preset camvid --out data_cache/camvid \
        --criteria ppap p0 hp kmeans --train-args "--max-steps 100 --select-every 20"

    # the same over 3 training seeds (each: its own batch plans, anchors, holdout and init),
    # every evaluation over the preset's 3 probe seeds: mean ± std, differences vs frozen
    python scripts/compare_criteria.py train-eval --preset camvid --seeds 3

Options: --criteria (subset, in order), --mine-args/--train-args/--eval-args (extra flags passed
through, quoted: --eval-args --no-crf), --checkpoints (train-eval: best last labelfree),
--seeds N (training seeds seed..seed+N-1; audit: mining seeds), --seed, --tag
(train-eval: train `<criterion>-<tag>` on the same mined sets, e.g. another schedule),
--table-only, --md FILE (also write the table there),
--dry-run (print the commands).

Seed s (s = --seed is the first) mines `<out>/mine/<criterion>` with `--seed s`, later seeds
`<criterion>-seed<s>`; `audit` mines `--plans 1` into `audit-<criterion>[-seed<s>]` so it never
clashes with a full run; training runs are `<out>/train/<criterion>[-<tag>][-seed<s>]`, trained
with `--seed s`. Every figure is the mean ± std over all evaluations of a row (training seeds ×
the eval's probe seeds; the frozen baseline: probe seeds only); "> 2 std" marks a difference to
frozen larger than twice sqrt(std_a² + std_b²) (pipeline.evaluation.seeds.compare).
"""

from __future__ import annotations

import argparse
import json
import shlex
import subprocess
import sys
from pathlib import Path

from pipeline.artifacts.layout import RunLayout
from pipeline.artifacts.reports import EvalReport
from pipeline.artifacts.training import TrainRun
from pipeline.evaluation.seeds import Spread, compare, seed_list, spread

CRITERIA = ("ppap", "p0", "hp", "kmeans", "primaps", "eigen")
REPO = Path(__file__).resolve().parents[1]


def cli(args: argparse.Namespace, *argv: str, extra: str = "") -> None:
    cmd = [sys.executable, "-m", "stages.cli", *argv, *shlex.split(extra)]
    print("$", " ".join(shlex.quote(c) for c in cmd), flush=True)
    if not args.dry_run:
        subprocess.run(cmd, cwd=REPO, check=True)


def common(args: argparse.Namespace) -> list[str]:
    out = ["--out", args.out] if args.out else []
    return out + (["--preset", args.preset] if args.preset else [])


def out_dir(args: argparse.Namespace) -> Path:
    return REPO / (args.out or f"data_cache/{args.preset or 'demo'}")


def emit(args: argparse.Namespace, lines: list[str]) -> None:
    text = "\n".join(lines)
    print(text)
    if args.md:
        Path(args.md).write_text(text + "\n")


def fmt(v, spec: str = ".1f") -> str:
    return "-" if v is None else format(v, spec)


def seeds(args: argparse.Namespace) -> list[int]:
    return seed_list(args.seed, args.seeds)


def suffix(args: argparse.Namespace, seed: int) -> str:
    """'' for the first seed (the names of a single-seed comparison), else '-seed<s>'."""
    return "" if seed == args.seed else f"-seed{seed}"


AUDIT_KEYS = (("n_pos", ",.0f"), ("tp_in_p", ".1f"), ("tp_in_p_pooled", ".1f"), ("n_neg", ",.0f"),
              ("fp_in_n", ".1f"), ("n_amb", ",.0f"), ("recall", ".1f"), ("no_pos_pct", ".1f"))


def do_audit(args: argparse.Namespace) -> None:
    reports = []
    for seed in seeds(args):
        names = [f"audit-{c}{suffix(args, seed)}" for c in args.criteria]
        for c, name in zip(args.criteria, names):
            cli(args, "mine", *common(args), "--criterion", c, "--name", name, "--plans", "1",
                "--seed", str(seed), extra=args.mine_args)
        json_path = RunLayout(out_dir(args)).audit / f"criteria{suffix(args, seed)}.json"
        mined = [x for n in names for x in ("--mined", n)]
        cli(args, "audit", *common(args), *mined, "--batches", str(args.batches), "--max-anchors",
            str(args.max_anchors), "--seed", str(seed), "--json", str(json_path),
            "--plot", str(json_path.with_name(json_path.stem + "_fig1b.png")))
        if not args.dry_run:
            reports.append(json.loads(json_path.read_text()))
    if args.dry_run:
        return
    n = len(reports)
    rep = reports[0]
    lines = [f"Plan 0, batches {rep['batches']} of each mining seed ({', '.join(map(str, seeds(args)))}), "
             f"{sum(rep['anchors_audited'])} sampled anchors per seed, the same for every criterion"
             + (f"; mean ± std over {n} mining seeds" if n > 1 else "") + ":", "",
             "| criterion | mean \\|P\\| | % TP in P | % TP pooled | mean \\|N\\| | % FP in N | "
             "mean \\|A\\| | recall % | no positive % |", "|---|---|---|---|---|---|---|---|---|"]
    for i, r in enumerate(rep["runs"]):
        cells = [spread(x["runs"][i][k] for x in reports).format(spec) for k, spec in AUDIT_KEYS]
        lines.append(f"| {r['criterion']} | " + " | ".join(cells) + " |")
    emit(args, lines)


def metrics(args: argparse.Namespace, name: str) -> dict:
    return EvalReport(out_dir(args), name).metrics()


def values(reports: list[dict], key: str, crf: bool = False) -> Spread:
    """Every evaluation's value of `key` (e.g. cluster_miou) over the reports and their probe
    seeds (reports written before --seeds count as one seed)."""
    tag = "crf" if crf else "no_crf"
    out = []
    for m in reports:
        if m.get(tag) is None:
            continue
        out += [r[tag][key] for r in m.get("seeds", [m])]
    return spread(out)


def cell(reports: dict | list[dict], probe: str, crf: bool = False) -> str:
    """'acc / mIoU', each mean ± std over every evaluation of the reports."""
    reports = reports if isinstance(reports, list) else [reports]
    acc, miou = values(reports, f"{probe}_acc", crf), values(reports, f"{probe}_miou", crf)
    if miou.mean is None:
        return "-"
    return f"{acc.format()} / {miou.format()}"


def do_probes(args: argparse.Namespace) -> None:
    runs = [("kmeans", "frozen"), ("primaps-em", "frozen-primaps-em"), ("eigen", "frozen-eigen")]
    for probe, _ in runs:
        cli(args, "eval", *common(args), "--baseline", "frozen", "--probe", probe, extra=args.eval_args)
    if args.dry_run:
        return
    lines = ["| frozen features, cluster probe | cluster acc / mIoU | + CRF |", "|---|---|---|"]
    for probe, name in runs:
        m = metrics(args, name)
        lines.append(f"| {probe} | {cell(m, 'cluster')} | {cell(m, 'cluster', True)} |")
    emit(args, lines)


def run_of(args: argparse.Namespace, criterion: str, seed: int | None = None) -> str:
    """Training run of a criterion and seed: `<criterion>[-<tag>][-seed<s>]` unless --run
    CRITERION=RUN (first seed only)."""
    seed = args.seed if seed is None else seed
    given = dict(x.split("=", 1) for x in args.run)
    if seed == args.seed and criterion in given:
        return given[criterion]
    return criterion + (f"-{args.tag}" if args.tag else "") + suffix(args, seed)


def selection(args: argparse.Namespace, run: str) -> dict:
    return TrainRun(out_dir(args), run).selection()


def last_step(args: argparse.Namespace, run: str) -> int:
    return max(r["step"] for r in TrainRun(out_dir(args), run).selection_records())


def checkpoints(args: argparse.Namespace, run: str) -> list[tuple[str, int, str]]:
    """(checkpoint, step, eval name) of `run`; a checkpoint made at the same step as one before
    it is the same weights, so it shares that one's evaluation instead of repeating it."""
    sel = selection(args, run)
    steps = {"best": sel["best_step"], "last": last_step(args, run),
             "labelfree": sel["labelfree_step"]}
    out, seen = [], {}
    for ck in args.checkpoints:
        step = steps[ck]
        out.append((ck, step, seen.setdefault(step, f"{run}-{ck}")))
    return out


def eval_once(args: argparse.Namespace, name: str, *argv: str) -> None:
    """`ppap-pipe eval ...` unless eval/<name>/metrics.json exists (--redo-eval: always)."""
    if args.redo_eval or not EvalReport(out_dir(args), name).exists():
        cli(args, "eval", *common(args), *argv, extra=args.eval_args)
    else:
        print(f"# eval/{name} exists; kept (--redo-eval to recompute)", flush=True)


def do_train_eval(args: argparse.Namespace) -> None:
    """Mine, train with held-out selection and evaluate best/last (probes refitted on the
    model's training-split code) for every criterion and training seed; the frozen baseline
    with the same probes."""
    eval_once(args, "frozen", "--baseline", "frozen")
    for c in args.criteria:
        for seed in seeds(args):
            run = run_of(args, c, seed)
            mined = c + suffix(args, seed)
            cli(args, "mine", *common(args), "--criterion", c, "--name", mined, "--seed", str(seed),
                extra=args.mine_args)
            if run != dict(x.split("=", 1) for x in args.run).get(c):  # not a given run
                cli(args, "train", *common(args), "--mined", mined, "--name", run, "--seed",
                    str(seed), extra=args.train_args)
            if args.dry_run:
                continue
            for ck, _, name in checkpoints(args, run):
                if name == f"{run}-{ck}":
                    eval_once(args, name, "--trained", run, "--checkpoint", ck)
    if args.primaps_em:
        eval_once(args, "frozen-primaps-em", "--baseline", "frozen", "--probe", "primaps-em")
        for c in args.criteria:
            for seed in seeds(args):
                run = run_of(args, c, seed)
                eval_once(args, f"{run}-best-primaps-em", "--trained", run, "--probe", "primaps-em")
    if args.dry_run:
        return
    emit(args, train_eval_table(args))


def _row(args: argparse.Namespace, c: str, ck: str) -> dict:
    """One table row: the reports, checkpoint steps and held-out scores of every seed's run."""
    reports, steps, held = [], [], []
    for seed in seeds(args):
        run = run_of(args, c, seed)
        records = {r["step"]: r for r in TrainRun(out_dir(args), run).selection_records()}
        found = {k: (step, name) for k, step, name in checkpoints(args, run)}
        step, name = found[ck]
        reports.append(metrics(args, name))
        steps.append(step)
        held.append(records.get(step, {}).get("cluster_miou"))
    return {"reports": reports, "steps": steps, "held": spread(held)}


def train_eval_table(args: argparse.Namespace) -> list[str]:
    fz = metrics(args, "frozen")
    n_train = len(seeds(args))
    n_probe = fz.get("n_seeds", 1)
    lines = [f"acc / mIoU (%) on the evaluation split, mean ± std over {n_train} training "
             f"seed(s) × {n_probe} probe seed(s) (frozen: the probe seeds): k-means and a "
             "converged linear probe fitted on each model's training-split code; checkpoints "
             "chosen on held-out *training* images (best: held-out cluster mIoU; labelfree: the "
             "rank rule); Δ = cluster mIoU − frozen, marked when larger than 2 std.", "",
             "| features | checkpoint (steps) | held-out cluster mIoU | cluster | cluster + CRF | "
             "linear | linear + CRF | Δ cluster mIoU |", "|---|---|---|---|---|---|---|---|"]
    frozen_held = []
    rows_iou = [("frozen", [fz])]
    frozen_miou = values([fz], "cluster_miou")
    verdicts = []
    for c in args.criteria:
        for seed in seeds(args):
            frozen_held.append(selection(args, run_of(args, c, seed))["frozen"]["cluster_miou"])
        for ck in args.checkpoints:
            row = _row(args, c, ck)
            reps = row["reports"]
            if ck == args.checkpoints[0]:
                rows_iou.append((f"{c} ({ck})", reps))
            d = compare(frozen_miou, values(reps, "cluster_miou"))
            verdicts.append((f"{c} ({ck})", d))
            run0 = run_of(args, c)
            lines.append(f"| {c}-trained (`{run0}`{', …' if n_train > 1 else ''}) | {ck} "
                         f"({', '.join(map(str, row['steps']))}) | {row['held'].format()} | "
                         f"{cell(reps, 'cluster')} | {cell(reps, 'cluster', True)} | "
                         f"{cell(reps, 'linear')} | {cell(reps, 'linear', True)} | {d.format()} |")
    lines.insert(4, f"| frozen | - | {spread(dict.fromkeys(frozen_held)).format()} | "
                    f"{cell(fz, 'cluster')} | {cell(fz, 'cluster', True)} | {cell(fz, 'linear')} | "
                    f"{cell(fz, 'linear', True)} | |")
    above = [label for label, d in verdicts if d.exceeds and d.delta > 0]
    below = [label for label, d in verdicts if d.exceeds and d.delta < 0]
    lines += ["", "Differences to frozen cluster mIoU larger than 2 std: "
              + (f"above frozen: {', '.join(above)}" if above else "none above frozen") + "; "
              + (f"below frozen: {', '.join(below)}" if below else "none below frozen") + "."]
    names = fz["class_names"]
    lines += ["", "Per-class cluster IoU (%, no CRF; mean ± std over the same evaluations):", "",
              "| features | " + " | ".join(names) + " |", "|---" * (len(names) + 1) + "|"]
    for label, reps in rows_iou:
        cols = []
        for k in range(len(names)):
            vals = [r["no_crf"]["per_class_iou"]["cluster"][k] for m in reps
                    for r in m.get("seeds", [m])]
            cols.append(spread(vals).format())
        lines.append(f"| {label} | " + " | ".join(cols) + " |")
    lines += ["", "Every evaluation's cluster mIoU (no CRF), by training run and probe seed:", "",
              "| features | run | cluster mIoU per probe seed | mean |", "|---|---|---|---|"]
    lines.append(f"| frozen | `frozen` | {', '.join(f'{v:.1f}' for v in frozen_miou.values)} | "
                 f"{frozen_miou.format()} |")
    for c in args.criteria:
        ck = args.checkpoints[0]
        for seed, m in zip(seeds(args), _row(args, c, ck)["reports"]):
            v = values([m], "cluster_miou")
            lines.append(f"| {c} ({ck}) | `{run_of(args, c, seed)}` | "
                         f"{', '.join(f'{x:.1f}' for x in v.values)} | {v.format()} |")
    if args.primaps_em:
        lines += ["", "| features | cluster probe | cluster | cluster + CRF |", "|---|---|---|---|"]
        pairs = [("frozen", [fz], [metrics(args, "frozen-primaps-em")])]
        for c in args.criteria:
            row = _row(args, c, "best")
            em = [metrics(args, f"{run_of(args, c, s)}-best-primaps-em") for s in seeds(args)]
            pairs.append((f"{c} (best)", row["reports"], em))
        for label, km, em in pairs:
            for probe, reps in (("k-means", km), ("PriMaPs-EM", em)):
                lines.append(f"| {label} | {probe} | {cell(reps, 'cluster')} | "
                             f"{cell(reps, 'cluster', True)} |")
    return lines


PASS_THROUGH = {"--mine-args": "extra flags for every mine command",
                "--train-args": "extra flags for every train command",
                "--eval-args": "extra flags for every eval command"}


def join_pass_through(argv: list[str]) -> list[str]:
    """`--eval-args --no-crf` as `--eval-args=--no-crf`: argparse would take a lone value that
    starts with '-' for an option of its own and stop with 'expected one argument'."""
    out, i = [], 0
    while i < len(argv):
        if argv[i] in PASS_THROUGH and i + 1 < len(argv):
            out.append(f"{argv[i]}={argv[i + 1]}")
            i += 2
        else:
            out.append(argv[i])
            i += 1
    return out


def main(argv: list[str] | None = None) -> None:
    p = argparse.ArgumentParser(description=__doc__.split("\n\n")[0],
                                formatter_class=argparse.RawDescriptionHelpFormatter, epilog=__doc__)
    p.add_argument("what", choices=("audit", "probes", "train-eval"))
    p.add_argument("--preset", default="camvid")
    p.add_argument("--out", default=None, help="run directory (default data_cache/<preset>)")
    p.add_argument("--criteria", nargs="+", default=list(CRITERIA), choices=CRITERIA)
    p.add_argument("--batches", type=int, default=3, help="audit: batches of plan 0")
    p.add_argument("--max-anchors", type=int, default=1024, help="audit: anchors per batch")
    for flag, text in PASS_THROUGH.items():
        p.add_argument(flag, default="", help=f"{text} (quoted; may start with '-')")
    p.add_argument("--run", nargs="+", default=[], metavar="CRITERION=RUN",
                   help="train-eval: use an existing training run for a criterion (e.g. a "
                        "sweep-train run: ppap=tau-tau0.1) instead of training train/<criterion>")
    p.add_argument("--checkpoints", nargs="+", default=["best", "last"],
                   choices=("best", "last", "labelfree"), help="train-eval: checkpoints per run")
    p.add_argument("--primaps-em", action="store_true",
                   help="train-eval: also a PriMaPs-EM cluster probe on the frozen and trained code")
    p.add_argument("--redo-eval", action="store_true",
                   help="train-eval: recompute evaluations that exist already")
    p.add_argument("--table-only", action="store_true",
                   help="train-eval: print the table from existing results, run nothing")
    p.add_argument("--seeds", type=int, default=1,
                   help="training seeds (train-eval) / mining seeds (audit): seed..seed+N-1")
    p.add_argument("--seed", type=int, default=0, help="the first seed (default 0)")
    p.add_argument("--tag", default="",
                   help="train-eval: name runs <criterion>-<tag>[-seed<s>] (another recipe on the "
                        "same mined sets, e.g. --tag e10 --train-args '--epochs 10')")
    p.add_argument("--md", default=None, help="also write the Markdown table to this file")
    p.add_argument("--dry-run", action="store_true", help="print the commands only")
    args = p.parse_args(join_pass_through(sys.argv[1:] if argv is None else list(argv)))
    if args.what == "train-eval" and args.table_only:
        emit(args, train_eval_table(args))
        return
    {"audit": do_audit, "probes": do_probes, "train-eval": do_train_eval}[args.what](args)


if __name__ == "__main__":
    main()
