"""What every dataset shares: the `Dataset` base class and `Sample`, the errors that name a file and
its fix (`DataError`, `CorruptImage`), ignore = -1, and the checked readers of images, label PNGs,
id lists and lookup tables."""

from __future__ import annotations

import hashlib
import os
from dataclasses import dataclass
from pathlib import Path
from typing import Any, Sequence

import numpy as np
from PIL import Image

SPLITS = ("train", "val")


IGNORE = -1


IMAGE_EXTENSIONS = (".jpg", ".jpeg", ".png", ".bmp", ".tif", ".tiff", ".webp")


class DataError(ValueError):
    """A dataset is missing, malformed or inconsistent; the message names the file and the fix."""


class CorruptImage(DataError):
    """One image (or its label file) cannot be decoded; callers may skip it and report."""


@dataclass
class Sample:
    image_id: str
    rgb: np.ndarray  # (H, W, 3) uint8
    label: np.ndarray | None  # (H, W) int64, ignore = -1


def _read_rgb(path: Path) -> np.ndarray:
    if not path.is_file():
        raise DataError(f"image file {path} is missing; restore it or remove it from the split")
    try:
        with Image.open(path) as im:
            im.load()
            return np.asarray(im.convert("RGB"), dtype=np.uint8)
    except (OSError, SyntaxError, ValueError, Image.DecompressionBombError) as exc:
        raise CorruptImage(
            f"cannot decode image {path} ({exc}); re-download or re-encode it, or remove it "
            "from the split"
        ) from None


def _read_label_png(path: Path) -> np.ndarray:
    """Raw single-channel label values (uint8/uint16/int32) of a PNG."""
    if not path.is_file():
        raise DataError(f"label file {path} is missing; restore it or remove the image from the split")
    try:
        with Image.open(path) as im:
            im.load()
            mode = im.mode
            arr = np.asarray(im)
    except (OSError, SyntaxError, ValueError, Image.DecompressionBombError) as exc:
        raise CorruptImage(
            f"cannot decode label {path} ({exc}); re-create it or remove the image from the split"
        ) from None
    if arr.ndim != 2:
        raise DataError(
            f"label {path} has mode {mode!r} with {arr.shape[-1]} channels; labels must be "
            "single-channel PNGs of class indices (mode L, P or I), not colour-coded images"
        )
    return arr


def _check_same_size(rgb: np.ndarray, label: np.ndarray, image_path: Any, label_path: Any) -> None:
    if label.shape != rgb.shape[:2]:
        raise DataError(
            f"label {label_path} is {label.shape[1]}x{label.shape[0]} (WxH) but its image "
            f"{image_path} is {rgb.shape[1]}x{rgb.shape[0]}; labels must have the image's size "
            "(re-create the label or remove the image from the split)"
        )


def _apply_lut(raw: np.ndarray, lut: np.ndarray) -> np.ndarray:
    """Map raw label values through `lut` (int64, length 256); values outside it -> ignore."""
    raw = np.asarray(raw)
    if raw.dtype == np.uint8:
        return lut[raw]
    out = np.full(raw.shape, IGNORE, np.int64)
    ok = (raw >= 0) & (raw < len(lut))
    out[ok] = lut[raw[ok].astype(np.int64)]
    return out


def _read_list(path: Path, what: str) -> list[str]:
    if not path.is_file():
        raise DataError(f"split list {path} is missing; {what}")
    lines = [ln.strip() for ln in path.read_text().splitlines()]
    return [ln for ln in lines if ln and not ln.startswith("#")]


def _sha(items: Sequence[str]) -> str:
    return hashlib.sha256("\n".join(items).encode()).hexdigest()[:16]


def _resolve_root(name: str, root: str | os.PathLike | None) -> Path:
    if root is None or str(root) == "":
        raise DataError(f"dataset {name!r} needs a root folder; pass data_root=<folder> (--data-root)")
    path = Path(root).expanduser().resolve()
    if not path.is_dir():
        raise DataError(f"data root {path} for dataset {name!r} does not exist or is not a folder; "
                        "pass the folder that holds the dataset")
    return path


def _missing_check(paths: Sequence[Path], what: str) -> None:
    missing = [p for p in paths if not p.is_file()]
    if missing:
        shown = ", ".join(str(p) for p in missing[:3])
        raise DataError(
            f"{len(missing)} {what} file(s) listed in the split are missing (e.g. {shown}); "
            "restore them or remove their ids from the split list"
        )


class Dataset:
    """A split of a dataset: `len`, `image_id(i)`, `load(i) -> Sample`, `describe()`."""

    name: str = ""
    split: str = ""
    num_classes: int = 0
    class_names: list[str]
    has_labels: bool = False
    root: Path | None = None

    def __init__(self, split: str, root: Path | None, ids: list[str], class_names: list[str],
                 has_labels: bool):
        self.split = split
        self.root = root
        self._ids = ids
        self.class_names = list(class_names)
        self.num_classes = len(self.class_names)
        self.has_labels = has_labels
        if not ids:
            where = root if root is not None else self.name
            raise DataError(f"dataset {self.name!r} split {split!r} at {where} is empty; "
                            "check the split list / image folder")

    def __len__(self) -> int:
        return len(self._ids)

    def image_id(self, i: int) -> str:
        return self._ids[self._index(i)]

    def _index(self, i: int) -> int:
        n = len(self._ids)
        if not -n <= int(i) < n:
            raise IndexError(f"index {i} out of range for {self.name}/{self.split} with {n} images")
        return int(i) % n

    def load(self, i: int) -> Sample:
        i = self._index(i)
        rgb, label = self._load(i)
        if label is not None:
            label = label.astype(np.int64, copy=False)
        return Sample(self._ids[i], rgb, label)

    __getitem__ = load

    def _load(self, i: int) -> tuple[np.ndarray, np.ndarray | None]:
        raise NotImplementedError

    def describe(self) -> dict[str, Any]:
        """JSON-able identity of this split (what a cache made from it depends on)."""
        return {
            "name": self.name,
            "split": self.split,
            "root": str(self.root) if self.root is not None else None,
            "n": len(self),
            "ids_sha256": _sha(sorted(self._ids)),
            "num_classes": self.num_classes,
            "class_names": list(self.class_names),
            "has_labels": self.has_labels,
        }

    def __repr__(self) -> str:
        return f"<{type(self).__name__} {self.name}/{self.split} n={len(self)} root={self.root}>"
