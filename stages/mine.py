"""Stage 2: mine PPAP (or P⁰ / HP / k-means) sets on fixed, seeded batches into shards.

Unit of work: one (epoch, batch) of the batch plan, written as one shard plus its `.done`
marker (pipeline.shards). Which crops form a batch and which patches are anchors is a pure
function of (seed, epoch, batch, sizes) (pipeline.batching), so a rerun, a resumed run and a
dask run write bit-identical shards. Criterion state shared by all batches (the HP reference
pool, the k-means centroids, the PriMaPs class prototypes, the eigenfunction net) is drawn once
from the training split and saved beside the shards.

The feature cache must be complete (FeatureStore.split refuses an unfinished one). The manifest
records which training crops were mined (`items`: count and sha256) and how many plans are
complete (`plans`); a rerun verifies every finished shard's checksum and re-mines corrupt ones and
those of older versions (no checksum). One writer per directory (lock `<dir>/.lock`).
"""

from __future__ import annotations

import dataclasses
import functools
import io
import logging
import os
import time
from pathlib import Path
from typing import Any, NamedTuple

import numpy as np

from pipeline import batching, eigen, mining, primaps, shards
from pipeline.config import MineConfig, to_dict
from pipeline.executor import run_units
from pipeline.featstore import FeatureStore, normalise, take_rows
from pipeline.integrity import (CorruptArtifact, clean_orphans, hold_lock, read_checked, releases_locks,
                                require_device, sha256_bytes, write_checked)
from pipeline.store import atomic_write_bytes, atomic_write_json, check_or_write_manifest, read_json

log = logging.getLogger("ppap.mine")

KMEANS_SAMPLE = 100_000  # patches used to fit the k-means / primaps / eigen criterion state


def mine_dir(out: str | Path, name: str) -> Path:
    return Path(out) / "mine" / name


@functools.lru_cache(maxsize=2)
def _store(out: str) -> FeatureStore:
    return FeatureStore(out)


@functools.lru_cache(maxsize=4)
def _split(out: str, seed: int, holdout: float) -> tuple[np.ndarray, np.ndarray]:
    """(mining population, held-out crops) of the training split: valid crops minus the crops
    of the seeded held-out source images (pipeline.batching.holdout_split)."""
    g = _store(out).split("train")
    return batching.holdout_split(seed, g["image_index"][:], g["valid"][:], holdout)


def train_items(cfg: MineConfig) -> np.ndarray:
    """Training crops that may be mined: readable, and not held out for selection."""
    return _split(cfg.out, cfg.seed, cfg.holdout)[0]


def holdout_items(cfg: MineConfig) -> np.ndarray:
    """Crops of the held-out source images (never mined, never trained on)."""
    return _split(cfg.out, cfg.seed, cfg.holdout)[1]


@functools.lru_cache(maxsize=8)
def _plan(seed: int, epoch: int, n_items: int, batch_size: int) -> list[np.ndarray]:
    return batching.batch_plan(seed, epoch, n_items, batch_size)


def batch_images(cfg: MineConfig, epoch: int, batch: int) -> np.ndarray:
    """Crop indices (into the cache's train split) of batch `batch` of plan `epoch`."""
    items = train_items(cfg)
    return items[_plan(cfg.seed, epoch, len(items), cfg.batch_size)[batch]]


def _params(cfg: MineConfig) -> mining.MineParams:
    return mining.MineParams(phi0=cfg.phi0, psi0=cfg.psi0, prop_iters=cfg.prop_iters,
                             sigma_pos=cfg.sigma_pos, sigma_amb=cfg.sigma_amb)


def _identity(cfg: MineConfig, store: FeatureStore) -> dict[str, Any]:
    """Everything that changes the shards (not: plans, workers, memory budget)."""
    ident: dict[str, Any] = {
        "features_fingerprint": store.fingerprint,
        "criterion": cfg.criterion,
        "batch_size": cfg.batch_size,
        "anchor_fraction": cfg.anchor_fraction,
        "seed": cfg.seed,
        "holdout": cfg.holdout,
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


def _kmeans_k(cfg: MineConfig, store: FeatureStore) -> int:
    if cfg.kmeans_k is not None:
        return cfg.kmeans_k
    if store.num_classes < 2:
        raise ValueError(f"the cache has no class list, so the {cfg.criterion} criterion cannot "
                         "default its cluster count; pass --kmeans-k K")
    return store.num_classes


def _save_npy(path: Path, arr: np.ndarray) -> None:
    buf = io.BytesIO()
    np.save(buf, arr)
    write_checked(path, buf.getvalue())  # + <path>.sha256


def _load_npy(path: str) -> np.ndarray:
    """Criterion state is read once per process, not once per batch (keyed by mtime)."""
    return _load_npy_at(path, os.stat(path).st_mtime_ns)


@functools.lru_cache(maxsize=2)
def _load_npy_at(path: str, mtime_ns: int) -> np.ndarray:
    data = read_checked(path, what="criterion state", legacy_ok=False,
                        fix="rerun `ppap-pipe mine` with the same settings: it redraws it")
    return np.load(io.BytesIO(data))


def _state_ok(path: Path, repair: bool, load: Any = None) -> bool:
    """Whether saved criterion state can be used; with `repair`, a corrupt or unverifiable
    file is dropped so that it is drawn again (it is a pure function of seed and cache)."""
    if not path.exists():
        return False
    if not repair:
        return True
    try:
        (load or _load_npy)(str(path))
        return True
    except (CorruptArtifact, ValueError, OSError, KeyError) as exc:
        log.warning("mine: %s; drawing it again", exc)
        path.unlink(missing_ok=True)
        return False


def _rows(store: FeatureStore, crops: np.ndarray, patches: np.ndarray) -> np.ndarray:
    """Normalised frozen features of (crop, patch) pairs, in the given order."""
    feats = store.split("train")["feats"]
    uniq, inv = np.unique(crops, return_inverse=True)
    block = feats.get_orthogonal_selection((uniq, slice(None), slice(None)))
    return normalise(block[inv, patches])


def criterion_state(cfg: MineConfig, store: FeatureStore, directory: Path,
                    repair: bool = False) -> dict[str, Any]:
    """HP pool or k-means centroids: drawn once (seeded) from the mined crops (the training split less the holdout), saved."""
    items = train_items(cfg)
    h, w = store.grid("train")
    if cfg.criterion == "hp":
        path = directory / "hp_pool.npy"
        if not _state_ok(path, repair):
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
        if not _state_ok(path, repair):
            _save_npy(path, mining.fit_kmeans(sample(), _kmeans_k(cfg, store), cfg.seed))
        return {"centroids": _load_npy(str(path))}
    if cfg.criterion == "eigen":
        path = directory / "eigen_state.npz"
        if not _state_ok(path, repair, load=eigen.EigenClusters.from_npz):
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


def cluster_labels(cfg: MineConfig, state: dict[str, Any], F: np.ndarray,
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


def process_batch(unit: tuple[int, int], cfg: MineConfig) -> dict[str, Any]:
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


def _population(items: np.ndarray) -> dict[str, Any]:
    """Which training crops the batch plans permute (recorded in the manifest)."""
    return {"n": int(len(items)),
            "sha256": sha256_bytes(np.ascontiguousarray(items, dtype="<i8").tobytes())}


def _check_population(directory: Path, items: dict[str, Any], store: FeatureStore) -> bool:
    """Refuse shards mined on other crops; True for a directory of an older version (re-mine)."""
    path = directory / "manifest.json"
    if not path.is_file():
        return False
    old = read_json(path).get("items")
    if old is None:
        log.warning("mine: %s was written by an older ppap-pipe that recorded neither the crops it "
                    "mined nor shard checksums; every shard is mined again", directory)
        return True
    if old != items:
        raise ValueError(
            f"{directory} was mined on {old.get('n')} training crops, but {store.path} now has "
            f"{items['n']} usable ones (it changed since, e.g. it was unfinished when mining "
            "started), so its batch plans differ; delete that directory or mine under another "
            "--name")
    return False


def _complete_plans(cfg: MineConfig, directory: Path, n_items: int) -> int:
    e = 0
    while all(shards.is_done(shards.shard_path(directory, e, b))
              for b in range(len(_plan(cfg.seed, e, n_items, cfg.batch_size)))):
        e += 1
    return e


def _todo(directory: Path, units: list[tuple[int, int]]) -> list[tuple[int, int]]:
    """Units without an intact shard; logs why finished-looking shards are mined again."""
    todo, redo = [], {"legacy": [], "corrupt": []}
    for u in units:
        state, why = shards.shard_state(shards.shard_path(directory, *u))
        if state != "ok":
            todo.append(u)
        if state in redo:
            redo[state].append(why)
    if redo["corrupt"]:
        log.warning("mine: re-mining %d shard(s) that fail their checksum or marker: %s",
                    len(redo["corrupt"]), "; ".join(redo["corrupt"][:3]))
    if redo["legacy"]:
        log.warning("mine: re-mining %d shard(s) written without a checksum by an older ppap-pipe",
                    len(redo["legacy"]))
    return todo


@releases_locks
def run(cfg: MineConfig) -> dict[str, Any]:
    """Mine every (epoch, batch) of `cfg.plans` batch plans; resumable; refuses to mix."""
    require_device(cfg.device)
    cfg = dataclasses.replace(cfg, out=str(Path(cfg.out).resolve()))
    store = _store(cfg.out)
    directory = mine_dir(cfg.out, cfg.run_name)
    items = train_items(cfg)
    if len(items) == 0:
        raise ValueError(f"{store.path} holds no readable training crop to mine; rerun "
                         "`ppap-pipe features` (see features_report.json)")
    if cfg.batch_size > len(items):
        raise ValueError(
            f"batch_size={cfg.batch_size} is larger than the {len(items)} training crops left to "
            f"mine in {store.path} (holdout={cfg.holdout}); use --batch-size {len(items)} or less"
        )
    held = holdout_items(cfg)
    log.info("mine %s: criterion=%s plans=%d batch=%d anchors/img=%s backend=%s device=%s seed=%d "
             "holdout=%s (%d crops kept out for selection)", cfg.run_name, cfg.criterion,
             cfg.plans, cfg.batch_size, cfg.anchors_per_image, cfg.backend, cfg.device, cfg.seed,
             cfg.holdout, len(held))
    identity = _identity(cfg, store)
    population = _population(items)
    hold_lock(directory, "mined-set directory")
    clean_orphans(directory)
    old_manifest = (directory / "manifest.json").is_file()
    record = check_or_write_manifest(directory / "manifest.json", identity,
                                     extra={"config": to_dict(cfg), "items": population},
                                     what="mined-set directory")  # other settings: refused first
    legacy = old_manifest and _check_population(directory, population, store)
    atomic_write_json(directory / "config.json", to_dict(cfg))
    if legacy:  # state drawn by an older version may come from other crops: draw it again
        for name in ("hp_pool.npy", "kmeans_centroids.npy"):
            (directory / name).unlink(missing_ok=True)
    criterion_state(cfg, store, directory, repair=True)
    units = [(e, b) for e in range(cfg.plans)
             for b in range(len(_plan(cfg.seed, e, len(items), cfg.batch_size)))]
    todo = _todo(directory, units)
    log.info("mine %s: %d batches, %d already done", cfg.run_name, len(units), len(units) - len(todo))
    t0 = time.perf_counter()
    run_units(process_batch, todo, args=(cfg,), workers=cfg.workers, scheduler=cfg.scheduler,
              desc=f"mine {cfg.run_name}", rate_unit="batch")
    summary = summarise(directory, units)
    summary["seconds"] = round(time.perf_counter() - t0, 2)
    summary["criterion_state"] = state_checksums(directory)
    atomic_write_json(directory / "summary.json", summary)
    # the manifest says what the directory holds now (extended plans included)
    record = {**record, "config": to_dict(cfg), "items": population,
              "plans": _complete_plans(cfg, directory, len(items))}
    atomic_write_json(directory / "manifest.json", record)
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


class LoadedBatch(NamedTuple):
    """What `load_batch` returns (unpacks as `store, shard, F`)."""

    store: FeatureStore
    shard: shards.Shard
    F: np.ndarray  # (B*h*w, D) float32 unit mining features of the shard's crops


def load_batch(out: str | Path, mined: str, epoch: int, batch: int) -> LoadedBatch:
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
    return LoadedBatch(store, shard, store.mining_features(shard.images))


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
