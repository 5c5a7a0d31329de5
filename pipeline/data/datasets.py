"""Datasets by name, the crop protocol (docs/method.md §5) and per-patch majority labels (§8).

Every dataset yields `Sample(image_id, rgb uint8 (H, W, 3), label int64 (H, W) | None)` with
ignore = -1. Layouts under `root`:

- ``cocostuff27``: ``images/{train2017,val2017}/<id>.jpg``, ``annotations/<same>/<id>.png``
  (fine labels 0..181, 255 unlabelled), id lists ``curated/train2017/Coco164kFull_Stuff_Coarse.txt``
  and ``curated/val2017/Coco164kFull_Stuff_Coarse_7.txt``; fine -> 27 coarse classes.
- ``cityscapes``: ``leftImg8bit/{train,val}/<city>/<stem>_leftImg8bit.png`` and
  ``gtFine/{train,val}/<city>/<stem>_gtFine_labelIds.png``; class = labelId - 7 (27 classes).
- ``potsdam``: ``imgs/<id>.mat`` (key ``img``, 4 channels, RGB = first 3), ``gt/<id>.mat`` (key
  ``gt``, 0..5, 255 ignore), lists ``labelled_train.txt`` (train) / ``labelled_test.txt`` (val);
  merged {0,4}->0, {1,5}->1, {2,3}->2.
- ``camvid``: SegNet layout: ``train.txt`` / ``val.txt`` list ``image label`` path pairs
  (``train/x.png trainannot/x.png``); values 0..10, 11 = void -> ignore.
- ``folder``: any images. ``<root>/images/{train,val}/*`` with optional label PNGs
  ``<root>/labels/{train,val}/<stem>.png``; when ``images/`` has no ``train``/``val`` subfolder,
  every image in ``images/`` (or in ``<root>`` itself when there is no ``images/``) serves both
  splits, labels then in ``<root>/labels/<stem>.png``. Labels are single-channel PNGs holding class
  indices, 255 = ignore. If a labels folder exists, every image needs its label. Class names: the
  ``classes=`` file, else ``<root>/classes.txt`` (one name per line); required when labelled.
- ``demo``: no files needed. Deterministic 480x360 mosaics (48 train, 16 val) of 2-4 regions,
  each region cut from one of six photographs bundled inside scikit-image (read from the package
  folder, never fetched); a region's class is its source photo.

Crops: a view is always "the centred square of the shorter side of a box, resized to size x
size". That is the same picture as "resize the shorter side to `size`, then centre-crop" (up to
sub-pixel rounding of the centre offset) and makes the returned box exact. Images are resized
with PIL's bilinear filter (antialiased when shrinking, as torchvision's PIL path does); labels
with nearest neighbour, so a view never contains a label value absent from its source box.

Errors: `DataError` (a ValueError) names the file or folder and the fix; an image or label file
that cannot be decoded raises `CorruptImage` (a DataError) from `load`, which the features stage
skips and reports.
"""

from __future__ import annotations

import functools
import hashlib
import logging
import os
from dataclasses import dataclass
from pathlib import Path
from typing import Any, Sequence

import numpy as np
from PIL import Image

log = logging.getLogger("ppap.datasets")

DATASETS = ("cocostuff27", "cityscapes", "potsdam", "camvid", "folder", "demo")
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


# ---------------------------------------------------------------------------------------------
# File readers
# ---------------------------------------------------------------------------------------------


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


# ---------------------------------------------------------------------------------------------
# Base class
# ---------------------------------------------------------------------------------------------


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


# ---------------------------------------------------------------------------------------------
# COCO-Stuff-27
# ---------------------------------------------------------------------------------------------

COCO27_CLASSES = [
    "electronic", "appliance", "food-things", "furniture-things", "indoor", "kitchen",
    "accessory", "animal", "outdoor", "person", "sports", "vehicle",
    "ceiling", "floor", "food-stuff", "furniture-stuff", "rawmaterial", "textile", "wall",
    "window", "building", "ground", "plant", "sky", "solid", "structural", "water",
]

_COCO_GROUPS: dict[int, Sequence[int]] = {
    9: [0], 11: range(1, 9), 8: range(9, 15), 7: range(15, 25), 6: range(25, 33),
    10: range(33, 43), 5: range(43, 51), 2: range(51, 61), 3: range(61, 71), 0: range(71, 77),
    1: range(77, 83), 4: range(83, 91),
    17: [91, 92, 103, 104, 108, 130, 136, 140, 151, 166, 167],
    22: [93, 96, 118, 123, 128, 133, 141, 162, 168],
    20: [94, 95, 127, 150, 157, 165],
    15: [97, 106, 107, 109, 111, 122, 129, 132, 155, 160, 164],
    25: [98, 112, 137, 145, 163],
    16: [99, 131, 138, 142],
    13: [100, 113, 114, 115, 116, 117],
    12: [101, 102],
    23: [105, 156],
    21: [110, 124, 125, 135, 139, 143, 144, 146, 148, 153, 158],
    26: [119, 147, 154, 177, 178],
    14: [120, 121, 152, 169],
    24: [126, 134, 149, 159, 161, 181],
    18: range(170, 177),
    19: [179, 180],
}


def _coco_lut() -> np.ndarray:
    lut = np.full(256, IGNORE, np.int64)
    for coarse, fines in _COCO_GROUPS.items():
        for f in fines:
            assert lut[f] == IGNORE, f"fine class {f} mapped twice"
            lut[f] = coarse
    return lut


COCO_FINE_TO_COARSE = _coco_lut()  # 256 entries; 255 (unlabelled) -> -1


class CocoStuff27(Dataset):
    name = "cocostuff27"
    LISTS = {"train": ("train2017", "Coco164kFull_Stuff_Coarse.txt"),
             "val": ("val2017", "Coco164kFull_Stuff_Coarse_7.txt")}

    def __init__(self, root: Path, split: str):
        sub, list_name = self.LISTS[split]
        ids = _read_list(root / "curated" / sub / list_name,
                         f"COCO-Stuff-27 needs the curated list curated/{sub}/{list_name} "
                         "(from the STEGO data release)")
        self._img_dir = root / "images" / sub
        self._ann_dir = root / "annotations" / sub
        for d in (self._img_dir, self._ann_dir):
            if not d.is_dir():
                raise DataError(f"folder {d} is missing; COCO-Stuff needs images/{sub} and annotations/{sub}")
        super().__init__(split, root, ids, COCO27_CLASSES, True)
        _missing_check([self._img_dir / f"{i}.jpg" for i in ids], "image")

    def _load(self, i):
        iid = self._ids[i]
        img_p, lab_p = self._img_dir / f"{iid}.jpg", self._ann_dir / f"{iid}.png"
        rgb = _read_rgb(img_p)
        raw = _read_label_png(lab_p)
        _check_same_size(rgb, raw, img_p, lab_p)
        return rgb, _apply_lut(raw, COCO_FINE_TO_COARSE)


# ---------------------------------------------------------------------------------------------
# Cityscapes-27
# ---------------------------------------------------------------------------------------------

CITYSCAPES27_CLASSES = [
    "road", "sidewalk", "parking", "rail track", "building", "wall", "fence", "guard rail",
    "bridge", "tunnel", "pole", "polegroup", "traffic light", "traffic sign", "vegetation",
    "terrain", "sky", "person", "rider", "car", "truck", "bus", "caravan", "trailer", "train",
    "motorcycle", "bicycle",
]
CITYSCAPES_LUT = np.full(256, IGNORE, np.int64)
CITYSCAPES_LUT[7:34] = np.arange(27)  # labelId 7..33 -> 0..26; below 7 (and above 33) ignore


class Cityscapes27(Dataset):
    name = "cityscapes"
    IMG_SUFFIX = "_leftImg8bit.png"
    LAB_SUFFIX = "_gtFine_labelIds.png"

    def __init__(self, root: Path, split: str):
        img_dir = root / "leftImg8bit" / split
        if not img_dir.is_dir():
            raise DataError(f"folder {img_dir} is missing; Cityscapes needs leftImg8bit/{split}/<city>/")
        self._lab_dir = root / "gtFine" / split
        if not self._lab_dir.is_dir():
            raise DataError(f"folder {self._lab_dir} is missing; Cityscapes needs gtFine/{split}/<city>/")
        ids = sorted(
            f"{p.parent.name}/{p.name[: -len(self.IMG_SUFFIX)]}"
            for p in img_dir.glob(f"*/*{self.IMG_SUFFIX}")
        )
        self._img_dir = img_dir
        super().__init__(split, root, ids, CITYSCAPES27_CLASSES, True)

    def _load(self, i):
        iid = self._ids[i]
        img_p = self._img_dir / f"{iid}{self.IMG_SUFFIX}"
        lab_p = self._lab_dir / f"{iid}{self.LAB_SUFFIX}"
        rgb = _read_rgb(img_p)
        raw = _read_label_png(lab_p)
        _check_same_size(rgb, raw, img_p, lab_p)
        return rgb, _apply_lut(raw, CITYSCAPES_LUT)


# ---------------------------------------------------------------------------------------------
# Potsdam-3
# ---------------------------------------------------------------------------------------------

POTSDAM3_CLASSES = ["roads and cars", "buildings and clutter", "trees and vegetation"]
POTSDAM_LUT = np.full(256, IGNORE, np.int64)
POTSDAM_LUT[[0, 4]] = 0
POTSDAM_LUT[[1, 5]] = 1
POTSDAM_LUT[[2, 3]] = 2


def _read_mat(path: Path, key: str) -> np.ndarray:
    from scipy.io import loadmat

    if not path.is_file():
        raise DataError(f"file {path} is missing; restore it or remove its id from the split list")
    try:
        mat = loadmat(str(path))
    except Exception as exc:  # scipy raises ValueError/TypeError/OSError/MatReadError variously
        raise CorruptImage(f"cannot read MATLAB file {path} ({exc}); re-create it or remove its id "
                           "from the split list") from None
    if key not in mat:
        keys = sorted(k for k in mat if not k.startswith("__"))
        raise DataError(f"{path} has no key {key!r} (keys: {keys}); Potsdam .mat files need "
                        f"'img' (imgs/) and 'gt' (gt/)")
    return np.asarray(mat[key])


def _mat_to_rgb(arr: np.ndarray, path: Path) -> np.ndarray:
    """(H, W, C>=3) in any numeric dtype -> uint8 RGB from the first three channels.

    Floats with max <= 1 are taken as [0, 1] and scaled by 255; everything is clipped to 0..255.
    """
    if arr.ndim == 3 and arr.shape[-1] < 3 <= arr.shape[0] <= 4 < arr.shape[-1]:
        arr = np.moveaxis(arr, 0, -1)  # channel-first storage
    if arr.ndim != 3 or arr.shape[-1] < 3:
        raise DataError(f"{path}['img'] has shape {arr.shape}; expected (H, W, 4) (or at least 3 channels)")
    rgb = arr[..., :3]
    if rgb.dtype == np.uint8:
        return np.ascontiguousarray(rgb)
    rgb = rgb.astype(np.float64)
    if np.issubdtype(arr.dtype, np.floating) and rgb.size and rgb.max() <= 1.0:
        rgb = rgb * 255.0
    return np.clip(np.rint(rgb), 0, 255).astype(np.uint8)


class Potsdam3(Dataset):
    name = "potsdam"
    LISTS = {"train": "labelled_train.txt", "val": "labelled_test.txt"}

    def __init__(self, root: Path, split: str):
        list_name = self.LISTS[split]
        ids = _read_list(root / list_name,
                         f"Potsdam needs {list_name} in the data root (one image id per line)")
        super().__init__(split, root, ids, POTSDAM3_CLASSES, True)
        _missing_check([root / "imgs" / f"{i}.mat" for i in ids], "image (imgs/<id>.mat)")

    def _load(self, i):
        iid = self._ids[i]
        img_p, gt_p = self.root / "imgs" / f"{iid}.mat", self.root / "gt" / f"{iid}.mat"
        rgb = _mat_to_rgb(_read_mat(img_p, "img"), img_p)
        gt = _read_mat(gt_p, "gt")
        if gt.ndim == 3 and gt.shape[-1] == 1:
            gt = gt[..., 0]
        if gt.ndim != 2:
            raise DataError(f"{gt_p}['gt'] has shape {gt.shape}; expected (H, W) class indices")
        _check_same_size(rgb, gt, img_p, gt_p)
        return rgb, _apply_lut(gt, POTSDAM_LUT)


# ---------------------------------------------------------------------------------------------
# CamVid (SegNet version)
# ---------------------------------------------------------------------------------------------

CAMVID_CLASSES = ["sky", "building", "pole", "road", "pavement", "tree", "sign/symbol", "fence",
                  "car", "pedestrian", "bicyclist"]
CAMVID_LUT = np.full(256, IGNORE, np.int64)
CAMVID_LUT[:11] = np.arange(11)  # 11 = void -> ignore


class CamVid(Dataset):
    name = "camvid"

    def __init__(self, root: Path, split: str):
        lines = _read_list(root / f"{split}.txt",
                           f"CamVid (SegNet layout) needs {split}.txt listing 'image label' path pairs")
        pairs = []
        for n, line in enumerate(lines, 1):
            parts = line.split()
            if len(parts) != 2:
                raise DataError(f"{root / f'{split}.txt'} line {n} is {line!r}; expected "
                                "'<image path> <label path>' relative to the data root")
            pairs.append((root / parts[0], root / parts[1]))
        self._pairs = pairs
        super().__init__(split, root, [p[0].stem for p in pairs], CAMVID_CLASSES, True)
        _missing_check([p[0] for p in pairs], "image")

    def _load(self, i):
        img_p, lab_p = self._pairs[i]
        rgb = _read_rgb(img_p)
        raw = _read_label_png(lab_p)
        _check_same_size(rgb, raw, img_p, lab_p)
        return rgb, _apply_lut(raw, CAMVID_LUT)


# ---------------------------------------------------------------------------------------------
# Any folder of images
# ---------------------------------------------------------------------------------------------


def _read_class_file(path: Path) -> list[str]:
    if not path.is_file():
        raise DataError(f"class list {path} does not exist; pass classes=<file> with one class "
                        "name per line")
    names = [ln.strip() for ln in path.read_text().splitlines() if ln.strip()]
    if not names:
        raise DataError(f"class list {path} is empty; write one class name per line")
    if len(set(names)) != len(names):
        raise DataError(f"class list {path} repeats a name; class names must be unique")
    return names


class Folder(Dataset):
    name = "folder"

    def __init__(self, root: Path, split: str, classes: str | None):
        img_base = root / "images" if (root / "images").is_dir() else root
        lab_base = root / "labels"
        split_dirs = [s for s in SPLITS if (img_base / s).is_dir()]
        if split_dirs:
            if split not in split_dirs:
                raise DataError(f"folder {img_base / split} is missing (found {split_dirs}); create "
                                f"it, or put all images directly in {img_base} to use them for "
                                "both splits")
            img_dir, lab_dir, self.layout = img_base / split, lab_base / split, "split"
        else:
            img_dir, lab_dir, self.layout = img_base, lab_base, "shared"
        files = sorted(p for p in img_dir.iterdir()
                       if p.is_file() and p.suffix.lower() in IMAGE_EXTENSIONS)
        stems: dict[str, Path] = {}
        for p in files:
            if p.stem in stems:
                raise DataError(f"{p} and {stems[p.stem]} share the stem {p.stem!r}; image stems "
                                "must be unique (labels are matched by stem)")
            stems[p.stem] = p
        self._files = files
        self._lab_dir = lab_dir if lab_dir.is_dir() else None
        if self._lab_dir is not None:
            _missing_check([lab_dir / f"{p.stem}.png" for p in files], "label (<stem>.png)")
        cls_path = Path(classes).expanduser() if classes else root / "classes.txt"
        if classes or cls_path.is_file():
            names = _read_class_file(cls_path)
        elif self._lab_dir is not None:
            raise DataError(f"labels found in {lab_dir} but no class list; create {root / 'classes.txt'} "
                            "or pass classes=<file> (one class name per line, line k = label value k)")
        else:
            names = []
        self._classes_path = cls_path.resolve() if names else None
        super().__init__(split, root, [p.stem for p in files], names, self._lab_dir is not None)
        self._img_dir = img_dir

    def _load(self, i):
        img_p = self._files[i]
        rgb = _read_rgb(img_p)
        if self._lab_dir is None:
            return rgb, None
        lab_p = self._lab_dir / f"{img_p.stem}.png"
        raw = _read_label_png(lab_p).astype(np.int64)
        _check_same_size(rgb, raw, img_p, lab_p)
        label = np.where(raw == 255, IGNORE, raw)
        bad = (label >= self.num_classes) | (label < IGNORE)
        if bad.any():
            v = int(label[bad][0])
            raise DataError(f"label {lab_p} holds value {v} but the class list has "
                            f"{self.num_classes} classes (0..{self.num_classes - 1}, 255 = ignore); "
                            "fix the label or add the missing classes to the class list")
        return rgb, label

    def describe(self) -> dict[str, Any]:
        d = super().describe()
        d["layout"] = self.layout
        d["images"] = str(self._img_dir)
        d["classes_file"] = str(self._classes_path) if self._classes_path else None
        return d


# ---------------------------------------------------------------------------------------------
# Demo: mosaics of scikit-image's bundled photographs
# ---------------------------------------------------------------------------------------------

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


# ---------------------------------------------------------------------------------------------
# Factory
# ---------------------------------------------------------------------------------------------


def get_dataset(name: str, root: str | os.PathLike | None, split: str, classes: str | None = None,
                seed: int = 0) -> Dataset:
    """A split ('train' or 'val') of a dataset by name (see the module docstring for layouts)."""
    if name not in DATASETS:
        raise DataError(f"unknown dataset {name!r}; choose one of {', '.join(DATASETS)}")
    if split not in SPLITS:
        raise DataError(f"unknown split {split!r}; use 'train' or 'val'")
    if classes is not None and name != "folder":
        raise DataError(f"classes={classes!r} only applies to dataset 'folder'; {name!r} has a "
                        "fixed class list, drop the option")
    if name == "demo":
        if root is not None:
            log.debug("dataset 'demo' ignores data root %s", root)
        return Demo(split, seed)
    path = _resolve_root(name, root)
    if name == "cocostuff27":
        return CocoStuff27(path, split)
    if name == "cityscapes":
        return Cityscapes27(path, split)
    if name == "potsdam":
        return Potsdam3(path, split)
    if name == "camvid":
        return CamVid(path, split)
    return Folder(path, split, classes)


# ---------------------------------------------------------------------------------------------
# Views (docs/method.md §5)
# ---------------------------------------------------------------------------------------------

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


# ---------------------------------------------------------------------------------------------
# Patch labels (docs/method.md §8)
# ---------------------------------------------------------------------------------------------


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
