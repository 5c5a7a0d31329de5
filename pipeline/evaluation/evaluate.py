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
from typing import Any

import numpy as np
import torch
import torch.nn.functional as Fn

from pipeline.artifacts.features import FeatureStore
from pipeline.artifacts.reports import EvalReport
from pipeline.artifacts.training import TrainRun
from pipeline.cache.integrity import releases_locks, require_device
from pipeline.cache.store import code_version
from pipeline.config.resolve import to_dict
from pipeline.config.schema import EvalConfig
from pipeline.evaluation.crf import CRFPool, cluster_probs, softmax
from pipeline.evaluation.fitting import (
    BATCH,
    EVAL_SPLIT,
    Probes,
    _frozen_probes,
    _trained_probes,
    _valid_rows,
)
from pipeline.evaluation.metrics import (
    Confusion,
    cluster_scores,
    linear_scores,
    matched_confusion,
)
from pipeline.evaluation.seeds import format_mean_std, mean_block
from pipeline.evaluation.viz import colourise, palette
from pipeline.executor import progress, timed

log = logging.getLogger("ppap.evaluate")

UPSAMPLE_BUDGET_MB = 256  # upsampled code (D x S x S float32) held at once
#                             beyond it are left out by a seeded subsample)


# --------------------------------------------------------------------------- model sources


def _default_checkpoint(cfg: EvalConfig) -> EvalConfig:
    """`--checkpoint best` (the default) of a run that never selected falls back to `last`
    (TrainRun.checkpoint_for_eval); missing runs and checkpoints are refused with advice."""
    if cfg.baseline == "frozen" or not cfg.trained:
        return cfg
    kind, _ = TrainRun(cfg.out, cfg.trained).checkpoint_for_eval(cfg.checkpoint)
    return cfg if kind == cfg.checkpoint else dataclasses.replace(cfg, checkpoint=kind)




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
