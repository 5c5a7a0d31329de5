"""Stage 2 through the real pipeline: CLI validation, resume, dask, refusal, export vs brute force."""

from __future__ import annotations

import json
import subprocess
import sys
from pathlib import Path

import numpy as np
import pytest
from _fixtures import make_folder

from pipeline.artifacts.features import FeatureStore
from pipeline.cache import build as features
from pipeline.cache.store import ManifestMismatch
from pipeline.config.schema import ExportConfig, MineConfig
from pipeline.mining import export, mine, recover, shards

REPO = Path(__file__).resolve().parents[1]


@pytest.fixture(scope="module")
def cache(tmp_path_factory) -> Path:
    root = make_folder(tmp_path_factory.mktemp("data"), n=6, size=(64, 80))
    out = tmp_path_factory.mktemp("run")
    from pipeline.config.schema import FeaturesConfig

    features.run(FeaturesConfig(out=str(out), dataset="folder", data_root=str(root),
                                backbone="vit_tiny_random", train_size=48, eval_size=48,
                                splits=("train",), chunk_size=3))
    return out


@pytest.fixture(scope="module")
def thresholds(cache) -> tuple[float, float]:
    """Φ0/Ψ0 at the 85th/50th percentile of this cache's similarities: non-trivial sets."""
    F = FeatureStore(cache).mining_features(np.arange(8))
    s = F[::7] @ F.T
    return float(np.round(np.quantile(s, 0.85), 2)), float(np.round(np.quantile(s, 0.5), 2))


def cfg_for(cache, thresholds, **kw) -> MineConfig:
    phi0, psi0 = thresholds
    base = dict(out=str(cache), phi0=phi0, psi0=psi0, prop_iters=2, sigma_pos=3.0, sigma_amb=3.0,
                batch_size=8, anchors_per_image="1/4", plans=2, seed=3)
    base.update(kw)
    return MineConfig(**base)


def shard_bytes(directory: Path) -> dict[str, bytes]:
    return {str(p.relative_to(directory)): p.read_bytes()
            for p in sorted((directory / "shards").rglob("*.npz"))}


def dense_reference(F, anchors, phi0, psi0, T, sp, sa):
    """docs/method.md §2 in float64, written independently of pipeline.mining.engines."""
    F = F.astype(np.float64)
    pos, amb = [], []
    for a in anchors:
        v, phi, psi = F[a], phi0, psi0
        s = F @ v
        members = s > phi
        for _ in range(T):
            nv = F[members].sum(0)
            nv = nv / np.linalg.norm(nv)
            d = 1.0 - float(v @ nv)
            phi, psi, v = phi - d / sp, psi + d / sa, nv
            s = F @ v
            members = s > phi
        keep = np.arange(len(F)) != a
        pos.append((np.flatnonzero((s > phi) & keep), s, phi))
        amb.append((np.flatnonzero((s >= psi) & (s <= phi) & keep), s, psi))
    return pos, amb


def test_invalid_values_fail_before_any_work(cache, thresholds, tmp_path):
    cli = [sys.executable, "-m", "stages.cli", "mine", "--out", str(cache)]
    cases = {
        ("--phi0", "0.1", "--psi0", "0.15"): "phi0=0.1 must be greater than psi0=0.15",
        ("--sigma-pos", "0"): "sigma_pos=0.0 must be > 0",
        ("--prop-iters", "-1"): "prop_iters=-1",
        ("--anchors-per-image", "1.5"): "anchors_per_image='1.5' must lie in (0, 1]",
        ("--anchors-per-image", "0"): "must lie in (0, 1]",
        ("--batch-size", "1000"): "batch_size=1000 is larger than the 30 training crops",
    }
    for args, message in cases.items():
        r = subprocess.run(cli + ["--name", "bad"] + list(args), cwd=REPO, capture_output=True, text=True)
        assert r.returncode == 2, (args, r.stderr)
        assert message in r.stderr, (args, r.stderr)
    assert not (cache / "mine" / "bad" / "shards").exists()


def test_resume_and_dask_are_bit_identical(cache, thresholds, monkeypatch):
    ref = mine.run(cfg_for(cache, thresholds, name="ref"))
    assert ref["shards"] == 2 * 4 and ref["mean_pos"] > 1 and ref["mean_amb"] > 1
    reference = shard_bytes(Path(ref["dir"]))

    calls, armed = [], [True]
    real = mine.process_batch

    def flaky(unit, cfg):
        calls.append(unit)
        if armed[0] and len(calls) == 4:
            armed[0] = False
            raise KeyboardInterrupt
        return real(unit, cfg)

    monkeypatch.setattr(mine, "process_batch", flaky)
    from pipeline.executor import StageInterrupted

    with pytest.raises(StageInterrupted):
        mine.run(cfg_for(cache, thresholds, name="resumed"))
    first = set(calls[:3])
    calls.clear()
    mine.run(cfg_for(cache, thresholds, name="resumed"))
    assert not first & set(calls), "finished shards were mined again"
    monkeypatch.undo()
    assert shard_bytes(cache / "mine" / "resumed") == reference

    mine.run(cfg_for(cache, thresholds, name="dask", workers=2))
    assert shard_bytes(cache / "mine" / "dask") == reference


def test_more_epochs_extend_other_params_refused(cache, thresholds):
    cfg = cfg_for(cache, thresholds, name="grow", plans=1)
    mine.run(cfg)
    before = shard_bytes(cache / "mine" / "grow")
    out = mine.run(cfg_for(cache, thresholds, name="grow", plans=2))
    after = shard_bytes(cache / "mine" / "grow")
    assert out["shards"] == 8 and all(after[k] == v for k, v in before.items())
    with pytest.raises(ManifestMismatch, match="psi0: on disk"):
        mine.run(cfg_for(cache, (thresholds[0], thresholds[1] - 0.05), name="grow"))
    assert shard_bytes(cache / "mine" / "grow") == after


def test_export_matches_brute_force(cache, thresholds, tmp_path):
    cfg = cfg_for(cache, thresholds, name="exp", plans=1)
    mine.run(cfg)
    to = tmp_path / "b1.npz"
    r = subprocess.run([sys.executable, "-m", "stages.cli", "export", "--out", str(cache),
                        "--mined", "exp", "--epoch", "0", "--batch", "1", "--to", str(to)],
                       cwd=REPO, capture_output=True, text=True)
    assert r.returncode == 0, r.stderr
    z = dict(np.load(to))
    store = FeatureStore(cache)
    images = mine.mining_plan(cfg).batch_images(0, 1)
    np.testing.assert_array_equal(z["features"], store.mining_features(images))
    N = len(z["features"])
    assert z["patch_label"].shape == (N,) and z["image_index"].shape == (N,)
    np.testing.assert_array_equal(z["image_index"], np.repeat(images, N // len(images)))
    pos, amb = dense_reference(z["features"], z["anchors"], cfg.phi0, cfg.psi0, 2, 3.0, 3.0)
    checked = 0
    for i in range(len(z["anchors"])):
        got_p = set(z["pos_indices"][z["pos_indptr"][i]:z["pos_indptr"][i + 1]].tolist())
        got_a = set(z["amb_indices"][z["amb_indptr"][i]:z["amb_indptr"][i + 1]].tolist())
        (ref_p, s, phi), (ref_a, _, psi) = pos[i], amb[i]
        near = set(np.flatnonzero((np.abs(s - phi) < 1e-5) | (np.abs(s - psi) < 1e-5)).tolist())
        assert (got_p ^ set(ref_p.tolist())) <= near
        assert (got_a ^ set(ref_a.tolist())) <= near
        checked += len(ref_p) + len(ref_a)
    assert checked > 100


def test_export_unknown_batch_is_clear(cache, thresholds, tmp_path):
    mine.run(cfg_for(cache, thresholds, name="exp2", plans=1))
    with pytest.raises(ValueError, match="batch 99 of epoch 0 is not mined"):
        export.run(ExportConfig(out=str(cache), mined="exp2", batch=99, to=str(tmp_path / "x.npz")))
    with pytest.raises(ValueError, match="no mined sets named 'nope'"):
        export.run(ExportConfig(out=str(cache), mined="nope", to=str(tmp_path / "x.npz")))
    assert not (tmp_path / "x.npz").exists()


@pytest.mark.parametrize("criterion", ["p0", "hp", "kmeans"])
def test_other_criteria_write_recoverable_shards(cache, thresholds, criterion):
    cfg = cfg_for(cache, thresholds, name=f"c_{criterion}", criterion=criterion, plans=1,
                  hp_pool_size=20, kmeans_k=3)
    summary = mine.run(cfg)
    assert summary["shards"] == 4
    path = shards.iter_shards(cache / "mine" / cfg.run_name, 0)[0]
    sh = shards.read_shard(path)
    F = FeatureStore(cache).mining_features(sh.images)
    sets = recover.recover_sets(sh, F)
    assert len(sets.amb_indices) == 0
    assert json.loads((cache / "mine" / cfg.run_name / "summary.json").read_text())["anchors"] > 0
    if criterion == "p0":  # positives = P⁰ minus self, checked directly
        s = F[sh.anchors] @ F.T
        for i, a in enumerate(sh.anchors):
            want = set(np.flatnonzero(s[i] > cfg.phi0).tolist()) - {int(a)}
            near = set(np.flatnonzero(np.abs(s[i] - cfg.phi0) < 1e-5).tolist())
            got = set(sets.pos_indices[sets.pos_indptr[i]:sets.pos_indptr[i + 1]].tolist())
            assert got ^ want <= near
