"""Fixed class colours shared by the evaluation grids and the `show` pictures."""

from __future__ import annotations

import numpy as np


def palette(n: int) -> np.ndarray:
    """Fixed (n, 3) uint8 class colours (tab20, tab20b, tab20c, then seeded extras)."""
    from matplotlib import colormaps

    cols = np.concatenate([colormaps[name](np.arange(20))[:, :3] for name in ("tab20", "tab20b", "tab20c")])
    cols = (cols * 255).round().astype(np.uint8)
    if n > len(cols):
        extra = np.random.default_rng(0).integers(0, 256, size=(n - len(cols), 3), dtype=np.uint8)
        cols = np.concatenate([cols, extra])
    return cols[:n]


def colourise(labels: np.ndarray, pal: np.ndarray) -> np.ndarray:
    """Class ids -> RGB; ignore (<0) black, ids outside the palette (unmatched clusters) white."""
    lab = np.asarray(labels, dtype=np.int64)
    out = np.zeros(lab.shape + (3,), np.uint8)
    inside = (lab >= 0) & (lab < len(pal))
    out[inside] = pal[lab[inside]]
    out[lab >= len(pal)] = 255
    return out
