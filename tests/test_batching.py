"""Batch plans and anchor choice: coverage, disjointness, stability, sizes."""

import math

import numpy as np
import pytest

from pipeline.mining.batching import (
    anchor_rows,
    batch_plan,
    n_anchors_per_image,
    sample_patches,
)

PLAN_CASES = [(1, 1), (7, 7), (10, 3), (64, 64), (100, 64), (129, 64), (1835, 64), (500, 1),
              (1000, 333)]


@pytest.mark.parametrize("n,bs", PLAN_CASES)
@pytest.mark.parametrize("epoch", [0, 1, 4])
def test_plan_covers_every_item_once_in_even_batches(n, bs, epoch):
    plan = batch_plan(seed=3, epoch=epoch, n_items=n, batch_size=bs)
    assert len(plan) == math.ceil(n / bs)
    sizes = [len(b) for b in plan]
    assert max(sizes) <= bs and max(sizes) - min(sizes) <= 1
    allitems = np.concatenate(plan)
    assert allitems.dtype == np.int64
    assert len(allitems) == n  # with the sort below: every item exactly once, batches disjoint
    np.testing.assert_array_equal(np.sort(allitems), np.arange(n))


def test_plan_is_stable_and_varies_with_epoch_and_seed():
    a = batch_plan(0, 0, 200, 16)
    b = batch_plan(0, 0, 200, 16)
    assert all(np.array_equal(x, y) for x, y in zip(a, b))
    perm = lambda s, e: np.concatenate(batch_plan(s, e, 200, 16))  # noqa: E731
    perms = {tuple(perm(s, e)) for s in range(3) for e in range(4)}
    assert len(perms) == 12  # every (seed, epoch) its own permutation
    # batch-mates change between epochs
    first = set(batch_plan(0, 0, 200, 16)[0].tolist())
    assert first != set(batch_plan(0, 1, 200, 16)[0].tolist())


def test_plan_rejects_batch_larger_than_items():
    with pytest.raises(ValueError, match=r"batch_size=65.*n_items=64"):
        batch_plan(0, 0, 64, 65)
    for bad in (dict(n_items=0, batch_size=1), dict(n_items=5, batch_size=0),
                dict(n_items=5.0, batch_size=2)):
        with pytest.raises(ValueError):
            batch_plan(0, 0, **bad)
    with pytest.raises(ValueError, match="seed"):
        batch_plan(-1, 0, 10, 2)


@pytest.mark.parametrize("hw,frac,k", [(784, 1 / 16, 49), (196, 1 / 4, 49), (256, 1 / 16, 16),
                                       (8, 1 / 16, 1), (40, 1 / 16, 3), (10, 1.0, 10),
                                       (3, 0.01, 1)])
def test_anchor_count_per_image(hw, frac, k):
    assert n_anchors_per_image(hw, frac) == k


@pytest.mark.parametrize("B,hw,frac", [(4, 784, 1 / 16), (16, 256, 1 / 16), (3, 10, 0.5),
                                       (5, 7, 1.0), (2, 9, 0.01)])
def test_anchor_rows_shape_and_distinctness(B, hw, frac):
    rows = anchor_rows(seed=1, epoch=2, batch=3, n_images=B, patches_per_image=hw, fraction=frac)
    k = n_anchors_per_image(hw, frac)
    assert rows.dtype == np.int64 and rows.ndim == 1
    assert np.all(np.diff(rows) > 0)  # sorted and distinct
    assert rows.min() >= 0 and rows.max() < B * hw
    np.testing.assert_array_equal(np.bincount(rows // hw, minlength=B), np.full(B, k))
    if frac == 1.0:
        np.testing.assert_array_equal(rows, np.arange(B * hw))


def test_anchor_rows_stable_and_varied():
    args = dict(n_images=8, patches_per_image=256, fraction=1 / 16)
    a = anchor_rows(0, 0, 0, **args)
    np.testing.assert_array_equal(a, anchor_rows(0, 0, 0, **args))
    others = [anchor_rows(1, 0, 0, **args), anchor_rows(0, 1, 0, **args), anchor_rows(0, 0, 1, **args)]
    for o in others:
        assert not np.array_equal(a, o)
    # patches are spread over the image, not a fixed pattern: all positions get used over batches
    used = np.concatenate([anchor_rows(0, 0, b, **args) % 256 for b in range(40)])
    assert len(np.unique(used)) > 240


def test_anchor_rows_rejects_bad_fraction():
    for bad in (0.0, -0.1, 1.5, float("nan")):
        with pytest.raises(ValueError, match="fraction"):
            anchor_rows(0, 0, 0, 2, 16, bad)


def test_sample_patches_one_per_image_and_distinct():
    imgs, pats = sample_patches(seed=5, n_images=100, patches_per_image=49, n=60)
    assert len(np.unique(imgs)) == 60 and pats.min() >= 0 and pats.max() < 49
    i2, p2 = sample_patches(seed=5, n_images=100, patches_per_image=49, n=60)
    np.testing.assert_array_equal(imgs, i2)
    np.testing.assert_array_equal(pats, p2)
    # more samples than images: every image used floor/ceil(n / n_images) times, pairs distinct
    imgs, pats = sample_patches(seed=5, n_images=30, patches_per_image=10, n=75)
    uses = np.bincount(imgs, minlength=30)
    assert set(uses.tolist()) <= {2, 3}
    assert len(set(zip(imgs.tolist(), pats.tolist()))) == 75
    with pytest.raises(ValueError, match="distinct"):
        sample_patches(0, 3, 4, 13)
