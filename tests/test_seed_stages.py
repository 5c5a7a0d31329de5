"""The primaps and eigen criteria through the real stages: mine (state, resume, refusal, CLI),
export, audit next to the other criteria, show, and training on their shards."""

from __future__ import annotations

import json
import subprocess
import sys
from pathlib import Path

import numpy as np
import pytest
from test_audit import GRID, K, make_store, mine_run

from pipeline.artifacts.features import FeatureStore
from pipeline.cache.store import ManifestMismatch
from pipeline.config.schema import (
    AuditConfig,
    ExportConfig,
    MineConfig,
    ShowConfig,
    TrainConfig,
)
from pipeline.mining import export, mine, recover, shards

REPO = Path(__file__).resolve().parents[1]
FAST = dict(eigen_steps=150)


def shard_bytes(directory: Path) -> dict[str, bytes]:
    return {str(p.relative_to(directory)): p.read_bytes()
            for p in sorted((directory / "shards").rglob("*.npz"))}


@pytest.fixture(scope="module")
def store(fake_cache, tmp_path_factory):
    out = tmp_path_factory.mktemp("seedstore")
    pl = make_store(fake_cache, out)  # 12 crops of 4x4 patches, 3 separable classes, some ignore labels
    for name, criterion in (("ppap", "ppap"), ("p0", "p0"), ("hp", "hp"), ("kmeans", "kmeans"),
                            ("primaps", "primaps"), ("eigen", "eigen")):
        mine_run(out, name, criterion=criterion, **FAST)
    return out, pl


def test_state_is_saved_and_summarised(store):
    out, _ = store
    for name, state in (("primaps", "primaps_prototypes.npy"), ("eigen", "eigen_state.npz"),
                        ("kmeans", "kmeans_centroids.npy")):
        d = out / "mine" / name
        assert (d / state).is_file()
        summary = json.loads((d / "summary.json").read_text())
        assert set(summary["criterion_state"]) == {state} and len(summary["criterion_state"][state]) == 64
    ident = json.loads((out / "mine" / "primaps" / "manifest.json").read_text())["identity"]
    assert ident["primaps_psi"] == 0.4 and ident["primaps_coverage"] == 0.95 and ident["kmeans_k"] == K
    ident = json.loads((out / "mine" / "eigen" / "manifest.json").read_text())["identity"]
    assert ident["eigen_steps"] == 150 and ident["eigen_kernel_power"] == 1.0
    # primaps labels its masks with the same prototypes the kmeans criterion uses
    np.testing.assert_array_equal(np.load(out / "mine" / "primaps" / "primaps_prototypes.npy"),
                                  np.load(out / "mine" / "kmeans" / "kmeans_centroids.npy"))


def test_audit_compares_all_six_criteria_on_the_same_anchors(store, tmp_path, capsys):
    from pipeline.audit import report as audit

    out, _ = store
    names = ("ppap", "p0", "hp", "kmeans", "primaps", "eigen")
    rep = audit.run(AuditConfig(out=str(out), mined=names, batches=3, max_anchors=None,
                                  json=str(tmp_path / "a.json"), plot=str(tmp_path / "f.png")))
    runs = {r["name"]: r for r in rep["runs"]}
    assert list(runs) == list(names)
    assert len({r["n_anchors"] for r in runs.values()}) == 1
    printed = capsys.readouterr().out
    for name in names:
        assert name in printed
    # separable classes: the cluster criteria find (almost) exactly the same-class patches
    for name in ("kmeans", "primaps", "eigen"):
        assert runs[name]["tp_in_p"] > 97 and runs[name]["recall"] > 95, (name, runs[name])
        assert runs[name]["fp_in_n"] < 3, (name, runs[name])


def test_primaps_sets_follow_the_mask_pseudo_labels(store):
    """Recovered sets = rows with the same PriMaPs pseudo-label (recomputed independently)."""
    from pipeline.mining import primaps

    out, _ = store
    d = out / "mine" / "primaps"
    sh = shards.read_shard(shards.iter_shards(d, 0)[0])
    F = FeatureStore(out).mining_features(sh.images)
    protos = np.load(d / "primaps_prototypes.npy")
    masks = np.concatenate([primaps.principal_masks(F[b * GRID * GRID:(b + 1) * GRID * GRID]) + 100 * b
                            for b in range(len(sh.images))])  # ids made batch-wide by hand
    assert (masks >= 0).all()  # 16 patches per crop: 95% coverage rounds up to all of them
    sets = recover.recover_sets(sh, F)
    labels = sh.cluster_of
    for i, a in enumerate(sh.anchors):
        want = set(np.flatnonzero(labels == labels[a]).tolist()) - {int(a)}
        assert set(sets.pos(i).tolist()) == want
    # and the labels are the masks' majority prototype classes
    near = np.argmax(F @ (protos / np.linalg.norm(protos, axis=1, keepdims=True)).T, axis=1)
    for m in np.unique(masks):
        sel = np.flatnonzero(masks == m)
        assert len(set(labels[sel].tolist())) == 1
        assert labels[sel][0] == np.bincount(near[sel], minlength=K).argmax()


def test_unassigned_rows_are_ambiguous_end_to_end(store, tmp_path):
    """coverage < 1 on crops of 16 patches leaves rows unassigned: ambiguous in shards, export."""
    out, _ = store
    cfg = mine_run(out, "primaps_half", criterion="primaps", primaps_coverage=0.3, primaps_psi=0.95)
    sh = shards.read_shard(shards.iter_shards(out / "mine" / "primaps_half", 0)[0])
    un = np.flatnonzero(sh.cluster_of < 0)
    assert un.size > 0
    to = tmp_path / "b0.npz"
    export.run(ExportConfig(out=str(out), mined="primaps_half", epoch=0, batch=0, to=str(to)))
    z = dict(np.load(to))
    for i, a in enumerate(z["anchors"]):
        amb = set(z["amb_indices"][z["amb_indptr"][i]:z["amb_indptr"][i + 1]].tolist())
        pos = set(z["pos_indices"][z["pos_indptr"][i]:z["pos_indptr"][i + 1]].tolist())
        if sh.cluster_of[a] < 0:
            assert not pos and amb == set(range(len(sh.cluster_of))) - {int(a)}
        else:
            assert amb == set(un.tolist()) and not (pos & amb)
    summary = json.loads((out / "mine" / "primaps_half" / "summary.json").read_text())
    assert summary["mean_amb"] > 0
    assert cfg.primaps_coverage == 0.3


def test_rerun_is_bit_identical_and_changed_settings_are_refused(store):
    out, _ = store
    for criterion in ("primaps", "eigen"):
        mine_run(out, f"{criterion}_again", criterion=criterion, **FAST)
        assert shard_bytes(out / "mine" / f"{criterion}_again") == shard_bytes(out / "mine" / criterion)
        before = shard_bytes(out / "mine" / criterion)
        mine_run(out, criterion, criterion=criterion, **FAST)  # finished: nothing redone
        assert shard_bytes(out / "mine" / criterion) == before
    with pytest.raises(ManifestMismatch, match="primaps_psi"):
        mine_run(out, "primaps", criterion="primaps", primaps_psi=0.5)
    with pytest.raises(ManifestMismatch, match="eigen_kernel_power"):
        mine_run(out, "eigen", criterion="eigen", eigen_steps=150, eigen_kernel_power=4.0)


def test_show_renders_primaps_sets(store, tmp_path):
    from pipeline.audit import show

    out, _ = store
    paths = show.run(ShowConfig(out=str(out), mined="primaps", random=2, dest=str(tmp_path)))
    assert len(paths) == 2 and all(p.is_file() and p.stat().st_size > 1000 for p in paths)


def test_cli_validates_the_new_options(store):
    out, _ = store
    cli = [sys.executable, "-m", "stages.cli"]
    cases = [
        (["mine", "--out", str(out), "--criterion", "primaps", "--primaps-psi", "1.2", "--name", "x"],
         "primaps_psi=1.2 must lie in [0, 1)"),
        (["mine", "--out", str(out), "--criterion", "primaps", "--primaps-coverage", "0", "--name", "x"],
         "primaps_coverage=0.0 must lie in (0, 1]"),
        (["mine", "--out", str(out), "--criterion", "eigen", "--eigen-dim", "0", "--name", "x"],
         "eigen_dim=0 must be at least 1"),
        (["mine", "--out", str(out), "--criterion", "spectral", "--name", "x"],
         "criterion='spectral': choose one of ppap, p0, hp, kmeans, primaps, eigen"),
        (["eval", "--out", str(out), "--baseline", "frozen", "--probe", "spectral"],
         "probe='spectral': choose one of kmeans, primaps-em, eigen"),
    ]
    for args, message in cases:
        r = subprocess.run(cli + args, cwd=REPO, capture_output=True, text=True)
        assert r.returncode == 2 and message in r.stderr, (args, r.stderr)
    assert not (out / "mine" / "x").exists()
    help_text = subprocess.run(cli + ["mine", "--help"], cwd=REPO, capture_output=True, text=True).stdout
    assert "--primaps-psi" in help_text and "--eigen-kernel-power" in help_text


@pytest.mark.parametrize("criterion", ["primaps", "eigen"])
def test_train_runs_on_primaps_and_eigen_shards(fake_cache, tmp_path, criterion):
    """End to end on a tiny real cache: mine with the stage, then train on the shards."""
    from test_train import N_CROPS, B, _make_cache

    from pipeline.training import train

    store = _make_cache(fake_cache, tmp_path)
    mine.run(MineConfig(out=str(tmp_path), criterion=criterion, batch_size=B,
                          anchors_per_image="1/4", plans=2, seed=0, eigen_steps=100,
                          primaps_coverage=0.8))
    summary = train.run(TrainConfig(out=str(tmp_path), mined=criterion, epochs=2, lr=3e-3,
                                      ckpt_every=2, seed=1))
    assert summary["finished"] and np.isfinite(summary["final_loss"])
    rows = [json.loads(x) for x in (tmp_path / "train" / criterion / "metrics.jsonl").read_text().splitlines()]
    assert len(rows) == 2 * -(-N_CROPS // B)
    assert all(r["anchors_used"] > 0 and r["mean_pos"] > 0 for r in rows)
    ident = json.loads((tmp_path / "train" / criterion / "manifest.json").read_text())["identity"]
    assert ident["mined"] == criterion and store.fingerprint == ident["features_fingerprint"]
