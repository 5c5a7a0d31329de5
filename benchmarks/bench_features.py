"""Stage-1 throughput: the whole `features` stage next to the bare backbone forward pass.

Both run in this process on the same images: the bare pass only pushes the already-prepared,
normalised crops through the backbone (no decoding, cropping, patch labels or Zarr writes).
Prints images/s for both, their ratio (goal: stage >= 85% of bare on CPU) and bytes stored per
source image.

    python benchmarks/bench_features.py [--images 24] [--backbone dinov2_vits14_offline]
                                        [--dataset camvid --data-root ../shared/camvid]
"""

from __future__ import annotations

import argparse
import os
import shutil
import tempfile
import time
from pathlib import Path

import numpy as np
import torch

REPO = Path(__file__).resolve().parents[1]


def dir_bytes(path: Path) -> int:
    return sum(p.stat().st_size for p in path.rglob("*") if p.is_file())


def main() -> None:
    ap = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    ap.add_argument("--images", type=int, default=24, help="source images per split")
    ap.add_argument("--backbone", default="dinov2_vits14_offline")
    camvid = REPO.parent / "shared" / "camvid"
    ap.add_argument("--dataset", default="camvid" if camvid.is_dir() else "demo")
    ap.add_argument("--data-root", default=str(camvid) if camvid.is_dir() else None)
    ap.add_argument("--batch-size", type=int, default=16)
    args = ap.parse_args()

    from pipeline.artifacts.layout import RunLayout
    from pipeline.cache import build as stage
    from pipeline.config.schema import FeaturesConfig
    from pipeline.data.backbones import forward_tokens, load_backbone
    from pipeline.data.datasets import get_dataset
    from pipeline.data.specs import input_size
    from pipeline.data.views import eval_view, five_crops

    model, info, _ = load_backbone(args.backbone)
    print(f"backbone {args.backbone}, dataset {args.dataset}, {args.images} images per split, "
          f"torch threads {torch.get_num_threads()}, cpu count {os.cpu_count()}")

    # -- bare forward on the exact same crops (prepared outside the timer) -----------------
    def prepared(split: str, side: int) -> torch.Tensor:
        ds = get_dataset(args.dataset, args.data_root, split)
        views = []
        for i in range(min(args.images, len(ds))):
            s = ds.load(i)
            vs = five_crops(s.rgb, s.label, side) if split == "train" else [eval_view(s.rgb, s.label, side)]
            views += [v[0] for v in vs]
        x = torch.from_numpy(np.stack(views)).permute(0, 3, 1, 2).float().div(255)
        x = (x - torch.tensor(info.mean).view(1, 3, 1, 1)) / torch.tensor(info.std).view(1, 3, 1, 1)
        ins = input_size(info, side)
        if ins != side:
            x = torch.nn.functional.interpolate(x, size=(ins, ins), mode="bilinear", antialias=False)
        return x

    xs = {"train": prepared("train", 224), "val": prepared("val", 320)}
    with torch.inference_mode():
        forward_tokens(model, xs["train"][:2])  # warm-up
        t0 = time.perf_counter()
        for x in xs.values():
            for b in range(0, len(x), args.batch_size):
                forward_tokens(model, x[b : b + args.batch_size])
        bare = time.perf_counter() - t0

    # -- the whole stage ----------------------------------------------------------------------
    out = Path(tempfile.mkdtemp(prefix="bench_features_"))
    try:
        cfg = FeaturesConfig(out=str(out), dataset=args.dataset, data_root=args.data_root,
                             backbone=args.backbone, limit=args.images, batch_size=args.batch_size)
        stage._describe(cfg)  # dataset listing + backbone load outside the timer, like the bare pass
        t0 = time.perf_counter()
        stage.run(cfg)
        whole = time.perf_counter() - t0
        stored = dir_bytes(RunLayout(out).features_store)
    finally:
        shutil.rmtree(out, ignore_errors=True)

    n = 2 * args.images  # train + val source images
    print(f"bare forward : {n / bare:7.2f} images/s  ({bare:.1f}s; 5 crops at 224 per train image, 1 view per val image)")
    print(f"whole stage  : {n / whole:7.2f} images/s  ({whole:.1f}s; decode, crops, labels, forward, Zarr writes)")
    print(f"ratio stage/bare: {bare / whole:.3f}  (goal >= 0.85)")
    print(f"stored: {stored / n / 1e6:.2f} MB per source image ({stored / 1e6:.1f} MB for {n} images)")


if __name__ == "__main__":
    main()
