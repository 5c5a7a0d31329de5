"""Stage 4: cluster and linear-probe metrics on the evaluation split, with and without CRF.

The evaluation split is `val` of `<out>/features.zarr`; it is never used to select anything.
For a trained run, `code` comes from the fine-tuned branch of one of its checkpoints
(`--checkpoint best`: selected during training on held-out *training* images; `last`;
`labelfree`: chosen by the label-free rule) applied to the cached val mid tokens. For
`--baseline frozen`, `code` is the cached frozen features.

Probes measure the representation, not an optimiser: by default (`--probes refit`, and always
for the frozen baseline) the cluster probe is a seeded spherical k-means (K = classes, restarts)
and the linear probe a multinomial logistic regression fitted to convergence (L-BFGS on
standardised code, pipeline.evaluation.probes), both fitted on the training split's code of the model
being evaluated, so trained vs frozen compares representations with identical probe fitting.
`--probes trained` uses the probes trained alongside the network instead. Both fitting paths
read their code through a `CodeSource` (frozen feats or branch-encoded tokens).

Per val image (docs/method.md §6): code -> bilinear upsampling to the label size -> probes;
cluster prediction = argmax cosine to the centroids, linear = argmax logits; one confusion
matrix per (probe, CRF on/off) over the split; Hungarian matching for clusters. CRF runs in
worker processes while the next batch is computed.

Writes `<out>/eval/<name>/` with name 'frozen' or '<run>-<checkpoint>' ('-trained-probes'
appended with `--probes trained`): metrics.json, confusion.npz (raw matrices), confusion.png,
predictions.png, config.json, and probes.pt for fitted probes.

`--probe primaps-em|eigen` replaces the cluster probe (wherever it comes from) by one fitted on
the training split's code of the evaluated model with pipeline/mining/primaps.py (PriMaPs-EM) or
pipeline/mining/eigen.py (neural eigenfunctions + k-means); it is scored through the same Hungarian
path, the linear probe is unchanged, and `-<probe>` is appended to the output name. The
default `--probe kmeans` is the spherical k-means probe.
"""

from __future__ import annotations

import dataclasses
import io
import logging
import time
from concurrent.futures import Future
from dataclasses import dataclass
from typing import Any, Callable

import numpy as np
import torch
import torch.nn.functional as Fn

from pipeline.artifacts.features import FeatureStore, normalise
from pipeline.artifacts.reports import EvalReport
from pipeline.artifacts.training import TrainRun
from pipeline.cache.integrity import releases_locks, require_device
from pipeline.cache.store import code_version
from pipeline.config.resolve import to_dict
from pipeline.config.schema import EvalConfig
from pipeline.evaluation.crf import CRFPool, cluster_probs, softmax
from pipeline.evaluation.metrics import (
    Confusion,
    cluster_scores,
    linear_scores,
    matched_confusion,
)
from pipeline.evaluation.probes import (
    KMEANS_NITER,
    KMEANS_NREDO,
    fit_linear,
    patch_histograms,
    spherical_kmeans,
)
from pipeline.evaluation.seeds import format_mean_std, mean_block, seed_list
from pipeline.evaluation.viz import colourise, palette
from pipeline.executor import progress, timed

log = logging.getLogger("ppap.evaluate")

EVAL_SPLIT = "val"
FIT_SPLIT = "train"
BATCH = 8  # crops read and encoded per step (val pass; training-split code for refit)
UPSAMPLE_BUDGET_MB = 256  # upsampled code (D x S x S float32) held at once
# fitted probes (frozen baseline, --probes refit), on the training split only
KMEANS_MAX_ROWS = 100_000  # seeded subsample of training patches for spherical k-means
LINEAR_MAX_ROWS = 600_000  # seeded subsample of training patches (whole crops) for the linear fit
PROBE_BLOCK = 256  # crops read per block
PRIMAPS_EM_CACHE_MB = 1536  # --probe primaps-em: float16 training code held in memory (crops
#                             beyond it are left out by a seeded subsample)


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


# --------------------------------------------------------------------------- model sources


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


def _default_checkpoint(cfg: EvalConfig) -> EvalConfig:
    """`--checkpoint best` (the default) of a run that never selected falls back to `last`
    (TrainRun.checkpoint_for_eval); missing runs and checkpoints are refused with advice."""
    if cfg.baseline == "frozen" or not cfg.trained:
        return cfg
    kind, _ = TrainRun(cfg.out, cfg.trained).checkpoint_for_eval(cfg.checkpoint)
    return cfg if kind == cfg.checkpoint else dataclasses.replace(cfg, checkpoint=kind)


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


def report_name(cfg: EvalConfig) -> str:
    """eval/<name>: 'frozen', or '<run>-<checkpoint>' (+ '-trained-probes' with --probes trained)."""
    if cfg.baseline == "frozen":
        return "frozen"
    return f"{cfg.trained}-{cfg.checkpoint}" + ("-trained-probes" if cfg.probes == "trained" else "")


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


# --------------------------------------------------------------------------- evaluation pass


def _predict(probes: Probes, code: torch.Tensor, size: tuple[int, int]):
    """([cosine (B, C, H, W) per seed fit], [logits (B, K, H, W) per distinct linear probe])
    after upsampling code to `size` once."""
    up = Fn.interpolate(code, size=size, mode="bilinear", align_corners=False)
    return ([f.cluster.scores(up) for f in probes.fits],
            [lin.predict_logits(up, size) for lin in probes.linears])


def _show_indices(n: int, n_show: int) -> list[int]:
    if n_show <= 0 or n == 0:
        return []
    return sorted({int(round(v)) for v in np.linspace(0, n - 1, min(n_show, n))})


def evaluate_split(cfg: EvalConfig, store: FeatureStore, probes: Probes) -> dict[str, Any]:
    """Stream the val split once for every seed's probes; returns the confusion matrices
    (`("cluster", fit index, crf)`, `("linear", linear index, crf)`) and the first seed's
    predictions of the shown images."""
    g = store.split(EVAL_SPLIT)
    if "labels" not in g:
        raise ValueError(f"{store.path}/{EVAL_SPLIT} has no labels; evaluation needs a labelled val split")
    rows = _valid_rows(g, store.n(EVAL_SPLIT))
    if len(rows) == 0:
        raise ValueError(f"{store.path}/{EVAL_SPLIT} holds no valid images to evaluate")
    k = store.num_classes
    linears = probes.linears
    for lin in linears:
        if lin.num_classes != k:
            raise ValueError(f"linear probe has {lin.num_classes} classes, the cache {k}")
    crf_settings = (False, True) if cfg.crf else (False,)
    conf = {("cluster", i, on): Confusion(k, f.cluster.n_clusters)
            for i, f in enumerate(probes.fits) for on in crf_settings}
    conf.update({("linear", j, on): Confusion(k, k) for j in range(len(linears))
                 for on in crf_settings})
    n_cl = len(probes.fits)
    first_lin = probes.linear_index(probes.fits[0])
    show_at = set(_show_indices(len(rows), cfg.n_show))
    shown: dict[int, dict[str, np.ndarray]] = {}
    key = probes.inputs
    size = (int(g["labels"].shape[-2]), int(g["labels"].shape[-1]))  # labels and rgb: S x S
    per_step = max(1, (UPSAMPLE_BUDGET_MB << 20) // (store.embed_dim * size[0] * size[1] * 4))

    pool = CRFPool(cfg.crf_workers) if cfg.crf else None
    window = 2 * pool.workers if pool else 0
    pending: dict[int, Future] = {}
    crf_bar = progress(total=len(rows), desc="crf", unit="img", disable=pool is None)
    labels_of: dict[int, np.ndarray] = {}

    def update(gt: np.ndarray, cl: list, li: list, on: bool) -> None:
        for i, pred in enumerate(cl):
            conf[("cluster", i, on)].update(gt, pred)
        for j, pred in enumerate(li):
            conf[("linear", j, on)].update(gt, pred)

    def collect(pos: int) -> None:
        refined = pending.pop(pos).result()  # cluster maps of every fit, then the linear ones
        update(labels_of.pop(pos), refined[:n_cl], refined[n_cl:], True)
        if pos in shown:
            shown[pos]["cluster_crf"] = refined[0]
            shown[pos]["linear_crf"] = refined[n_cl + first_lin]
        crf_bar.update(1)

    try:
        with torch.no_grad(), progress(total=len(rows), desc=f"eval {probes.name}",
                                       unit="img") as bar:
            for b0 in range(0, len(rows), BATCH):
                idx = rows[b0:b0 + BATCH]
                sel = (idx, *([slice(None)] * 2))
                batch = {key: g[key].get_orthogonal_selection(sel)}
                store.require_finite(EVAL_SPLIT, key, idx, batch[key])
                labels = g["labels"].get_orthogonal_selection(sel).astype(np.int64)
                rgb = g["rgb"].get_orthogonal_selection((idx, *([slice(None)] * 3)))
                code = probes.code(batch)
                for s in range(0, len(idx), per_step):
                    cosines, logits = _predict(probes, code[s:s + per_step], size)
                    cl_pred = [c.argmax(1).cpu().numpy() for c in cosines]
                    li_pred = [x.argmax(1).cpu().numpy() for x in logits]
                    if pool is not None:
                        p_cl = [cluster_probs(c.cpu().numpy(), axis=1) for c in cosines]
                        p_li = [softmax(x.cpu().numpy(), axis=1) for x in logits]
                    for j in range(cl_pred[0].shape[0]):
                        pos = b0 + s + j
                        gt = labels[s + j]
                        update(gt, [p[j] for p in cl_pred], [p[j] for p in li_pred], False)
                        if pos in show_at:
                            shown[pos] = {"rgb": rgb[s + j], "gt": gt, "cluster": cl_pred[0][j],
                                          "linear": li_pred[first_lin][j]}
                        if pool is not None:
                            labels_of[pos] = gt
                            pending[pos] = pool.submit(rgb[s + j], [p[j] for p in p_cl]
                                                       + [p[j] for p in p_li])
                            while len(pending) > window:
                                collect(min(pending))
                bar.update(len(idx))
        while pending:
            collect(min(pending))
    finally:
        crf_bar.close()
        if pool is not None:
            pool.close()
    if conf[("linear", 0, False)].matrix.sum() == 0:
        raise ValueError(f"{store.path}/{EVAL_SPLIT} has no labelled pixel (all ignore = -1); "
                         "nothing to evaluate")
    return {"confusion": {k_: v.matrix for k_, v in conf.items()}, "shown": shown,
            "n_images": int(len(rows))}


def seed_confusions(confs: dict[tuple, np.ndarray], probes: Probes,
                    i: int) -> dict[tuple[str, bool], np.ndarray]:
    """{(probe, crf): matrix} of seed fit `i` (its cluster probe and its linear probe)."""
    j = probes.linear_index(probes.fits[i])
    return {(p, on): m for (p, x, on), m in confs.items()
            if (p == "cluster" and x == i) or (p == "linear" and x == j)}


# --------------------------------------------------------------------------- reporting


def metric_blocks(confs: dict[tuple[str, bool], np.ndarray], crf_on: bool) -> tuple[dict, dict]:
    """metrics.json blocks per CRF setting, and the cluster mappings used."""
    out: dict[str, Any] = {}
    mappings: dict[str, list[int]] = {}
    for on in ((False, True) if crf_on else (False,)):
        tag = "crf" if on else "no_crf"
        cs, mapping = cluster_scores(confs[("cluster", on)])
        ls = linear_scores(confs[("linear", on)])
        out[tag] = {
            "cluster_acc": cs.accuracy, "cluster_miou": cs.miou,
            "linear_acc": ls.accuracy, "linear_miou": ls.miou,
            "per_class_iou": {"cluster": cs.per_class_iou, "linear": ls.per_class_iou},
        }
        mappings[tag] = [int(v) for v in mapping]
    if not crf_on:
        out["crf"] = None
    return out, mappings


def _png(fig) -> bytes:
    from matplotlib.backends.backend_agg import FigureCanvasAgg

    FigureCanvasAgg(fig)
    buf = io.BytesIO()
    fig.savefig(buf, format="png", dpi=fig.dpi, bbox_inches="tight", pad_inches=0.1)
    return buf.getvalue()


def confusion_png(matched_cluster: np.ndarray, linear: np.ndarray, class_names: list[str]) -> bytes:
    """Row-normalised confusion matrices (cluster after Hungarian matching, linear) side by side."""
    from matplotlib.figure import Figure

    k = len(class_names)
    side = max(4.0, 0.28 * k + 2)
    fig = Figure(figsize=(2 * side + 1, side), dpi=100, layout="constrained")
    axes = fig.subplots(1, 2)
    for ax, m, title in ((axes[0], matched_cluster, "cluster (Hungarian-matched)"), (axes[1], linear, "linear probe")):
        m = np.asarray(m, dtype=np.float64)
        norm = m / np.maximum(m.sum(axis=1, keepdims=True), 1)
        im = ax.imshow(norm, vmin=0, vmax=1, cmap="viridis", interpolation="nearest")
        cols = list(class_names) + (["unmatched"] if m.shape[1] > k else [])
        fs = max(4, min(9, int(200 / max(k, 1))))
        ax.set_xticks(range(len(cols)), cols, rotation=90, fontsize=fs)
        ax.set_yticks(range(k), class_names, fontsize=fs)
        ax.set_xlabel("predicted")
        ax.set_ylabel("ground truth")
        ax.set_title(title)
    fig.colorbar(im, ax=axes, shrink=0.8, label="fraction of the row")
    return _png(fig)


def predictions_png(shown: dict[int, dict[str, np.ndarray]], mapping: dict[str, np.ndarray],
                    k: int, crf_on: bool, class_names: list[str]) -> bytes:
    """Grid: image | ground truth | cluster | linear (| cluster+CRF | linear+CRF) per shown image."""
    from matplotlib.figure import Figure
    from matplotlib.patches import Patch

    pal = palette(k)
    cols = ["image", "ground truth", "cluster", "linear"] + (["cluster + CRF", "linear + CRF"] if crf_on else [])
    rows = sorted(shown)
    fig = Figure(figsize=(2.2 * len(cols), 2.2 * max(1, len(rows)) + 0.8), dpi=100, layout="constrained")
    axes = np.asarray(fig.subplots(max(1, len(rows)), len(cols), squeeze=False))
    for r, pos in enumerate(rows):
        item = shown[pos]
        panels = [item["rgb"], colourise(item["gt"], pal),
                  colourise(_map(item["cluster"], mapping["no_crf"], k), pal), colourise(item["linear"], pal)]
        if crf_on:
            panels += [colourise(_map(item["cluster_crf"], mapping["crf"], k), pal),
                       colourise(item["linear_crf"], pal)]
        for c, img in enumerate(panels):
            ax = axes[r, c]
            ax.imshow(img, interpolation="nearest")
            ax.set_xticks([])
            ax.set_yticks([])
            if r == 0:
                ax.set_title(cols[c], fontsize=9)
    for ax in axes.ravel()[len(rows) * len(cols):]:
        ax.axis("off")
    handles = [Patch(color=pal[i] / 255, label=class_names[i]) for i in range(k)]
    fig.legend(handles=handles, loc="outside lower center", ncol=min(k, 9), fontsize=7)
    return _png(fig)


def _map(clusters: np.ndarray, mapping: np.ndarray, k: int) -> np.ndarray:
    """Cluster ids -> matched class ids; unmatched clusters -> k (drawn white)."""
    lut = np.where(np.asarray(mapping) >= 0, mapping, k)
    return lut[clusters]


# --------------------------------------------------------------------------- entry point


@releases_locks
def run(cfg: EvalConfig) -> dict[str, Any]:
    """Evaluate a trained run (or the frozen baseline) on val; writes `<out>/eval/<name>/`
    (see `report_name`)."""
    t0 = time.perf_counter()
    require_device(cfg.device)
    if cfg.baseline == "none" and not cfg.trained:
        raise ValueError("give --trained NAME (a run under out/train/) or --baseline frozen")
    store = FeatureStore(cfg.out)
    if not store.has_labels:
        raise ValueError(f"{store.path} was cached without labels; evaluation needs a labelled dataset")
    cfg = _default_checkpoint(cfg)
    probes = _frozen_probes(cfg, store) if cfg.baseline == "frozen" else _trained_probes(cfg, store)
    if cfg.probe != "kmeans":
        probes.name = f"{probes.name}-{cfg.probe}"
    name = probes.name
    fitted = cfg.baseline == "frozen" or cfg.probes == "refit"
    seeds = [f.seed for f in probes.fits]
    log.info("eval %s: %s probes, %d val images, K=%d classes, C=%d clusters, crf=%s, device=%s, "
             "probe seeds %s, code %s", name, "fitted" if fitted else "trained",
             store.n(EVAL_SPLIT), store.num_classes, probes.fits[0].cluster.n_clusters, cfg.crf,
             cfg.device, seeds, code_version())
    with timed(f"eval {name}: val pass", log):
        res = evaluate_split(cfg, store, probes)
    confs = res["confusion"]
    per_seed = []
    for i, fit in enumerate(probes.fits):
        blocks, mappings = metric_blocks(seed_confusions(confs, probes, i), cfg.crf)
        per_seed.append({"seed": fit.seed, **blocks, "cluster_mapping": mappings})
    tags = ("no_crf", "crf") if cfg.crf else ("no_crf",)
    mean = {t: mean_block([r[t] for r in per_seed]) for t in tags}
    if not cfg.crf:
        mean["crf"] = None
    mappings = per_seed[0]["cluster_mapping"]
    report = {
        "name": name,
        "baseline": cfg.baseline,
        "probes": "refit" if fitted else "trained",
        "cluster_probe": cfg.probe,
        "split": EVAL_SPLIT,
        "n_images": res["n_images"],
        "num_classes": store.num_classes,
        "n_clusters": int(probes.fits[0].cluster.n_clusters),
        "class_names": store.class_names,
        # mean over the probe seeds, `<metric>_std` their sample standard deviation
        **mean,
        "n_seeds": len(per_seed),
        "seeds": per_seed,
        "cluster_mapping": mappings,  # of the first seed (confusion.png, predictions.png)
        "model": probes.info,
        "features_fingerprint": store.fingerprint,
        "code_version": code_version(),
        "seconds": round(time.perf_counter() - t0, 2),
    }
    probes_state = None
    if fitted or cfg.probe != "kmeans":  # keep fitted probes for inspection and reuse
        fits = [{"seed": f.seed,
                 "centroids": f.cluster.centroids.detach().cpu(),
                 "cluster_probe": {k: v.cpu() for k, v in f.cluster.state_dict().items()},
                 "linear_probe": {k: v.cpu() for k, v in f.linear.state_dict().items()},
                 "cluster_mapping": r["cluster_mapping"]}
                for f, r in zip(probes.fits, per_seed)]
        probes_state = {**{k: fits[0][k] for k in ("centroids", "linear_probe", "cluster_probe")},
                        "fits": fits, "info": probes.info, "seed": cfg.seed}
    mapping_arr = {t: np.asarray(v) for t, v in mappings.items()}
    first = seed_confusions(confs, probes, 0)
    matched = matched_confusion(first[("cluster", False)], mapping_arr["no_crf"])
    if not (matched[:, -1] > 0).any():
        matched = matched[:, :-1]
    dest = EvalReport(cfg.out, name).write(
        config={**to_dict(cfg), "name": name},
        metrics=report,
        confusions=_confusion_arrays(confs, probes),
        confusion_png=confusion_png(matched, first[("linear", False)], store.class_names),
        predictions_png=(predictions_png(res["shown"], mapping_arr, store.num_classes, cfg.crf,
                                         store.class_names) if res["shown"] else None),
        probes=probes_state).parent
    log.info("eval %s: %s -> %s", name, summary_line(report), dest)
    return report


def _confusion_arrays(confs: dict[tuple, np.ndarray], probes: Probes) -> dict[str, np.ndarray]:
    """confusion.npz: `<probe>_<crf|no_crf>` of the first seed; with several seeds also
    `cluster_<tag>_seed<s>` per seed and `linear_<tag>_seed<s>` per distinct linear fit (named
    by the first seed that uses it)."""
    out: dict[str, np.ndarray] = {}
    several = len(probes.fits) > 1
    linear_seed = {}
    for f in probes.fits:
        linear_seed.setdefault(probes.linear_index(f), f.seed)
    for (p, x, on), m in confs.items():
        tag = "crf" if on else "no_crf"
        seed = probes.fits[x].seed if p == "cluster" else linear_seed[x]
        if x == 0 or (p == "linear" and x == probes.linear_index(probes.fits[0])):
            out[f"{p}_{tag}"] = m
        if several:
            out[f"{p}_{tag}_seed{seed}"] = m
    return out


def summary_line(report: dict[str, Any]) -> str:
    """'cluster acc 58.2 ± 0.4 mIoU 27.1 ± 0.9 | linear ...' of a metrics.json report."""
    n = report.get("n_seeds", 1)

    def part(block: dict[str, Any], probe: str) -> str:
        return " ".join(f"{label} " + format_mean_std(block[f"{probe}_{m}"],
                                                      block.get(f"{probe}_{m}_std"), n)
                        for label, m in (("acc", "acc"), ("mIoU", "miou")))

    nc = report["no_crf"]
    msg = f"cluster {part(nc, 'cluster')} | linear {part(nc, 'linear')}"
    if report.get("crf"):
        msg += f" | +CRF cluster {part(report['crf'], 'cluster')} linear {part(report['crf'], 'linear')}"
    return msg + (f" (mean ± std over {n} probe seeds)" if n > 1 else "")
