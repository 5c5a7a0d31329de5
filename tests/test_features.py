"""Stage 1 end to end on tiny folder datasets with the random-weight backbone."""

from __future__ import annotations

import json
import signal
import subprocess
import sys
import time
from pathlib import Path

import numpy as np
import pytest
import torch
import zarr
from _fixtures import make_folder
from PIL import Image

from pipeline.artifacts.features import FeatureStore
from pipeline.cache import build as stage
from pipeline.cache.store import ManifestMismatch
from pipeline.config.schema import FeaturesConfig

REPO = Path(__file__).resolve().parents[1]


def cfg_for(root: Path, out: Path, **kw) -> FeaturesConfig:
    base = dict(out=str(out), dataset="folder", data_root=str(root), backbone="vit_tiny_random",
                train_size=32, eval_size=40, chunk_size=2, batch_size=4)
    base.update(kw)
    return FeaturesConfig(**base)


def arrays(out: Path) -> dict[str, np.ndarray]:
    g = zarr.open_group(str(out / "features.zarr"), mode="r")
    return {f"{s}/{k}": g[s][k][:] for s in ("train", "val") if s in g for k in g[s].array_keys()}


def assert_same(a: dict, b: dict) -> None:
    assert a.keys() == b.keys()
    for k in a:
        np.testing.assert_array_equal(a[k], b[k], err_msg=k)


@pytest.fixture(scope="module")
def folder(tmp_path_factory) -> Path:
    return make_folder(tmp_path_factory.mktemp("folder"))


@pytest.fixture(scope="module")
def reference(folder, tmp_path_factory) -> dict:
    out = tmp_path_factory.mktemp("ref")
    stage.run(cfg_for(folder, out))
    return arrays(out)


def test_cache_layout_and_contents(folder, tmp_path, reference):
    from pipeline.data.backbones import forward_tokens, load_backbone
    from pipeline.data.datasets import get_dataset
    from pipeline.data.views import five_crops, patch_labels

    out = tmp_path / "run"
    report = stage.run(cfg_for(folder, out))
    assert report["crops"] == {"train": 35, "val": 3}
    store = FeatureStore(out)
    assert store.grid("train") == (4, 4) and store.grid("val") == (5, 5)
    assert store.num_classes == 3 and store.has_labels
    tr = store.split("train")
    assert tr["tokens"].shape == (35, 17, 48) and tr["tokens"].dtype == np.float16
    assert tr["feats"].shape == (35, 16, 48)
    assert tr["labels"].shape == (35, 32, 32) and tr["rgb"].shape == (35, 32, 32, 3)
    assert (tr["valid"][:] == 1).all()
    np.testing.assert_array_equal(tr["image_index"][:], np.repeat(np.arange(7), 5))
    # crop 3 of image 4 recomputed by hand equals the cache
    ds = get_dataset("folder", str(folder), "train")
    s = ds.load(4)
    rgb, lab, box = five_crops(s.rgb, s.label, 32)[3]
    np.testing.assert_array_equal(tr["rgb"][23], rgb)
    np.testing.assert_array_equal(tr["labels"][23], lab)
    np.testing.assert_array_equal(tr["crop_box"][23], box)
    np.testing.assert_array_equal(tr["patch_labels"][23], patch_labels(lab, (4, 4)))
    model, info, _ = load_backbone("vit_tiny_random")
    x = torch.from_numpy(rgb.copy()).permute(2, 0, 1)[None].float() / 255
    x = (x - torch.tensor(info.mean).view(1, 3, 1, 1)) / torch.tensor(info.std).view(1, 3, 1, 1)
    with torch.no_grad():
        mid, feat = forward_tokens(model, x)
    np.testing.assert_allclose(tr["tokens"][23].astype(np.float32), mid[0].numpy(), atol=2e-3, rtol=2e-3)
    np.testing.assert_allclose(tr["feats"][23].astype(np.float32), feat[0].numpy(), atol=2e-3, rtol=2e-3)
    # a second identical run is a no-op and changes nothing
    again = stage.run(cfg_for(folder, out))
    assert again["chunks_computed"] == 0
    assert_same(arrays(out), reference)


def test_resume_after_interrupt_skips_finished_chunks(folder, tmp_path, reference, monkeypatch):
    out = tmp_path / "run"
    calls = []
    real = stage.process_unit
    armed = [True]

    def flaky(unit, cfg):
        calls.append(unit.key)
        if armed[0] and len(calls) == 3:
            armed[0] = False
            raise KeyboardInterrupt
        return real(unit, cfg)

    monkeypatch.setattr(stage, "process_unit", flaky)
    from pipeline.executor import StageInterrupted

    with pytest.raises(StageInterrupted, match="rerun the same command"):
        stage.run(cfg_for(folder, out))
    done_before = set(calls[:2])
    calls.clear()
    stage.run(cfg_for(folder, out))
    assert not done_before & set(calls), "finished chunks were redone"
    assert_same(arrays(out), reference)


def test_resume_after_sigkill(folder, tmp_path, reference):
    """Kill the real CLI process mid-run, rerun the same command, get the same cache."""
    out = tmp_path / "run"
    cmd = [sys.executable, "-m", "stages.cli", "features", "--out", str(out), "--dataset",
           "folder", "--data-root", str(folder), "--backbone", "vit_tiny_random",
           "--train-size", "32", "--eval-size", "40", "--chunk-size", "2", "--batch-size", "4"]
    proc = subprocess.Popen(cmd, cwd=REPO, stdout=subprocess.DEVNULL, stderr=subprocess.DEVNULL)
    markers = out / "markers" / "features"
    deadline = time.time() + 60
    while time.time() < deadline and not (markers.exists() and any(markers.glob("*.done"))):
        time.sleep(0.05)
    proc.send_signal(signal.SIGKILL)
    proc.wait()
    n_done = len(list(markers.glob("*.done")))
    assert n_done < 6, "the run finished before it could be killed"
    subprocess.run(cmd, cwd=REPO, check=True, stdout=subprocess.DEVNULL, stderr=subprocess.DEVNULL)
    assert len(list(markers.glob("*.done"))) == 6
    assert_same(arrays(out), reference)


def test_refuses_other_settings_in_same_dir(folder, tmp_path):
    out = tmp_path / "run"
    stage.run(cfg_for(folder, out, limit=2, splits=("train",)))
    before = arrays(out)
    with pytest.raises(ManifestMismatch, match="seed: on disk 0, now 1"):
        stage.run(cfg_for(folder, out, limit=2, splits=("train",), seed=1))
    with pytest.raises(ManifestMismatch, match="preprocessing"):
        stage.run(cfg_for(folder, out, limit=2, splits=("train",), train_size=48))
    assert_same(arrays(out), before)


def test_dask_workers_equal_sequential(folder, tmp_path, reference):
    out = tmp_path / "run"
    stage.run(cfg_for(folder, out, workers=2))
    assert_same(arrays(out), reference)


def test_corrupt_image_is_skipped_and_reported(tmp_path):
    root = make_folder(tmp_path / "data", n=4)
    (root / "images" / "train" / "im02.png").write_bytes(b"not a png at all")
    out = tmp_path / "run"
    report = stage.run(cfg_for(root, out))
    assert [s["image_id"] for s in report["skipped_images"]] == ["im02"]
    valid = zarr.open_group(str(out / "features.zarr"))["train"]["valid"][:]
    np.testing.assert_array_equal(valid, np.repeat([1, 1, 0, 1], 5))
    assert json.loads((out / "features_report.json").read_text())["skipped_images"]


def test_wrong_label_size_stops_and_keeps_finished_chunks(tmp_path, reference):
    root = make_folder(tmp_path / "data")
    good = root / "labels" / "train" / "im05.png"
    keep = good.read_bytes()
    Image.fromarray(np.zeros((10, 10), np.uint8)).save(good)
    out = tmp_path / "run"
    with pytest.raises(ValueError, match="im05"):
        stage.run(cfg_for(root, out))
    done = sorted(p.name for p in (out / "markers" / "features").glob("*.done"))
    assert "train-00000.done" in done and "train-00001.done" in done
    good.write_bytes(keep)
    stage.run(cfg_for(root, out))
    assert_same(arrays(out), reference)


def test_bad_roots_and_empty_dataset(tmp_path):
    with pytest.raises(ValueError, match="does-not-exist"):
        stage.run(cfg_for(tmp_path / "does-not-exist", tmp_path / "o1"))
    empty = tmp_path / "empty"
    (empty / "images").mkdir(parents=True)
    with pytest.raises(ValueError, match="no images|empty|No images"):
        stage.run(cfg_for(empty, tmp_path / "o2"))
    assert not (tmp_path / "o2" / "features.zarr").exists()


def test_incompatible_store_is_refused_untouched(folder, tmp_path):
    out = tmp_path / "run"
    bad = out / "features.zarr"
    bad.mkdir(parents=True)
    (bad / ".zgroup").write_text('{"zarr_format": 2}')  # an old zarr v2 store
    with pytest.raises(ValueError, match="Zarr|zarr"):
        stage.run(cfg_for(folder, out))
    assert (bad / ".zgroup").read_text() == '{"zarr_format": 2}'
    # a store written by a future format version is refused by the manifest check
    out2 = tmp_path / "run2"
    stage.run(cfg_for(folder, out2, limit=1, splits=("val",)))
    m = json.loads((out2 / "features_manifest.json").read_text())
    m["identity"]["format_version"] = 999
    (out2 / "features_manifest.json").write_text(json.dumps(m))
    with pytest.raises(ValueError, match="format"):
        stage.run(cfg_for(folder, out2, limit=1, splits=("val",)))
