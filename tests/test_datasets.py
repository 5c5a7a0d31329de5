"""Datasets on tiny fixture trees in each real layout, the crop protocol and patch labels."""

from __future__ import annotations

import json
import socket
from pathlib import Path

import numpy as np
import pytest
from PIL import Image
from scipy.io import savemat

from pipeline.data.base import CorruptImage, DataError
from pipeline.data.datasets import (
    COCO27_CLASSES,
    COCO_FINE_TO_COARSE,
    DATASETS,
    get_dataset,
)
from pipeline.data.demo import _demo_photo, demo_mosaic
from pipeline.data.views import eval_view, five_crops, patch_labels

CAMVID = Path(__file__).resolve().parents[1].parent / "shared" / "camvid"


def _rgb(h: int, w: int, seed: int = 0) -> np.ndarray:
    return np.random.default_rng(seed).integers(0, 256, (h, w, 3), dtype=np.uint8)


def _png(path: Path, arr: np.ndarray) -> Path:
    path.parent.mkdir(parents=True, exist_ok=True)
    Image.fromarray(arr).save(path)
    return path


# --------------------------------------------------------------------------- COCO-Stuff-27

# the table of docs/method.md §5.2, written out independently of the module
SPEC_COCO = {
    9: [0], 11: list(range(1, 9)), 8: list(range(9, 15)), 7: list(range(15, 25)),
    6: list(range(25, 33)), 10: list(range(33, 43)), 5: list(range(43, 51)),
    2: list(range(51, 61)), 3: list(range(61, 71)), 0: list(range(71, 77)),
    1: list(range(77, 83)), 4: list(range(83, 91)),
    17: [91, 92, 103, 104, 108, 130, 136, 140, 151, 166, 167],
    22: [93, 96, 118, 123, 128, 133, 141, 162, 168], 20: [94, 95, 127, 150, 157, 165],
    15: [97, 106, 107, 109, 111, 122, 129, 132, 155, 160, 164], 25: [98, 112, 137, 145, 163],
    16: [99, 131, 138, 142], 13: [100, 113, 114, 115, 116, 117], 12: [101, 102], 23: [105, 156],
    21: [110, 124, 125, 135, 139, 143, 144, 146, 148, 153, 158], 26: [119, 147, 154, 177, 178],
    14: [120, 121, 152, 169], 24: [126, 134, 149, 159, 161, 181], 18: list(range(170, 177)),
    19: [179, 180],
}


def test_coco_table_matches_spec_and_covers_all_fine_classes():
    expect = {f: c for c, fines in SPEC_COCO.items() for f in fines}
    assert sorted(expect) == list(range(182))
    for f in range(256):
        assert COCO_FINE_TO_COARSE[f] == expect.get(f, -1), f
    assert len(COCO27_CLASSES) == 27


def _coco_tree(root: Path) -> dict[str, np.ndarray]:
    """Two train and one val image; fine labels hitting several groups and 255."""
    fines = {
        "000000000009": np.array([[0, 5, 91, 255], [105, 181, 170, 51]], np.uint8),
        "000000000025": np.array([[17, 100, 119, 72], [255, 255, 97, 179]], np.uint8),
        "000000000139": np.array([[83, 120, 160, 14], [255, 0, 0, 255]], np.uint8),
    }
    splits = {"train2017": ["000000000009", "000000000025"], "val2017": ["000000000139"]}
    lists = {"train2017": "Coco164kFull_Stuff_Coarse.txt", "val2017": "Coco164kFull_Stuff_Coarse_7.txt"}
    for sub, ids in splits.items():
        for i, iid in enumerate(ids):
            fine = np.kron(fines[iid], np.ones((4, 4), np.uint8))  # 8x16 image
            Image.fromarray(_rgb(8, 16, i)).save(_mkdir(root / "images" / sub) / f"{iid}.jpg")
            _png(root / "annotations" / sub / f"{iid}.png", fine)
        p = _mkdir(root / "curated" / sub) / lists[sub]
        p.write_text("\n".join(ids) + "\n")
    return fines


def _mkdir(p: Path) -> Path:
    p.mkdir(parents=True, exist_ok=True)
    return p


def test_cocostuff27_layout_and_mapping(tmp_path):
    fines = _coco_tree(tmp_path)
    tr = get_dataset("cocostuff27", str(tmp_path), "train")
    va = get_dataset("cocostuff27", str(tmp_path), "val")
    assert (len(tr), len(va), tr.num_classes, tr.has_labels) == (2, 1, 27, True)
    s = tr.load(0)
    assert s.image_id == "000000000009"
    assert s.rgb.dtype == np.uint8 and s.rgb.shape == (8, 16, 3)
    assert s.label.dtype == np.int64 and s.label.shape == (8, 16)
    expect = np.array([[9, 11, 17, -1], [23, 24, 18, 2]])
    np.testing.assert_array_equal(s.label[::4, ::4], expect)
    np.testing.assert_array_equal(s.label, np.kron(expect, np.ones((4, 4), np.int64)))
    np.testing.assert_array_equal(tr.load(1).label[::4, ::4], [[7, 13, 26, 0], [-1, -1, 15, 19]])
    np.testing.assert_array_equal(va.load(0).label[::4, ::4], [[4, 14, 15, 8], [-1, 9, 9, -1]])
    assert fines  # fixture built
    d = tr.describe()
    json.dumps(d)
    assert d["root"] == str(tmp_path.resolve()) and d["n"] == 2 and d["name"] == "cocostuff27"
    assert d["ids_sha256"] != va.describe()["ids_sha256"]


# --------------------------------------------------------------------------- Cityscapes

def test_cityscapes_labelids_minus_seven(tmp_path):
    ids = np.array([[0, 3, 6, 7], [20, 33, 26, 255]], np.uint8)
    for split, city, stem in [("train", "aachen", "aachen_000000_000019"),
                              ("train", "bremen", "bremen_000001_000019"),
                              ("val", "lindau", "lindau_000000_000019")]:
        _png(tmp_path / "leftImg8bit" / split / city / f"{stem}_leftImg8bit.png", _rgb(2, 4))
        _png(tmp_path / "gtFine" / split / city / f"{stem}_gtFine_labelIds.png", ids)
    tr = get_dataset("cityscapes", tmp_path, "train")
    assert len(tr) == 2 and tr.num_classes == 27 and len(tr.class_names) == 27
    assert tr.image_id(0) == "aachen/aachen_000000_000019"
    np.testing.assert_array_equal(tr.load(1).label, [[-1, -1, -1, 0], [13, 26, 19, -1]])
    assert tr.class_names[0] == "road" and tr.class_names[26] == "bicycle"
    assert len(get_dataset("cityscapes", tmp_path, "val")) == 1


# --------------------------------------------------------------------------- Potsdam

def _potsdam_tree(root: Path) -> tuple[np.ndarray, np.ndarray]:
    img = np.random.default_rng(3).integers(0, 256, (6, 5, 4), dtype=np.uint8)
    gt = np.array([0, 1, 2, 3, 4, 5, 255, 0, 1, 2] * 3, np.uint8).reshape(6, 5)
    for iid in ("top_potsdam_2_10_0", "top_potsdam_2_10_1", "top_potsdam_7_7_3"):
        _mkdir(root / "imgs")
        _mkdir(root / "gt")
        savemat(root / "imgs" / f"{iid}.mat", {"img": img})
        savemat(root / "gt" / f"{iid}.mat", {"gt": gt})
    (root / "labelled_train.txt").write_text("top_potsdam_2_10_0\ntop_potsdam_2_10_1\n")
    (root / "labelled_test.txt").write_text("top_potsdam_7_7_3\n")
    return img, gt


def test_potsdam_mat_rgb_and_merges(tmp_path):
    img, gt = _potsdam_tree(tmp_path)
    tr = get_dataset("potsdam", tmp_path, "train")
    assert (len(tr), len(get_dataset("potsdam", tmp_path, "val")), tr.num_classes) == (2, 1, 3)
    s = tr.load(1)
    np.testing.assert_array_equal(s.rgb, img[..., :3])
    merge = {0: 0, 4: 0, 1: 1, 5: 1, 2: 2, 3: 2, 255: -1}
    np.testing.assert_array_equal(s.label, np.vectorize(merge.get)(gt))


def test_potsdam_float_images_in_unit_range(tmp_path):
    _potsdam_tree(tmp_path)
    f = np.full((6, 5, 4), 0.5)
    savemat(tmp_path / "imgs" / "top_potsdam_2_10_0.mat", {"img": f})
    assert (get_dataset("potsdam", tmp_path, "train").load(0).rgb == 128).all()


# --------------------------------------------------------------------------- CamVid layout

def _camvid_tree(root: Path, n_train: int = 3, n_val: int = 2) -> None:
    for split, n in (("train", n_train), ("val", n_val)):
        lines = []
        for i in range(n):
            name = f"0001TP_{i:06d}.png"
            _png(root / split / name, _rgb(6, 8, i))
            lab = (np.arange(48).reshape(6, 8) % 12).astype(np.uint8)
            _png(root / f"{split}annot" / name, lab)
            lines.append(f"{split}/{name} {split}annot/{name}")
        (root / f"{split}.txt").write_text("\n".join(lines) + "\n")


def test_camvid_layout_void_is_ignore(tmp_path):
    _camvid_tree(tmp_path)
    tr = get_dataset("camvid", tmp_path, "train")
    assert (len(tr), tr.num_classes) == (3, 11)
    assert tr.class_names[0] == "sky" and tr.class_names[10] == "bicyclist"
    lab = tr.load(2).label
    raw = np.arange(48).reshape(6, 8) % 12
    np.testing.assert_array_equal(lab, np.where(raw == 11, -1, raw))
    assert tr.image_id(0) == "0001TP_000000"


@pytest.mark.skipif(not CAMVID.is_dir(), reason="real CamVid not at ../shared/camvid")
def test_real_camvid():
    tr = get_dataset("camvid", str(CAMVID), "train")
    va = get_dataset("camvid", str(CAMVID), "val")
    assert (len(tr), len(va)) == (367, 101)
    assert len(set(tr.image_id(i) for i in range(len(tr)))) == 367
    for ds in (tr, va):
        for i in (0, len(ds) - 1):
            s = ds.load(i)
            assert s.rgb.shape == (360, 480, 3) and s.rgb.dtype == np.uint8
            assert s.label.shape == (360, 480) and s.label.dtype == np.int64
            assert s.label.min() >= -1 and s.label.max() <= 10
            assert len(np.unique(s.label[s.label >= 0])) >= 4


# --------------------------------------------------------------------------- folder

def test_folder_with_splits_labels_and_classes(tmp_path):
    (tmp_path / "classes.txt").write_text("sky\nroad\ncar\n")
    lab = np.array([[0, 1, 2, 255]] * 3, np.uint8)
    for split, stems in (("train", ["a", "b"]), ("val", ["c"])):
        for s in stems:
            Image.fromarray(_rgb(3, 4)).save(_mkdir(tmp_path / "images" / split) / f"{s}.jpg")
            _png(tmp_path / "labels" / split / f"{s}.png", lab)
    tr = get_dataset("folder", tmp_path, "train")
    assert (len(tr), tr.num_classes, tr.class_names, tr.has_labels) == (2, 3, ["sky", "road", "car"], True)
    np.testing.assert_array_equal(tr.load(1).label, [[0, 1, 2, -1]] * 3)
    assert tr.image_id(1) == "b" and get_dataset("folder", tmp_path, "val").image_id(0) == "c"
    # an explicit class file wins over classes.txt
    other = tmp_path / "mine.txt"
    other.write_text("a\nb\nc\nd\n")
    assert get_dataset("folder", tmp_path, "train", classes=str(other)).num_classes == 4
    # a label value beyond the class list is refused, naming the file
    _png(tmp_path / "labels" / "train" / "a.png", np.full((3, 4), 7, np.uint8))
    with pytest.raises(DataError, match=r"a\.png.*value 7"):
        tr.load(0)


def test_folder_without_splits_or_labels(tmp_path):
    for s in ("x", "y", "z"):
        _png(tmp_path / f"{s}.png", _rgb(5, 7))
    (tmp_path / "notes.txt").write_text("not an image")
    tr = get_dataset("folder", tmp_path, "train")
    va = get_dataset("folder", tmp_path, "val")
    assert len(tr) == len(va) == 3 and not tr.has_labels and tr.num_classes == 0
    s = tr.load(0)
    assert s.label is None and s.rgb.shape == (5, 7, 3)
    assert tr.describe()["layout"] == "shared"
    # labels in <root>/labels (no split folders) need a class list
    _png(tmp_path / "labels" / "x.png", np.zeros((5, 7), np.uint8))
    _png(tmp_path / "labels" / "y.png", np.zeros((5, 7), np.uint8))
    _png(tmp_path / "labels" / "z.png", np.zeros((5, 7), np.uint8))
    with pytest.raises(DataError, match="class"):
        get_dataset("folder", tmp_path, "train")
    (tmp_path / "classes.txt").write_text("bg\n")
    assert get_dataset("folder", tmp_path, "val").load(2).label.shape == (5, 7)


# --------------------------------------------------------------------------- demo

def test_demo_deterministic_offline_and_covers_classes(monkeypatch):
    def no_network(*a, **k):
        raise AssertionError("the demo dataset touched the network")

    monkeypatch.setattr(socket.socket, "connect", no_network)
    monkeypatch.setattr(socket, "create_connection", no_network)
    _demo_photo.cache_clear()
    a = get_dataset("demo", None, "train", seed=0)
    b = get_dataset("demo", None, "train", seed=0)
    c = get_dataset("demo", None, "train", seed=1)
    v = get_dataset("demo", None, "val", seed=0)
    assert (len(a), len(v), a.num_classes) == (48, 16, 6)
    seen = set()
    for i in range(0, 48, 3):
        sa, sb = a.load(i), b.load(i)
        np.testing.assert_array_equal(sa.rgb, sb.rgb)
        np.testing.assert_array_equal(sa.label, sb.label)
        assert sa.rgb.shape == (360, 480, 3) and sa.label.shape == (360, 480)
        assert sa.label.dtype == np.int64 and sa.label.min() >= 0
        cls = np.unique(sa.label)
        assert 2 <= len(cls) <= 4
        assert min(np.bincount(sa.label.ravel())[cls]) > 0.02 * sa.label.size  # no sliver regions
        seen |= set(cls.tolist())
    assert seen == set(range(6))
    assert not np.array_equal(a.load(0).rgb, c.load(0).rgb)
    assert not np.array_equal(a.load(0).rgb, v.load(0).rgb)
    assert a.describe() == b.describe() and a.describe() != c.describe()


def test_demo_regions_show_their_source_photo():
    rgb, label = demo_mosaic(0, "val", 5)
    for k in np.unique(label):
        photo = _demo_photo(int(k))
        ys, xs = np.nonzero(label == k)
        y, x = ys[len(ys) // 2], xs[len(xs) // 2]
        # the region's pixel exists somewhere in its source photo's colours
        hit = (photo.reshape(-1, 3) == rgb[y, x]).all(axis=1).any()
        assert hit


# --------------------------------------------------------------------------- views

def _coord_label(h: int, w: int) -> np.ndarray:
    return np.arange(h * w, dtype=np.int64).reshape(h, w)


@pytest.mark.parametrize("h,w", [(360, 480), (101, 151), (300, 200)])
def test_five_crops_geometry(h, w):
    rgb = _rgb(h, w, 1)
    lab = _coord_label(h, w)
    views = five_crops(rgb, lab, size=56)
    assert len(views) == 5
    hh, ww = h // 2, w // 2
    m = min(hh, ww)
    cx, cy = round((w - ww) / 2), round((h - hh) / 2)
    halves = [(0, 0), (w - ww, 0), (0, h - hh), (w - ww, h - hh), (cx, cy)]
    for (img, l, box), (hx, hy) in zip(views, halves):
        x0, y0, x1, y1 = box
        assert (x1 - x0, y1 - y0) == (m, m)
        assert (x0, y0) == (hx + (ww - m) // 2, hy + (hh - m) // 2)  # centred in the half crop
        assert img.shape == (56, 56, 3) and img.dtype == np.uint8 and l.shape == (56, 56)
        ys, xs = l // w, l % w
        assert ys.min() >= y0 and ys.max() < y1 and xs.min() >= x0 and xs.max() < x1
        assert (np.diff(ys, axis=0) >= 0).all() and (np.diff(xs, axis=1) >= 0).all()
        # oracles: PIL bilinear on the box for the image, PIL nearest for the label
        ref = Image.fromarray(rgb).crop(box).resize((56, 56), Image.Resampling.BILINEAR)
        np.testing.assert_array_equal(img, np.asarray(ref))
        ref_l = Image.fromarray(lab[y0:y1, x0:x1].astype(np.int32)).resize((56, 56), Image.Resampling.NEAREST)
        np.testing.assert_array_equal(l, np.asarray(ref_l))
    assert [b for _, _, b in five_crops(rgb, None, 56)] == [b for _, _, b in views]
    assert all(v[1] is None for v in five_crops(rgb, None, 56))


def test_views_add_no_label_values():
    rng = np.random.default_rng(2)
    lab = rng.integers(-1, 5, (90, 120))
    lab[:, :30] = 7
    rgb = _rgb(90, 120)
    for _, l, (x0, y0, x1, y1) in five_crops(rgb, lab, 224) + [eval_view(rgb, lab, 320)]:
        assert set(np.unique(l)) <= set(np.unique(lab[y0:y1, x0:x1]))


def test_eval_view_box():
    rgb, lab = _rgb(360, 480), _coord_label(360, 480)
    img, l, box = eval_view(rgb, lab, 320)
    assert box == (60, 0, 420, 360) and img.shape == (320, 320, 3) and l.shape == (320, 320)
    assert eval_view(_rgb(400, 300), None, 32)[2] == (0, 50, 300, 350)
    with pytest.raises(ValueError, match="label shape"):
        eval_view(rgb, lab[:-1], 320)
    with pytest.raises(ValueError, match="uint8"):
        eval_view(rgb.astype(np.float32), None, 320)


# --------------------------------------------------------------------------- patch labels

def _patch_oracle(label: np.ndarray, gh: int, gw: int) -> np.ndarray:
    H, W = label.shape
    out = np.empty((gh, gw), np.int16)
    for i in range(gh):
        for j in range(gw):
            vals = [int(label[y, x]) for y in range(H) for x in range(W)
                    if y * gh // H == i and x * gw // W == j]
            valid = [v for v in vals if v >= 0]
            if 2 * (len(vals) - len(valid)) > len(vals) or not valid:
                out[i, j] = -1
            else:
                counts = {v: valid.count(v) for v in set(valid)}
                best = max(counts.values())
                out[i, j] = min(v for v, c in counts.items() if c == best)
    return out


@pytest.mark.parametrize("S,grid,seed", [(32, (4, 4), 0), (50, (7, 7), 1), (45, (16, 16), 2), (30, (3, 5), 3)])
def test_patch_labels_against_loop_oracle(S, grid, seed):
    rng = np.random.default_rng(seed)
    lab = rng.integers(-1, 4, (S, S))
    lab[: S // 3, : S // 3] = -1  # a mostly-ignore corner
    got = patch_labels(lab, grid)
    assert got.dtype == np.int16 and got.shape == grid
    np.testing.assert_array_equal(got, _patch_oracle(lab, *grid))
    batch = np.stack([lab, np.roll(lab, 3, axis=0)])
    np.testing.assert_array_equal(patch_labels(batch, grid)[1], _patch_oracle(batch[1], *grid))


def test_patch_labels_rules():
    # one 4x4 patch (grid 1x1) per case
    half_ignore = np.array([-1] * 8 + [2] * 5 + [1] * 3).reshape(4, 4)
    assert patch_labels(half_ignore, (1, 1))[0, 0] == 2  # exactly half ignore -> valid majority
    mostly = np.array([-1] * 9 + [2] * 7).reshape(4, 4)
    assert patch_labels(mostly, (1, 1))[0, 0] == -1
    tie = np.array([5] * 6 + [3] * 6 + [-1] * 4).reshape(4, 4)
    assert patch_labels(tie, (1, 1))[0, 0] == 3  # ties -> smallest label
    assert (patch_labels(np.full((8, 8), -1), (2, 2)) == -1).all()
    with pytest.raises(ValueError, match="grid"):
        patch_labels(np.zeros((4, 4), int), (5, 5))


# --------------------------------------------------------------------------- bad input

def test_unknown_name_split_root_and_options(tmp_path):
    with pytest.raises(DataError, match="unknown dataset 'coco'"):
        get_dataset("coco", tmp_path, "train")
    with pytest.raises(DataError, match="unknown split 'test'"):
        get_dataset("demo", None, "test")
    for name in DATASETS:
        if name == "demo":
            continue
        with pytest.raises(DataError, match="does not exist"):
            get_dataset(name, tmp_path / "nope", "train")
        with pytest.raises(DataError, match="needs a root"):
            get_dataset(name, None, "train")
    with pytest.raises(DataError, match="only applies to dataset 'folder'"):
        get_dataset("camvid", tmp_path, "train", classes="c.txt")
    assert issubclass(CorruptImage, DataError) and issubclass(DataError, ValueError)


def test_missing_split_lists_and_folders(tmp_path):
    with pytest.raises(DataError, match="Coco164kFull_Stuff_Coarse.txt"):
        get_dataset("cocostuff27", tmp_path, "train")
    with pytest.raises(DataError, match="labelled_test.txt"):
        get_dataset("potsdam", tmp_path, "val")
    with pytest.raises(DataError, match=r"val\.txt"):
        get_dataset("camvid", tmp_path, "val")
    with pytest.raises(DataError, match="leftImg8bit"):
        get_dataset("cityscapes", tmp_path, "train")
    _png(tmp_path / "f" / "images" / "train" / "a.png", _rgb(4, 4))
    with pytest.raises(DataError, match=r"images[/\\]val is missing"):
        get_dataset("folder", tmp_path / "f", "val")


def test_empty_datasets(tmp_path):
    (tmp_path / "train.txt").write_text("\n")
    with pytest.raises(DataError, match="empty"):
        get_dataset("camvid", tmp_path, "train")
    _mkdir(tmp_path / "e" / "images")
    with pytest.raises(DataError, match="empty"):
        get_dataset("folder", tmp_path / "e", "train")


def test_listed_but_missing_files(tmp_path):
    _coco_tree(tmp_path)
    (tmp_path / "images" / "train2017" / "000000000025.jpg").unlink()
    with pytest.raises(DataError, match="000000000025.jpg"):
        get_dataset("cocostuff27", tmp_path, "train")


def test_label_of_wrong_size(tmp_path):
    _camvid_tree(tmp_path / "cv")
    _png(tmp_path / "cv" / "trainannot" / "0001TP_000001.png", np.zeros((6, 9), np.uint8))
    ds = get_dataset("camvid", tmp_path / "cv", "train")
    ds.load(0)
    with pytest.raises(DataError, match=r"0001TP_000001\.png is 9x6.*8x6"):
        ds.load(1)
    _potsdam_tree(tmp_path / "pd")
    savemat(tmp_path / "pd" / "gt" / "top_potsdam_7_7_3.mat", {"gt": np.zeros((5, 5), np.uint8)})
    with pytest.raises(DataError, match="top_potsdam_7_7_3.mat"):
        get_dataset("potsdam", tmp_path / "pd", "val").load(0)


def test_corrupt_images_raise_corruptimage_naming_the_file(tmp_path):
    _camvid_tree(tmp_path / "cv")
    (tmp_path / "cv" / "train" / "0001TP_000002.png").write_bytes(b"not a png at all")
    ds = get_dataset("camvid", tmp_path / "cv", "train")
    with pytest.raises(CorruptImage, match=r"0001TP_000002\.png"):
        ds.load(2)
    # a truncated JPEG in a folder dataset
    good = tmp_path / "f" / "ok.jpg"
    _mkdir(good.parent)
    Image.fromarray(_rgb(64, 64)).save(good, quality=95)
    data = good.read_bytes()
    (tmp_path / "f" / "cut.jpg").write_bytes(data[: len(data) // 2])
    fd = get_dataset("folder", tmp_path / "f", "train")
    assert fd.image_id(0) == "cut"
    with pytest.raises(CorruptImage, match=r"cut\.jpg"):
        fd.load(0)
    fd.load(1)
    # an unreadable .mat
    _potsdam_tree(tmp_path / "pd")
    (tmp_path / "pd" / "imgs" / "top_potsdam_2_10_1.mat").write_bytes(b"garbage" * 20)
    with pytest.raises(CorruptImage, match="top_potsdam_2_10_1.mat"):
        get_dataset("potsdam", tmp_path / "pd", "train").load(1)


def test_colour_label_refused(tmp_path):
    (tmp_path / "classes.txt").write_text("a\nb\n")
    _png(tmp_path / "images" / "p.png", _rgb(4, 4))
    _png(tmp_path / "labels" / "p.png", _rgb(4, 4))
    with pytest.raises(DataError, match="single-channel"):
        get_dataset("folder", tmp_path, "train").load(0)
