"""`ppap-pipe predict` on a tiny real pipeline (folder dataset, random-weight ViT): one label,
colour and overlay image per input image at the image's own size, EXIF orientation, class ids
through eval's saved matching, corrupt images skipped and listed, resume, modes 0644."""

from __future__ import annotations

import json
import shutil
import stat
from pathlib import Path

import numpy as np
import pytest
from _fixtures import make_folder
from PIL import Image
from typer.testing import CliRunner

from stages import cli


def invoke(*argv) -> str:
    res = CliRunner().invoke(cli.app, [str(a) for a in argv])
    assert res.exit_code == 0, (argv, res.output, repr(res.exception))
    return res.output


@pytest.fixture(scope="module")
def run_dir(tmp_path_factory) -> Path:
    root = make_folder(tmp_path_factory.mktemp("data"), n=8, size=(48, 64))
    out = tmp_path_factory.mktemp("run")
    invoke("features", "--out", out, "--dataset", "folder", "--data-root", root,
           "--backbone", "vit_tiny_random", "--train-size", 32, "--eval-size", 48)
    invoke("mine", "--out", out, "--phi0", 0.9, "--psi0", 0.5, "--batch-size", 8,
           "--anchors-per-image", "1/4", "--holdout", 0.25, "--seed", 0, "--force")
    invoke("train", "--out", out, "--epochs", 1, "--select-every", 2, "--tau", 0.2)
    invoke("eval", "--out", out, "--trained", "ppap", "--no-crf", "--seeds", 2, "--n-show", 0)
    return out


@pytest.fixture()
def images(tmp_path) -> Path:
    d = tmp_path / "new"
    (d / "sub").mkdir(parents=True)
    rng = np.random.default_rng(1)
    Image.fromarray(rng.integers(0, 255, (50, 70, 3), dtype=np.uint8)).save(d / "a.png")
    Image.fromarray(rng.integers(0, 255, (90, 40, 3), dtype=np.uint8)).save(d / "sub" / "b.jpg")
    # EXIF orientation 6 (rotate 90°): stored 30 x 60, shown 60 x 30
    im = Image.fromarray(rng.integers(0, 255, (30, 60, 3), dtype=np.uint8))
    exif = Image.Exif()
    exif[0x0112] = 6
    im.save(d / "c.jpg", exif=exif)
    (d / "broken.png").write_bytes(b"\x89PNG\r\n\x1a\nnot really a png")
    (d / "notes.txt").write_text("not an image")
    return d


def test_predict_writes_one_label_per_image_and_lists_the_corrupt_one(run_dir, images, tmp_path):
    dest = tmp_path / "pred"
    invoke("predict", "--run-dir", run_dir, "--trained", "ppap", "--images", images, "--out", dest)
    sizes = {"a": (70, 50), "sub/b": (40, 90), "c": (30, 60)}  # PIL (width, height); c rotated
    for stem, size in sizes.items():
        with Image.open(dest / f"{stem}.png") as lab:
            assert lab.size == size and lab.mode == "L"
            ids = np.asarray(lab)
        with Image.open(dest / f"{stem}_color.png") as col:
            assert col.size == size and col.mode == "RGB"
        with Image.open(dest / f"{stem}_overlay.jpg") as ov:
            assert ov.size == size
        # class ids after eval's Hungarian matching (3 classes), 255 = unmatched cluster
        assert set(np.unique(ids)) <= {0, 1, 2, 255}
    summary = json.loads((dest / "predict.json").read_text())
    assert summary["probe"] == "fitted" and summary["ids"] == "class ids"
    assert summary["probe_report"] == "ppap-best" and summary["names"] == ["c0", "c1", "c2"]
    assert summary["written"] == sorted(sizes) and summary["images"] == 4
    assert [Path(s["image"]).name for s in summary["skipped"]] == ["broken.png"]
    for p in dest.rglob("*"):
        if p.is_file() and not p.name.startswith("."):
            assert stat.S_IMODE(p.stat().st_mode) == 0o644, p

    # rerun: nothing redone (files untouched), the same summary
    before = {p: p.stat().st_mtime_ns for p in dest.rglob("*.png")}
    (dest / "a.png").unlink()  # an unfinished image is redone
    invoke("predict", "--run-dir", run_dir, "--trained", "ppap", "--images", images, "--out", dest)
    after = {p: p.stat().st_mtime_ns for p in dest.rglob("*.png")}
    assert (dest / "a.png").is_file()
    others = lambda d: {p: t for p, t in d.items() if not p.name.startswith("a")}  # noqa: E731
    assert others(after) == others(before) and len(others(after)) == 4
    # other settings into the same folder are refused, naming the difference
    res = CliRunner().invoke(cli.app, ["predict", "--run-dir", str(run_dir), "--images", str(images),
                                       "--out", str(dest), "--head", "linear"])
    assert res.exit_code != 0 and "head" in str(res.exception)


def test_predict_with_the_trained_probe_gives_cluster_ids(run_dir, images, tmp_path):
    dest = tmp_path / "pred-trained"
    invoke("predict", "--run-dir", run_dir, "--images", images, "--out", dest, "--probe", "trained",
           "--checkpoint", "last", "--crf")
    summary = json.loads((dest / "predict.json").read_text())
    assert summary["probe"] == "trained" and summary["ids"] == "cluster ids" and summary["crf"]
    assert summary["checkpoint"] == "last"
    with Image.open(dest / "a.png") as lab:
        assert np.asarray(lab).max() < len(summary["names"])


def test_predict_refuses_bad_input_clearly(run_dir, tmp_path):
    res = CliRunner().invoke(cli.app, ["predict", "--run-dir", str(run_dir), "--images",
                                       str(tmp_path / "nope"), "--out", str(tmp_path / "o")])
    assert res.exit_code != 0 and "is not a folder" in str(res.exception)
    empty = tmp_path / "empty"
    empty.mkdir()
    res = CliRunner().invoke(cli.app, ["predict", "--run-dir", str(run_dir), "--images", str(empty),
                                       "--out", str(tmp_path / "o")])
    assert res.exit_code != 0 and "holds no image files" in str(res.exception)
    res = CliRunner().invoke(cli.app, ["predict", "--run-dir", str(run_dir), "--images", str(empty)])
    assert res.exit_code != 0 and "--out DIR" in str(res.exception)


def test_an_unlabelled_folder_trains_and_predicts_cluster_ids(tmp_path, images):
    """No labels anywhere: train picks a default cluster-probe size (27) without --n-clusters,
    and predict writes cluster ids from the trained probe."""
    root = make_folder(tmp_path / "data", n=8, size=(48, 64))
    shutil.rmtree(root / "labels")
    (root / "classes.txt").unlink(missing_ok=True)
    out = tmp_path / "run"
    invoke("features", "--out", out, "--dataset", "folder", "--data-root", root,
           "--backbone", "vit_tiny_random", "--train-size", 32, "--eval-size", 48)
    invoke("mine", "--out", out, "--phi0", 0.9, "--psi0", 0.5, "--batch-size", 8,
           "--anchors-per-image", "1/4", "--holdout", 0.25, "--seed", 0, "--force")
    invoke("train", "--out", out, "--epochs", 1, "--select-every", 2, "--tau", 0.2)
    import torch
    ckpt = torch.load(out / "train" / "ppap" / "best.pt", map_location="cpu", weights_only=False)
    assert ckpt["model"]["n_clusters"] == 27 and not ckpt["model"]["has_labels"]
    dest = tmp_path / "pred"
    invoke("predict", "--run-dir", out, "--trained", "ppap", "--probe", "trained",
           "--images", images, "--out", dest)
    lab = np.asarray(Image.open(dest / "a.png"))
    assert lab.shape == (50, 70) and lab.max() < 27
