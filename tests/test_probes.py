"""Probes that measure the representation: converged linear fit, spherical k-means, rank signals."""

from __future__ import annotations

import numpy as np
import pytest
import torch

from pipeline.evaluation.probes import (
    LINEAR_MAX_ITER,
    LINEAR_TOL,
    assign,
    cluster_miou,
    code_stats,
    crossfit_linear_miou,
    fit_linear,
    spherical_kmeans,
)


def _blobs(n_per: int, k: int, d: int, spread: float, seed: int, offset: float = 0.0):
    rng = np.random.default_rng(seed)
    centres = rng.normal(size=(k, d))
    y = np.repeat(np.arange(k), n_per)
    x = centres[y] + spread * rng.normal(size=(len(y), d)) + offset
    return x.astype(np.float32), y


def test_fit_linear_converges_on_a_separable_problem():
    # a large common offset (like DINOv2's shared component) must not slow or bias the fit
    x, y = _blobs(200, 4, 16, 0.2, seed=0, offset=25.0)
    fit = fit_linear(x, y, 4)
    assert fit.converged and fit.grad_max <= LINEAR_TOL * 10, fit.info()
    assert fit.iterations < LINEAR_MAX_ITER
    logits = x @ fit.weight.T + fit.bias  # folded back to raw code
    assert (logits.argmax(1) == y).all()
    # the fit is deterministic and the recorded info is complete
    again = fit_linear(x, y, 4)
    np.testing.assert_array_equal(again.weight, fit.weight)
    assert set(fit.info()) >= {"linear_iterations", "linear_converged", "linear_l2", "linear_grad_max"}


def test_fit_linear_soft_targets_and_ignored_rows():
    x, y = _blobs(100, 3, 8, 0.3, seed=1)
    hist = np.zeros((len(y), 3), np.float32)
    hist[np.arange(len(y)), y] = 3.0
    hist[::5] = 0.0  # rows without any labelled pixel are dropped
    hard = np.where(hist.sum(1) > 0, y, -1)
    a, b = fit_linear(x, hist, 3), fit_linear(x, hard, 3)
    # one-hot counts are hard labels up to a per-row scale of the loss
    assert ((x @ a.weight.T + a.bias).argmax(1) == y).mean() == 1.0
    assert ((x @ b.weight.T + b.bias).argmax(1) == y).mean() == 1.0


def test_fit_linear_is_not_stopped_early_like_a_few_epochs_of_adam():
    """The measurement must not depend on optimiser budget: on a hard, overlapping problem the
    converged fit reaches a lower penalised loss than 5 epochs of Adam on raw features."""
    x, y = _blobs(300, 5, 32, 1.5, seed=2, offset=10.0)
    fit = fit_linear(x, y, 5)
    assert fit.converged
    xt, yt = torch.from_numpy(x), torch.from_numpy(y)
    lin = torch.nn.Linear(32, 5)
    opt = torch.optim.Adam(lin.parameters(), lr=1e-3)
    for _ in range(5):
        for s in range(0, len(x), 64):
            loss = torch.nn.functional.cross_entropy(lin(xt[s:s + 64]), yt[s:s + 64])
            opt.zero_grad()
            loss.backward()
            opt.step()
    adam_acc = (lin(xt).argmax(1) == yt).float().mean().item()
    lbfgs_acc = float(((x @ fit.weight.T + fit.bias).argmax(1) == y).mean())
    assert lbfgs_acc > adam_acc + 0.05, (lbfgs_acc, adam_acc)


def test_spherical_kmeans_recovers_directions_and_is_seeded():
    x, y = _blobs(150, 3, 12, 0.1, seed=3)
    c1 = spherical_kmeans(x, 3, seed=0)
    c2 = spherical_kmeans(x, 3, seed=0)
    np.testing.assert_array_equal(c1, c2)
    np.testing.assert_allclose(np.linalg.norm(c1, axis=1), 1.0, atol=1e-5)
    pred = assign(x, c1)
    # each cluster is one class
    for k in range(3):
        assert len(np.unique(y[pred == k])) == 1
    s = cluster_miou(x, y, 3, seed=0)
    assert s.miou == pytest.approx(100.0)


def test_code_stats_effective_rank():
    rng = np.random.default_rng(4)
    iso = rng.normal(size=(4000, 8))
    s = code_stats(iso)
    assert 7.5 < s.erank <= 8.0 and abs(s.mean_cos) < 0.02
    # rows in a 3-dimensional subspace: rank <= 3, the top 3 PCs hold everything
    low = rng.normal(size=(4000, 3)) @ rng.normal(size=(3, 8))
    t = code_stats(low)
    assert 1.5 < t.erank <= 3.0 + 1e-6 and t.top3_share > 0.999
    # a large shared component: high mean cosine (the rank is of the *centred* covariance)
    shared = code_stats(iso + 6.0)
    assert shared.mean_cos > 0.9 and shared.erank < s.erank
    with pytest.raises(ValueError, match="n >= 2"):
        code_stats(np.ones((1, 4)))


def test_crossfit_linear_uses_other_images_only():
    x, y = _blobs(60, 2, 6, 0.2, seed=5)
    hist = np.eye(2, dtype=np.float32)[y]
    groups = np.arange(len(y)) % 6  # six "source images"
    s = crossfit_linear_miou(x, hist, y, groups, 2, folds=2, seed=0)
    assert s.miou == pytest.approx(100.0)
    with pytest.raises(ValueError):
        crossfit_linear_miou(x, hist, y, np.zeros(len(y), int), 2, folds=2)
