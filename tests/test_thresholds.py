"""Mining thresholds made for another backbone are caught, and `mine --calibrate` picks them
label-free (pipeline/mining/thresholds.py)."""

from __future__ import annotations

import json
import logging
from pathlib import Path

import numpy as np
import pytest
from _fixtures import make_folder

from pipeline.artifacts.features import FeatureStore
from pipeline.cache import build as features
from pipeline.config.schema import FeaturesConfig, MineConfig
from pipeline.mining import mine, thresholds

CAMVID = Path(__file__).resolve().parents[2] / "shared" / "camvid"


@pytest.fixture(scope="module")
def cache(tmp_path_factory) -> Path:
    """Real pretrained weights (DINOv2 ViT-S/14 shipped offline) on a few small pictures."""
    root = make_folder(tmp_path_factory.mktemp("data"), n=6, size=(64, 80))
    out = tmp_path_factory.mktemp("run")
    features.run(FeaturesConfig(out=str(out), dataset="folder", data_root=str(root),
                                backbone="dinov2_vits14_offline", train_size=56, eval_size=56,
                                splits=("train",), chunk_size=3))
    return out


@pytest.fixture(scope="module")
def random_cache(tmp_path_factory) -> Path:
    root = make_folder(tmp_path_factory.mktemp("data"), n=6, size=(64, 80))
    out = tmp_path_factory.mktemp("run")
    features.run(FeaturesConfig(out=str(out), dataset="folder", data_root=str(root),
                                backbone="vit_tiny_random", train_size=48, eval_size=48,
                                splits=("train",), chunk_size=3))
    return out


def _cosines(out: Path) -> np.ndarray:
    plan = mine.mining_plan(MineConfig(out=str(out), batch_size=8, holdout=0.0, seed=0))
    F = FeatureStore(out).mining_features(plan.batch_images(0, 0))
    return thresholds.similarity_sample(F, seed=0)


def _cfg(out: Path, **kw) -> MineConfig:
    base = dict(out=str(out), batch_size=8, anchors_per_image="1/4", plans=1, seed=0, holdout=0.0)
    return MineConfig(**{**base, **kw})


def test_thresholds_that_make_most_of_a_batch_positive_are_refused(cache, caplog):
    s = _cosines(cache)
    loose = float(np.round(np.quantile(s, 0.4), 2))  # ~60% of the batch above phi0
    with pytest.raises(ValueError, match=r"phi0=.* puts \d+% of a mined batch .*--calibrate.*--force"):
        mine.run(_cfg(cache, phi0=loose, psi0=loose - 0.2, name="loose"))
    assert not (cache / "mine" / "loose").exists()  # refused before anything is written
    with caplog.at_level(logging.WARNING, logger="ppap.mine"):
        mine.run(_cfg(cache, phi0=loose, psi0=loose - 0.2, name="loose", force=True))
    assert "look made for another backbone" in caplog.text
    caplog.clear()
    moderate = float(np.round(np.quantile(s, 0.85), 2))  # ~15%: mined, with a warning
    with caplog.at_level(logging.WARNING, logger="ppap.mine"):
        mine.run(_cfg(cache, phi0=moderate, psi0=moderate - 0.2, name="moderate"))
    assert "look made for another backbone" in caplog.text
    caplog.clear()
    tight = float(np.round(np.quantile(s, 0.995), 2))
    with caplog.at_level(logging.WARNING, logger="ppap.mine"):
        mine.run(_cfg(cache, phi0=tight, psi0=tight - 0.2, name="tight"))
    assert "another backbone" not in caplog.text


def test_random_weight_features_are_warned_about_not_refused(random_cache, caplog):
    """Random weights (tests, smoke runs) have no threshold convention: loose thresholds there
    are mined, with the warning."""
    s = _cosines(random_cache)
    loose = float(np.round(np.quantile(s, 0.4), 2))
    with caplog.at_level(logging.WARNING, logger="ppap.mine"):
        summary = mine.run(_cfg(random_cache, phi0=loose, psi0=loose - 0.2, name="loose"))
    assert "look made for another backbone" in caplog.text and summary["mean_pos"] > 0


def test_calibrate_takes_the_quantiles_of_the_first_batch(random_cache):
    s = _cosines(random_cache)
    summary = mine.run(_cfg(random_cache, calibrate=True, name="cal", calibrate_pos=0.98, calibrate_amb=0.6))
    cfg = json.loads((random_cache / "mine" / "cal" / "config.json").read_text())
    assert cfg["phi0"] == round(float(np.quantile(s, 0.98)), 2)
    assert cfg["psi0"] == round(float(np.quantile(s, 0.6)), 2)
    assert cfg["calibrate"] is True and summary["mean_pos"] > 0
    # a rerun calibrates to the same values: nothing redone, nothing refused
    mine.run(_cfg(random_cache, calibrate=True, name="cal", calibrate_pos=0.98, calibrate_amb=0.6))
    with pytest.raises(ValueError, match="calibrate_amb"):
        _cfg(random_cache, calibrate=True, calibrate_pos=0.5, calibrate_amb=0.6)
    with pytest.raises(ValueError, match="too uniform"):
        thresholds.calibrate(np.ones((4, 4)))


@pytest.mark.skipif(not CAMVID.is_dir(), reason="CamVid not at ../shared/camvid")
def test_dino_v1_thresholds_on_dinov2_are_refused_and_calibration_finds_the_preset(tmp_path):
    """The paper's DINO v1 thresholds (0.55 / 0.15) on real DINOv2 ViT-S/14 features of CamVid:
    refused, naming the fix; --calibrate lands near the audit-chosen preset 0.95 / 0.70 (on these
    8 images a batch is more alike than a batch of the whole split, so Ψ0 comes out higher:
    0.80 here, 0.72 on the full cache)."""
    out = tmp_path / "run"
    features.run(FeaturesConfig(out=str(out), dataset="camvid", data_root=str(CAMVID),
                                backbone="dinov2_vits14_offline", splits=("train",), limit=8,
                                chunk_size=8))
    with pytest.raises(ValueError, match=r"phi0=0.55 puts [3-9]\d% .*DINO v1.*--preset camvid"):
        mine.run(_cfg(out, phi0=0.55, psi0=0.15, batch_size=32))
    mine.run(_cfg(out, calibrate=True, batch_size=32))
    cfg = json.loads((out / "mine" / "ppap" / "config.json").read_text())
    assert abs(cfg["phi0"] - 0.95) <= 0.02 and abs(cfg["psi0"] - 0.70) <= 0.12, cfg
