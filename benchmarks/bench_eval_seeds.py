"""Wall time of the seeded evaluation (`eval --seeds N`): what the error bars cost.

Evaluates the frozen baseline (or `--trained NAME`) of an existing feature cache with 1 and
with N probe seeds, with and without the dense CRF, in a scratch run directory whose
`features.zarr` is a symlink to the cache's (the cache and its eval/ reports are left
untouched). Prints the wall time of each evaluation, the ratio to one seed measured in the same
run, and the cluster mIoU it gave (mean ± std over the seeds).

Per extra seed the evaluation fits one more spherical k-means (3 restarts) and scores one more
cluster probe on every val image (one more CRF per image with --crf); the converged linear probe
is fitted once when every seed's subsample is the whole training split (CamVid: 458k patches,
below the 600k cap).

Usage: python benchmarks/bench_eval_seeds.py [--out data_cache/camvid] [--seeds 3]
       [--trained NAME --checkpoint best] [--crf-workers 0]
Skips (exit 0, with a message) when the cache does not exist: build it with
`make features PRESET=camvid` (CamVid at ../shared/camvid).
"""

from __future__ import annotations

import argparse
import os
import shutil
import sys
import tempfile
import time
from pathlib import Path

ROOT = Path(__file__).resolve().parents[1]
sys.path.insert(0, str(ROOT))


def main() -> None:
    ap = argparse.ArgumentParser(description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter)
    ap.add_argument("--out", default=str(ROOT / "data_cache" / "camvid"),
                    help="run directory holding features.zarr (read only)")
    ap.add_argument("--seeds", type=int, default=3)
    ap.add_argument("--trained", default=None, help="a training run of --out (default: frozen)")
    ap.add_argument("--checkpoint", default="best")
    ap.add_argument("--crf-workers", type=int, default=0)
    args = ap.parse_args()

    from pipeline.artifacts.layout import RunLayout
    from pipeline.config.schema import EvalConfig
    from pipeline.evaluation import evaluate
    from pipeline.evaluation.seeds import format_mean_std

    src = RunLayout(Path(args.out).resolve())
    if not src.features_store.is_dir():
        print(f"skipped: no feature cache at {src.features_store}; build it with "
              "`make features PRESET=camvid` (CamVid at ../shared/camvid)")
        return
    scratch = RunLayout(tempfile.mkdtemp(prefix="bench_eval_seeds_"))
    rows = []
    try:
        os.symlink(src.features_store, scratch.features_store)
        shutil.copytree(src.feature_markers, scratch.feature_markers)
        for f in ("features_manifest", "features_config"):
            if getattr(src, f).is_file():
                shutil.copy(getattr(src, f), getattr(scratch, f))
        if args.trained:  # checkpoints are read, never written
            os.makedirs(scratch.train_root, exist_ok=True)
            os.symlink(src.train(args.trained), scratch.train(args.trained))
        for crf in (False, True):
            base = None
            for n in (1, args.seeds):
                cfg = EvalConfig(out=str(scratch.out), baseline="none" if args.trained else "frozen",
                                 trained=args.trained, checkpoint=args.checkpoint, seeds=n,
                                 crf=crf, crf_workers=args.crf_workers, n_show=0)
                t0 = time.perf_counter()
                rep = evaluate.run(cfg)
                wall = time.perf_counter() - t0
                base = base or wall
                nc = rep["no_crf"]
                rows.append((f"{'crf' if crf else 'no crf'}, {n} seed(s)", wall, wall / base,
                             format_mean_std(nc["cluster_miou"], nc.get("cluster_miou_std"), n),
                             rep["n_images"]))
    finally:
        shutil.rmtree(scratch.out)
    what = f"trained run {args.trained} ({args.checkpoint})" if args.trained else "frozen baseline"
    print(f"\neval --seeds on {src.out} ({what}, {rows[0][4]} val images), wall seconds:")
    print(f"{'evaluation':<22} {'wall s':>8} {'x 1 seed':>9}  cluster mIoU")
    for name, wall, ratio, miou, _ in rows:
        print(f"{name:<22} {wall:8.1f} {ratio:9.2f}  {miou}")


if __name__ == "__main__":
    main()
