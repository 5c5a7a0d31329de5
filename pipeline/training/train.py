"""Stage 3: train the fine-tuned branch and the probes from cached mid tokens and mined shards.

Reads the feature cache (never runs the frozen backbone) and the mined sets
(pipeline.artifacts.mined.MinedSets); writes the training run `<out>/train/<run>/` through
pipeline.artifacts.training.TrainRun: manifest, config, metrics.jsonl (one line per step),
selection records and the checkpoints last/best/labelfree.pt (atomic, with checksums). One
writer per run directory (lock `<run>/.lock`); inputs are checked for NaN/Inf per batch and
training stops at the first non-finite loss or gradient, before the weights change.

Epoch e trains on the batches of mined plan e % n_plans, in batch order. Step = one shard:
tokens of its crops -> code, z; Eq. 8 on z with the shard's sets; linear-probe cross-entropy
and cluster-probe loss on code.detach(). Everything is seeded and has no other randomness, so a
run killed after a checkpoint and rerun resumes to the same weights as an uninterrupted run.
"""

from __future__ import annotations

import json
import logging
import time
from contextlib import nullcontext
from pathlib import Path
from typing import Any, NamedTuple

import numpy as np
import torch

from pipeline.artifacts.features import FeatureStore, normalise, take_rows
from pipeline.artifacts.mined import MinedSets
from pipeline.artifacts.training import TrainRun
from pipeline.cache.integrity import NonFinite, releases_locks
from pipeline.cache.store import code_version
from pipeline.config.resolve import to_dict
from pipeline.config.schema import TrainConfig
from pipeline.evaluation.plots import curve_png
from pipeline.evaluation.probes import code_stats, spherical_kmeans
from pipeline.executor import StageInterrupted, progress, timed
from pipeline.mining.recover import recover_sets
from pipeline.training.loss import ppap_loss
from pipeline.training.model import CKPT_FORMAT, build_model
from pipeline.training.selection import Holdout, best_choice, labelfree_choice

log = logging.getLogger("ppap.train")

# Settings that do not change the trained weights: a rerun may change them freely.
_NOT_IDENTITY = ("out", "name", "max_steps", "ckpt_every", "anchor_chunk", "device", "holdout",
                 "collapse_ratio")
CLUSTER_INIT_ROWS = 50_000  # patches for the k-means initialisation of the cluster probe
_TAG_CLUSTER_INIT = 0x434C4900  # "CLI": sampling stream of that initialisation
_SELECT_KEYS = ("cluster_miou", "cluster_miou_std", "linear_miou", "erank", "top3_share",
                "mean_cos", "train_loss")
# Settings added after runs were made, with the value those runs had: a setting at that value
# stays out of the identity, so such runs still resume (and are refused at any other value).
_LEGACY_IDENTITY = {"select_seeds": 1}

# Max relative L2 error and min cosine between cached feats and the branch's initial code.
# fp16 storage of tokens and feats gives ~3e-4 (DINOv2 ViT-S on CamVid, tiny random ViT);
# the same architecture with other random weights gives ~7e-2 (min cosine ~0.993).
_REPRO_REL_ERR = 5e-3
_REPRO_MIN_COS = 0.9999


def _gather(arr, crops: np.ndarray) -> np.ndarray:
    """Rows `crops` (any order, distinct) of a zarr array, in that order."""
    return take_rows(arr, crops)


def load_frozen_backbone(manifest: dict[str, Any]):
    """The cache's backbone (for its last block + norm); refuses other weights."""
    from pipeline.data.backbones import load_backbone

    model, info, fp = load_backbone(manifest["backbone"], weights=manifest.get("weights"),
                                    device="cpu", seed=int(manifest.get("seed") or 0))
    want = manifest.get("weights_fingerprint")
    if want is not None and fp != want:
        raise ValueError(
            f"backbone {manifest['backbone']} now loads weights {fp}, but the cache was made with "
            f"{want}; restore those weights (--weights in the features stage) or rebuild the cache"
        )
    return model, info, fp


def check_reproduces_cache(branch, store: FeatureStore,
                           crop: int | None = None) -> dict[str, float]:
    """The branch at initialisation must turn cached tokens into the cached feats (fp16 tol).

    Checks one crop (default: the first one written from a readable image).
    """
    g = store.split("train")
    if crop is None:
        valid = np.flatnonzero(np.asarray(g["valid"][:])) if "valid" in g else np.arange(1)
        crop = int(valid[0]) if valid.size else 0
    tokens = torch.from_numpy(np.asarray(g["tokens"][crop:crop + 1], dtype=np.float32))
    cached = torch.from_numpy(np.asarray(g["feats"][crop], dtype=np.float32))
    dev = next(branch.parameters()).device
    with torch.no_grad():
        code = branch.encode(tokens.to(dev)).float().cpu()
    ours = code[0].flatten(1).T  # (h*w, D)
    rel = float((ours - cached).norm() / cached.norm().clamp_min(1e-12))
    cos = float(torch.nn.functional.cosine_similarity(ours, cached, dim=1).min())
    if not (rel <= _REPRO_REL_ERR and cos >= _REPRO_MIN_COS):
        raise ValueError(
            f"the last block + norm of backbone {store.manifest['backbone']} do not reproduce the "
            f"cached features of crop {crop} (relative error {rel:.3g}, min cosine {cos:.4f}); "
            "the backbone weights differ from those that made the cache: rebuild the cache"
        )
    return {"rel_err": rel, "min_cos": cos}


def _device(cfg: TrainConfig) -> torch.device:
    if cfg.device.startswith("cuda") and not torch.cuda.is_available():
        raise ValueError(f"device={cfg.device!r} but CUDA is not available; use --device cpu")
    return torch.device(cfg.device)


class Optimisers(NamedTuple):
    """What `make_optimisers` returns (unpacks as `net, linear, cluster`)."""

    net: torch.optim.Optimizer  # the branch (block copy + head)
    linear: torch.optim.Optimizer | None  # None without a linear probe
    cluster: torch.optim.Optimizer


def make_optimisers(branch, linear, cluster, cfg: TrainConfig) -> Optimisers:
    """(net, linear probe or None, cluster probe) optimisers as configured."""
    opt_cls = torch.optim.AdamW if cfg.optimizer == "adamw" else torch.optim.Adam
    opt_net = opt_cls(branch.net_parameters(), lr=cfg.lr, weight_decay=cfg.weight_decay)
    opt_lin = torch.optim.Adam(linear.parameters(), lr=cfg.probe_lr) if linear is not None else None
    return Optimisers(opt_net, opt_lin, torch.optim.Adam(cluster.parameters(), lr=cfg.cluster_lr))


@torch.enable_grad()  # callers (or an earlier stage in this process) may have disabled it
def train_step(models, opts, tokens: torch.Tensor, labels: torch.Tensor | None, anchors, sets,
               cfg: TrainConfig, amp: bool = False) -> dict[str, Any]:
    """One optimisation step on one batch; returns its losses, set sizes and code statistics.

    models = (branch, linear or None, cluster), opts = their optimisers (same order); `tokens`
    (B, 1+h*w, D) float32 mid tokens; `labels` (B, S, S) int64 or None; `anchors`/`sets`: the
    shard's anchor rows and recovered CSR sets. Probes learn from code.detach() only; the
    gradient norm of the network is clipped to cfg.grad_clip. `erank`/`top3_share`/`mean_cos`
    describe the batch's code before the update (pipeline.evaluation.probes.code_stats).
    """
    branch, linear, cluster = models
    with torch.autocast("cuda", dtype=torch.bfloat16) if amp else nullcontext():
        code, z = branch(tokens)
    loss, stats = ppap_loss(
        z, anchors, sets.pos_indptr, sets.pos_indices, sets.amb_indptr, sets.amb_indices,
        tau=cfg.tau, parity_factor=cfg.parity_factor, chunk=cfg.anchor_chunk,
        amb_weight=cfg.amb_weight,
    )
    feats = code.detach().float()
    lin_loss = linear.loss(feats, labels) if linear is not None and labels is not None else None
    clu_loss = cluster.loss(feats)
    total = loss + clu_loss + (lin_loss if lin_loss is not None else 0.0)
    if not bool(torch.isfinite(total.detach())):
        parts = {"contrastive": loss, "linear probe": lin_loss, "cluster probe": clu_loss}
        raise NonFinite("non-finite loss (" + ", ".join(
            f"{k} {float(v.detach()):.4g}" for k, v in parts.items() if v is not None) + ")")
    for opt in opts:
        if opt is not None:
            opt.zero_grad(set_to_none=True)
    total.backward()
    grad_norm = torch.nn.utils.clip_grad_norm_(branch.net_parameters(), cfg.grad_clip)
    if not bool(torch.isfinite(grad_norm)):
        raise NonFinite(f"non-finite gradient norm ({float(grad_norm):.4g}) with a finite loss "
                        f"{float(total.detach()):.4g}")
    for opt in opts:
        if opt is not None:
            opt.step()
    cstats = code_stats(feats.flatten(2).transpose(1, 2).reshape(-1, feats.shape[1]))
    return {
        "loss": float(loss.detach()),
        "linear_loss": float(lin_loss.detach()) if lin_loss is not None else None,
        "cluster_loss": float(clu_loss.detach()),
        "grad_norm": float(grad_norm),
        "mean_pos": stats.mean_pos, "mean_neg": stats.mean_neg, "mean_amb": stats.mean_amb,
        "anchors_used": stats.anchors_used,
        **cstats.as_dict(),
    }


def init_cluster_probe(cluster, store: FeatureStore, crops: np.ndarray, seed: int) -> int:
    """Centroids <- spherical k-means of the frozen training code (= the branch's initial code)
    on a seeded sample of at most CLUSTER_INIT_ROWS patches of `crops`; returns rows used."""
    from pipeline.mining.batching import sample_patches

    h, w = store.grid("train")
    n = min(CLUSTER_INIT_ROWS, len(crops) * h * w)
    imgs, patches = sample_patches(seed, len(crops), h * w, n, tag=_TAG_CLUSTER_INIT)
    feats = store.split("train")["feats"]
    uniq, inv = np.unique(crops[imgs], return_inverse=True)
    rows = normalise(feats.get_orthogonal_selection((uniq, slice(None), slice(None)))[inv, patches])
    cent = spherical_kmeans(rows, cluster.n_clusters, seed)
    with torch.no_grad():
        cluster.centroids.copy_(torch.from_numpy(cent).to(cluster.centroids.device))
    return n


def _frozen_scores(run: TrainRun, store: FeatureStore, holdout: Holdout, branch,
                   seed: int, seeds: int) -> dict[str, Any]:
    """Step-0 held-out scores: the branch equals the frozen features there, so every run on the
    same cache, holdout and seed gets the same record; it is computed once and kept beside the
    runs (TrainRun.frozen_scores, a pure cache)."""
    import hashlib

    from pipeline.evaluation.probes import (
        KMEANS_NITER,
        KMEANS_NREDO,
        LINEAR_L2,
        LINEAR_MAX_ITER,
        LINEAR_TOL,
    )

    key = hashlib.sha256(json.dumps({
        "features": store.fingerprint, "seed": seed, "code": code_version(),
        "crops": hashlib.sha256(np.ascontiguousarray(holdout.crops, "<i8").tobytes()).hexdigest(),
        "probes": [LINEAR_L2, LINEAR_TOL, LINEAR_MAX_ITER, KMEANS_NITER, KMEANS_NREDO],
        **({"kmeans_seeds": seeds} if seeds != 1 else {}),
    }, sort_keys=True).encode()).hexdigest()[:16]
    scores = run.frozen_scores(key)
    if scores is None:
        scores = holdout.score(branch, seed, seeds)
        run.save_frozen_scores(key, scores)
    return scores


def curve_title(cfg: TrainConfig) -> str:
    """What a run's curve.png shows: the run, its mined sets and the recipe."""
    return (f"train/{cfg.run_name} on mine/{cfg.mined}: {cfg.optimizer} lr {cfg.lr:g}, "
            f"wd {cfg.weight_decay:g}, τ {cfg.tau:g}, {cfg.epochs} epochs, seed {cfg.seed}; "
            f"held-out training images, {cfg.select_seeds} k-means seed(s) per point")


@releases_locks
def run(cfg: TrainConfig) -> dict[str, Any]:
    """Train (or resume) `<out>/train/<run>/`; returns a summary dict."""

    t_start = time.perf_counter()
    out = Path(cfg.out)
    store = FeatureStore(out)
    store.split("train")  # refuses an unfinished or damaged cache first
    mined = MinedSets.open(store, cfg.mined)
    plans = mined.complete_plans()  # refuses unfinished mining
    if cfg.holdout is not None and abs(cfg.holdout - mined.holdout) > 1e-12:
        raise ValueError(
            f"holdout={cfg.holdout}, but the mined sets {mined.dir} keep out holdout="
            f"{mined.holdout} of the training images; the holdout is fixed when mining (it decides "
            f"which crops form the batches): mine again with `ppap-pipe mine --holdout {cfg.holdout}"
            f" --name NAME` and train on that, or drop --holdout"
        )
    mined.check_checksums(plans)
    n_plans = len(plans)
    run = TrainRun(out, cfg.run_name)
    run_dir = run.dir
    dev = _device(cfg)
    version = code_version()
    log.info("train: run %s on mined %s (%d plan(s)), seed %d, device %s, code %s", run_dir,
             cfg.mined, n_plans, cfg.seed, dev, version)
    if cfg.epochs > n_plans:
        log.info("train: %d epochs over %d mined plan(s): epoch e reuses plan e %% %d",
                 cfg.epochs, n_plans, n_plans)

    man = store.manifest
    backbone, info, weights_fp = load_frozen_backbone(man)
    branch, linear, cluster = build_model(man, backbone, n_clusters=cfg.n_clusters, seed=cfg.seed,
                                          device=str(dev))
    del backbone
    repro = check_reproduces_cache(branch, store)
    log.info("train: branch reproduces the cache (rel err %.2g, min cos %.5f)", repro["rel_err"],
             repro["min_cos"])

    # selection on the held-out training images (never on the evaluation split)
    holdout = None
    select_metric = cfg.select_metric
    if cfg.select_every > 0:
        if len(mined.holdout_crops) == 0:
            log.warning("train: the mined sets %s keep no held-out images (mined with holdout=%s), "
                        "so there is no selection and no best.pt; mine with --holdout 0.1 to get "
                        "them", mined.dir, mined.holdout)
        else:
            holdout = Holdout.load(store, mined.holdout_crops)
            if holdout.patch_labels is None and select_metric != "labelfree":
                log.info("train: the cache has no labels; selecting with the label-free rule")
                select_metric = "labelfree"
            log.info("train: selection every %d steps on %d held-out crops of %d source images "
                     "(metric %s)", cfg.select_every, len(holdout.crops), holdout.n_images,
                     select_metric)

    cfg_dict = to_dict(cfg)
    identity = {k: v for k, v in cfg_dict.items() if k not in _NOT_IDENTITY
                and not (k in _LEGACY_IDENTITY and v == _LEGACY_IDENTITY[k])}
    identity.update(features_fingerprint=store.fingerprint, mined_fingerprint=mined.fingerprint,
                    mined_plans=[len(p) for p in plans], holdout=mined.holdout)
    run.begin(identity, cfg_dict)

    opt_net, opt_lin, opt_clu = make_optimisers(branch, linear, cluster, cfg)
    models, opts = (branch, linear, cluster), (opt_net, opt_lin, opt_clu)

    meta = {
        "backbone": man["backbone"], "weights": man.get("weights"),
        "backbone_seed": int(man.get("seed") or 0), "weights_fingerprint": weights_fp,
        "patch_size": info.patch_size, "embed_dim": store.embed_dim,
        "grid": list(store.grid("train")), "num_classes": store.num_classes,
        "n_clusters": cluster.n_clusters, "has_labels": store.has_labels,
        "class_names": store.class_names,
    }
    last = run.checkpoint("last")
    ckpt_path = last.path
    step, epoch, batch, finished = 0, 0, 0, False
    if last.exists():
        ck = last.read(map_location=dev, fix=(
            f"delete {ckpt_path} and {ckpt_path.name}.sha256 to train {run_dir.name} again from "
            "step 0, or restore the file"))
        branch.load_state_dict(ck["branch"])
        cluster.load_state_dict(ck["cluster_probe"])
        opt_net.load_state_dict(ck["opt_net"])
        opt_clu.load_state_dict(ck["opt_cluster"])
        if linear is not None:
            linear.load_state_dict(ck["linear_probe"])
            opt_lin.load_state_dict(ck["opt_linear"])
        step, epoch, batch, finished = ck["step"], ck["epoch"], ck["batch"], ck["finished"]
        log.info("train: resuming from %s at step %d (epoch %d, batch %d)", ckpt_path, step,
                 epoch, batch)
    else:
        train_crops = np.setdiff1d(
            np.flatnonzero(store.split("train")["valid"][:]), mined.holdout_crops)
        with timed("train: cluster probe <- spherical k-means of the initial code", log):
            init_cluster_probe(cluster, store, train_crops, cfg.seed)
    run.truncate_records(step)
    records = run.selection_records()

    def save(kind: str, finished_now: bool, selection: dict[str, Any] | None = None) -> None:
        run.checkpoint(kind).write({
            "format": CKPT_FORMAT,
            "branch": branch.state_dict(),
            "linear_probe": linear.state_dict() if linear is not None else None,
            "cluster_probe": cluster.state_dict(),
            "opt_net": opt_net.state_dict(),
            "opt_linear": opt_lin.state_dict() if opt_lin is not None else None,
            "opt_cluster": opt_clu.state_dict(),
            "step": step, "epoch": epoch, "batch": batch, "finished": finished_now,
            "config": cfg_dict, "model": meta,
            "features_fingerprint": store.fingerprint, "mined_fingerprint": mined.fingerprint,
            "code_version": version, "selection": selection,
        })

    recent_losses: list[float] = []
    warned = {"collapse": False}

    def select_point(finished_now: bool) -> None:
        """Score the held-out images now; keep best.pt / labelfree.pt; record the point."""
        if holdout is None or (records and records[-1]["step"] == step):
            return
        t0 = time.perf_counter()
        scores = (_frozen_scores(run, store, holdout, branch, cfg.seed, cfg.select_seeds)
                  if step == 0 else holdout.score(branch, cfg.seed, cfg.select_seeds))
        rec = {"step": step, "epoch": epoch, "batch": batch, **scores,
               "train_loss": (round(float(np.mean(recent_losses)), 5) if recent_losses else None)}
        rec["erank_ratio"] = round(rec["erank"] / records[0]["erank"], 4) if records else 1.0
        rec["seconds"] = round(time.perf_counter() - t0, 2)
        recent_losses.clear()
        records.append(rec)
        if records and rec["erank_ratio"] < cfg.collapse_ratio:
            log.warning("train: held-out code is collapsing at step %d: effective rank %.2f is "
                        "%.0f%% of the frozen %.2f (top-3 PCs hold %.0f%% of the variance); lower "
                        "--lr, lower --tau, or select an earlier checkpoint", step, rec["erank"],
                        100 * rec["erank_ratio"], records[0]["erank"], 100 * rec["top3_share"])
        best_i = (labelfree_choice(records, cfg.rank_floor) if select_metric == "labelfree"
                  else best_choice(records, select_metric))
        lf_i = labelfree_choice(records, cfg.rank_floor)
        rec["is_best"] = best_i == len(records) - 1
        rec["is_labelfree"] = lf_i == len(records) - 1
        where = {"holdout": mined.holdout, "holdout_crops": int(len(holdout.crops)),
                 "holdout_images": holdout.n_images}
        if rec["is_best"]:
            save("best", finished_now, {**rec, **where, "metric": select_metric})
        if rec["is_labelfree"]:
            save("labelfree", finished_now,
                 {**rec, **where, "metric": "labelfree", "rank_floor": cfg.rank_floor})
        run.append_selection(rec)
        run.write_curve(curve_png(records, curve_title(cfg), cfg.rank_floor))
        shown = {k: rec[k] for k in ("cluster_miou", "linear_miou", "erank") if k in rec}
        log.info("train: held-out at step %d: %s%s", step,
                 " ".join(f"{k} {v:.2f}" for k, v in shown.items()),
                 " (best so far)" if rec["is_best"] else "")

    total = sum(len(plans[e % n_plans]) for e in range(cfg.epochs))
    if cfg.max_steps is not None:
        total = min(total, cfg.max_steps)
    tokens_arr = store.split("train")["tokens"]
    labels_arr = store.split("train")["labels"] if linear is not None else None
    amp = cfg.amp and dev.type == "cuda"
    branch.train()

    if step == 0 and holdout is not None:
        with timed("train: scoring the frozen features on the held-out images (step 0)", log):
            select_point(False)
    bar = progress(total=total, initial=min(step, total), desc="train", unit="step")
    last_loss = None
    t_loop = time.perf_counter()
    steps_here = 0
    try:
        while not finished and epoch < cfg.epochs:
            paths = plans[epoch % n_plans]
            while batch < len(paths):
                if cfg.max_steps is not None and step >= cfg.max_steps:
                    break
                t0 = time.perf_counter()
                shard = mined.read_shard(epoch % n_plans, batch)
                images = np.asarray(shard.images, dtype=np.int64)
                tok = _gather(tokens_arr, images)
                store.require_finite("train", "tokens", images, tok)
                tokens = torch.from_numpy(tok.astype(np.float32)).to(dev)
                labels = (torch.from_numpy(_gather(labels_arr, images).astype(np.int64)).to(dev)
                          if linear is not None else None)
                F = store.mining_features(images)
                sets = recover_sets(shard, F)
                try:
                    res = train_step(models, opts, tokens, labels, shard.anchors, sets, cfg, amp=amp)
                except NonFinite as exc:
                    raise NonFinite(
                        f"training stopped at step {step + 1} (epoch {epoch}, batch {batch}, shard "
                        f"{paths[batch]}): {exc}. The weights were not updated; {last.resume_point()}"
                        ". Lower --lr (or raise --tau), or check that shard's crops") from None
                frozen = code_stats(F)
                res["erank_frozen"] = round(frozen.erank, 4)
                step += 1
                batch += 1
                steps_here += 1
                last_loss = res["loss"]
                recent_losses.append(last_loss)
                rec = {"step": step, "epoch": epoch, "batch": batch - 1, "plan": epoch % n_plans,
                       **res, "time": round(time.perf_counter() - t0, 4),
                       "elapsed": round(time.perf_counter() - t_start, 3)}
                run.append_metric(rec)
                if res["erank"] < cfg.collapse_ratio * frozen.erank and not warned["collapse"]:
                    warned["collapse"] = True
                    log.warning("train: code is collapsing at step %d: effective rank %.2f vs "
                                "%.2f for the frozen features of the same batch (top-3 PCs hold "
                                "%.0f%% of the variance); lower --lr or --tau", step, res["erank"],
                                frozen.erank, 100 * res["top3_share"])
                bar.update(1)
                bar.set_postfix(loss=f"{last_loss:.4f}", P=f"{res['mean_pos']:.0f}",
                                rank=f"{res['erank']:.1f}",
                                sps=f"{steps_here / (time.perf_counter() - t_loop):.2f}")
                at_select = holdout is not None and step % cfg.select_every == 0
                if at_select:
                    select_point(False)
                if (step % cfg.ckpt_every == 0 or at_select) and batch < len(paths):
                    save("last", False)
            if batch < len(paths):  # stopped by max_steps inside the epoch
                break
            epoch, batch = epoch + 1, 0
            finished = epoch >= cfg.epochs
            if finished:
                select_point(True)
            save("last", finished)
            log.info("train: epoch %d done at step %d (loss %.4f)", epoch - 1, step,
                     last_loss if last_loss is not None else float("nan"))
        if not finished:
            select_point(False)
            save("last", False)
    except KeyboardInterrupt:
        raise StageInterrupted(
            f"training interrupted at step {step}; rerun the same command to resume: "
            f"{last.resume_point()}") from None
    finally:
        bar.close()
    if last_loss is None:  # nothing trained in this call: report the last recorded loss
        last_loss = run.last_metric("loss")

    summary = {
        "run_dir": str(run_dir), "checkpoint": str(ckpt_path), "steps": step,
        "steps_this_run": steps_here, "epoch": epoch, "batch": batch, "finished": finished,
        "final_loss": last_loss, "seconds": round(time.perf_counter() - t_start, 2),
    }
    if records:
        bi = (labelfree_choice(records, cfg.rank_floor) if select_metric == "labelfree"
              else best_choice(records, select_metric))
        li = labelfree_choice(records, cfg.rank_floor)
        summary["selection"] = {
            "metric": select_metric, "points": len(records), "holdout": mined.holdout,
            "holdout_crops": int(len(holdout.crops)), "holdout_images": holdout.n_images,
            "best_step": records[bi]["step"] if bi is not None else None,
            "best": {k: records[bi].get(k) for k in _SELECT_KEYS} if bi is not None else None,
            "labelfree_step": records[li]["step"] if li is not None else None,
            "labelfree": {k: records[li].get(k) for k in _SELECT_KEYS} if li is not None else None,
            "frozen": {k: records[0].get(k) for k in _SELECT_KEYS},
        }
        run.write_selection(summary["selection"])
    log.info("train: %s", json.dumps(summary))
    return summary
