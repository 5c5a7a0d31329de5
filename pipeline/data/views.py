"""The crop protocol (docs/method.md §5) and per-patch majority labels (§8).

A view is always "the centred square of the shorter side of a box, resized to size x size": the
same picture as "resize the shorter side to `size`, then centre-crop" (up to sub-pixel rounding
of the centre offset), with an exact box. Images are resized with PIL's bilinear filter
(antialiased when shrinking, as torchvision's PIL path does); labels with nearest neighbour, so a
view never contains a label value absent from its source box."""

from __future__ import annotations

import numpy as np
from PIL import Image

from pipeline.data.base import IGNORE

Box = tuple[int, int, int, int]


def _check_pair(rgb: np.ndarray, label: np.ndarray | None) -> None:
    if not (isinstance(rgb, np.ndarray) and rgb.ndim == 3 and rgb.shape[2] == 3 and rgb.dtype == np.uint8):
        desc = f"{getattr(rgb, 'dtype', type(rgb).__name__)} {getattr(rgb, 'shape', '')}"
        raise ValueError(f"rgb must be a uint8 (H, W, 3) array, got {desc}")
    if label is not None and np.shape(label) != rgb.shape[:2]:
        raise ValueError(f"label shape {np.shape(label)} differs from the image's {rgb.shape[:2]}; "
                         "pass the label that belongs to this image")


def _square_view(rgb: np.ndarray, label: np.ndarray | None, box: Box, size: int):
    """Centred square (side = shorter side) of `box`, resized to size x size."""
    x0, y0, x1, y1 = box
    w, h = x1 - x0, y1 - y0
    m = min(w, h)
    if m < 1:
        raise ValueError(f"crop box {box} is empty; the image ({rgb.shape[1]}x{rgb.shape[0]}) is too small")
    sx, sy = x0 + (w - m) // 2, y0 + (h - m) // 2
    sq = (sx, sy, sx + m, sy + m)
    # crop first: PIL's resize(box=...) would also read pixels just outside the box
    img = Image.fromarray(rgb[sy: sy + m, sx: sx + m]).resize((size, size), Image.Resampling.BILINEAR)
    out_label = None
    if label is not None:
        idx = np.minimum(((np.arange(size) + 0.5) * (m / size)).astype(np.int64), m - 1)
        out_label = np.asarray(label)[sy + idx[:, None], sx + idx[None, :]]
    return np.asarray(img, dtype=np.uint8), out_label, sq


def _check_size(size: int) -> int:
    if int(size) != size or size < 1:
        raise ValueError(f"size={size!r} must be a positive integer (pixels)")
    return int(size)


def five_crops(rgb: np.ndarray, label: np.ndarray | None, size: int = 224
               ) -> list[tuple[np.ndarray, np.ndarray | None, Box]]:
    """Training views: top-left, top-right, bottom-left, bottom-right, centre crops at half the
    image's height and width, each as the centred `size` x `size` square of its shorter side.

    Returns [(rgb (size, size, 3) uint8, label (size, size) | None, (x0, y0, x1, y1))]; the box
    is the exact source region that the view shows.
    """
    size = _check_size(size)
    _check_pair(rgb, label)
    H, W = rgb.shape[:2]
    h, w = H // 2, W // 2
    if h < 1 or w < 1:
        raise ValueError(f"image of {W}x{H} pixels is too small for five crops (needs 2x2 at least)")
    cy, cx = int(round((H - h) / 2.0)), int(round((W - w) / 2.0))
    boxes = [(0, 0, w, h), (W - w, 0, W, h), (0, H - h, w, H), (W - w, H - h, W, H),
             (cx, cy, cx + w, cy + h)]
    return [_square_view(rgb, label, b, size) for b in boxes]


def eval_view(rgb: np.ndarray, label: np.ndarray | None, size: int = 320
              ) -> tuple[np.ndarray, np.ndarray | None, Box]:
    """Evaluation view: the whole image's centred square of its shorter side, resized to size."""
    size = _check_size(size)
    _check_pair(rgb, label)
    H, W = rgb.shape[:2]
    return _square_view(rgb, label, (0, 0, W, H), size)


def patch_labels(label: np.ndarray, grid: tuple[int, int]) -> np.ndarray:
    """Majority label per patch of a `grid` = (h, w) split of `label` (..., H, W) -> (..., h, w) int16.

    Pixel (y, x) belongs to patch (floor(y*h/H), floor(x*w/W)). A patch is -1 when more than
    half of its pixels are ignore (< 0); otherwise it takes its most frequent valid label, the
    smallest one on ties. One leading batch dimension is accepted.
    """
    lab = np.asarray(label)
    if lab.ndim not in (2, 3):
        raise ValueError(f"label must be (H, W) or (N, H, W), got shape {lab.shape}")
    gh, gw = (int(g) for g in grid)
    H, W = lab.shape[-2:]
    if not (1 <= gh <= H and 1 <= gw <= W):
        raise ValueError(f"grid {tuple(grid)} must be positive and no larger than the label's {H}x{W}")
    batch = lab.shape[0] if lab.ndim == 3 else 1
    lab = lab.reshape(batch, H, W).astype(np.int64, copy=False)
    py = (np.arange(H) * gh) // H
    px = (np.arange(W) * gw) // W
    cell = (py[:, None] * gw + px[None, :])  # (H, W) patch index
    n_cells = gh * gw
    pid = (np.arange(batch)[:, None, None] * n_cells + cell[None]).ravel()  # global patch id
    flat = lab.ravel()
    valid = flat >= 0
    k = int(flat.max()) + 1 if valid.any() else 1
    counts = np.bincount(pid[valid] * k + flat[valid], minlength=batch * n_cells * k)
    counts = counts.reshape(batch * n_cells, k)
    n_valid = counts.sum(axis=1)
    n_total = np.bincount(cell.ravel(), minlength=n_cells)  # same for every batch item
    n_total = np.tile(n_total, batch)
    out = counts.argmax(axis=1)  # first maximum = smallest label on ties
    mostly_ignore = 2 * (n_total - n_valid) > n_total
    out = np.where(mostly_ignore | (n_valid == 0), IGNORE, out).astype(np.int16)
    shape = (batch, gh, gw) if np.ndim(label) == 3 else (gh, gw)
    return out.reshape(shape)
