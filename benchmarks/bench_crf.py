"""Dense-CRF throughput: images/s at evaluation size, sequential and over all cores.

    python benchmarks/bench_crf.py [--side 320] [--images 16] [--classes 27 11] [--workers 0]

Synthetic inputs (a seeded mosaic of coloured regions with noisy class probabilities) at the
protocol's settings (docs/method.md §6). One probability map per image; the evaluation stage
refines two per image (cluster and linear), so it runs at about half these rates.
"""

from __future__ import annotations

import argparse
import json
import os
import time

import numpy as np

from pipeline.evaluation import crf


def synthetic(n: int, side: int, k: int, seed: int = 0):
    rng = np.random.default_rng(seed)
    cells = 8
    images, probs = [], []
    for _ in range(n):
        region = np.kron(rng.integers(0, k, size=(cells, cells)), np.ones((side // cells + 1,) * 2, int))
        region = region[:side, :side]
        colours = rng.integers(0, 256, size=(k, 3))
        img = np.clip(colours[region] + rng.normal(0, 10, (side, side, 3)), 0, 255).astype(np.uint8)
        logits = rng.normal(0, 1, (k, side, side)).astype(np.float32)
        np.put_along_axis(logits, region[None], np.take_along_axis(logits, region[None], 0) + 1.0, 0)
        images.append(img)
        probs.append(crf.softmax(logits))
    return images, probs


def bench(images, probs, workers: int) -> tuple[float, list]:
    """Steady-state images/s: the pool is started and warmed up before the clock starts."""
    with crf.CRFPool(workers) as pool:
        tiny = np.zeros((8, 8, 3), np.uint8), np.full((2, 8, 8), 0.5, np.float32)
        for f in [pool.submit(tiny[0], [tiny[1]]) for _ in range(pool.workers)]:
            f.result()
        t0 = time.perf_counter()
        futures = [pool.submit(img, [p]) for img, p in zip(images, probs)]
        out = [f.result()[0] for f in futures]
        return len(images) / (time.perf_counter() - t0), out


def main() -> None:
    ap = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    ap.add_argument("--side", type=int, default=320)
    ap.add_argument("--images", type=int, default=16)
    ap.add_argument("--classes", type=int, nargs="+", default=[27, 11])
    ap.add_argument("--workers", type=int, default=0, help="parallel run (0 = all cores)")
    args = ap.parse_args()
    cores = crf.resolve_workers(args.workers)
    print(f"{cores} cores available; load average {os.getloadavg()[0]:.1f} (other work skews figures)")
    rows = []
    for k in args.classes:
        images, probs = synthetic(args.images, args.side, k)
        seq, a = bench(images, probs, 1)
        par, b = bench(images, probs, args.workers)
        same = all(np.array_equal(x, y) for x, y in zip(a, b))
        rows.append({"classes": k, "side": args.side, "images": args.images,
                     "sequential_img_s": round(seq, 2), "parallel_img_s": round(par, 2),
                     "workers": cores, "speedup": round(par / seq, 2), "identical": same,
                     "load_avg": round(os.getloadavg()[0], 1)})
        print(f"K={k:3d} {args.side}x{args.side}: sequential {seq:6.2f} img/s | "
              f"{cores} workers {par:6.2f} img/s (x{par / seq:.2f}) | identical={same}", flush=True)
    print(json.dumps(rows))


if __name__ == "__main__":
    main()
