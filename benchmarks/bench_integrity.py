"""Cost of the integrity checks (issue 9) on a real feature cache, which is left untouched.

Works in a scratch run directory whose `features.zarr` is a symlink to the cache's and whose
markers are copies, to which chunk checksums are added (as a features rerun would). Measures:

  start check     FeatureStore.split(train/val): markers + every chunk file's size (what every
                  stage pays once), with markers of the previous version and with checksums
  deep check      hashing every chunk (what a `features` rerun pays to find damaged chunks)
  first read      reading all train tokens/feats/labels through the checked store (sha256 of
                  every chunk, once per process) vs a plain Zarr group (page cache warm)
  per batch       one batch of --batch crops: gather tokens + feats + labels with and without
                  the chunk checks (first read pays hashing, later reads nothing), NaN/Inf
                  checks of tokens and feats, sha256 of a shard of --anchors anchors

Usage: python benchmarks/bench_integrity.py --out data_cache/camvid [--batch 64] [--anchors 1024]
"""

from __future__ import annotations

import argparse
import json
import os
import shutil
import sys
import tempfile
import time
from pathlib import Path

import numpy as np

ROOT = Path(__file__).resolve().parents[1]
sys.path.insert(0, str(ROOT))


def _t(fn, reps: int = 1) -> float:
    best = float("inf")
    for _ in range(reps):
        t0 = time.perf_counter()
        fn()
        best = min(best, time.perf_counter() - t0)
    return best


def main() -> None:
    ap = argparse.ArgumentParser(description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter)
    ap.add_argument("--out", required=True, help="run directory holding features.zarr (read only)")
    ap.add_argument("--batch", type=int, default=64)
    ap.add_argument("--anchors", type=int, default=1024)
    ap.add_argument("--seed", type=int, default=0)
    args = ap.parse_args()

    import zarr

    from pipeline.artifacts.chunks import check_units
    from pipeline.artifacts.features import FeatureStore, take_rows
    from pipeline.artifacts.layout import RunLayout
    from pipeline.cache.integrity import nonfinite_rows, sha256_bytes

    src = RunLayout(Path(args.out).resolve())
    scratch = RunLayout(tempfile.mkdtemp(prefix="bench_integrity_"))
    try:
        os.symlink(src.features_store, scratch.features_store)
        shutil.copytree(src.feature_markers, scratch.feature_markers)
        for f in ("features_manifest", "features_config"):
            if getattr(src, f).is_file():
                shutil.copy(getattr(src, f), getattr(scratch, f))
        store = FeatureStore(scratch.out)
        splits = [s for s in ("train", "val") if s in store.root]
        size = sum(p.stat().st_size for s in splits
                   for p in (src.features_store / s).rglob("*") if p.is_file())
        res: dict[str, float] = {"cache_MB": size / 2**20}
        res["start_check_legacy_s"] = _t(lambda: [FeatureStore(scratch.out).check_complete(s) for s in splits], 3)

        t0 = time.perf_counter()
        for s in splits:  # add checksums to the copied markers (what a features rerun does)
            for c in check_units(scratch.out, store.manifest, s, deep=True):
                p = scratch.feature_marker(c.key)
                m = json.loads(p.read_text())
                m["chunks"] = c.records
                p.write_text(json.dumps(m))
        res["deep_check_s"] = time.perf_counter() - t0
        res["start_check_checksums_s"] = _t(lambda: [FeatureStore(scratch.out).check_complete(s) for s in splits], 3)

        names = [n for n in ("tokens", "feats", "labels") if n in store.root["train"]]
        plain = zarr.open_group(str(src.features_store), mode="r")["train"]
        res["read_all_plain_s"] = _t(lambda: [plain[n][:] for n in names])  # warms the page cache
        res["read_all_plain_s"] = _t(lambda: [plain[n][:] for n in names])
        checked = FeatureStore(scratch.out).split("train")
        res["read_all_checked_first_s"] = _t(lambda: [checked[n][:] for n in names])
        res["read_all_checked_again_s"] = _t(lambda: [checked[n][:] for n in names])
        files = [p for n in names for p in (src.features_store / "train" / n).rglob("*") if p.is_file()]
        res["sha256_of_those_chunks_s"] = _t(lambda: [sha256_bytes(p.read_bytes()) for p in files])

        rng = np.random.default_rng(args.seed)
        crops = np.sort(rng.choice(plain["tokens"].shape[0], args.batch, replace=False))
        res["batch_read_plain_s"] = _t(lambda: [take_rows(plain[n], crops) for n in names], 3)
        fresh = FeatureStore(scratch.out).split("train")
        res["batch_read_checked_first_s"] = _t(lambda: [take_rows(fresh[n], crops) for n in names])
        res["batch_read_checked_again_s"] = _t(lambda: [take_rows(fresh[n], crops) for n in names], 3)
        tok, feats = take_rows(plain["tokens"], crops), take_rows(plain["feats"], crops)
        res["batch_nonfinite_check_s"] = _t(lambda: (nonfinite_rows(tok), nonfinite_rows(feats)), 5)
        shard = np.random.default_rng(1).bytes(int(1190 * args.anchors))  # ~1.19 KB per anchor
        res["shard_sha256_s"] = _t(lambda: sha256_bytes(shard), 5)
    finally:
        shutil.rmtree(scratch.out)
    width = max(map(len, res))
    for k, v in res.items():
        print(f"{k:<{width}}  {v:10.4f}")


if __name__ == "__main__":
    main()
