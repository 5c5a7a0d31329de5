"""Datasets by name (`get_dataset`): where each one's files lie and how its labels map.

The crop protocol and patch labels are in `data/views.py`, the shared base in `data/base.py`,
the file-free demo in `data/demo.py`.

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

Errors: `DataError` (a ValueError) names the file or folder and the fix; an image or label file
that cannot be decoded raises `CorruptImage` (a DataError) from `load`, which the features stage
skips and reports.
"""

from __future__ import annotations

import logging
import os
from pathlib import Path
from typing import Any, Sequence

import numpy as np

from pipeline.data.base import (
    IGNORE,
    IMAGE_EXTENSIONS,
    SPLITS,
    CorruptImage,
    DataError,
    Dataset,
    _apply_lut,
    _check_same_size,
    _missing_check,
    _read_label_png,
    _read_list,
    _read_rgb,
    _resolve_root,
)
from pipeline.data.demo import Demo

log = logging.getLogger("ppap.datasets")

DATASETS = ("cocostuff27", "cityscapes", "potsdam", "camvid", "folder", "demo")


# ---------------------------------------------------------------------------------------------
# File readers
# ---------------------------------------------------------------------------------------------


# ---------------------------------------------------------------------------------------------
# Base class
# ---------------------------------------------------------------------------------------------


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


# ---------------------------------------------------------------------------------------------
# Patch labels (docs/method.md §8)
# ---------------------------------------------------------------------------------------------
