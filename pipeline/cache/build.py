"""Stage 1: run the frozen backbone once over a dataset and cache its tokens in Zarr.

Unit of work: a chunk of `chunk_size` source images of one split (5 crops each for `train`,
one evaluation view each for `val`). A chunk writes its own preallocated region of every array,
then its marker `markers/features/<split>-<chunk>.done` with the size and sha256 of each chunk
file it wrote. A rerun checks every marked chunk against its marker (recomputing damaged ones and
adding checksums to markers of older versions) and skips the intact ones; a chunk cut short is
simply redone, so the result equals an uninterrupted run. One writer at a time (lock
`<out>/.features.lock`).
"""

from __future__ import annotations

import dataclasses
import functools
import json
import logging
import os
import time
from dataclasses import dataclass
from pathlib import Path
from typing import Any

import numpy as np

from pipeline.artifacts.chunks import unit_key
from pipeline.artifacts.features import FeatureCacheWriter
from pipeline.cache.integrity import (
    NonFinite,
    nonfinite_rows,
    releases_locks,
    require_device,
)
from pipeline.cache.store import in_run
from pipeline.config.resolve import config_hash, to_dict
from pipeline.config.schema import FeaturesConfig
from pipeline.executor import run_units

log = logging.getLogger("ppap.features")

CROPS_PER_IMAGE = {"train": 5, "val": 1}


@dataclass(frozen=True)
class Unit:
    split: str
    chunk: int
    start: int  # first source image
    stop: int  # one past the last source image

    @property
    def key(self) -> str:
        return unit_key(self.split, self.chunk)

    @property
    def n_images(self) -> int:
        return self.stop - self.start


def _side(cfg: FeaturesConfig, split: str) -> int:
    return cfg.train_size if split == "train" else cfg.eval_size


@functools.lru_cache(maxsize=4)
def _dataset(name: str, root: str | None, split: str, classes: str | None, seed: int, limit: int | None):
    from pipeline.data.datasets import get_dataset

    ds = get_dataset(name, root, split, classes=classes, seed=seed)
    return ds, (len(ds) if limit is None else min(limit, len(ds)))


@functools.lru_cache(maxsize=2)
def _backbone(name: str, weights: str | None, device: str, seed: int):
    from pipeline.data.backbones import load_backbone

    return load_backbone(name, weights=weights, device=device, seed=seed)


def _describe(cfg: FeaturesConfig) -> dict[str, Any]:
    """Identity of the cache: everything that changes its contents."""
    from pipeline.data.specs import input_size

    model, info, weights_fp = _backbone(cfg.backbone, cfg.weights, cfg.device, cfg.seed)
    splits = {}
    first = None
    for split in cfg.splits:
        ds, n = _dataset(cfg.dataset, cfg.data_root, split, cfg.classes, cfg.seed, cfg.limit)
        first = first or ds
        side = _side(cfg, split)
        g = input_size(info, side) // info.patch_size
        splits[split] = {
            "dataset": ds.describe(),
            "n_images": n,
            "n_crops": n * CROPS_PER_IMAGE[split],
            "side": side,
            "input_side": input_size(info, side),
            "grid": [g, g],
        }
    identity = {
        "dataset": cfg.dataset,
        "backbone": cfg.backbone,
        "weights_fingerprint": weights_fp,
        "seed": cfg.seed if (cfg.dataset == "demo" or weights_fp.startswith("random")) else None,
        "preprocessing": {
            "train": "five-crop: 4 corners + centre at half height/width, shorter side "
                     f"{cfg.train_size}, centre {cfg.train_size}x{cfg.train_size}",
            "val": f"shorter side {cfg.eval_size}, centre {cfg.eval_size}x{cfg.eval_size}",
            "mean": list(info.mean), "std": list(info.std),
            "backbone_input_resize": "bilinear, no antialias, to a multiple of the patch size",
        },
        "limit": cfg.limit,
        "chunk_size": cfg.chunk_size,
        "splits": splits,
    }
    manifest = {
        **identity,
        "fingerprint": config_hash(identity),
        "weights": cfg.weights,
        "patch_size": info.patch_size,
        "embed_dim": info.embed_dim,
        "num_classes": first.num_classes,
        "class_names": list(first.class_names),
        "has_labels": bool(first.has_labels),
        "train_size": cfg.train_size,
        "eval_size": cfg.eval_size,
        "grid_train": splits.get("train", {}).get("grid"),
        "grid_eval": splits.get("val", {}).get("grid"),
    }
    return manifest


def _units(cfg: FeaturesConfig, manifest: dict[str, Any]) -> list[Unit]:
    units = []
    for split, s in manifest["splits"].items():
        n = s["n_images"]
        for c, start in enumerate(range(0, n, cfg.chunk_size)):
            units.append(Unit(split, c, start, min(n, start + cfg.chunk_size)))
    return units


def process_unit(unit: Unit, cfg: FeaturesConfig) -> dict[str, Any]:
    """Compute and write one chunk; returns its stats. Safe to call again after a crash."""
    import torch

    from pipeline.data.backbones import forward_tokens
    from pipeline.data.base import CorruptImage
    from pipeline.data.specs import input_size
    from pipeline.data.views import eval_view, five_crops, patch_labels

    t0 = time.perf_counter()
    if cfg.workers > 0:  # share the cores between local worker processes
        torch.set_num_threads(max(1, (os.cpu_count() or 1) // cfg.workers))
    ds, _ = _dataset(cfg.dataset, cfg.data_root, unit.split, cfg.classes, cfg.seed, cfg.limit)
    model, info, _ = _backbone(cfg.backbone, cfg.weights, cfg.device, cfg.seed)
    side = _side(cfg, unit.split)
    in_side = input_size(info, side)
    grid = (in_side // info.patch_size, in_side // info.patch_size)
    per = CROPS_PER_IMAGE[unit.split]

    rgbs, labels, boxes, img_idx, valid, skipped = [], [], [], [], [], []
    for i in range(unit.start, unit.stop):
        try:
            sample = ds.load(i)
        except CorruptImage as exc:
            log.warning("skipping unreadable image %s: %s", ds.image_id(i), exc)
            skipped.append({"index": i, "image_id": ds.image_id(i), "error": str(exc)})
            blank = np.zeros((side, side, 3), np.uint8)
            lab = np.full((side, side), -1, np.int64) if ds.has_labels else None
            views = [(blank, lab, (0, 0, 0, 0))] * per
            ok = 0
        else:
            views = five_crops(sample.rgb, sample.label, side) if unit.split == "train" else [
                eval_view(sample.rgb, sample.label, side)
            ]
            ok = 1
        for rgb, lab, box in views:
            rgbs.append(rgb)
            labels.append(lab)
            boxes.append(box)
            img_idx.append(i)
            valid.append(ok)

    x = torch.from_numpy(np.stack(rgbs)).permute(0, 3, 1, 2).float().div_(255.0)
    mean = torch.tensor(info.mean).view(1, 3, 1, 1)
    std = torch.tensor(info.std).view(1, 3, 1, 1)
    x = (x - mean) / std
    mids, feats = [], []
    with torch.inference_mode():
        for b in range(0, len(x), cfg.batch_size):
            xb = x[b : b + cfg.batch_size].to(cfg.device)
            if in_side != side:
                xb = torch.nn.functional.interpolate(
                    xb, size=(in_side, in_side), mode="bilinear", align_corners=False, antialias=False
                )
            mid, feat = forward_tokens(model, xb)
            mids.append(mid.to("cpu", torch.float16).numpy())
            feats.append(feat.to("cpu", torch.float16).numpy())
    mids, feats = np.concatenate(mids), np.concatenate(feats)
    for name, arr in (("tokens", mids), ("feats", feats)):  # float16 overflow included
        bad = nonfinite_rows(arr)
        if len(bad):
            imgs = sorted({ds.image_id(img_idx[i]) for i in bad})
            raise NonFinite(
                f"the backbone {cfg.backbone} produced NaN/Inf {name} for image(s) "
                f"{', '.join(imgs[:5])} of split {unit.split}; nothing of chunk {unit.key} was "
                "written. Check the --weights file (a damaged checkpoint gives NaN) and rerun")

    lo, hi = unit.start * per, unit.stop * per
    arrays = {"tokens": mids, "feats": feats, "rgb": np.stack(rgbs),
              "image_index": np.asarray(img_idx, np.int32),
              "crop_box": np.asarray(boxes, np.int32).reshape(-1, 4),
              "valid": np.asarray(valid, np.uint8)}
    if ds.has_labels:
        lab = np.stack(labels).astype(np.int16)
        arrays["labels"] = lab
        arrays["patch_labels"] = np.stack([patch_labels(l, grid) for l in lab]).astype(np.int16)
    stats = {"images": unit.n_images, "crops": hi - lo, "skipped": skipped,
             "seconds": round(time.perf_counter() - t0, 3)}
    return FeatureCacheWriter(cfg.out).write_unit(unit.split, unit.chunk, lo, hi, arrays, stats)


@releases_locks
def run(cfg: FeaturesConfig) -> dict[str, Any]:
    """Fill `<out>/features.zarr`; resumable; refuses to mix caches made from other inputs."""
    require_device(cfg.device)
    # absolute paths: dask workers may start elsewhere
    cfg = dataclasses.replace(
        cfg, out=str(Path(cfg.out).resolve()),
        data_root=str(Path(cfg.data_root).expanduser().resolve()) if cfg.data_root else None,
    )
    out = Path(cfg.out)
    log.info("features: dataset=%s backbone=%s out=%s device=%s seed=%d", cfg.dataset,
             cfg.backbone, out, cfg.device, cfg.seed)
    manifest = _describe(cfg)
    writer = FeatureCacheWriter(out)
    writer.open(manifest, {s: cfg.chunk_size * CROPS_PER_IMAGE[s] for s in manifest["splits"]},
                to_dict(cfg))
    units = _units(cfg, manifest)
    intact = writer.intact_units(manifest, {u.key: u.chunk for u in units})
    todo = [u for u in units if u.key not in intact]
    log.info("features: %d chunks, %d already done", len(units), len(units) - len(todo))
    t0 = time.perf_counter()
    run_units(
        process_unit, todo, args=(cfg,), workers=cfg.workers, scheduler=cfg.scheduler,
        desc="features", unit_weight=lambda u: u.n_images, rate_unit="img",
    )
    elapsed = time.perf_counter() - t0
    skipped = [s for u in units for s in writer.unit_stats(u.key).get("skipped", [])]
    report = {
        "store": in_run(writer.path, writer.out),  # relative to the run directory
        "fingerprint": manifest["fingerprint"],
        "chunks": len(units),
        "chunks_computed": len(todo),
        "images": {k: v["n_images"] for k, v in manifest["splits"].items()},
        "crops": {k: v["n_crops"] for k, v in manifest["splits"].items()},
        "skipped_images": skipped,
        "seconds": round(elapsed, 2),
    }
    report_path = writer.write_report(report)
    if skipped:
        log.warning("features: %d unreadable image(s) skipped (valid=0 in the cache); see %s",
                    len(skipped), report_path)
    log.info("features: done -> %s", json.dumps({k: report[k] for k in ("images", "crops", "seconds")}))
    return report
