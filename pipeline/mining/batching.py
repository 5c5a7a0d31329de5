"""Which crops form batch k of epoch e, and which patches of a batch are anchors.

Both are pure functions of their arguments (seed, epoch, sizes): no global RNG, no state, so a
mined batch can be recomputed or audited from its numbers alone.

API
---
batch_plan(seed, epoch, n_items, batch_size) -> list[np.ndarray]
    One seeded permutation of range(n_items) per epoch, cut into ceil(n_items / batch_size)
    batches as evenly as possible (sizes differ by at most one, all <= batch_size).
    Each batch is an int64 array in permutation order (not sorted).
n_anchors_per_image(patches_per_image, fraction) -> int
    max(1, round(fraction * patches_per_image)), rounding halves up.
anchor_rows(seed, epoch, batch, n_images, patches_per_image, fraction) -> np.ndarray[int64]
    Sorted rows b * patches_per_image + p of the batch's feature matrix F: for every image b
    exactly n_anchors_per_image(...) distinct patches p (all of them for fraction 1.0).
sample_patches(seed, n_images, patches_per_image, n, tag=...) -> (images, patches)
    n distinct (image, patch) pairs, one patch per image while n <= n_images (HP pool,
    k-means training sample).
n_holdout(n_sources, fraction) -> int
    floor(fraction * n_sources) source images held out (0 when fewer than 1 would be).
holdout_split(seed, image_index, valid, fraction) -> (train_crops, holdout_crops)
    Whole source images held out of mining and training, for selection: the crops of
    n_holdout(...) seeded source images go to the holdout, the other valid crops to training.
"""

from __future__ import annotations

import math

import numpy as np

# Fixed stream tags so the batch plan, the anchors and the samples never share random bits.
_TAG_PLAN = 0x50504150  # "PPAP"
_TAG_ANCHORS = 0x414E4348  # "ANCH"
TAG_HP_POOL = 0x48500000  # "HP"
TAG_KMEANS = 0x4B4D0000  # "KM"
TAG_HOLDOUT = 0x484F4C44  # "HOLD"


def _check_nonneg_int(name: str, value: int) -> int:
    if isinstance(value, (bool, np.bool_)) or not isinstance(value, (int, np.integer)):
        raise ValueError(f"{name}={value!r} must be an integer")
    if value < 0:
        raise ValueError(f"{name}={value} must be >= 0")
    return int(value)


def _check_pos_int(name: str, value: int) -> int:
    value = _check_nonneg_int(name, value)
    if value == 0:
        raise ValueError(f"{name}=0 must be a positive integer")
    return value


def batch_plan(seed: int, epoch: int, n_items: int, batch_size: int) -> list[np.ndarray]:
    """Batches of epoch `epoch`: a seeded permutation of range(n_items) split evenly."""
    seed = _check_nonneg_int("seed", seed)
    epoch = _check_nonneg_int("epoch", epoch)
    n_items = _check_pos_int("n_items", n_items)
    batch_size = _check_pos_int("batch_size", batch_size)
    if batch_size > n_items:
        raise ValueError(
            f"batch_size={batch_size} is larger than the number of items n_items={n_items}; "
            f"use --batch-size {n_items} or less (or add images)"
        )
    rng = np.random.default_rng(np.random.SeedSequence([seed, epoch, _TAG_PLAN]))
    perm = rng.permutation(n_items).astype(np.int64)
    n_batches = -(-n_items // batch_size)
    return [np.ascontiguousarray(b) for b in np.array_split(perm, n_batches)]


def n_anchors_per_image(patches_per_image: int, fraction: float) -> int:
    """max(1, round(fraction * patches_per_image)) with halves rounded up."""
    hw = _check_pos_int("patches_per_image", patches_per_image)
    fraction = float(fraction)
    if not (0.0 < fraction <= 1.0):
        raise ValueError(f"fraction={fraction!r} must lie in (0, 1]; use e.g. 1/16 or 1.0 for all")
    return min(hw, max(1, math.floor(fraction * hw + 0.5)))


def anchor_rows(
    seed: int, epoch: int, batch: int, n_images: int, patches_per_image: int, fraction: float
) -> np.ndarray:
    """Sorted anchor rows (b * hw + p) of one batch, the same count of distinct patches per image."""
    seed = _check_nonneg_int("seed", seed)
    epoch = _check_nonneg_int("epoch", epoch)
    batch = _check_nonneg_int("batch", batch)
    n_images = _check_pos_int("n_images", n_images)
    hw = _check_pos_int("patches_per_image", patches_per_image)
    k = n_anchors_per_image(hw, fraction)
    base = np.arange(n_images, dtype=np.int64)[:, None] * hw
    if k == hw:
        return (base + np.arange(hw, dtype=np.int64)[None, :]).ravel()
    rng = np.random.default_rng(np.random.SeedSequence([seed, epoch, batch, _TAG_ANCHORS]))
    # k smallest of iid uniform keys per image = k patches drawn without replacement
    keys = rng.random((n_images, hw))
    chosen = np.sort(np.argpartition(keys, k - 1, axis=1)[:, :k], axis=1).astype(np.int64)
    return (base + chosen).ravel()


def sample_patches(
    seed: int, n_images: int, patches_per_image: int, n: int, tag: int = TAG_HP_POOL
) -> tuple[np.ndarray, np.ndarray]:
    """n distinct (image, patch) pairs, images as spread as possible.

    n <= n_images: n distinct random images, one random patch each (the HP pool recipe).
    n > n_images: every image is used ceil or floor(n / n_images) times, distinct patches.
    Returns (images, patches), int64 arrays of length n in draw order.
    """
    seed = _check_nonneg_int("seed", seed)
    n_images = _check_pos_int("n_images", n_images)
    hw = _check_pos_int("patches_per_image", patches_per_image)
    n = _check_pos_int("n", n)
    if n > n_images * hw:
        raise ValueError(
            f"cannot draw n={n} distinct patches from {n_images} images x {hw} patches; "
            f"lower the pool/sample size to at most {n_images * hw}"
        )
    rng = np.random.default_rng(np.random.SeedSequence([seed, _check_nonneg_int("tag", tag)]))
    rounds = -(-n // n_images)
    images = np.concatenate([rng.permutation(n_images) for _ in range(rounds)])[:n]
    if rounds == 1:
        patches = rng.integers(0, hw, size=n)
    else:
        # round r uses the r-th entry of a per-image random order of its patches: distinct
        order = np.argsort(rng.random((n_images, hw)), axis=1)[:, :rounds]
        use = np.repeat(np.arange(rounds), n_images)[:n]
        patches = order[images, use]
    return images.astype(np.int64), patches.astype(np.int64)


def n_holdout(n_sources: int, fraction: float) -> int:
    """floor(fraction * n_sources) held-out source images; fraction in [0, 1)."""
    n_sources = _check_nonneg_int("n_sources", n_sources)
    fraction = float(fraction)
    if not (0.0 <= fraction < 1.0):
        raise ValueError(f"holdout={fraction!r} must lie in [0, 1): the fraction of training "
                         "images kept out of mining and training (0 = none)")
    n = math.floor(fraction * n_sources + 1e-9)
    return min(n, max(n_sources - 1, 0))


def holdout_split(seed: int, image_index: np.ndarray, valid: np.ndarray,
                  fraction: float) -> tuple[np.ndarray, np.ndarray]:
    """(training crops, held-out crops): sorted crop indices; whole source images held out.

    `image_index[c]` is the source image of crop c, `valid[c]` whether it was readable. The
    held-out source images are a seeded choice among the sources with a valid crop, so the split
    depends only on (seed, the cache's image_index/valid, fraction).
    """
    seed = _check_nonneg_int("seed", seed)
    image_index = np.asarray(image_index, dtype=np.int64)
    valid = np.asarray(valid).astype(bool)
    if image_index.shape != valid.shape:
        raise ValueError(f"image_index {image_index.shape} and valid {valid.shape} differ in shape")
    crops = np.flatnonzero(valid).astype(np.int64)
    sources = np.unique(image_index[crops])
    k = n_holdout(len(sources), fraction)
    if k == 0:
        return crops, np.zeros(0, np.int64)
    rng = np.random.default_rng(np.random.SeedSequence([seed, TAG_HOLDOUT]))
    held = np.sort(rng.choice(sources, size=k, replace=False))
    is_held = np.isin(image_index[crops], held)
    return crops[~is_held], crops[is_held]
