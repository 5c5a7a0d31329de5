"""Stage 2: mine PPAP (or P⁰ / HP / k-means / PriMaPs / eigen) sets on fixed, seeded batches.

Unit of work: one (plan, batch) of the batch plan, written as one shard plus its `.done`
marker into the mined-set directory (pipeline.artifacts.mined.MinedSets). Which crops form a
batch and which patches are anchors is a pure function of (seed, plan, batch, sizes)
(MiningPlan, pipeline.mining.batching), so a rerun, a resumed run and a dask run write bit-identical
shards. Criterion state shared by all batches (the HP reference pool, the k-means centroids,
the PriMaPs class prototypes, the eigenfunction net) is drawn once from the training split and
saved beside the shards.

The feature cache must be complete (FeatureStore.split refuses an unfinished one). The manifest
records which training crops were mined and how many plans are complete; a rerun verifies every
finished shard's checksum and re-mines corrupt ones and those of older versions (no checksum).
One writer per directory (lock `<dir>/.lock`).
"""

from __future__ import annotations

import dataclasses
import functools
import logging
import os
import time
from pathlib import Path
from typing import Any

import numpy as np

from pipeline.artifacts.features import FeatureStore, normalise
from pipeline.artifacts.mined import MinedSets, MiningPlan
from pipeline.cache.integrity import releases_locks, require_device
from pipeline.config.resolve import to_dict
from pipeline.config.schema import MineConfig
from pipeline.executor import run_units
from pipeline.mining import batching, criteria, eigen, primaps, thresholds
from pipeline.mining.batch import mine_batch
from pipeline.mining.sets import MineParams

log = logging.getLogger("ppap.mine")

KMEANS_SAMPLE = 100_000  # patches used to fit the k-means / primaps / eigen criterion state


@functools.lru_cache(maxsize=2)
def _store(out: str) -> FeatureStore:
    """The feature cache, opened once per process (dask workers included)."""
    return FeatureStore(out)


@functools.lru_cache(maxsize=4)
def _plan(out: str, seed: int, holdout: float, batch_size: int) -> MiningPlan:
    return MiningPlan.of(_store(out), seed, holdout, batch_size)


def mining_plan(cfg: MineConfig) -> MiningPlan:
    """The batch plan of `cfg` on its feature cache (computed once per process)."""
    return _plan(cfg.out, cfg.seed, cfg.holdout, cfg.batch_size)


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


def _rows(store: FeatureStore, crops: np.ndarray, patches: np.ndarray) -> np.ndarray:
    """Normalised frozen features of (crop, patch) pairs, in the given order."""
    feats = store.split("train")["feats"]
    uniq, inv = np.unique(crops, return_inverse=True)
    block = feats.get_orthogonal_selection((uniq, slice(None), slice(None)))
    return normalise(block[inv, patches])


def criterion_state(cfg: MineConfig, store: FeatureStore, sets: MinedSets,
                    repair: bool = False) -> dict[str, Any]:
    """HP pool, k-means centroids, PriMaPs prototypes or eigenfunctions: drawn once (seeded)
    from the mined crops (the training split less the holdout), saved in `sets`."""
    items = mining_plan(cfg).items
    h, w = store.grid("train")
    crit = cfg.criterion
    if crit == "hp":
        if not sets.state_ok(crit, repair):
            imgs, patches = batching.sample_patches(cfg.seed, len(items), h * w, cfg.hp_pool_size,
                                                    tag=batching.TAG_HP_POOL)
            sets.save_state_array(crit, _rows(store, items[imgs], patches))
        return {"hp_pool": sets.load_state_array(crit)}

    def sample() -> np.ndarray:  # the same seeded sample for kmeans, primaps and eigen
        n = min(KMEANS_SAMPLE, len(items) * h * w)
        imgs, patches = batching.sample_patches(cfg.seed, len(items), h * w, n,
                                                tag=batching.TAG_KMEANS)
        return _rows(store, items[imgs], patches)

    if crit in ("kmeans", "primaps"):
        # primaps: the class prototypes whose majority labels the masks (= the kmeans centroids)
        if not sets.state_ok(crit, repair):
            sets.save_state_array(crit, criteria.fit_kmeans(sample(), _kmeans_k(cfg, store), cfg.seed))
        return {"centroids": sets.load_state_array(crit)}
    if crit == "eigen":
        load = eigen.EigenClusters.from_npz
        if not sets.state_ok(crit, repair, loader=load):
            params = eigen.EigenParams(n_eigen=cfg.eigen_dim, steps=cfg.eigen_steps,
                                       kernel_power=cfg.eigen_kernel_power)
            log.info("mine %s: fitting %s eigenfunctions (NeuralEF, %d steps) on %d patches",
                     cfg.run_name, cfg.eigen_dim or "K", cfg.eigen_steps,
                     min(KMEANS_SAMPLE, len(items) * h * w))
            fitted = eigen.fit_eigen_clusters(sample(), _kmeans_k(cfg, store), cfg.seed, params)
            sets.save_state_bytes(crit, fitted.to_npz_bytes())
        return {"eigen": sets.load_state(crit, load)}
    return {}


def cluster_labels(cfg: MineConfig, state: dict[str, Any], F: np.ndarray,
                   patches_per_crop: int) -> np.ndarray | None:
    """The label of every row of F for the cluster criteria (-1 = unassigned), else None."""
    if cfg.criterion == "kmeans":
        return criteria.assign_clusters(F, state["centroids"], mem_budget_mb=cfg.mem_budget_mb)
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
    """Mine batch `unit = (plan, batch)` and write its shard + marker. Safe to redo."""
    plan, batch = unit
    _limit_threads(cfg.workers)
    store = _store(cfg.out)
    sets = MinedSets(cfg.out, cfg.run_name, store)
    images = mining_plan(cfg).batch_images(plan, batch)
    F = store.mining_features(images)
    h, w = store.grid("train")
    anchors = batching.anchor_rows(cfg.seed, plan, batch, len(images), h * w, cfg.anchor_fraction)
    state = criterion_state(cfg, store, sets)
    cluster_of = cluster_labels(cfg, state, F, h * w)
    mined = mine_batch(
        F, anchors, cfg.criterion, MineParams.from_config(cfg), backend=cfg.backend, device=cfg.device,
        mem_budget_mb=cfg.mem_budget_mb, band=cfg.band, hp_pool=state.get("hp_pool"),
        cluster_of=cluster_of, keep_sets=cfg.criterion == "hp",
    )
    # no timings in the shard: shards of a rerun must be bit-identical
    return sets.write_shard(plan, batch, mined, images, cfg.criterion, meta={"grid": [h, w]})


def _checked_thresholds(cfg: MineConfig, store: FeatureStore, plan: MiningPlan) -> MineConfig:
    """--calibrate: Φ0/Ψ0 from the first batch's cosines; then refuse (without --force) or warn
    about thresholds that make a large share of a batch positive (pipeline.mining.thresholds)."""
    if cfg.criterion not in ("ppap", "p0"):
        return cfg
    s = thresholds.similarity_sample(store.mining_features(plan.batch_images(0, 0)), cfg.seed)
    if cfg.calibrate:
        phi0, psi0 = thresholds.calibrate(s, cfg.calibrate_pos, cfg.calibrate_amb)
        log.info("mine %s: calibrated on batch 0 of plan 0 (label-free): phi0 = %.2f (quantile "
                 "%g of the cosines), psi0 = %.2f (quantile %g)", cfg.run_name, phi0,
                 cfg.calibrate_pos, psi0, cfg.calibrate_amb)
        cfg = dataclasses.replace(cfg, phi0=phi0, psi0=psi0)
    check = thresholds.threshold_check(s, cfg.phi0, cfg.psi0)
    backbone = store.manifest.get("backbone", "the backbone")
    fix = ("use the thresholds of a preset for this backbone (--preset camvid: 0.95/0.70 for "
           "DINOv2), --calibrate (label-free, from this batch's cosines), or choose them with "
           "`ppap-pipe audit --sweep phi0=...` on labelled crops")
    # random-weight backbones (tests, smoke runs) have no threshold convention to get wrong:
    # their features are only warned about, never refused
    random_weights = str(store.manifest.get("weights_fingerprint", "")).startswith("random:")
    if check.verdict == "refuse" and not (cfg.force or random_weights):
        raise ValueError(f"{check.message(backbone)}; {fix}; or pass --force to mine anyway")
    if check.verdict != "ok":
        log.warning("mine %s: %s; %s", cfg.run_name, check.message(backbone), fix)
    return cfg


@releases_locks
def run(cfg: MineConfig) -> dict[str, Any]:
    """Mine every (plan, batch) of `cfg.plans` batch plans; resumable; refuses to mix."""
    require_device(cfg.device)
    cfg = dataclasses.replace(cfg, out=str(Path(cfg.out).resolve()))
    store = _store(cfg.out)
    plan = mining_plan(cfg)
    if len(plan.items) == 0:
        raise ValueError(f"{store.path} holds no readable training crop to mine; rerun "
                         "`ppap-pipe features` (see features_report.json)")
    if cfg.batch_size > len(plan.items):
        raise ValueError(
            f"batch_size={cfg.batch_size} is larger than the {len(plan.items)} training crops "
            f"left to mine in {store.path} (holdout={cfg.holdout}); use --batch-size "
            f"{len(plan.items)} or less")
    cfg = _checked_thresholds(cfg, store, plan)
    log.info("mine %s: criterion=%s plans=%d batch=%d anchors/img=%s backend=%s device=%s seed=%d "
             "holdout=%s (%d crops kept out for selection)", cfg.run_name, cfg.criterion,
             cfg.plans, cfg.batch_size, cfg.anchors_per_image, cfg.backend, cfg.device, cfg.seed,
             cfg.holdout, len(plan.held))
    sets = MinedSets(cfg.out, cfg.run_name, store)
    population = plan.population()
    config = to_dict(cfg)
    record = sets.begin(_identity(cfg, store), config, population)  # other settings: refused
    criterion_state(cfg, store, sets, repair=True)
    units = plan.units(cfg.plans)
    todo = sets.todo(units)
    log.info("mine %s: %d batches, %d already done", cfg.run_name, len(units), len(units) - len(todo))
    t0 = time.perf_counter()
    run_units(process_batch, todo, args=(cfg,), workers=cfg.workers, scheduler=cfg.scheduler,
              desc=f"mine {cfg.run_name}", rate_unit="batch")
    summary = {**sets.shard_summary(units), "seconds": round(time.perf_counter() - t0, 2)}
    summary = sets.finish(record, summary, config, population, sets.count_complete_plans(plan))
    log.info("mine %s: mean |P| %.1f, |A| %.1f, |N| %.1f, no-positive anchors %d, %.0f bytes/anchor",
             cfg.run_name, summary["mean_pos"], summary["mean_amb"], summary["mean_neg"],
             summary["anchors_without_positive"], summary["bytes_per_anchor"])
    return summary

