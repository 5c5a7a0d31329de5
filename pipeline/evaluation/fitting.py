"""Fitting the evaluation's probes on the training split (docs/method.md §6): where the code comes
from (frozen features or a trained branch), the seeded patch samples, spherical k-means per seed,
the converged linear probe, PriMaPs-EM and eigenfunction probes, and a trained run's own probes.

Every model is scored with probes fitted the same way on its own training-split code, so frozen
and trained rows of a table compare like with like."""

from __future__ import annotations

import logging
from dataclasses import dataclass
from typing import Any, Callable

import numpy as np
import torch

from pipeline.artifacts.features import FeatureStore, normalise
from pipeline.artifacts.training import TrainRun
from pipeline.config.schema import EvalConfig
from pipeline.evaluation.probes import (
    KMEANS_NITER,
    KMEANS_NREDO,
    fit_linear,
    patch_histograms,
    spherical_kmeans,
)
from pipeline.evaluation.seeds import seed_list
from pipeline.executor import progress, timed

log = logging.getLogger("ppap.evaluate")

EVAL_SPLIT = "val"  # the evaluation split: never used to select anything

def report_name(cfg: EvalConfig) -> str:
    """eval/<name>: 'frozen', or '<run>-<checkpoint>' (+ '-trained-probes' with --probes trained)."""
    if cfg.baseline == "frozen":
        return "frozen"
    return f"{cfg.trained}-{cfg.checkpoint}" + ("-trained-probes" if cfg.probes == "trained" else "")


FIT_SPLIT = "train"


BATCH = 8  # crops read and encoded per step (val pass; training-split code for refit)


# fitted probes (frozen baseline, --probes refit), on the training split only
KMEANS_MAX_ROWS = 100_000  # seeded subsample of training patches for spherical k-means


LINEAR_MAX_ROWS = 600_000  # seeded subsample of training patches (whole crops) for the linear fit


PROBE_BLOCK = 256  # crops read per block


PRIMAPS_EM_CACHE_MB = 1536  # --probe primaps-em: float16 training code held in memory (crops


@dataclass
class SeedFit:
    """The probes of one probe seed: the cluster probe fitted with `seed`, and the linear probe
    (one fit is shared by the seeds whose seeded training subsample is the same)."""

    seed: int
    cluster: Any  # pipeline.training.model.ClusterProbe (or pipeline.mining.eigen.EigenClusterProbe)
    linear: Any  # pipeline.training.model.LinearProbe
    info: dict[str, Any]


@dataclass
class Probes:
    """What the evaluation needs from a model: code for val crops, and its probes per seed."""

    name: str
    inputs: str  # the val array `code` reads: "tokens" (trained branch) or "feats" (frozen)
    code: Callable[[dict[str, np.ndarray]], torch.Tensor]  # val batch -> (B, D, h, w) float32
    fits: list[SeedFit]  # one per probe seed (one for --probes trained)
    info: dict[str, Any]
    source: "CodeSource | None" = None  # training-split code of this model (to fit probes on)

    @property
    def linears(self) -> list[Any]:
        """The distinct linear probes, in seed order (a shared fit is scored once)."""
        out: list[Any] = []
        for f in self.fits:
            if not any(f.linear is x for x in out):
                out.append(f.linear)
        return out

    def linear_index(self, fit: SeedFit) -> int:
        return next(i for i, x in enumerate(self.linears) if x is fit.linear)


@dataclass
class CodeSource:
    """Training-split code for fitting probes, in the layout of the cached `feats`."""

    name: str  # for logs and progress bars
    itemsize: int  # bytes per value of what `read` returns (memory budget of the fit cache)
    read: Callable[[np.ndarray], np.ndarray]  # sorted crop indices -> (n, h*w, D) float array


def frozen_source(store: FeatureStore) -> CodeSource:
    """The cached frozen features of the training split."""
    feats = store.split(FIT_SPLIT)["feats"]

    def read(idx: np.ndarray) -> np.ndarray:
        data = feats.get_orthogonal_selection((idx, slice(None), slice(None)))
        store.require_finite(FIT_SPLIT, "feats", idx, data)
        return data

    return CodeSource("frozen features", feats.dtype.itemsize, read)


def branch_source(store: FeatureStore, branch, device: torch.device, name: str) -> CodeSource:
    """`branch.encode` of the cached training mid tokens, BATCH crops at a time (float32)."""
    tokens = store.split(FIT_SPLIT)["tokens"]
    grid = store.grid(FIT_SPLIT)

    def read(idx: np.ndarray) -> np.ndarray:
        out = np.empty((len(idx), grid[0] * grid[1], store.embed_dim), np.float32)
        with torch.no_grad():
            for s in range(0, len(idx), BATCH):
                sel = (idx[s:s + BATCH], slice(None), slice(None))
                raw = tokens.get_orthogonal_selection(sel)
                store.require_finite(FIT_SPLIT, "tokens", idx[s:s + BATCH], raw)
                t = torch.from_numpy(raw).to(device, torch.float32)
                code = branch.encode(t, grid).float()  # (b, D, h, w)
                out[s:s + len(t)] = code.flatten(2).transpose(1, 2).cpu().numpy()
        return out

    return CodeSource(f"{name} branch code", 4, read)


def _trained_probes(cfg: EvalConfig, store: FeatureStore) -> Probes:
    (branch, linear, cluster, _), info = TrainRun(cfg.out, cfg.trained).load_for_eval(
        cfg.checkpoint, store, cfg.device)
    grid = store.grid(EVAL_SPLIT)
    dev = torch.device(cfg.device)

    def code(batch: dict[str, np.ndarray]) -> torch.Tensor:
        tokens = torch.from_numpy(batch["tokens"]).to(dev, torch.float32)
        return branch.encode(tokens, grid).float()

    name = report_name(cfg)
    source = branch_source(store, branch, dev, cfg.trained)
    if cfg.probes == "refit":
        fits, fit_info = _fit_probes(cfg, store, source)
        return Probes(name, "tokens", code, fits, {**info, **fit_info}, source)
    if linear is None:
        raise ValueError(f"{info['checkpoint']} has no linear probe (trained without labels); "
                         "cannot evaluate it with --probes trained")
    if cfg.seeds > 1 and cfg.probe == "kmeans":
        log.info("eval: --probes trained scores the probes saved with the run, one fit: "
                 "--seeds %d applies to fitted probes only", cfg.seeds)
    fits, fit_info = _fit_probes(cfg, store, source, trained=(linear, cluster))
    return Probes(name, "tokens", code, fits, {**info, **fit_info}, source)


def _frozen_code_fn(store: FeatureStore, split: str, device: torch.device):
    h, w = store.grid(split)

    def code(batch: dict[str, np.ndarray]) -> torch.Tensor:
        f = torch.from_numpy(batch["feats"]).to(device, torch.float32)  # (B, h*w, D)
        return f.transpose(1, 2).reshape(f.shape[0], f.shape[2], h, w)

    return code


def _valid_rows(group, n: int) -> np.ndarray:
    if "valid" in group:
        return np.flatnonzero(np.asarray(group["valid"][:]) > 0)
    return np.arange(n)


def _sample_crops(store: FeatureStore, seed: int, max_rows: int, tag: int) -> np.ndarray:
    """Sorted seeded choice of whole valid training crops holding at most `max_rows` patches."""
    g = store.split(FIT_SPLIT)
    crops = _valid_rows(g, store.n(FIT_SPLIT))
    hw = int(np.prod(store.grid(FIT_SPLIT)))
    n_crops = min(len(crops), max(1, max_rows // hw))
    if n_crops == len(crops):
        return crops
    rng = np.random.default_rng([seed, tag])
    return np.sort(rng.choice(crops, size=n_crops, replace=False))


def _kmeans_sample(store: FeatureStore, seed: int, source: CodeSource) -> np.ndarray:
    """Seeded subsample (<= KMEANS_MAX_ROWS rows) of normalised training-split code."""
    chosen = _sample_crops(store, seed, KMEANS_MAX_ROWS + int(np.prod(store.grid(FIT_SPLIT))), 1)
    rng = np.random.default_rng([seed, 3])
    rows = []
    for s in range(0, len(chosen), PROBE_BLOCK):
        f = source.read(chosen[s:s + PROBE_BLOCK])
        rows.append(normalise(f.reshape(-1, f.shape[-1])))
    x = np.concatenate(rows)
    if len(x) > KMEANS_MAX_ROWS:
        x = x[np.sort(rng.choice(len(x), size=KMEANS_MAX_ROWS, replace=False))]
    return np.ascontiguousarray(x, dtype=np.float32)


def fit_kmeans(x: np.ndarray, k: int, seed: int) -> np.ndarray:
    """Spherical k-means centroids (k, D) of the rows `x` (pipeline.evaluation.probes, seeded restarts)."""
    if len(x) < k:
        raise ValueError(f"{len(x)} training patches cannot make {k} clusters; cache more training images")
    return spherical_kmeans(x, k, seed)


def fit_linear_probe(store: FeatureStore, seed: int, device: torch.device,
                     source: CodeSource | None = None, crops: np.ndarray | None = None):
    """LinearProbe fitted to convergence on training-split code (pipeline.evaluation.probes.fit_linear).

    `source` defaults to the frozen features. Rows: the patches of a seeded choice of whole
    training crops (`crops`, default `linear_crops(store, seed)`: all of them up to
    LINEAR_MAX_ROWS patches); targets: the class histogram of the labelled pixels under each
    patch. The fit (on standardised code, L-BFGS) is folded back into an ordinary 1x1-conv
    LinearProbe on raw code.
    """
    from pipeline.training.model import LinearProbe

    source = source or frozen_source(store)
    g = store.split(FIT_SPLIT)
    if "labels" not in g:
        raise ValueError(f"{store.path}/{FIT_SPLIT} has no labels; a fitted linear probe needs a "
                         "labelled training split")
    grid = store.grid(FIT_SPLIT)
    chosen = linear_crops(store, seed) if crops is None else crops
    xs, hs = [], []
    starts = range(0, len(chosen), PROBE_BLOCK)
    with progress(total=len(starts), desc=f"read {source.name}", unit="block") as bar:
        for s in starts:
            idx = chosen[s:s + PROBE_BLOCK]
            f = source.read(idx)
            xs.append(np.asarray(f, dtype=np.float32).reshape(-1, f.shape[-1]))
            lab = g["labels"].get_orthogonal_selection((idx, slice(None), slice(None)))
            hs.append(patch_histograms(lab, grid, store.num_classes))
            bar.update(1)
    x, hist = np.concatenate(xs), np.concatenate(hs)
    del xs, hs
    fit = fit_linear(x, hist, device=device)
    log.info("linear probe on %s: %d rows, L-BFGS %d iterations, max gradient %.1e, loss %.4f",
             source.name, len(x), fit.iterations, fit.grad_max, fit.loss)
    gen = torch.Generator().manual_seed(int(seed))
    probe = LinearProbe(store.embed_dim, store.num_classes, gen)
    with torch.no_grad():
        probe.conv.weight.copy_(torch.from_numpy(fit.weight)[:, :, None, None])
        probe.conv.bias.copy_(torch.from_numpy(fit.bias))
    probe = probe.to(device).eval().requires_grad_(False)
    probe.fit_info = {**fit.info(), "linear_rows": int(len(x))}  # recorded in metrics.json
    return probe


def linear_crops(store: FeatureStore, seed: int) -> np.ndarray:
    """The training crops the linear probe of `seed` is fitted on (all up to LINEAR_MAX_ROWS
    patches, so then every seed gets the same fit)."""
    return _sample_crops(store, seed, LINEAR_MAX_ROWS, 2)


def _kmeans_probe(store: FeatureStore, seed: int, source: CodeSource, device: torch.device):
    """(ClusterProbe, info): spherical k-means (K = classes, restarts) of `seed`'s sample."""
    from pipeline.training.model import ClusterProbe

    k = store.num_classes
    with timed(f"spherical k-means (seed {seed}) on {source.name}", log):
        x = _kmeans_sample(store, seed, source)
        centroids = fit_kmeans(x, k, seed)
    cluster = ClusterProbe(store.embed_dim, k, torch.Generator().manual_seed(0))
    with torch.no_grad():
        cluster.centroids.copy_(torch.from_numpy(centroids))
    return cluster.to(device).eval().requires_grad_(False), {"kmeans_rows": int(len(x))}


def _fit_probes(cfg: EvalConfig, store: FeatureStore, source: CodeSource,
                trained: tuple[Any, Any] | None = None) -> tuple[list[SeedFit], dict[str, Any]]:
    """Probes per seed (`--seeds`: cfg.seed, cfg.seed + 1, ...) and the fit record.

    Cluster probe: seeded spherical k-means (K = classes, KMEANS_NREDO restarts, the lowest
    inertia kept), or the `--probe primaps-em | eigen` fit, on `source`'s training-split code;
    linear probe: fitted to convergence on the same code, once per distinct seeded subsample.
    `trained` = (linear, cluster) of a checkpoint (--probes trained): its linear probe for every
    seed, and its cluster probe as the one fit unless --probe replaces it.
    """
    dev = torch.device(cfg.device)
    one_trained_fit = trained is not None and cfg.probe == "kmeans"
    seeds = [cfg.seed] if one_trained_fit else seed_list(cfg.seed, cfg.seeds)
    info: dict[str, Any] = {"fit_code": source.name, "probe_seeds": seeds}
    if cfg.probe == "kmeans" and trained is None:
        info.update(kmeans_niter=KMEANS_NITER, kmeans_nredo=KMEANS_NREDO)
    linears: dict[bytes, Any] = {}
    memo: dict[bytes, np.ndarray] = {}
    fits: list[SeedFit] = []
    for seed in seeds:
        fit_info: dict[str, Any] = {"seed": seed}
        if one_trained_fit:
            cluster = trained[1]
        elif cfg.probe == "kmeans":
            cluster, extra = _kmeans_probe(store, seed, source, dev)
            fit_info.update(extra)
        else:
            cluster, extra = fit_seed_probe(cfg, store, source, seed, memo)
            fit_info.update(extra)
        if trained is not None:
            linear = trained[0]
        else:
            crops = linear_crops(store, seed)
            key = crops.tobytes()
            if key not in linears:
                with timed(f"linear probe (seed {seed}) on {source.name}", log):
                    linears[key] = fit_linear_probe(store, seed, dev, source, crops)
            linear = linears[key]
            fit_info["linear_fit"] = list(linears).index(key)
        fits.append(SeedFit(seed, cluster, linear, fit_info))
    first = fits[0]
    if trained is None:
        info.update(first.linear.fit_info)
        info["linear_fits"] = len(linears)
    info.update({k: v for k, v in first.info.items() if k in ("kmeans_rows", "cluster_probe")})
    info["fits"] = [f.info for f in fits]
    return fits, info


def _frozen_probes(cfg: EvalConfig, store: FeatureStore) -> Probes:
    source = frozen_source(store)
    fits, info = _fit_probes(cfg, store, source)
    code = _frozen_code_fn(store, EVAL_SPLIT, torch.device(cfg.device))
    return Probes("frozen", "feats", code, fits, info, source)


def _primaps_crops(store: FeatureStore, seed: int) -> np.ndarray:
    """The valid training crops PriMaPs-EM reads (a seeded subset beyond PRIMAPS_EM_CACHE_MB)."""
    g = store.split(FIT_SPLIT)
    crops = _valid_rows(g, store.n(FIT_SPLIT))
    hw = int(np.prod(store.grid(FIT_SPLIT)))
    cap = max(1, (PRIMAPS_EM_CACHE_MB << 20) // (hw * store.embed_dim * 2))
    if len(crops) > cap:
        rng = np.random.default_rng([seed, 3])
        crops = np.sort(rng.choice(crops, size=cap, replace=False))
        log.info("primaps-em: using %d of the training crops (PRIMAPS_EM_CACHE_MB)", cap)
    return crops


def _training_crops(store: FeatureStore, crops: np.ndarray, source: CodeSource) -> np.ndarray:
    """Normalised training-split code of `crops`, (n, h*w, D) float16, for PriMaPs-EM."""
    hw = int(np.prod(store.grid(FIT_SPLIT)))
    out = np.empty((len(crops), hw, store.embed_dim), np.float16)
    starts = range(0, len(crops), PROBE_BLOCK)
    with progress(total=len(starts), desc=f"read {source.name}", unit="block") as bar:
        for s in starts:
            f = source.read(crops[s:s + PROBE_BLOCK])
            out[s:s + len(f)] = normalise(f).astype(np.float16)
            bar.update(1)
    return out


def fit_seed_probe(cfg: EvalConfig, store: FeatureStore, source: CodeSource,
                   seed: int | None = None, memo: dict[bytes, np.ndarray] | None = None):
    """(cluster-probe-like module, info) for --probe primaps-em | eigen, fitted on `source`
    with `seed` (default cfg.seed). `memo` keeps PriMaPs-EM's training code between seeds that
    read the same crops."""
    from pipeline.mining import eigen, primaps
    from pipeline.training.model import ClusterProbe

    seed = cfg.seed if seed is None else seed
    k = store.num_classes
    dev = torch.device(cfg.device)
    if cfg.probe == "primaps-em":
        params = primaps.EMParams(steps=cfg.em_steps, psi=cfg.primaps_psi,
                                  coverage=cfg.primaps_coverage)
        crops = _primaps_crops(store, seed)
        memo = {} if memo is None else memo
        if crops.tobytes() not in memo:
            memo.clear()  # one copy in memory at a time (up to PRIMAPS_EM_CACHE_MB)
            memo[crops.tobytes()] = _training_crops(store, crops, source)
        X = memo[crops.tobytes()]
        with timed(f"PriMaPs-EM (seed {seed}) on {source.name}", log), \
                progress(total=params.steps, desc="primaps-em", unit="step") as bar:
            def on_step(step: int, loss: float) -> None:
                bar.update(1)
                if step % 50 == 0:
                    bar.set_postfix(loss=f"{loss:.4f}", refresh=False)

            protos, info = primaps.fit_primaps_em(X, k, seed, params, progress=on_step)
        cluster = ClusterProbe(store.embed_dim, k, torch.Generator().manual_seed(0))
        with torch.no_grad():
            cluster.centroids.copy_(torch.from_numpy(protos))
    else:
        params = eigen.EigenParams(n_eigen=cfg.eigen_dim, steps=cfg.eigen_steps,
                                   kernel_power=cfg.eigen_kernel_power)
        x = _kmeans_sample(store, seed, source)
        with timed(f"neural eigenfunctions (seed {seed}) on {source.name}", log), \
                progress(total=params.steps, desc="neuralef", unit="step") as bar:
            clusters = eigen.fit_eigen_clusters(x, k, seed, params,
                                                progress=lambda step, loss: bar.update(1))
        cluster = eigen.EigenClusterProbe(clusters)
        info = {"method": "eigen", **clusters.info}
    return cluster.to(dev).eval().requires_grad_(False), {"cluster_probe": info}
