"""Metrics against hand-computed values and brute-force matching; dense CRF behaviour."""

from __future__ import annotations

import itertools

import numpy as np
import pytest

from pipeline.evaluation import crf, metrics

# ----------------------------------------------------------------------------- metrics


def test_confusion_counts_valid_pixels_only():
    gt = np.array([[0, 0, 1], [1, 2, -1], [255, 2, 0]])
    pred = np.array([[0, 1, 1], [1, 0, 2], [1, 2, 0]])
    conf = metrics.confusion(gt, pred, 3)
    naive = np.zeros((3, 3), np.int64)
    for g, p in zip(gt.ravel(), pred.ravel()):
        if 0 <= g < 3:
            naive[g, p] += 1
    np.testing.assert_array_equal(conf, naive)
    assert conf.sum() == 7  # -1 and 255 dropped


def test_linear_scores_hand_computed():
    gt = np.array([0, 0, 1, 1, 2, -1])
    pred = np.array([0, 1, 1, 1, 0, 2])
    s = metrics.linear_scores(metrics.confusion(gt, pred, 3))
    # TP = [1, 2, 0]; FP = [1, 1, 0]; FN = [1, 0, 1]
    assert s.accuracy == pytest.approx(60.0)
    assert s.per_class_iou == pytest.approx([100 / 3, 200 / 3, 0.0])
    assert s.miou == pytest.approx(100 / 3)


def test_undefined_iou_is_left_out_of_miou():
    gt = np.array([0, 0, 1, 1])
    pred = np.array([0, 0, 1, 0])
    s = metrics.linear_scores(metrics.confusion(gt, pred, 3))
    assert s.per_class_iou[2] is None
    assert s.per_class_iou[:2] == pytest.approx([200 / 3, 50.0])
    assert s.miou == pytest.approx((200 / 3 + 50) / 2)
    assert s.accuracy == pytest.approx(75.0)


def test_cluster_scores_permutation_is_perfect():
    rng = np.random.default_rng(0)
    gt = rng.integers(0, 4, size=(5, 7))
    perm = np.array([2, 0, 3, 1])
    s, mapping = metrics.cluster_scores(metrics.confusion(gt, perm[gt], 4))
    assert s.accuracy == 100.0 and s.miou == 100.0
    np.testing.assert_array_equal(mapping[perm], np.arange(4))


def test_cluster_scores_extra_cluster_counts_as_wrong():
    gt = np.array([0, 0, 0, 1, 1, 1])
    pred = np.array([0, 0, 2, 1, 1, 1])  # C = 3 > K = 2; cluster 2 stays unmatched
    s, mapping = metrics.cluster_scores(metrics.confusion(gt, pred, 2, 3))
    assert list(mapping) == [0, 1, -1]
    assert s.accuracy == pytest.approx(500 / 6)
    assert s.per_class_iou == pytest.approx([200 / 3, 100.0])
    assert s.miou == pytest.approx((200 / 3 + 100) / 2)


def _oracle(gt: np.ndarray, pred: np.ndarray, mapping: dict[int, int], k: int):
    """Pixel-level metrics after relabelling clusters (unmatched -> wrong for every class)."""
    valid = (gt >= 0) & (gt < k)
    g = gt[valid]
    p = np.array([mapping.get(int(c), -7) for c in pred[valid]])
    ious = []
    for c in range(k):
        inter = np.sum((g == c) & (p == c))
        union = np.sum((g == c) | (p == c))
        ious.append(inter / union if union else np.nan)
    ious = np.array(ious)
    return 100 * np.mean(g == p), 100 * np.nanmean(ious), ious


@pytest.mark.parametrize("k,c", [(3, 3), (4, 4), (3, 5), (4, 6), (5, 3)])
@pytest.mark.parametrize("seed", [0, 1, 2])
def test_hungarian_equals_brute_force(k, c, seed):
    rng = np.random.default_rng(seed)
    gt = rng.integers(-1, k, size=400)
    # predictions correlated with gt so the matching matters
    pred = np.where(rng.random(400) < 0.6, (gt * 7 + 3) % c, rng.integers(0, c, size=400))
    conf = metrics.confusion(gt, pred, k, c)
    s, mapping = metrics.cluster_scores(conf)
    # brute force over every one-to-one assignment between clusters and classes
    if k <= c:
        best = max(sum(conf[cls, cl] for cls, cl in enumerate(cls_to_cl))
                   for cls_to_cl in itertools.permutations(range(c), k))
    else:
        best = max(sum(conf[cls, cl] for cl, cls in enumerate(cl_to_cls))
                   for cl_to_cls in itertools.permutations(range(k), c))
    assert s.accuracy == pytest.approx(100 * best / conf.sum())
    acc, miou, ious = _oracle(gt, pred, {i: int(v) for i, v in enumerate(mapping) if v >= 0}, k)
    assert s.accuracy == pytest.approx(acc)
    assert s.miou == pytest.approx(miou)
    np.testing.assert_allclose([np.nan if v is None else v for v in s.per_class_iou], 100 * ious)


def test_confusion_accumulates_like_one_pass():
    rng = np.random.default_rng(3)
    gt = rng.integers(-1, 5, size=(6, 8, 8))
    pred = rng.integers(0, 7, size=(6, 8, 8))
    acc = metrics.Confusion(5, 7)
    for i in range(6):
        acc.update(gt[i], pred[i])
    np.testing.assert_array_equal(acc.matrix, metrics.confusion(gt, pred, 5, 7))


def test_bad_predictions_are_refused():
    with pytest.raises(ValueError, match="num_pred"):
        metrics.confusion(np.array([0, 1]), np.array([0, 3]), 2)
    with pytest.raises(ValueError, match="shape"):
        metrics.confusion(np.zeros((2, 2)), np.zeros((3, 3)), 2)
    with pytest.raises(ValueError, match="square"):
        metrics.linear_scores(np.zeros((2, 3)))


# ----------------------------------------------------------------------------- CRF


def _two_region_case(seed: int, h: int = 48, w: int = 64, k: int = 4):
    rng = np.random.default_rng(seed)
    gt = np.zeros((h, w), np.int64)
    gt[:, w // 2 - 5:] = 1
    gt[h // 2:, : w // 3] = 1  # a non-straight boundary
    colours = np.array([[220, 40, 40], [40, 60, 210]])
    img = np.clip(colours[gt] + rng.normal(0, 6, (h, w, 3)), 0, 255).astype(np.uint8)
    logits = rng.normal(0, 1.0, (k, h, w)).astype(np.float32)
    logits[0] += 0.8 * (gt == 0)
    logits[1] += 0.8 * (gt == 1)
    return img, crf.softmax(logits), gt


def test_crf_cleans_noise():
    img, probs, gt = _two_region_case(0)
    before = np.mean(probs.argmax(0) == gt)
    q = crf.dense_crf(img, probs)
    assert q.shape == probs.shape and q.dtype == np.float32
    np.testing.assert_allclose(q.sum(0), 1.0, atol=1e-4)
    after = np.mean(q.argmax(0) == gt)
    assert before < 0.6
    assert after > 0.97


def test_crf_handles_zero_probabilities_and_checks_shapes():
    img, probs, gt = _two_region_case(1, k=2)
    hard = np.stack([gt == 0, gt == 1]).astype(np.float32)  # exact zeros: clipped, no inf
    q = crf.dense_crf(img, hard)
    assert np.isfinite(q).all()
    assert np.mean(q.argmax(0) == gt) > 0.99
    with pytest.raises(ValueError, match="upsample"):
        crf.dense_crf(img, probs[:, :10])
    with pytest.raises(ValueError, match="uint8"):
        crf.dense_crf(img.astype(np.float32), probs)


def test_cluster_probs_is_softmax_of_twice_cosine():
    cos = np.array([[0.5, -1.0], [0.1, 1.0], [-0.2, 0.0]], np.float32)
    p = crf.cluster_probs(cos)
    e = np.exp(2 * cos.astype(np.float64))
    np.testing.assert_allclose(p, e / e.sum(0), rtol=1e-6)


def test_parallel_equals_sequential():
    cases = [_two_region_case(s) for s in range(4)]
    imgs = [c[0] for c in cases]
    pairs = [[c[1], crf.softmax(c[1][::-1].copy())] for c in cases]  # two maps per image
    seq = crf.refine_argmax(imgs, pairs, workers=1, progress=False)
    par = crf.refine_argmax(imgs, pairs, workers=2, progress=False)
    assert len(seq) == 4 and all(len(r) == 2 for r in seq)
    for a, b in zip(seq, par):
        for x, y in zip(a, b):
            np.testing.assert_array_equal(x, y)
    single = crf.refine_argmax(imgs, [p[0] for p in pairs], workers=1, progress=False)
    for a, b in zip(single, seq):
        np.testing.assert_array_equal(a, b[0])
