"""Tiny on-disk datasets shared by the stage tests (imported as `_fixtures`)."""

from __future__ import annotations

from pathlib import Path

import numpy as np
from PIL import Image


def make_folder(root: Path, n: int = 7, size=(40, 48), seed: int = 0, classes: int = 3) -> Path:
    """images/<split>/*.png + labels/<split>/*.png + classes.txt, structured colours per class."""
    rng = np.random.default_rng(seed)
    for split in ("train", "val"):
        (root / "images" / split).mkdir(parents=True, exist_ok=True)
        (root / "labels" / split).mkdir(parents=True, exist_ok=True)
        for i in range(n if split == "train" else 3):
            h, w = size
            lab = np.zeros((h, w), np.uint8)
            lab[:, w // 2 :] = 1
            lab[h // 2 :, : w // 3] = 2
            lab[:3, :3] = 255
            rgb = (np.array([[200, 30, 30], [30, 200, 30], [30, 30, 200]])[np.minimum(lab, 2)]
                   + rng.integers(0, 40, (h, w, 3))).clip(0, 255).astype(np.uint8)
            Image.fromarray(rgb).save(root / "images" / split / f"im{i:02d}.png")
            Image.fromarray(lab).save(root / "labels" / split / f"im{i:02d}.png")
    (root / "classes.txt").write_text("\n".join(f"c{k}" for k in range(classes)) + "\n")
    return root
