"""Training step from the token cache vs the same step recomputing the frozen backbone.

Both steps train the same modules on the same batch with the same mined sets (fixed here, since
mining is not part of a training step in either design):

  cache      read mid tokens + frozen feats of the batch from a Zarr store (fp16) -> trainable
             last block + norm + head -> Eq. 8, linear and cluster probes -> backward -> steps
  recompute  the authors' way: images -> full frozen ViT forward (all blocks, no_grad) for the
             mid tokens and the mining features -> the same trainable part as above

Usage: python benchmarks/bench_train.py [--batch 16] [--reps 5] [--backbone auto] [--json PATH]
Reports medians of wall time and of process CPU time (the latter is less sensitive to other
processes on a shared machine; on an idle machine the two ratios agree).
The timing does not depend on the weights: with `auto`, the offline DINOv2 ViT-S/14 is used when
installed, else a random-weight ViT-S/14 of the same architecture.
"""

from __future__ import annotations

import argparse
import json
import statistics
import tempfile
import time
from pathlib import Path

import numpy as np
import torch


def _backbone(name: str, seed: int):
    from pipeline.data import backbones, specs

    if name == "auto":
        try:
            model, info, fp = backbones.load_backbone("dinov2_vits14_offline")
            return model, info, fp
        except ValueError as exc:
            print(f"offline DINOv2 not available ({exc}); using a random-weight ViT-S/14")
            name = "random-vits14"
    if name == "random-vits14":
        spec = specs.get_spec("dinov2_vits14_offline")
        with torch.random.fork_rng(devices=[]):
            torch.manual_seed(seed)
            model = backbones._build(spec)
        return model.eval().requires_grad_(False), spec.info, f"random:{seed}"
    return backbones.load_backbone(name, seed=seed)


def _sets(feats: np.ndarray, anchors: np.ndarray, pos_frac: float, amb_frac: float):
    """Per-anchor top `pos_frac` rows by cosine as positives, the next `amb_frac` as ambiguous."""
    from types import SimpleNamespace

    F = torch.from_numpy(feats)
    s = F[torch.from_numpy(anchors)] @ F.T
    s[torch.arange(anchors.size), torch.from_numpy(anchors)] = -2.0  # anchor excluded
    order = torch.argsort(s, dim=1, descending=True).numpy()
    n = feats.shape[0]
    n_pos, n_amb = max(1, int(pos_frac * n)), int(amb_frac * n)
    pos = np.sort(order[:, :n_pos], axis=1)
    amb = np.sort(order[:, n_pos:n_pos + n_amb], axis=1)
    m = anchors.size
    rows = np.arange(m + 1, dtype=np.int64)
    return SimpleNamespace(
        pos_indptr=rows * n_pos, pos_indices=pos.reshape(-1).astype(np.int64),
        amb_indptr=rows * n_amb, amb_indices=amb.reshape(-1).astype(np.int64),
    )


def main(argv: list[str] | None = None) -> dict:
    ap = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    ap.add_argument("--backbone", default="auto",
                    help="auto | random-vits14 | a pipeline backbone name")
    ap.add_argument("--batch", type=int, default=16, help="crops per step (the paper uses 64)")
    ap.add_argument("--side", type=int, default=224)
    ap.add_argument("--classes", type=int, default=27, help="linear/cluster probe size")
    ap.add_argument("--no-linear-probe", action="store_true",
                    help="leave the full-resolution linear probe out of both steps (breakdown)")
    ap.add_argument("--reps", type=int, default=5, help="timed steps per variant (after 1 warm-up)")
    ap.add_argument("--seed", type=int, default=0)
    ap.add_argument("--device", default="cpu")
    ap.add_argument("--json", default=None, help="also write the figures here")
    args = ap.parse_args(argv)

    import zarr

    from pipeline.artifacts.features import normalise
    from pipeline.config.schema import TrainConfig
    from pipeline.data.backbones import forward_tokens
    from pipeline.data.specs import input_size
    from pipeline.mining.batching import anchor_rows
    from pipeline.training.model import build_model
    from pipeline.training.train import _gather, make_optimisers, train_step

    dev = torch.device(args.device)
    model, info, fp = _backbone(args.backbone, args.seed)
    model = model.to(dev)
    side = input_size(info, args.side)
    h = w = side // info.patch_size
    g = torch.Generator().manual_seed(args.seed)
    images = torch.randn(args.batch, 3, side, side, generator=g).to(dev)
    labels = torch.randint(-1, args.classes, (args.batch, args.side, args.side), generator=g)
    labels = labels.to(dev)
    with torch.no_grad():
        mid, feats = forward_tokens(model, images)
    crops = np.arange(args.batch, dtype=np.int64)
    anchors = anchor_rows(args.seed, 0, 0, args.batch, h * w, 1 / 16)
    sets = _sets(normalise(feats.cpu().numpy().reshape(-1, info.embed_dim)), anchors, 0.05, 0.15)

    tmp = tempfile.TemporaryDirectory()
    root = zarr.open_group(str(Path(tmp.name) / "bench.zarr"), mode="w")
    tok_arr = root.create_array("tokens", shape=mid.shape, dtype="float16",
                                chunks=(8,) + tuple(mid.shape[1:]))
    feat_arr = root.create_array("feats", shape=feats.shape, dtype="float16",
                                 chunks=(8,) + tuple(feats.shape[1:]))
    tok_arr[:] = mid.cpu().numpy().astype(np.float16)
    feat_arr[:] = feats.cpu().numpy().astype(np.float16)

    cfg = TrainConfig()
    manifest = dict(embed_dim=info.embed_dim, grid_train=[h, w], num_classes=args.classes,
                    has_labels=not args.no_linear_probe)

    def setup():
        mods = build_model(manifest, model, seed=args.seed, device=str(dev))
        return mods, make_optimisers(*mods, cfg)

    cached_mods, cached_opts = setup()
    recomp_mods, recomp_opts = setup()

    def cache_step():
        tokens = torch.from_numpy(_gather(tok_arr, crops).astype(np.float32)).to(dev)
        F = normalise(_gather(feat_arr, crops).reshape(-1, info.embed_dim))  # mining features
        assert F.shape[0] == args.batch * h * w
        return train_step(cached_mods, cached_opts, tokens, labels, anchors, sets, cfg)

    def recompute_step():
        with torch.no_grad():
            tokens, frozen = forward_tokens(model, images)  # all blocks of the frozen ViT
        F = normalise(frozen.cpu().numpy().reshape(-1, info.embed_dim))  # mining features
        assert F.shape[0] == args.batch * h * w
        return train_step(recomp_mods, recomp_opts, tokens, labels, anchors, sets, cfg)

    def timed(fn):
        """(wall seconds, process CPU seconds) of one call."""
        if dev.type == "cuda":
            torch.cuda.synchronize()
        t0, c0 = time.perf_counter(), time.process_time()
        fn()
        if dev.type == "cuda":
            torch.cuda.synchronize()
        return time.perf_counter() - t0, time.process_time() - c0

    def frozen_only():
        with torch.no_grad():
            forward_tokens(model, images)

    variants = {"cache": cache_step, "recompute": recompute_step, "frozen_forward": frozen_only}
    for fn in variants.values():  # warm-up
        timed(fn)
    times = {k: [] for k in variants}
    for _ in range(args.reps):  # interleaved, so load drifts hit all alike
        for k, fn in variants.items():
            times[k].append(timed(fn))
    med = {k: (statistics.median(t[0] for t in v), statistics.median(t[1] for t in v))
           for k, v in times.items()}
    res = {
        "backbone": info.name, "weights": fp, "device": str(dev),
        "threads": torch.get_num_threads(),
        "batch": args.batch, "input_side": side, "grid": [h, w], "anchors": int(anchors.size),
        "classes": args.classes, "linear_probe": not args.no_linear_probe, "reps": args.reps,
        **{f"{k}_wall_s": v[0] for k, v in med.items()},
        **{f"{k}_cpu_s": v[1] for k, v in med.items()},
    }
    res["speedup_wall"] = res["recompute_wall_s"] / res["cache_wall_s"]
    res["speedup_cpu"] = res["recompute_cpu_s"] / res["cache_cpu_s"]
    print(f"backbone {res['backbone']} ({fp}), {args.batch} crops at {side}px, grid {h}x{w}, "
          f"{res['anchors']} anchors, {args.classes} classes"
          f"{'' if res['linear_probe'] else ' (no linear probe)'}, device {dev}, "
          f"{res['threads']} threads, median of {args.reps}")
    print(f"  {'':28s} {'wall s':>8s} {'cpu s':>8s}")
    for k, label in (("cache", "step from cache"), ("recompute", "step recomputing the ViT"),
                     ("frozen_forward", "  of which frozen forward")):
        print(f"  {label:28s} {res[k + '_wall_s']:8.3f} {res[k + '_cpu_s']:8.3f}")
    print(f"  {'speed-up':28s} {res['speedup_wall']:7.2f}x {res['speedup_cpu']:7.2f}x")
    if args.json:
        Path(args.json).write_text(json.dumps(res, indent=2) + "\n")
    tmp.cleanup()
    return res


if __name__ == "__main__":
    main()
