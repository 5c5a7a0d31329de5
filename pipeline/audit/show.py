"""Pictures of mined sets (the paper's Fig. 5): one PNG per chosen anchor of one shard.

The anchor's patch is boxed in red on its image; its positives (magenta) and ambiguous patches
(blue) are tinted, and the rest (negatives) dimmed, on every image of the batch that holds
any: the anchor's image first, then the others by decreasing count, at most `MAX_IMAGES`. When the cache has labels, the
ground truth (class palette, ignore black) is drawn beside each image.

Reads `<out>/features.zarr` (train `rgb`, `labels`, frozen features) and one shard of
`<out>/mine/<mined>/`; writes `<dest or out/show/<mined>>/e{epoch}_b{batch}_a{anchor}.png`.
"""

from __future__ import annotations

import logging
import math
from pathlib import Path
from typing import Any, Sequence

import numpy as np

from pipeline.artifacts.features import FeatureStore, take_rows
from pipeline.artifacts.layout import RunLayout
from pipeline.artifacts.mined import MinedSets
from pipeline.audit.metrics import subset_shard
from pipeline.cache.integrity import hold_lock, releases_locks
from pipeline.config.schema import ShowConfig
from pipeline.evaluation.viz import colourise, palette
from pipeline.mining.recover import recover_sets

log = logging.getLogger("ppap.show")

MAX_IMAGES = 16  # images per figure (anchor's image included)
PANELS_PER_ROW = 4  # images per figure row (each with its ground truth beside it, if any)
PANEL_W_IN, PANEL_H_IN, HEADER_IN, DPI = 2.5, 2.7, 0.6, 100
# magenta and pure blue: the two colours farthest from every class colour of pipeline.evaluation.viz.palette
# (RGB distance >= 130 to each of its 60 colours), so a tinted patch never reads as a class
POS_RGBA = (1.0, 0.0, 1.0, 0.55)
AMB_RGBA = (0.0, 0.0, 1.0, 0.55)
REST_RGBA = (0.0, 0.0, 0.0, 0.35)


def layout(n_images: int, labelled: bool) -> tuple[int, int, tuple[int, int]]:
    """(rows, axes columns, (width, height) in pixels) of a figure showing `n_images`."""
    per_row = min(PANELS_PER_ROW, max(1, n_images))
    rows = math.ceil(n_images / per_row)
    cols = per_row * (2 if labelled else 1)
    size = (round(cols * PANEL_W_IN * DPI), round((rows * PANEL_H_IN + HEADER_IN) * DPI))
    return rows, cols, size


def choose_images(anchor_row: int, pos: np.ndarray, amb: np.ndarray, hw: int, n_img: int,
                  max_images: int = MAX_IMAGES) -> tuple[list[int], np.ndarray, np.ndarray]:
    """Batch positions to draw: the anchor's image, then images holding positives/ambiguous
    patches by decreasing count (ties by position). Also returns per-image pos/amb counts."""
    n_pos = np.bincount(np.asarray(pos, np.int64) // hw, minlength=n_img)
    n_amb = np.bincount(np.asarray(amb, np.int64) // hw, minlength=n_img)
    own = anchor_row // hw
    total = n_pos + n_amb
    others = [int(b) for b in np.argsort(-total, kind="stable") if total[b] > 0 and b != own]
    return [own] + others[: max_images - 1], n_pos, n_amb


def render_anchor(
    path: str | Path,
    rgb: np.ndarray,
    grid: tuple[int, int],
    anchor_row: int,
    pos: np.ndarray,
    amb: np.ndarray,
    labels: np.ndarray | None = None,
    class_names: Sequence[str] | None = None,
    patch_label: np.ndarray | None = None,
    title: str = "",
    crop_ids: Sequence[int] | None = None,
) -> Path:
    """Draw one anchor's sets on the images of its batch and save a PNG.

    rgb: (B, S, S, 3) uint8 crops of the batch; grid: (h, w) patches; rows are b*h*w + y*w + x;
    pos/amb: rows of the anchor's positive and ambiguous sets; labels: (B, S, S) or None.
    """
    from matplotlib.backends.backend_agg import FigureCanvasAgg
    from matplotlib.figure import Figure
    from matplotlib.patches import Patch, Rectangle

    h, w = grid
    hw = h * w
    side_y, side_x = rgb.shape[1], rgb.shape[2]
    py, px = side_y / h, side_x / w
    pos = np.asarray(pos, np.int64)
    amb = np.asarray(amb, np.int64)
    shown, n_pos, n_amb = choose_images(anchor_row, pos, amb, hw, rgb.shape[0])
    n_with = int(((n_pos + n_amb) > 0).sum())
    labelled = labels is not None
    rows, cols, (wpx, hpx) = layout(len(shown), labelled)
    per_row = cols // (2 if labelled else 1)

    fig = Figure(figsize=(wpx / DPI, hpx / DPI), dpi=DPI)
    FigureCanvasAgg(fig)
    top = 1 - HEADER_IN * DPI / hpx
    axes = fig.subplots(rows, cols, squeeze=False,
                        gridspec_kw=dict(left=0.01, right=0.99, bottom=0.01, top=top, wspace=0.04,
                                         hspace=0.18))
    for ax in axes.ravel():
        ax.axis("off")
    pal = None
    if labelled:
        k = max(len(class_names or ()), int(labels.max(initial=0)) + 1)
        pal = palette(k)
    ab, ar = divmod(anchor_row, hw)
    ay, ax_ = divmod(ar, w)
    extent = (0, side_x, side_y, 0)
    for i, b in enumerate(shown):
        r, c = divmod(i, per_row)
        c *= 2 if labelled else 1
        ax = axes[r, c]
        ax.imshow(rgb[b], extent=extent, interpolation="bilinear")
        over = np.tile(np.asarray(REST_RGBA, np.float32), (hw, 1))  # dim what is in neither set
        over[pos[pos // hw == b] % hw] = POS_RGBA
        over[amb[amb // hw == b] % hw] = AMB_RGBA
        if b == ab:
            over[ar] = 0.0  # the anchor itself stays clear (boxed below)
        ax.imshow(over.reshape(h, w, 4), extent=extent, interpolation="nearest")
        name = f"crop {crop_ids[b]}" if crop_ids is not None else f"image {b}"
        ax.set_title(f"{name}: {n_pos[b]} pos, {n_amb[b]} amb", fontsize=8)
        boxes = [ax]
        if labelled:
            gx = axes[r, c + 1]
            gx.imshow(colourise(labels[b], pal), extent=extent, interpolation="nearest")
            gx.set_title("ground truth", fontsize=8)
            boxes.append(gx)
        if b == ab:
            for bx in boxes:
                bx.add_patch(Rectangle((ax_ * px, ay * py), px, py, fill=False, edgecolor="red", linewidth=2))
    head = title or f"anchor row {anchor_row}"
    if patch_label is not None and labelled:
        lab = int(patch_label[anchor_row])
        name = class_names[lab] if class_names and 0 <= lab < len(class_names) else str(lab)
        head += " — " + ("ignore-labelled patch" if lab < 0 else f"class {name}")
    head += (f"\n|P| = {pos.size}, |A| = {amb.size} in {n_with} of {rgb.shape[0]} images; "
             f"showing {len(shown)} (anchor's image first, then by count)")
    fig.suptitle(head, fontsize=10, y=1 - 0.08 * HEADER_IN * DPI / hpx)
    fig.legend(handles=[Patch(color=POS_RGBA, label="positive"), Patch(color=AMB_RGBA, label="ambiguous"),
                        Patch(color=REST_RGBA, label="negative (dimmed)"),
                        Patch(fill=False, edgecolor="red", label="anchor")],
               loc="upper right", fontsize=8, frameon=False, ncol=4)
    if labelled:  # the classes drawn in the ground-truth panels
        present = sorted(int(c) for c in np.unique(labels[shown]) if c >= 0)
        names = [class_names[c] if class_names and c < len(class_names) else f"class {c}" for c in present]
        fig.legend(handles=[Patch(color=pal[c] / 255.0, label=n) for c, n in zip(present, names)],
                   loc="upper left", fontsize=7, frameon=False, ncol=min(6, max(1, len(present))),
                   title="ground truth", title_fontsize=7)
    path = Path(path)
    path.parent.mkdir(parents=True, exist_ok=True)
    tmp = path.with_name(f".{path.name}.tmp.png")
    fig.savefig(tmp, dpi=DPI)
    tmp.replace(path)
    return path


def _settings(c: dict[str, Any]) -> str:
    """The mining settings a picture depends on, for its title."""
    crit = c.get("criterion")
    if crit in ("ppap", "p0"):
        extra = f" T={c.get('prop_iters')}" if crit == "ppap" else ""
        return f"{crit} phi0={c.get('phi0')} psi0={c.get('psi0')}{extra}"
    return str(crit)


def _choose_anchors(cfg: ShowConfig, m: int) -> list[int]:
    bad = [a for a in cfg.anchors if not 0 <= a < m]
    if bad:
        raise ValueError(f"anchor position(s) {bad} outside this shard's 0..{m - 1}; pick --anchor below {m}")
    chosen = list(dict.fromkeys(int(a) for a in cfg.anchors))
    if cfg.random > 0:
        rest = np.setdiff1d(np.arange(m), chosen)
        k = min(cfg.random, rest.size)
        chosen += sorted(int(a) for a in np.random.default_rng(cfg.seed).choice(rest, size=k, replace=False))
    return chosen


@releases_locks
def run(cfg: ShowConfig) -> list[Path]:
    """Render the chosen anchors of shard (epoch, batch) of `<out>/mine/<mined>/`."""
    out = Path(cfg.out)
    store, shard, F = MinedSets.open(FeatureStore(out), cfg.mined).load_batch(cfg.epoch, cfg.batch)
    images = np.asarray(shard.images, np.int64)
    anchors = np.asarray(shard.anchors, np.int64)
    chosen = _choose_anchors(cfg, anchors.shape[0])
    sets = recover_sets(subset_shard(shard, np.asarray(chosen, np.int64)), F)  # row i = chosen[i]
    g = store.split("train")
    rgb = take_rows(g["rgb"], images)
    labels = take_rows(g["labels"], images) if store.has_labels and "labels" in g else None
    patch_label = take_rows(g["patch_labels"], images).reshape(-1) if labels is not None else None
    names = store.class_names if labels is not None else None
    sets_cfg = {"criterion": shard.criterion, **MinedSets(out, cfg.mined).config}
    dest = Path(cfg.dest) if cfg.dest else RunLayout(out).show(cfg.mined)
    grid = store.grid("train")
    hold_lock(dest, "picture folder")
    written = []
    for i, a in enumerate(chosen):
        title = (f"{out.resolve().name}: {cfg.mined} ({_settings(sets_cfg)}), plan {cfg.epoch}, "
                 f"batch {cfg.batch}, anchor {a} (row {int(anchors[a])})")
        p = render_anchor(dest / f"e{cfg.epoch}_b{cfg.batch}_a{a}.png", rgb, grid, int(anchors[a]),
                          sets.pos(i), sets.amb(i), labels=labels, class_names=names,
                          patch_label=patch_label, title=title, crop_ids=[int(c) for c in images])
        log.info("show: %s", p)
        written.append(p)
    return written
