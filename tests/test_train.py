"""Stage 3 on a tiny synthetic cache: outputs, exact resume, refusals."""

from __future__ import annotations

import json
import shutil

import numpy as np
import pytest
import torch
import zarr
from conftest import SplitSpec

from pipeline.artifacts.features import STORE_NAME, FeatureStore
from pipeline.artifacts.training import load_trained
from pipeline.cache.store import (
    ManifestMismatch,
    atomic_write_json,
    check_or_write_manifest,
)
from pipeline.config.schema import TrainConfig
from pipeline.data.backbones import forward_tokens, load_backbone
from pipeline.mining import shards
from pipeline.mining.batch import mine_batch
from pipeline.mining.batching import anchor_rows, batch_plan
from pipeline.mining.sets import MineParams
from pipeline.training import train
from pipeline.training.model import CKPT_FORMAT

N_CROPS, SIDE, GRID, K, B = 12, 64, 8, 3, 4  # vit_tiny_random has patch 8 -> 8x8 grid
SEED = 0


def _make_cache(fake_cache, out, labelled=True):
    """features.zarr like stages/features.py writes it, from the tiny random backbone."""
    model, info, fp = load_backbone("vit_tiny_random", seed=SEED)
    g = torch.Generator().manual_seed(1)
    # images of 3 flat-colour vertical bands (+ noise): the label is the band
    colours = torch.randn(K, 3, generator=g)
    bands = (torch.arange(SIDE) * K // SIDE).long()
    shift = torch.randint(0, SIDE, (N_CROPS,), generator=g)
    lab = torch.stack([(bands.roll(int(s)))[None, :].expand(SIDE, SIDE) for s in shift])
    x = colours[lab].permute(0, 3, 1, 2) + 0.3 * torch.randn(N_CROPS, 3, SIDE, SIDE, generator=g)
    mid, feats = forward_tokens(model, x)
    labels = lab.numpy().astype(np.int16)
    labels[:, :2] = -1  # an ignored strip

    def fill(split, sp, spec):
        sp["tokens"][:] = mid.numpy().astype(np.float16)
        sp["feats"][:] = feats.numpy().astype(np.float16)
        if labelled:
            sp["labels"][:] = labels
            sp["patch_labels"][:] = labels[:, ::SIDE // GRID, ::SIDE // GRID]
        sp["rgb"][:] = 0
        sp["image_index"][:] = np.arange(N_CROPS) // 5

    assert info.patch_size * GRID == SIDE
    return fake_cache(out, dim=info.embed_dim, patch=info.patch_size, num_classes=K,
                      train=SplitSpec(N_CROPS, GRID, chunk=4), labelled=labelled, fill=fill,
                      fingerprint="synthetic-cache-0", backbone="vit_tiny_random", seed=SEED,
                      weights=None, weights_fingerprint=fp)


def _mine(out, store, name="ppap", plans=2, fingerprint=None):
    """A mined-set directory (manifest + shards of `plans` batch plans) via pipeline.mining.shards."""
    mine_dir = out / "mine" / name
    check_or_write_manifest(mine_dir / "manifest.json", {
        "features_fingerprint": fingerprint or store.fingerprint, "criterion": "ppap",
        "plans": plans,
    }, what="mined-set directory")
    atomic_write_json(mine_dir / "config.json", {"epochs": plans, "batch_size": B, "seed": SEED})
    # thresholds from the similarity distribution of this random backbone
    F_all = store.mining_features(np.arange(N_CROPS))
    s = F_all @ F_all.T
    params = MineParams(phi0=float(np.quantile(s, 0.9)), psi0=float(np.quantile(s, 0.6)),
                        prop_iters=2, sigma_pos=3.0, sigma_amb=3.0)
    for e in range(plans):
        for b, images in enumerate(batch_plan(SEED, e, N_CROPS, B)):
            F = store.mining_features(images)
            anchors = anchor_rows(SEED, e, b, len(images), GRID * GRID, 0.25)
            mb = mine_batch(F, anchors, "ppap", params, backend="torch", keep_sets=False)
            shards.write_shard(shards.shard_path(mine_dir, e, b), mb, e, b, images, "ppap")
    return mine_dir


@pytest.fixture(scope="module")
def base(fake_cache, tmp_path_factory):
    out = tmp_path_factory.mktemp("train_cache")
    store = _make_cache(fake_cache, out)
    _mine(out, store)
    return out


@pytest.fixture
def out(base, tmp_path):
    dst = tmp_path / "run"
    shutil.copytree(base, dst)
    return dst


def cfg_for(out, **kw):
    base = dict(out=str(out), mined="ppap", epochs=3, tau=0.5, lr=3e-3, ckpt_every=2, seed=7)
    return TrainConfig(**{**base, **kw})


def _ckpt(out, name):
    return torch.load(out / "train" / name / "last.pt", map_location="cpu", weights_only=False)


def _assert_same_state(a, b, path=""):
    if isinstance(a, torch.Tensor):
        assert isinstance(b, torch.Tensor) and torch.equal(a, b), path
    elif isinstance(a, dict):
        assert a.keys() == b.keys(), path
        for k in a:
            _assert_same_state(a[k], b[k], f"{path}.{k}")
    elif isinstance(a, (list, tuple)):
        assert len(a) == len(b), path
        for i, (x, y) in enumerate(zip(a, b)):
            _assert_same_state(x, y, f"{path}[{i}]")
    else:
        assert a == b, path


def _metrics(out, name):
    text = (out / "train" / name / "metrics.jsonl").read_text()
    return [json.loads(line) for line in text.splitlines()]


def _strip_times(rows):
    return [{k: v for k, v in r.items() if k not in ("time", "elapsed")} for r in rows]


def test_train_writes_run_and_checkpoint(out):
    cfg = cfg_for(out, name="full")
    summary = train.run(cfg)
    run_dir = out / "train" / "full"
    n_batches = len(batch_plan(SEED, 0, N_CROPS, B))
    assert summary["steps"] == 3 * n_batches and summary["finished"]
    assert np.isfinite(summary["final_loss"])
    assert json.loads((run_dir / "config.json").read_text())["lr"] == cfg.lr
    man = json.loads((run_dir / "manifest.json").read_text())["identity"]
    assert man["features_fingerprint"] == "synthetic-cache-0" and "mined_fingerprint" in man

    rows = _metrics(out, "full")
    assert [r["step"] for r in rows] == list(range(1, 3 * n_batches + 1))
    # epoch e trains on plan e % 2, batches in order
    assert [(r["epoch"], r["plan"], r["batch"]) for r in rows[:n_batches + 1]] == [
        (0, 0, b) for b in range(n_batches)] + [(1, 1, 0)]
    assert rows[-1]["plan"] == 0 and rows[-1]["epoch"] == 2
    for key in ("loss", "linear_loss", "cluster_loss", "mean_pos", "mean_neg", "time"):
        assert all(np.isfinite(r[key]) for r in rows), key
    assert all(r["mean_pos"] > 0 and r["mean_neg"] > 0 for r in rows)

    ck = _ckpt(out, "full")
    assert ck["format"] == CKPT_FORMAT and ck["finished"] and ck["step"] == 3 * n_batches
    assert (ck["epoch"], ck["batch"]) == (3, 0)
    assert ck["features_fingerprint"] == "synthetic-cache-0"
    assert ck["model"]["grid"] == [GRID, GRID] and ck["model"]["n_clusters"] == K

    branch, linear, cluster, tcfg = load_trained(run_dir / "last.pt")
    assert tcfg["lr"] == cfg.lr and tcfg["step"] == 3 * n_batches
    model, _, _ = load_backbone("vit_tiny_random", seed=SEED)
    # the block trained, the norm stayed frozen
    assert not torch.equal(branch.block.mlp.fc1.weight, model.blocks[-1].mlp.fc1.weight)
    assert torch.equal(branch.norm.weight, model.norm.weight)
    tokens = FeatureStore(out).split("train")["tokens"][:2]
    tokens = torch.from_numpy(np.asarray(tokens, np.float32))
    with torch.no_grad():
        code = branch.encode(tokens)
        assert linear.predict_logits(code, (SIDE, SIDE)).shape == (2, K, SIDE, SIDE)
        assert cluster.scores(code).shape == (2, K, GRID, GRID)

    # a finished run reruns as a no-op
    again = train.run(cfg)
    assert again["steps"] == summary["steps"] and again["steps_this_run"] == 0
    assert again["final_loss"] == summary["final_loss"]


def test_resume_after_max_steps_and_after_a_crash_equals_one_run(out, monkeypatch):
    train.run(cfg_for(out, name="one"))

    # stopped by max_steps, then continued
    part = train.run(cfg_for(out, name="two", max_steps=4))
    assert part["steps"] == 4 and not part["finished"]
    train.run(cfg_for(out, name="two"))

    # killed (an exception) after step 5; the last checkpoint is at step 4 (ckpt_every=2)
    real_step = train.train_step
    calls = {"n": 0}

    def dying_step(*args, **kwargs):
        calls["n"] += 1
        if calls["n"] == 6:
            raise RuntimeError("simulated kill")
        return real_step(*args, **kwargs)

    monkeypatch.setattr(train, "train_step", dying_step)
    with pytest.raises(RuntimeError, match="simulated kill"):
        train.run(cfg_for(out, name="three"))
    assert _ckpt(out, "three")["step"] == 4
    assert len(_metrics(out, "three")) == 5
    monkeypatch.setattr(train, "train_step", real_step)
    train.run(cfg_for(out, name="three"))

    ref = _ckpt(out, "one")
    for name in ("two", "three"):
        ck = _ckpt(out, name)
        for key in ("branch", "linear_probe", "cluster_probe", "opt_net", "opt_linear",
                    "opt_cluster", "step", "epoch", "batch", "finished"):
            _assert_same_state(ck[key], ref[key], f"{name}:{key}")
        # the metrics log is the uninterrupted one, with no duplicated steps
        assert _strip_times(_metrics(out, name)) == _strip_times(_metrics(out, "one"))


def test_rerun_with_other_settings_is_refused(out):
    train.run(cfg_for(out, name="r", max_steps=1))
    with pytest.raises(ManifestMismatch, match="lr"):
        train.run(cfg_for(out, name="r", lr=1e-2))
    # settings that do not change the weights may differ
    train.run(cfg_for(out, name="r", max_steps=2, ckpt_every=5, anchor_chunk=3))


def test_refuses_shards_mined_from_another_cache(out):
    store = FeatureStore(out)
    _mine(out, store, name="foreign", plans=1, fingerprint="some-other-cache")
    with pytest.raises(ValueError, match="fingerprint"):
        train.run(cfg_for(out, mined="foreign"))
    with pytest.raises(ValueError, match="no mined sets named 'absent'"):
        train.run(cfg_for(out, mined="absent"))


def test_refuses_unfinished_mining(out):
    mine_dir = out / "mine" / "ppap"
    shards.done_path(shards.shard_path(mine_dir, 1, 2)).unlink()  # last batch of plan 1
    with pytest.raises(ValueError, match="plan 1 has 2 of 3 batches"):
        train.run(cfg_for(out, name="x"))
    shards.done_path(shards.shard_path(mine_dir, 1, 0)).unlink()
    shards.done_path(shards.shard_path(mine_dir, 1, 1)).unlink()
    with pytest.raises(ValueError, match="1 of 2 batch plans"):
        train.run(cfg_for(out, name="x"))


def test_refuses_a_backbone_that_does_not_reproduce_the_cache(out):
    root = zarr.open_group(str(out / STORE_NAME), mode="r+")
    good = dict(root.attrs["manifest"])
    # the same architecture with other weights (as if the cache had been made with seed 1)
    root.attrs["manifest"] = {**good, "seed": 1, "weights_fingerprint": "random:1"}
    with pytest.raises(ValueError, match="do not reproduce"):
        train.run(cfg_for(out, name="bad"))
    # weights that load under another fingerprint are refused before any comparison
    root.attrs["manifest"] = {**good, "weights_fingerprint": "random:5"}
    with pytest.raises(ValueError, match="random:5"):
        train.run(cfg_for(out, name="bad"))
    # corrupted cached features of the checked crop
    root.attrs["manifest"] = good
    root["train"]["feats"][0] = -np.asarray(root["train"]["feats"][0])
    with pytest.raises(ValueError, match="do not reproduce"):
        train.run(cfg_for(out, name="bad"))
    assert not (out / "train" / "bad" / "manifest.json").exists()


def test_loss_chunking_does_not_change_training(out):
    train.run(cfg_for(out, name="c1", max_steps=3, anchor_chunk=1024))
    train.run(cfg_for(out, name="c2", max_steps=3, anchor_chunk=5))
    a, b = _metrics(out, "c1"), _metrics(out, "c2")
    for ra, rb in zip(a, b):
        assert rb["loss"] == pytest.approx(ra["loss"], rel=1e-5)


def test_unlabelled_cache_trains_without_linear_probe(fake_cache, tmp_path):
    store = _make_cache(fake_cache, tmp_path, labelled=False)
    _mine(tmp_path, store, plans=1)
    summary = train.run(cfg_for(tmp_path, name="u", epochs=1, n_clusters=5))
    assert summary["finished"]
    rows = _metrics(tmp_path, "u")
    assert all(r["linear_loss"] is None and np.isfinite(r["cluster_loss"]) for r in rows)
    branch, linear, cluster, _ = load_trained(tmp_path / "train" / "u" / "last.pt")
    assert linear is None and cluster.n_clusters == 5


def test_load_trained_rejects_missing_and_foreign_files(tmp_path):
    with pytest.raises(ValueError, match="no checkpoint"):
        load_trained(tmp_path / "absent.pt")
    (tmp_path / "junk.pt").write_bytes(b"not a checkpoint")
    with pytest.raises(ValueError, match="not a readable checkpoint"):
        load_trained(tmp_path / "junk.pt")
    torch.save({"format": "other"}, tmp_path / "other.pt")
    with pytest.raises(ValueError, match="format='other'"):
        load_trained(tmp_path / "other.pt")
