"""`ppap-pipe predict`: segment a folder of new images with a trained run.

For every image under `--images` (jpg, jpeg, png, bmp, tif, tiff, webp; subfolders kept): EXIF
orientation applied, RGB; resized (PIL bilinear) so its shorter side is the cache's evaluation
side (320; the longer side capped at `--max-side`), each side rounded to a multiple of the patch;
the frozen backbone's first blocks give the mid tokens, the run's fine-tuned branch (checkpoint
`--checkpoint`) gives `code`, upsampled bilinearly to the working size; the probe predicts per
pixel (optionally refined by the dense CRF of docs/method.md §6.4 on the working-size image),
and the label map is resized (nearest) back to the image's own size.

Probes (`--probe`): `fitted` uses the cluster probe and its Hungarian matching that
`ppap-pipe eval` fitted and saved for this run and checkpoint (`eval/<run>-<checkpoint>/probes.pt`,
first probe seed): labels are class ids, unmatched clusters 255. `trained` uses the cluster
probe trained alongside the network: labels are cluster ids (no labels needed, so this works
for runs on unlabelled data). `auto` (default): `fitted` when that report exists, else
`trained`. `--head linear` uses the linear probe instead (fitted or trained; class ids).

Writes `<dest>/` (`--out`): `<name>.png` (uint8 label ids, 255 = unmatched / none), then
`<name>_color.png` (palette colours) and `<name>_overlay.jpg` (image and colours blended),
`predict.json` (what the ids mean: run, checkpoint, probe, classes, palette; images done and
skipped). The label PNG is written last, so an interrupted run redoes only unfinished images;
unreadable images are skipped and listed, not fatal. A folder written with other settings is
refused (`manifest.json`).
"""

from __future__ import annotations

import hashlib
import logging
import time
from pathlib import Path
from typing import Any, NamedTuple

import numpy as np
import torch
import torch.nn.functional as Fn

from pipeline.artifacts.features import FeatureStore
from pipeline.artifacts.reports import EvalReport
from pipeline.artifacts.training import TrainRun
from pipeline.cache.integrity import (
    clean_orphans,
    hold_lock,
    releases_locks,
    require_device,
)
from pipeline.cache.store import (
    atomic_write_bytes,
    atomic_write_json,
    check_or_write_manifest,
    code_version,
)
from pipeline.config.resolve import to_dict
from pipeline.config.schema import PredictConfig
from pipeline.evaluation.viz import colourise, palette
from pipeline.executor import progress

log = logging.getLogger("ppap.predict")

IMAGE_SUFFIXES = (".jpg", ".jpeg", ".png", ".bmp", ".tif", ".tiff", ".webp")
UNMATCHED = 255  # label value of unmatched clusters (uint8 label PNGs: at most 255 ids)
OVERLAY_ALPHA = 0.5


class Head(NamedTuple):
    """What turns code into labels: a (cluster or linear) probe, and the id mapping."""

    kind: str  # "cluster" | "linear"
    module: Any  # ClusterProbe (`scores`) or LinearProbe (`predict_logits`)
    mapping: np.ndarray | None  # cluster id -> class id (-1 unmatched); None: ids as they are
    source: str  # "fitted" | "trained"
    report: str | None  # eval/<name> the fitted probe came from
    names: list[str]  # what each output id means


def find_images(root: Path) -> list[Path]:
    """Image files under `root` (recursively), sorted by relative path."""
    if not root.is_dir():
        raise ValueError(f"--images {root} is not a folder; pass a folder of jpg/png images")
    files = sorted(p for p in root.rglob("*") if p.is_file() and p.suffix.lower() in IMAGE_SUFFIXES
                   and not any(part.startswith(".") for part in p.relative_to(root).parts))
    if not files:
        raise ValueError(f"--images {root} holds no image files ({', '.join(IMAGE_SUFFIXES)})")
    return files


def output_stem(root: Path, path: Path) -> str:
    """Output name of an image: its path under `root` without the suffix ('a/b' for a/b.jpg)."""
    return path.relative_to(root).with_suffix("").as_posix()


def read_image(path: Path) -> np.ndarray:
    """(H, W, 3) uint8 RGB with the EXIF orientation applied; raises ValueError if unreadable."""
    from PIL import Image, ImageOps

    try:
        with Image.open(path) as im:
            im = ImageOps.exif_transpose(im)
            return np.asarray(im.convert("RGB"), dtype=np.uint8)
    except (OSError, SyntaxError, ValueError, Image.DecompressionBombError) as exc:
        raise ValueError(f"cannot decode {path} ({type(exc).__name__}: {exc})") from None


def working_size(h: int, w: int, side: int, patch: int, max_side: int) -> tuple[int, int]:
    """(H', W'): shorter side `side`, aspect kept, longer side at most `max_side`, both
    multiples of the patch (at least one patch)."""
    scale = side / min(h, w)
    scale = min(scale, max_side / max(h, w))
    return tuple(max(patch, int(round(v * scale / patch)) * patch) for v in (h, w))  # type: ignore


def _head(cfg: PredictConfig, run: TrainRun, kind: str, linear, cluster, model_meta) -> Head:
    """The probe that labels pixels (see the module docstring: --probe, --head)."""
    report = EvalReport(cfg.out, f"{cfg.trained}-{kind}")
    source = cfg.probe
    if source == "auto":
        source = "fitted" if report.probes_path.is_file() else "trained"
        if source == "trained":
            log.info("predict: no fitted probe at %s (run `ppap-pipe eval --trained %s "
                     "--checkpoint %s` to fit and save one, with class ids); using the probe "
                     "trained with the run", report.dir, cfg.trained, kind)
    classes = list(model_meta.get("class_names") or [])
    if source == "fitted":
        fitted = report.fitted_probes()
        if cfg.head == "linear":
            lin = _linear_from_state(fitted["linear_probe"], cfg.device)
            return Head("linear", lin, None, "fitted", report.name, classes)
        clu = _cluster_from_centroids(fitted["centroids"], cfg.device)
        tag = "crf" if cfg.crf else "no_crf"
        mapping = np.asarray(fitted["cluster_mapping"][tag], dtype=np.int64)
        return Head("cluster", clu, mapping, "fitted", report.name, classes)
    if cfg.head == "linear":
        if linear is None:
            raise ValueError(f"{run.dir} was trained without labels, so it has no linear probe; "
                             "use --head cluster")
        return Head("linear", linear, None, "trained", None, classes)
    names = [f"cluster {i}" for i in range(cluster.n_clusters)]
    return Head("cluster", cluster, None, "trained", None, names)


def _cluster_from_centroids(centroids: torch.Tensor, device: str):
    from pipeline.training.model import ClusterProbe

    c = ClusterProbe(centroids.shape[1], centroids.shape[0], torch.Generator().manual_seed(0))
    with torch.no_grad():
        c.centroids.copy_(centroids)
    return c.to(device).eval().requires_grad_(False)


def _linear_from_state(state: dict[str, torch.Tensor], device: str):
    from pipeline.training.model import LinearProbe

    w = state["conv.weight"]
    lin = LinearProbe(w.shape[1], w.shape[0], torch.Generator().manual_seed(0))
    lin.load_state_dict(state)
    return lin.to(device).eval().requires_grad_(False)


def _labels(head: Head, code: torch.Tensor, size: tuple[int, int], rgb: np.ndarray,
            crf: bool) -> np.ndarray:
    """(H', W') label ids at the working size."""
    from pipeline.evaluation.crf import cluster_probs, crf_argmax, softmax

    up = Fn.interpolate(code, size=size, mode="bilinear", align_corners=False)
    if head.kind == "cluster":
        scores = head.module.scores(up)[0]
        probs = cluster_probs(scores.cpu().numpy(), axis=0) if crf else None
    else:
        scores = head.module.predict_logits(up, size)[0]
        probs = softmax(scores.cpu().numpy(), axis=0) if crf else None
    ids = crf_argmax(rgb, [probs])[0] if crf else scores.argmax(0).cpu().numpy()
    ids = np.asarray(ids, dtype=np.int64)
    if head.mapping is not None:
        lut = np.where(head.mapping >= 0, head.mapping, UNMATCHED)
        ids = lut[ids]
    return ids


def _png(arr: np.ndarray) -> bytes:
    import io

    from PIL import Image

    buf = io.BytesIO()
    Image.fromarray(arr).save(buf, format="PNG")
    return buf.getvalue()


def _jpg(arr: np.ndarray) -> bytes:
    import io

    from PIL import Image

    buf = io.BytesIO()
    Image.fromarray(arr).save(buf, format="JPEG", quality=90)
    return buf.getvalue()


def _checkpoint_digest(path: Path) -> str:
    return hashlib.sha256(path.read_bytes()).hexdigest()[:16]


@releases_locks
def run(cfg: PredictConfig) -> dict[str, Any]:
    """Label every image of `cfg.images` into `cfg.dest`; returns the summary (predict.json)."""
    from pipeline.data.backbones import forward_tokens, load_backbone

    t0 = time.perf_counter()
    require_device(cfg.device)
    root = Path(cfg.images)
    files = find_images(root)
    run_ = TrainRun(cfg.out, cfg.trained)
    kind, ckpt = run_.checkpoint_for_eval(cfg.checkpoint)
    branch, linear, cluster, tcfg = ckpt.load_model(cfg.device)
    meta = tcfg["model"]
    head = _head(cfg, run_, kind, linear, cluster, meta)
    dest = Path(cfg.dest)
    if dest.resolve() == root.resolve() or root.resolve() in dest.resolve().parents:
        raise ValueError(f"--out {dest} lies inside --images {root}; write the predictions to "
                         "another folder (they would be read as input next time)")
    hold_lock(dest, "prediction folder")
    clean_orphans(dest)
    side = int(FeatureStore(cfg.out).manifest.get("eval_size") or 320)
    identity = {"run": cfg.trained, "checkpoint": kind, "checkpoint_sha256": _checkpoint_digest(ckpt.path),
                "probe": head.source, "probe_report": head.report, "head": head.kind, "crf": cfg.crf,
                "side": side, "max_side": cfg.max_side}
    check_or_write_manifest(dest / "manifest.json", identity, what="prediction folder")
    backbone, info, _ = load_backbone(meta["backbone"], weights=meta.get("weights"),
                                      device=cfg.device, seed=int(meta.get("backbone_seed") or 0))
    mean = torch.tensor(info.mean).view(1, 3, 1, 1).to(cfg.device)
    std = torch.tensor(info.std).view(1, 3, 1, 1).to(cfg.device)
    pal = palette(len(head.names))
    if len(head.names) >= UNMATCHED:
        raise ValueError(f"{len(head.names)} output ids do not fit uint8 label PNGs (255 = "
                         "unmatched); train with fewer --n-clusters")

    stems: dict[str, Path] = {}
    skipped: list[dict[str, str]] = []
    todo: list[tuple[Path, str]] = []
    done = 0
    for p in files:
        stem = output_stem(root, p)
        if stem in stems:
            skipped.append({"image": str(p), "error": f"same output name as {stems[stem]}; rename one"})
            continue
        stems[stem] = p
        if (dest / f"{stem}.png").is_file():
            done += 1
        else:
            todo.append((p, stem))
    log.info("predict: %d images under %s (%d done before), run %s checkpoint %s (step %s), %s %s "
             "probe%s, device %s, code %s", len(stems), root, done, cfg.trained, kind,
             tcfg.get("step"), head.source, head.kind, " + CRF" if cfg.crf else "", cfg.device,
             code_version())
    with torch.no_grad(), progress(total=len(stems), initial=done, desc="predict", unit="img") as bar:
        for p, stem in todo:
            try:
                rgb = read_image(p)
            except ValueError as exc:
                log.warning("predict: skipping %s", exc)
                skipped.append({"image": str(p), "error": str(exc)})
                bar.update(1)
                continue
            h, w = rgb.shape[:2]
            size = working_size(h, w, side, info.patch_size, cfg.max_side)
            x = torch.from_numpy(np.array(rgb, copy=True)).permute(2, 0, 1)[None].float().div_(255.0).to(cfg.device)
            x = Fn.interpolate(x, size=size, mode="bilinear", align_corners=False, antialias=True)
            work_rgb = (x[0].permute(1, 2, 0).clamp(0, 1) * 255).round().byte().cpu().numpy()
            mid, _ = forward_tokens(backbone, (x - mean) / std)
            grid = (size[0] // info.patch_size, size[1] // info.patch_size)
            code = branch.encode(mid, grid).float()
            ids = _labels(head, code, size, work_rgb, cfg.crf)
            from PIL import Image

            full = np.asarray(Image.fromarray(ids.astype(np.uint8)).resize((w, h), Image.NEAREST))
            colour = colourise(np.where(full == UNMATCHED, len(pal), full), pal)
            overlay = (rgb.astype(np.float32) * (1 - OVERLAY_ALPHA)
                       + colour.astype(np.float32) * OVERLAY_ALPHA).round().astype(np.uint8)
            atomic_write_bytes(dest / f"{stem}_color.png", _png(colour))
            atomic_write_bytes(dest / f"{stem}_overlay.jpg", _jpg(overlay))
            atomic_write_bytes(dest / f"{stem}.png", _png(full))  # last: the image is done
            bar.update(1)
    finished = sorted(s for s in stems if (dest / f"{s}.png").is_file())
    summary = {
        "run": cfg.trained, "run_dir": str(run_.dir), "checkpoint": kind, "step": tcfg.get("step"),
        "probe": head.source, "probe_report": head.report, "head": head.kind, "crf": cfg.crf,
        "ids": ("class ids" if head.kind == "linear" or head.mapping is not None else "cluster ids"),
        "names": head.names, "unmatched": UNMATCHED,
        "palette": [[int(v) for v in c] for c in pal],
        "images": len(stems), "written": finished, "skipped": skipped,
        "config": to_dict(cfg), "code_version": code_version(),
        "seconds": round(time.perf_counter() - t0, 2),
    }
    atomic_write_json(dest / "predict.json", summary)
    log.info("predict: %d of %d images labelled -> %s%s", len(finished), len(stems), dest,
             f"; skipped {len(skipped)}: " + ", ".join(s["image"] for s in skipped[:5])
             if skipped else "")
    return summary
