"""Stage 2: mine PPAP (or P⁰ / HP / k-means) sets on fixed, seeded batches into shards.

Unit of work: one (epoch, batch) of the batch plan, written as one shard plus its `.done`
marker (pipeline.shards). Which crops form a batch and which patches are anchors is a pure
function of (seed, epoch, batch, sizes) (pipeline.batching), so a rerun, a resumed run and a
dask run write bit-identical shards. Criterion state shared by all batches (the HP reference
pool, the k-means centroids, the PriMaPs class prototypes, the eigenfunction net) is drawn once
from the training split and saved beside the shards.
"""

from __future__ import annotations

import dataclasses
import functools
import io
import logging
import os
import time
from pathlib import Path
from typing import Any

import numpy as np

from pipeline import batching, eigen, mining, primaps, shards
from pipeline import config as C
from pipeline.executor import run_units
from pipeline.featstore import FeatureStore, normalise, take_rows
from pipeline.store import atomic_write_bytes, atomic_write_json, check_or_write_manifest, read_json

log = logging.getLogger("ppap.mine")

KMEANS_SAMPLE = 100_000  # patches used to fit the k-means / primaps / eigen criterion state


def mine_dir(out: str | Path, name: str) -> Path:
    return Path(out) / "mine" / name


@functools.lru_cache(maxsize=2)
def _store(out: str) -> FeatureStore:
    return FeatureStore(out)


@functools.lru_cache(maxsize=2)
def _items(out: str) -> np.ndarray:
    """Training crops that were written from readable images (the mining population)."""
    return np.flatnonzero(_store(out).split("train")["valid"][:]).astype(np.int64)


@functools.lru_cache(maxsize=8)
def _plan(seed: int, epoch: int, n_items: int, batch_size: int) -> list[np.ndarray]:
    return batching.batch_plan(seed, epoch, n_items, batch_size)


def batch_images(cfg: C.MineConfig, epoch: int, batch: int) -> np.ndarray:
    """Crop indices (into the cache's train split) of batch `batch` of plan `epoch`."""
    items = _items(cfg.out)
    return items[_plan(cfg.seed, epoch, len(items), cfg.batch_size)[batch]]


def _params(cfg: C.MineConfig) -> mining.MineParams:
    return mining.MineParams(phi0=cfg.phi0, psi0=cfg.psi0, prop_iters=cfg.prop_iters,
                             sigma_pos=cfg.sigma_pos, sigma_amb=cfg.sigma_amb)


def _identity(cfg: C.MineConfig, store: FeatureStore) -> dict[str, Any]:
    """Everything that changes the shards (not: epochs, workers, memory budget)."""
    ident: dict[str, Any] = {
        "features_fingerprint": store.fingerprint,
        "criterion": cfg.criterion,
        "batch_size": cfg.batch_size,
        "anchor_fraction": cfg.anchor_fraction,
        "seed": cfg.seed,
        "backend": cfg.backend,
        "device": "cuda" if cfg.device.startswith("cuda") else "cpu",
    }
    if cfg.criterion == "ppap":
        ident.update(phi0=cfg.phi0, psi0=cfg.psi0, prop_iters=cfg.prop_iters,
                     sigma_pos=cfg.sigma_pos, sigma_amb=cfg.sigma_amb, band=cfg.band)
    elif cfg.criterion == "p0":
        ident.update(phi0=cfg.phi0, band=cfg.band)
    elif cfg.criterion == "hp":
        ident.update(hp_pool_size=cfg.hp_pool_size)
    elif cfg.criterion == "primaps":
        ident.update(kmeans_k=_kmeans_k(cfg, store), primaps_psi=cfg.primaps_psi,
                     primaps_coverage=cfg.primaps_coverage)
    elif cfg.criterion == "eigen":
        ident.update(kmeans_k=_kmeans_k(cfg, store), eigen_dim=cfg.eigen_dim,
                     eigen_steps=cfg.eigen_steps, eigen_kernel_power=cfg.eigen_kernel_power,
                     eigen_batch=eigen.BATCH, eigen_hidden=eigen.EigenParams().hidden)
    else:
        ident.update(kmeans_k=_kmeans_k(cfg, store))
    return ident


def _kmeans_k(cfg: C.MineConfig, store: FeatureStore) -> int:
    if cfg.kmeans_k is not None:
        return cfg.kmeans_k
    if store.num_classes < 2:
        raise ValueError(f"the cache has no class list, so the {cfg.criterion} criterion cannot "
                         "default its cluster count; pass --kmeans-k K")
    return store.num_classes


def _save_npy(path: Path, arr: np.ndarray) -> None:
    buf = io.BytesIO()
    np.save(buf, arr)
    atomic_write_bytes(path, buf.getvalue())


def _load_npy(path: str) -> np.ndarray:
    """Criterion state is read once per process, not once per batch (keyed by mtime)."""
    return _load_npy_at(path, os.stat(path).st_mtime_ns)


@functools.lru_cache(maxsize=2)
def _load_npy_at(path: str, mtime_ns: int) -> np.ndarray:
    return np.load(path)


def _rows(store: FeatureStore, crops: np.ndarray, patches: np.ndarray) -> np.ndarray:
    """Normalised frozen features of (crop, patch) pairs, in the given order."""
    feats = store.split("train")["feats"]
    uniq, inv = np.unique(crops, return_inverse=True)
    block = feats.get_orthogonal_selection((uniq, slice(None), slice(None)))
    return normalise(block[inv, patches])


def criterion_state(cfg: C.MineConfig, store: FeatureStore, directory: Path) -> dict[str, Any]:
    """HP pool or k-means centroids: drawn once (seeded) from the training split, saved."""
    items = _items(cfg.out)
    h, w = store.grid("train")
    if cfg.criterion == "hp":
        path = directory / "hp_pool.npy"
        if not path.exists():
            imgs, patches = batching.sample_patches(cfg.seed, len(items), h * w, cfg.hp_pool_size,
                                                    tag=batching.TAG_HP_POOL)
            _save_npy(path, _rows(store, items[imgs], patches))
        return {"hp_pool": _load_npy(str(path))}
    def sample() -> np.ndarray:  # the same seeded sample for kmeans, primaps and eigen
        n = min(KMEANS_SAMPLE, len(items) * h * w)
        imgs, patches = batching.sample_patches(cfg.seed, len(items), h * w, n,
                                                tag=batching.TAG_KMEANS)
        return _rows(store, items[imgs], patches)

    if cfg.criterion in ("kmeans", "primaps"):
        # primaps: the class prototypes whose majority labels the masks (= the kmeans centroids)
        path = directory / ("kmeans_centroids.npy" if cfg.criterion == "kmeans"
                            else "primaps_prototypes.npy")
        if not path.exists():
            _save_npy(path, mining.fit_kmeans(sample(), _kmeans_k(cfg, store), cfg.seed))
        return {"centroids": _load_npy(str(path))}
    if cfg.criterion == "eigen":
        path = directory / "eigen_state.npz"
        if not path.exists():
            params = eigen.EigenParams(n_eigen=cfg.eigen_dim, steps=cfg.eigen_steps,
                                       kernel_power=cfg.eigen_kernel_power)
            log.info("mine %s: fitting %s eigenfunctions (NeuralEF, %d steps) on %d patches",
                     cfg.run_name, cfg.eigen_dim or "K", cfg.eigen_steps, min(KMEANS_SAMPLE, len(items) * h * w))
            fitted = eigen.fit_eigen_clusters(sample(), _kmeans_k(cfg, store), cfg.seed, params)
            atomic_write_bytes(path, fitted.to_npz_bytes())
        return {"eigen": _load_eigen(str(path), os.stat(path).st_mtime_ns)}
    return {}


@functools.lru_cache(maxsize=2)
def _load_eigen(path: str, mtime_ns: int) -> eigen.EigenClusters:
    return eigen.EigenClusters.from_npz(path)


def cluster_labels(cfg: C.MineConfig, state: dict[str, Any], F: np.ndarray,
                   patches_per_crop: int) -> np.ndarray | None:
    """The label of every row of F for the cluster criteria (-1 = unassigned), else None."""
    if cfg.criterion == "kmeans":
        return mining.assign_clusters(F, state["centroids"], mem_budget_mb=cfg.mem_budget_mb)
    if cfg.criterion == "primaps":
        return primaps.pseudo_labels(F, patches_per_crop, state["centroids"], cfg.primaps_psi,
                                     cfg.primaps_coverage)
    if cfg.criterion == "eigen":
        return state["eigen"].assign(F)
    return None


def _limit_threads(workers: int) -> None:
    if workers > 0:
        import faiss
        import torch

        n = max(1, (os.cpu_count() or 1) // workers)
        torch.set_num_threads(n)
        faiss.omp_set_num_threads(n)


def process_batch(unit: tuple[int, int], cfg: C.MineConfig) -> dict[str, Any]:
    """Mine batch `unit = (epoch, batch)` and write its shard + marker. Safe to redo."""
    epoch, batch = unit
    _limit_threads(cfg.workers)
    store = _store(cfg.out)
    directory = mine_dir(cfg.out, cfg.run_name)
    images = batch_images(cfg, epoch, batch)
    F = store.mining_features(images)
    h, w = store.grid("train")
    anchors = batching.anchor_rows(cfg.seed, epoch, batch, len(images), h * w, cfg.anchor_fraction)
    state = criterion_state(cfg, store, directory)
    cluster_of = cluster_labels(cfg, state, F, h * w)
    mined = mining.mine_batch(
        F, anchors, cfg.criterion, _params(cfg), backend=cfg.backend, device=cfg.device,
        mem_budget_mb=cfg.mem_budget_mb, band=cfg.band, hp_pool=state.get("hp_pool"),
        cluster_of=cluster_of, keep_sets=cfg.criterion == "hp",
    )
    stats = shards.write_shard(
        shards.shard_path(directory, epoch, batch), mined, epoch, batch, images, cfg.criterion,
        meta={"grid": [h, w]},  # no timings: shards of a rerun must be bit-identical
    )
    return stats


def run(cfg: C.MineConfig) -> dict[str, Any]:
    """Mine every (epoch, batch) of `cfg.epochs` batch plans; resumable; refuses to mix."""
    cfg = dataclasses.replace(cfg, out=str(Path(cfg.out).resolve()))
    store = _store(cfg.out)
    directory = mine_dir(cfg.out, cfg.run_name)
    items = _items(cfg.out)
    if cfg.batch_size > len(items):
        raise ValueError(
            f"batch_size={cfg.batch_size} is larger than the {len(items)} training crops in "
            f"{store.path}; use --batch-size {len(items)} or less"
        )
    log.info("mine %s: criterion=%s epochs=%d batch=%d anchors/img=%s backend=%s device=%s seed=%d",
             cfg.run_name, cfg.criterion, cfg.epochs, cfg.batch_size, cfg.anchors_per_image,
             cfg.backend, cfg.device, cfg.seed)
    check_or_write_manifest(directory / "manifest.json", _identity(cfg, store),
                            extra={"config": C.to_dict(cfg)}, what="mined-set directory")
    atomic_write_json(directory / "config.json", C.to_dict(cfg))
    criterion_state(cfg, store, directory)
    units = [(e, b) for e in range(cfg.epochs)
             for b in range(len(_plan(cfg.seed, e, len(items), cfg.batch_size)))]
    todo = [u for u in units if not shards.is_done(shards.shard_path(directory, *u))]
    log.info("mine %s: %d batches, %d already done", cfg.run_name, len(units), len(units) - len(todo))
    t0 = time.perf_counter()
    run_units(process_batch, todo, args=(cfg,), workers=cfg.workers, scheduler=cfg.scheduler,
              desc=f"mine {cfg.run_name}", rate_unit="batch")
    summary = summarise(directory, units)
    summary["seconds"] = round(time.perf_counter() - t0, 2)
    summary["criterion_state"] = state_checksums(directory)
    atomic_write_json(directory / "summary.json", summary)
    log.info("mine %s: mean |P| %.1f, |A| %.1f, |N| %.1f, no-positive anchors %d, %.0f bytes/anchor",
             cfg.run_name, summary["mean_pos"], summary["mean_amb"], summary["mean_neg"],
             summary["anchors_without_positive"], summary["bytes_per_anchor"])
    return summary


STATE_FILES = ("hp_pool.npy", "kmeans_centroids.npy", "primaps_prototypes.npy", "eigen_state.npz")


def state_checksums(directory: Path) -> dict[str, str]:
    """sha256 of the criterion state files in a mined-set directory (recorded in summary.json)."""
    import hashlib

    return {name: hashlib.sha256((directory / name).read_bytes()).hexdigest()
            for name in STATE_FILES if (directory / name).is_file()}


def summarise(directory: Path, units: list[tuple[int, int]]) -> dict[str, Any]:
    """Anchor-weighted means over the markers of the given shards."""
    stats = [shards.read_marker(shards.shard_path(directory, *u)) for u in units]
    n = sum(s["n_anchors"] for s in stats)

    def mean(key: str) -> float:
        return sum(s[key] * s["n_anchors"] for s in stats) / max(n, 1)

    return {
        "dir": str(directory), "shards": len(stats), "anchors": n,
        "mean_pos": mean("mean_pos"), "mean_amb": mean("mean_amb"), "mean_neg": mean("mean_neg"),
        "anchors_without_positive": sum(s["anchors_without_positive"] for s in stats),
        "bytes_per_anchor": sum(s["bytes"] for s in stats) / max(n, 1),
    }


def load_batch(out: str | Path, mined: str, epoch: int, batch: int):
    """(store, shard, F) of one finished batch, checked against the cache it was mined from."""
    store = FeatureStore(out)
    directory = mine_dir(out, mined)
    manifest = directory / "manifest.json"
    if not manifest.exists():
        raise ValueError(f"no mined sets named {mined!r} under {Path(out) / 'mine'}; "
                         f"run `ppap-pipe mine --out {out} --name {mined}` first")
    fp = read_json(manifest)["identity"]["features_fingerprint"]
    if fp != store.fingerprint:
        raise ValueError(f"{directory} was mined from a feature cache with fingerprint {fp}, "
                         f"but {store.path} has {store.fingerprint}; mine again for this cache")
    path = shards.shard_path(directory, epoch, batch)
    if not shards.is_done(path):
        raise ValueError(f"batch {batch} of epoch {epoch} is not mined in {directory} "
                         f"(no {path.name} with its .done marker); check --epoch/--batch or "
                         "rerun `ppap-pipe mine`")
    shard = shards.read_shard(path)
    return store, shard, store.mining_features(shard.images)


def export(out: str | Path, mined: str, epoch: int, batch: int, to: str | Path) -> Path:
    """Write one mined batch as .npz in the documented export format."""
    store, shard, F = load_batch(out, mined, epoch, batch)
    labels = None
    if store.has_labels:
        labels = take_rows(store.split("train")["patch_labels"], shard.images)
    data = shards.export_batch(F, shard, patch_labels=labels, image_index=shard.images)
    buf = io.BytesIO()
    np.savez(buf, **data)
    to = Path(to)
    atomic_write_bytes(to, buf.getvalue())
    log.info("export: epoch %d batch %d of %s -> %s (%d rows, %d anchors)", epoch, batch, mined,
             to, len(F), len(shard.anchors))
    return to
