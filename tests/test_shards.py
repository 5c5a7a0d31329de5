"""Shards: write / read / recover gives back exactly the mined sets; size per anchor; layout."""

import json

import numpy as np
import pytest

from pipeline.mining.batch import mine_batch
from pipeline.mining.criteria import assign_clusters, fit_kmeans
from pipeline.mining.recover import export_batch, recover_sets
from pipeline.mining.sets import MineParams
from pipeline.mining.shards import (
    done_path,
    is_done,
    iter_shards,
    n_epochs,
    needs_sets,
    pack_float32,
    pack_uints,
    read_marker,
    read_shard,
    shard_path,
    unpack_float32,
    unpack_uints,
    write_shard,
)


def clustered_batch(seed, n_images, hw, d, k=12, spread=0.8):
    """F of a batch shaped like the pipeline's: images made of a few class regions, unit rows."""
    rng = np.random.default_rng(seed)
    centres = rng.standard_normal((k, d))
    centres /= np.linalg.norm(centres, axis=1, keepdims=True)
    side = int(np.sqrt(hw))
    yy, xx = np.divmod(np.arange(hw), side)
    rows = []
    for _ in range(n_images):
        cls = rng.choice(k, 3, replace=False)
        cut = rng.integers(1, side, 2)
        region = (yy >= cut[0]).astype(int) + (xx >= cut[1]).astype(int) * (yy >= cut[0])
        img_shift = 0.3 * rng.standard_normal(d) / np.sqrt(d)
        rows.append(centres[cls[region]] + img_shift + spread * rng.standard_normal((hw, d)) / np.sqrt(d))
    F = np.concatenate(rows).astype(np.float32)
    return np.ascontiguousarray(F / np.linalg.norm(F, axis=1, keepdims=True))


def sets_equal(a, b):
    return all(np.array_equal(getattr(a, f), getattr(b, f)) for f in
               ("pos_indptr", "pos_indices", "amb_indptr", "amb_indices"))


@pytest.fixture(scope="module")
def batch():
    B, hw = 8, 64
    F = clustered_batch(0, B, hw, 48)
    anchors = np.arange(0, B * hw, 3, dtype=np.int64)
    images = np.array([5, 1, 9, 3, 0, 7, 2, 4], np.int64)
    return F, anchors, images


@pytest.mark.parametrize("criterion,params", [
    ("ppap", MineParams(0.55, 0.15, 2, 3.0, 4.0)),
    ("ppap", MineParams(0.6, 0.45, 3, 0.3, 0.3)),  # Ψ overtakes Φ
    ("ppap", MineParams(0.55, 0.15, 0, 3.0, 4.0)),
    ("p0", MineParams(0.55, 0.15, 2, 3.0, 4.0)),
])
@pytest.mark.parametrize("backend", ["torch", "faiss"])
def test_roundtrip_recovers_exactly(tmp_path, batch, criterion, params, backend):
    F, anchors, images = batch
    mb = mine_batch(F, anchors, criterion, params, backend=backend)
    path = shard_path(tmp_path, 2, 7)
    assert path == tmp_path / "shards" / "e002" / "b00007.npz"
    stats = write_shard(path, mb, 2, 7, images, criterion, meta={"config_hash": "abc"})
    assert is_done(path) and read_marker(path) == json.loads(json.dumps(stats))
    sh = read_shard(path)
    assert (sh.epoch, sh.batch, sh.criterion, sh.meta) == (2, 7, criterion, {"config_hash": "abc"})
    np.testing.assert_array_equal(sh.images, images)
    np.testing.assert_array_equal(sh.anchors, anchors)
    np.testing.assert_array_equal(sh.proxy, mb.proxy)  # bit-exact float32
    np.testing.assert_array_equal(sh.phi, mb.phi)
    np.testing.assert_array_equal(sh.psi, mb.psi)
    mined = mb.sets()
    assert sets_equal(recover_sets(sh, F), mined)
    assert sets_equal(recover_sets(sh, F, dtype=np.float64), mined)  # other arithmetic, same sets
    assert sets_equal(recover_sets(sh, F, mem_budget_mb=0.05), mined)  # many recovery blocks
    # a shard written from a lean mining run (no sets kept) recovers the same sets
    lean = mine_batch(F, anchors, criterion, params, backend=backend, keep_sets=False)
    write_shard(path, lean, 2, 7, images, criterion)
    assert sets_equal(recover_sets(read_shard(path), F), mined)


def test_band_pairs_take_the_stored_class(tmp_path, batch):
    """Recovery classifies band pairs by the miner's stored class, not by recomputed s."""
    F, anchors, images = batch
    # Φ inside the within-cluster mode and a wide band, so that every class occurs in the band
    mb = mine_batch(F, anchors, "ppap", MineParams(0.75, 0.3, 2, 3.0, 4.0), backend="torch",
                    band=1e-2)
    p = shard_path(tmp_path, 0, 0)
    write_shard(p, mb, 0, 0, images, "ppap")
    sh = read_shard(p)
    assert set(np.unique(sh.band_class).tolist()) == {0, 1, 2}
    rows = np.repeat(np.arange(len(anchors)), np.diff(sh.band_indptr))
    # move one pair of each class to the next class (neg -> amb -> pos -> neg)
    picks = [int(np.flatnonzero(sh.band_class == k)[0]) for k in (0, 1, 2)]
    for k in picks:
        sh.band_class[k] = (sh.band_class[k] + 1) % 3
    got = recover_sets(sh, F)
    for k in picks:
        i, j, cls = rows[k], sh.band_indices[k], sh.band_class[k]
        assert (j in got.pos(i)) == (cls == 2) and (j in got.amb(i)) == (cls == 1)
    # everything else is unchanged
    n_changed = sum(np.setxor1d(got.pos(i), mb.sets().pos(i)).size
                    + np.setxor1d(got.amb(i), mb.sets().amb(i)).size for i in range(len(anchors)))
    assert n_changed == 4  # neg->amb (+1), amb->pos (2), pos->neg (1)


@pytest.mark.parametrize("backend", ["torch", "faiss"])
def test_hp_and_kmeans_shards(tmp_path, batch, backend):
    F, anchors, images = batch
    pool = clustered_batch(5, 4, 64, 48)[::2].copy()
    assert needs_sets("hp") and not any(needs_sets(c) for c in ("ppap", "p0", "kmeans"))
    mb = mine_batch(F, anchors, "hp", MineParams(), backend=backend, hp_pool=pool)
    p = shard_path(tmp_path, 0, 0)
    write_shard(p, mb, 0, 0, images, "hp")
    assert sets_equal(recover_sets(read_shard(p), F), mb.sets())
    cl = assign_clusters(F, fit_kmeans(F, 12, seed=0))
    mk = mine_batch(F, anchors, "kmeans", MineParams(), cluster_of=cl)
    p = shard_path(tmp_path, 0, 1)
    st = write_shard(p, mk, 0, 1, images, "kmeans")
    sh = read_shard(p)
    np.testing.assert_array_equal(sh.cluster_of, cl)
    assert sets_equal(recover_sets(sh, F), mk.sets())
    assert st["bytes_per_anchor"] < 4096


def test_bytes_per_anchor_small_and_independent_of_the_ambiguous_zone(tmp_path):
    # same batch, ambiguous zone from almost nothing to almost everything
    F = clustered_batch(1, 16, 196, 384)
    anchors = np.arange(0, len(F), 16, dtype=np.int64)
    sizes = {}
    for psi0 in (0.5, 0.2, -0.5):
        mb = mine_batch(F, anchors, "ppap", MineParams(0.55, psi0, 2, 3.0, 3.0), backend="torch",
                        keep_sets=False)
        st = write_shard(shard_path(tmp_path, 0, 0), mb, 0, 0, np.arange(16), "ppap")
        sizes[psi0] = (st["bytes_per_anchor"], st["mean_amb"])
    assert sizes[-0.5][1] > 0.9 * len(F) > 100 * sizes[0.5][1]  # zone from small to nearly all
    for per_anchor, _ in sizes.values():
        assert per_anchor < 4096
    assert max(s for s, _ in sizes.values()) < 1.3 * min(s for s, _ in sizes.values())


@pytest.mark.slow
def test_bytes_per_anchor_coco_s8_shape(tmp_path):
    """COCO-Stuff S/8 preset shape: N = 64*28*28 = 50,176 patches, 3,136 anchors, D = 384, T = 2."""
    from pipeline.mining.batching import anchor_rows

    F = clustered_batch(2, 64, 784, 384, k=27)
    anchors = anchor_rows(0, 0, 0, 64, 784, 1 / 16)
    assert len(anchors) == 3136
    mb = mine_batch(F, anchors, "ppap", MineParams(0.55, 0.20, 2, 3.0, 3.0), backend="torch",
                    keep_sets=False)
    st = write_shard(shard_path(tmp_path, 0, 0), mb, 0, 0, np.arange(64), "ppap")
    assert st["bytes_per_anchor"] <= 4096, st


def test_layout_markers_and_listing(tmp_path, batch):
    F, anchors, images = batch
    mb = mine_batch(F, anchors, "p0", MineParams(), backend="torch", keep_sets=False)
    for e, b in [(0, 1), (0, 0), (0, 2), (1, 0), (3, 0)]:
        write_shard(shard_path(tmp_path, e, b), mb, e, b, images, "p0")
    # an unfinished shard (no marker) is not listed
    done_path(shard_path(tmp_path, 0, 2)).unlink()
    assert iter_shards(tmp_path, 0) == [shard_path(tmp_path, 0, 0), shard_path(tmp_path, 0, 1)]
    assert iter_shards(tmp_path, 2) == []
    assert n_epochs(tmp_path) == 2  # e002 missing: epochs are counted from e000 up to a gap
    assert n_epochs(tmp_path / "nothing") == 0
    # no temporary files left behind
    assert not [p for p in (tmp_path / "shards").rglob("*") if p.name.endswith(".tmp")]


def test_bad_shards_and_inputs(tmp_path, batch):
    F, anchors, images = batch
    mb = mine_batch(F, anchors, "ppap", MineParams(), backend="torch")
    p = shard_path(tmp_path, 0, 0)
    with pytest.raises(ValueError, match="criterion"):
        write_shard(p, mb, 0, 0, images, "p0")
    with pytest.raises(ValueError, match="images"):
        write_shard(p, mb, 0, 0, images[:3], "ppap")
    write_shard(p, mb, 0, 0, images, "ppap")
    sh = read_shard(p)
    with pytest.raises(ValueError, match="float32 features of shape"):
        recover_sets(sh, F[:-1])
    with pytest.raises(ValueError, match="float32"):
        recover_sets(sh, F.astype(np.float64))
    p.write_bytes(b"not a shard")
    with pytest.raises(ValueError, match="rerun"):
        read_shard(p)
    lean_hp = mine_batch(F, anchors, "hp", MineParams(), hp_pool=F[:10].copy(), keep_sets=False)
    with pytest.raises(ValueError, match="keep_sets=True"):
        write_shard(p, lean_hp, 0, 0, images, "hp")


def test_export_batch(tmp_path, batch):
    F, anchors, images = batch
    mb = mine_batch(F, anchors, "ppap", MineParams(), backend="faiss")
    p = shard_path(tmp_path, 0, 0)
    write_shard(p, mb, 0, 0, images, "ppap")
    labels = np.random.default_rng(0).integers(-1, 5, (8, 8, 8)).astype(np.int16)
    ex = export_batch(F, read_shard(p), patch_labels=labels)
    assert ex["features"].dtype == np.float32 and np.array_equal(ex["features"], F)
    for k in ("anchors", "pos_indptr", "pos_indices", "amb_indptr", "amb_indices"):
        assert ex[k].dtype == np.int64
    np.testing.assert_array_equal(ex["pos_indices"], mb.pos_indices)
    np.testing.assert_array_equal(ex["amb_indptr"], mb.amb_indptr)
    np.testing.assert_array_equal(ex["proxy"], mb.proxy)
    assert ex["phi"].shape == ex["psi"].shape == (len(anchors),)
    np.testing.assert_array_equal(ex["patch_label"], labels.reshape(-1))
    np.testing.assert_array_equal(ex["image_index"], np.repeat(images, 64))
    ex2 = export_batch(F, mb, image_index=np.arange(len(F)))
    assert "patch_label" not in ex2 and np.array_equal(ex2["image_index"], np.arange(len(F)))
    np.testing.assert_array_equal(ex2["pos_indices"], ex["pos_indices"])
    with pytest.raises(ValueError, match="patch_labels"):
        export_batch(F, mb, patch_labels=np.zeros(7, int))


def test_encodings_roundtrip():
    rng = np.random.default_rng(0)
    for x in (np.zeros(0, np.int64), np.array([0]), rng.integers(0, 200, 1000),
              rng.integers(0, 70000, 100), rng.integers(0, 2**40, 50)):
        np.testing.assert_array_equal(unpack_uints(pack_uints(x)), x)
    small = pack_uints(rng.integers(0, 30, 10000))
    assert small.nbytes < 7000  # about 5 bits per small delta
    for x in (rng.standard_normal((30, 7)).astype(np.float32), np.zeros((0, 4), np.float32),
              np.array([np.nan, -0.0, np.inf], np.float32)):
        y = unpack_float32(pack_float32(x))
        assert y.shape == x.shape and y.tobytes() == x.tobytes()
    with pytest.raises(ValueError):
        pack_uints(np.array([-1]))
