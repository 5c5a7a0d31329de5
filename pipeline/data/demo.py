"""The `demo` dataset: no files needed. Deterministic 480x360 mosaics (48 train, 16 val) of 2-4
regions, each cut from one of six photographs bundled inside scikit-image (read from the package
folder, never fetched); a region's class is its source photo."""

from __future__ import annotations

import functools
from pathlib import Path
from typing import Any

import numpy as np
from PIL import Image

from pipeline.data.base import (
    SPLITS,
    DataError,
    Dataset,
)

# (class name, file inside skimage/data): colour photos shipped in the scikit-image wheel itself
DEMO_PHOTOS = (
    ("astronaut", "astronaut.png"),
    ("cat", "chelsea.png"),
    ("coffee", "coffee.png"),
    ("rocket", "rocket.jpg"),
    ("motorcycle", "motorcycle_left.png"),
    ("microscopy", "ihc.png"),
)


DEMO_SIZE = (480, 360)  # width, height


DEMO_COUNTS = {"train": 48, "val": 16}


_DEMO_MARGIN = 1.3  # photos are scaled to cover this multiple of the canvas, for random offsets


def _skimage_data_dir() -> Path:
    try:
        import skimage
    except ImportError:  # pragma: no cover - scikit-image is a declared dependency
        raise DataError("the demo dataset needs scikit-image (pip install scikit-image)") from None
    return Path(skimage.__file__).resolve().parent / "data"


@functools.lru_cache(maxsize=len(DEMO_PHOTOS))
def _demo_photo(k: int) -> np.ndarray:
    """Photo k, resized (bicubic) so that it covers `_DEMO_MARGIN` x the canvas; read-only."""
    path = _skimage_data_dir() / DEMO_PHOTOS[k][1]
    if not path.is_file():
        raise DataError(f"bundled photo {path} is missing from the scikit-image install; "
                        "reinstall scikit-image (the demo never downloads)")
    with Image.open(path) as im:
        im = im.convert("RGB")
        w, h = im.size
        scale = _DEMO_MARGIN * max(DEMO_SIZE[0] / w, DEMO_SIZE[1] / h)
        im = im.resize((round(w * scale), round(h * scale)), Image.Resampling.BICUBIC)
        arr = np.asarray(im, dtype=np.uint8)
    arr.setflags(write=False)
    return arr


def _demo_regions(rng: np.random.Generator, k: int, width: int, height: int) -> np.ndarray:
    """(H, W) region index in 0..k-1, every region non-empty.

    Half the mosaics are guillotine cuts into rectangles; the others a power diagram of k
    well-separated centres on sinusoidally warped coordinates (irregular curved borders).
    """
    if rng.random() < 0.5:
        boxes = [(0, 0, width, height)]
        while len(boxes) < k:
            j = max(range(len(boxes)), key=lambda b: (boxes[b][2] - boxes[b][0]) * (boxes[b][3] - boxes[b][1]))
            x0, y0, x1, y1 = boxes.pop(j)
            t = rng.uniform(0.3, 0.7)
            if (x1 - x0) >= (y1 - y0):
                xm = x0 + int(round(t * (x1 - x0)))
                boxes += [(x0, y0, xm, y1), (xm, y0, x1, y1)]
            else:
                ym = y0 + int(round(t * (y1 - y0)))
                boxes += [(x0, y0, x1, ym), (x0, ym, x1, y1)]
        order = rng.permutation(k)
        regions = np.empty((height, width), np.int64)
        for r, (x0, y0, x1, y1) in zip(order, boxes):
            regions[y0:y1, x0:x1] = r
        return regions
    min_sep = 0.35 * min(width, height)
    for _ in range(100):
        centres = rng.uniform([0.1 * width, 0.1 * height], [0.9 * width, 0.9 * height], size=(k, 2))
        d = np.linalg.norm(centres[:, None] - centres[None], axis=-1) + np.eye(k) * 1e9
        if d.min() >= min_sep:
            break
    weights = rng.uniform(0.0, 0.15 * min_sep**2, size=k)
    amp = rng.uniform(10, 35, size=2)
    freq = rng.uniform(1.0, 3.0, size=2) * 2 * np.pi
    phase = rng.uniform(0, 2 * np.pi, size=2)
    y, x = np.mgrid[0:height, 0:width].astype(np.float64)
    xw = x + amp[0] * np.sin(freq[0] * y / height + phase[0])
    yw = y + amp[1] * np.sin(freq[1] * x / width + phase[1])
    dist = (xw[None] - centres[:, 0, None, None]) ** 2 + (yw[None] - centres[:, 1, None, None]) ** 2
    regions = np.argmin(dist - weights[:, None, None], axis=0)
    # a centre always owns its own neighbourhood unless warping stole it; make sure none is empty
    for r in range(k):
        if not (regions == r).any():
            cx, cy = centres[r].astype(int)
            regions[max(0, cy - 20): cy + 20, max(0, cx - 20): cx + 20] = r
    return regions


def demo_mosaic(seed: int, split: str, i: int) -> tuple[np.ndarray, np.ndarray]:
    """Mosaic i of a split: (rgb (360, 480, 3) uint8, label (360, 480) int64). Pure in its args."""
    width, height = DEMO_SIZE
    rng = np.random.default_rng([int(seed), SPLITS.index(split), int(i)])
    k = int(rng.integers(2, 5))
    photos = rng.choice(len(DEMO_PHOTOS), size=k, replace=False)
    regions = _demo_regions(rng, k, width, height)
    rgb = np.empty((height, width, 3), np.uint8)
    label = np.empty((height, width), np.int64)
    for r, p in enumerate(photos):
        src = _demo_photo(int(p))
        oy = int(rng.integers(0, src.shape[0] - height + 1))
        ox = int(rng.integers(0, src.shape[1] - width + 1))
        patch = src[oy: oy + height, ox: ox + width]
        if rng.random() < 0.5:
            patch = patch[:, ::-1]
        mask = regions == r
        rgb[mask] = patch[mask]
        label[mask] = int(p)
    return rgb, label


class Demo(Dataset):
    name = "demo"

    def __init__(self, split: str, seed: int):
        self.seed = int(seed)
        n = DEMO_COUNTS[split]
        super().__init__(split, None, [f"demo-{split}-{seed}-{i:04d}" for i in range(n)],
                         [c for c, _ in DEMO_PHOTOS], True)

    def _load(self, i):
        return demo_mosaic(self.seed, self.split, i)

    def describe(self) -> dict[str, Any]:
        d = super().describe()
        d["seed"] = self.seed
        d["size"] = list(DEMO_SIZE)
        d["photos"] = [f for _, f in DEMO_PHOTOS]
        return d
