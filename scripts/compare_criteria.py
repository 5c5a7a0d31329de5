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

Options: --criteria (subset, in order), --mine-args/--train-args/--eval-args (extra flags passed
through, quoted), --checkpoints (train-eval: best last labelfree), --table-only, --md FILE (also write the table there), --dry-run (print the commands).
Mined sets are named after the criterion (`<out>/mine/<criterion>`), except that `audit` mines
`--plans 1` into `<out>/mine/audit-<criterion>` so it never clashes with a full run; training
runs are `<out>/train/<criterion>`.
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


def do_audit(args: argparse.Namespace) -> None:
    names = [f"audit-{c}" for c in args.criteria]
    for c, name in zip(args.criteria, names):
        cli(args, "mine", *common(args), "--criterion", c, "--name", name, "--plans", "1",
            extra=args.mine_args)
    json_path = RunLayout(out_dir(args)).audit / "criteria.json"
    mined = [x for n in names for x in ("--mined", n)]
    cli(args, "audit", *common(args), *mined, "--batches", str(args.batches), "--max-anchors",
        str(args.max_anchors), "--json", str(json_path),
        "--plot", str(json_path.with_name("criteria_fig1b.png")))
    if args.dry_run:
        return
    rep = json.loads(json_path.read_text())
    lines = [f"Epoch {rep['epoch']}, batches {rep['batches']}, {sum(rep['anchors_audited'])} sampled "
             "anchors, the same for every criterion:", "",
             "| criterion | mean \\|P\\| | % TP in P | % TP pooled | mean \\|N\\| | % FP in N | "
             "mean \\|A\\| | recall % | no positive |", "|---|---|---|---|---|---|---|---|---|"]
    for r in rep["runs"]:
        lines.append(f"| {r['criterion']} | {fmt(r['n_pos'], ',.0f')} | {fmt(r['tp_in_p'])} | "
                     f"{fmt(r['tp_in_p_pooled'])} | {fmt(r['n_neg'], ',.0f')} | {fmt(r['fp_in_n'])} | "
                     f"{fmt(r['n_amb'], ',.0f')} | {fmt(r['recall'])} | {fmt(r['no_pos_pct'])}% |")
    emit(args, lines)


def metrics(args: argparse.Namespace, name: str) -> dict:
    return EvalReport(out_dir(args), name).metrics()


def cell(m: dict, probe: str, crf: bool = False) -> str:
    block = m["crf" if crf else "no_crf"]
    if block is None:
        return "-"
    return f"{block[f'{probe}_acc']:.1f} / {block[f'{probe}_miou']:.1f}"


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


def run_of(args: argparse.Namespace, criterion: str) -> str:
    """Training run of a criterion: `<out>/train/<criterion>` unless --run CRITERION=RUN."""
    return dict(x.split("=", 1) for x in args.run).get(criterion, criterion)


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
    """Issue-8 protocol: mine, train with held-out selection, evaluate best/last (probes refitted
    on the model's training-split code), frozen baseline with the same probes."""
    eval_once(args, "frozen", "--baseline", "frozen")
    for c in args.criteria:
        run = run_of(args, c)
        cli(args, "mine", *common(args), "--criterion", c, "--name", c, extra=args.mine_args)
        if run == c:  # a run given by --run was trained already (e.g. by sweep-train)
            cli(args, "train", *common(args), "--mined", c, "--name", c, extra=args.train_args)
        if args.dry_run:
            continue
        for ck, _, name in checkpoints(args, run):
            if name == f"{run}-{ck}":
                eval_once(args, name, "--trained", run, "--checkpoint", ck)
    if args.primaps_em:
        eval_once(args, "frozen-primaps-em", "--baseline", "frozen", "--probe", "primaps-em")
        for c in args.criteria:
            run = run_of(args, c)
            eval_once(args, f"{run}-best-primaps-em", "--trained", run, "--probe", "primaps-em")
    if args.dry_run:
        return
    emit(args, train_eval_table(args))


def train_eval_table(args: argparse.Namespace) -> list[str]:
    fz = metrics(args, "frozen")
    lines = ["acc / mIoU (%) on the evaluation split, k-means and a converged linear probe fitted "
             "on each model's training-split code; checkpoints chosen on held-out *training* "
             "images (best: held-out cluster mIoU; labelfree: the rank rule).", "",
             "| features | checkpoint (step) | held-out cluster mIoU | cluster | cluster + CRF | "
             "linear | linear + CRF |", "|---|---|---|---|---|---|---|"]
    frozen_hold = None
    rows_iou = [("frozen", fz)]
    for c in args.criteria:
        run = run_of(args, c)
        sel = selection(args, run)
        frozen_hold = sel["frozen"]["cluster_miou"]
        records = {r["step"]: r for r in TrainRun(out_dir(args), run).selection_records()}
        for ck, step, name in checkpoints(args, run):
            m = metrics(args, name)
            if ck == "best":
                rows_iou.append((f"{c} ({ck})", m))
            hold = records.get(step, {}).get("cluster_miou")
            lines.append(f"| {c}-trained (`{run}`) | {ck} ({step}) | {fmt(hold)} | {cell(m, 'cluster')} | "
                         f"{cell(m, 'cluster', True)} | {cell(m, 'linear')} | {cell(m, 'linear', True)} |")
    lines.insert(4, f"| frozen | - | {fmt(frozen_hold)} | {cell(fz, 'cluster')} | "
                    f"{cell(fz, 'cluster', True)} | {cell(fz, 'linear')} | {cell(fz, 'linear', True)} |")
    names = fz["class_names"]
    lines += ["", "Per-class cluster IoU (%, no CRF):", "",
              "| features | " + " | ".join(names) + " |", "|---" * (len(names) + 1) + "|"]
    for label, m in rows_iou:
        ious = m["no_crf"]["per_class_iou"]["cluster"]
        lines.append(f"| {label} | " + " | ".join(f"{v:.1f}" for v in ious) + " |")
    if args.primaps_em:
        lines += ["", "| features | cluster probe | cluster | cluster + CRF |", "|---|---|---|---|"]
        pairs = [("frozen", "frozen", "frozen-primaps-em")]
        pairs += [(f"{c} (best)", checkpoints(args, run_of(args, c))[0][2],
                   f"{run_of(args, c)}-best-primaps-em")
                  for c in args.criteria]
        for label, km, em in pairs:
            for probe, name in (("k-means", km), ("PriMaPs-EM", em)):
                m = metrics(args, name)
                lines.append(f"| {label} | {probe} | {cell(m, 'cluster')} | {cell(m, 'cluster', True)} |")
    return lines


def main(argv: list[str] | None = None) -> None:
    p = argparse.ArgumentParser(description=__doc__.split("\n\n")[0],
                                formatter_class=argparse.RawDescriptionHelpFormatter, epilog=__doc__)
    p.add_argument("what", choices=("audit", "probes", "train-eval"))
    p.add_argument("--preset", default="camvid")
    p.add_argument("--out", default=None, help="run directory (default data_cache/<preset>)")
    p.add_argument("--criteria", nargs="+", default=list(CRITERIA), choices=CRITERIA)
    p.add_argument("--batches", type=int, default=3, help="audit: batches of plan 0")
    p.add_argument("--max-anchors", type=int, default=1024, help="audit: anchors per batch")
    p.add_argument("--mine-args", default="", help="extra flags for every mine command")
    p.add_argument("--train-args", default="", help="extra flags for every train command")
    p.add_argument("--eval-args", default="", help="extra flags for every eval command")
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
    p.add_argument("--md", default=None, help="also write the Markdown table to this file")
    p.add_argument("--dry-run", action="store_true", help="print the commands only")
    args = p.parse_args(argv)
    if args.what == "train-eval" and args.table_only:
        emit(args, train_eval_table(args))
        return
    {"audit": do_audit, "probes": do_probes, "train-eval": do_train_eval}[args.what](args)


if __name__ == "__main__":
    main()
