"""PriMaPs masks / pseudo-labels / PriMaPs-EM and neural eigenfunctions on tiny synthetic
features whose right masks and clusters are known; their criteria through the shard format."""

from __future__ import annotations

import numpy as np
import pytest
import torch
from scipy.optimize import linear_sum_assignment

from pipeline.mining import eigen, primaps, recover, shards
from pipeline.mining.batch import mine_batch
from pipeline.mining.sets import MineParams

D, K, G = 32, 3, 8  # feature dim, classes, crop grid (8x8 patches)


def _protos(seed: int = 0) -> np.ndarray:
    P = np.random.default_rng(seed).normal(size=(K, D))
    return (P / np.linalg.norm(P, axis=1, keepdims=True)).astype(np.float32)


def _crops(n: int, noise: float, seed: int = 1):
    """n crops: left half / right top / right bottom quadrants of three different classes."""
    rng = np.random.default_rng(seed)
    P = _protos()
    X, L = [], []
    for _ in range(n):
        c = rng.permutation(K)
        lab = np.full((G, G), c[0])
        lab[:, G // 2:] = c[1]
        lab[G // 2:, G // 2:] = c[2]
        X.append(3 * P[lab.ravel()] + noise * rng.normal(size=(G * G, D)))
        L.append(lab.ravel())
    return np.asarray(X, np.float32), np.asarray(L, np.int64)


def _same_partition(a: np.ndarray, b: np.ndarray) -> bool:
    """Equal up to renumbering."""
    pairs = set(zip(a.tolist(), b.tolist()))
    return len(pairs) == len(set(a.tolist())) == len(set(b.tolist()))


def _matched_accuracy(pred: np.ndarray, labels: np.ndarray) -> float:
    c = np.zeros((K, K))
    np.add.at(c, (labels.ravel(), pred.ravel()), 1)
    r, cc = linear_sum_assignment(-c)
    return float(c[r, cc].sum() / c.sum())


# --------------------------------------------------------------------------- PriMaPs masks


def test_masks_recover_the_regions_of_a_crop():
    X, L = _crops(1, noise=0.3)
    m = primaps.principal_masks(X[0], psi=0.4, coverage=1.0)
    assert (m >= 0).all()
    assert _same_partition(m, L[0])
    # the first mask follows the dominant principal direction: the biggest region (left half)
    assert set(np.flatnonzero(m == 0)) == set(np.flatnonzero(L[0] == L[0][0]))
    # masks do not depend on the patch order
    perm = np.random.default_rng(0).permutation(G * G)
    assert _same_partition(primaps.principal_masks(X[0][perm], 0.4, 1.0), m[perm])


def test_masks_stop_at_the_coverage_and_leave_the_rest_unassigned():
    rng = np.random.default_rng(3)
    X = rng.normal(size=(64, D)).astype(np.float32)  # no structure: many small masks
    full = primaps.principal_masks(X, psi=0.4, coverage=1.0)
    half = primaps.principal_masks(X, psi=0.4, coverage=0.5)
    assert (full >= 0).all()
    assigned = half >= 0
    assert 0.5 <= assigned.mean() < 1.0
    # stopping early only drops the last masks: the extracted ones are the same
    np.testing.assert_array_equal(half[assigned], full[assigned])
    assert set(np.unique(full[~assigned])) == set(range(half.max() + 1, full.max() + 1))
    # a lower psi gives larger masks, hence fewer of them
    assert primaps.principal_masks(X, 0.0, 1.0).max() < full.max()


def test_bad_psi_and_coverage_are_refused():
    X = np.ones((4, D), np.float32)
    with pytest.raises(ValueError, match="psi=1.5 must lie in"):
        primaps.principal_masks(X, psi=1.5)
    with pytest.raises(ValueError, match="coverage=0 must lie in"):
        primaps.principal_masks(X, coverage=0)
    with pytest.raises(ValueError, match="whole number of crops"):
        primaps.crop_masks(np.ones((10, D), np.float32), 4)


def test_majority_labels_hand_example():
    mask = np.array([0, 0, 0, 1, 1, -1, 2, 2])
    cls = np.array([2, 2, 1, 0, 1, 2, 1, 1])
    # mask 0: 2 wins; mask 1: tie 0/1 -> lowest (0); unassigned stays -1; mask 2: 1
    np.testing.assert_array_equal(primaps.majority_labels(mask, cls, 3), [2, 2, 2, 0, 0, -1, 1, 1])


def test_pseudo_labels_fix_wrong_prototype_votes_inside_a_mask():
    X, L = _crops(6, noise=0.3)
    F = X.reshape(-1, D) / np.linalg.norm(X.reshape(-1, D), axis=1, keepdims=True)
    P = _protos()
    masks = primaps.crop_masks(F, G * G, 0.4, 1.0)
    assert len(np.unique(masks)) == 6 * 3 and (np.unique(masks) // (G * G) == np.repeat(np.arange(6), 3)).all()
    # prototypes that misclassify some patches: class 0's prototype pulled far towards class 1
    bad = P.copy()
    bad[0] = P[0] + 4 * P[1]
    near = primaps.nearest_prototype(F, bad)
    assert 0.85 < (near == L.ravel()).mean() < 0.97
    pl = primaps.pseudo_labels(F, G * G, bad, psi=0.4, coverage=1.0)
    np.testing.assert_array_equal(pl, L.ravel())  # the majority inside each mask is right
    # every mask takes one label: the majority of its votes
    for m in np.unique(masks):
        sel = masks == m
        assert len(set(pl[sel].tolist())) == 1
        assert pl[sel][0] == np.bincount(near[sel], minlength=K).argmax()


# --------------------------------------------------------------------------- PriMaPs-EM


def test_minibatch_kmeans_finds_the_class_centres():
    X, _ = _crops(20, noise=0.3)
    C = primaps.minibatch_spherical_kmeans(X, K, seed=0)
    cos = C @ _protos().T
    r, c = linear_sum_assignment(-cos)
    assert cos[r, c].min() > 0.98
    np.testing.assert_array_equal(C, primaps.minibatch_spherical_kmeans(X, K, seed=0))


def test_primaps_em_repairs_bad_prototypes_through_the_masks():
    X, L = _crops(40, noise=0.6)
    P = _protos()
    bad = P + 0.9 * np.roll(P, 1, axis=0)
    Xn = X.reshape(-1, D) / np.linalg.norm(X.reshape(-1, D), axis=1, keepdims=True)

    def acc(protos):
        return _matched_accuracy(primaps.nearest_prototype(Xn, protos), L)

    params = primaps.EMParams(steps=200)
    protos, info = primaps.fit_primaps_em(X, K, 0, params, init=bad)
    assert acc(bad) < 0.75 and acc(protos) > 0.98
    assert info["loss_last"] < info["loss_first"]
    assert np.allclose(np.linalg.norm(protos, axis=1), 1, atol=1e-5)
    # the masks do the work: with one mask per patch EM is plain self-training and stays poor
    singletons = np.tile(np.arange(G * G), (len(X), 1))
    alone, _ = primaps.fit_primaps_em(X, K, 0, params, init=bad, masks=singletons)
    assert acc(alone) < 0.9
    # seeded and repeatable; 0 steps returns the initial prototypes
    again, _ = primaps.fit_primaps_em(X, K, 0, params, init=bad)
    np.testing.assert_array_equal(protos, again)
    zero, _ = primaps.fit_primaps_em(X, K, 0, primaps.EMParams(steps=0), init=bad)
    np.testing.assert_allclose(zero, bad / np.linalg.norm(bad, axis=1, keepdims=True), rtol=1e-6)


def test_focal_loss_weights_and_ignore():
    logits = torch.tensor([[2.0, 0.0], [0.0, 2.0], [1.0, 1.0]])
    target = torch.tensor([0, 1, -1])
    got = primaps.focal_cross_entropy(logits, target, gamma=0.0)
    want = torch.nn.functional.cross_entropy(logits[:2], target[:2])
    assert torch.allclose(got, want)
    # gamma > 0 down-weights the classes the batch is already confident about
    p = torch.softmax(logits, 1).mean(0)
    w = (1 - p) ** 2
    ce = torch.nn.functional.cross_entropy(logits[:2], target[:2], reduction="none")
    assert torch.allclose(primaps.focal_cross_entropy(logits, target, 2.0), (w[target[:2]] * ce).sum() / 2)
    assert primaps.focal_cross_entropy(logits, torch.tensor([-1, -1, -1]), 2.0) == 0


# --------------------------------------------------------------------------- eigenfunctions


def _points(n: int = 600, seed: int = 0):
    rng = np.random.default_rng(seed)
    lab = rng.integers(0, K, n)
    X = (_protos()[lab] * 3 + 0.3 * rng.normal(size=(n, D))).astype(np.float32)
    return X, lab


def test_neuralef_loss_at_exact_eigenvectors():
    X, _ = _points(200)
    Kx = eigen.affinity_kernel(torch.from_numpy(X)).double()
    assert torch.allclose(Kx, Kx.T) and float(Kx.diagonal().abs().max()) == 0
    w, V = torch.linalg.eigh(Kx)
    top = V[:, -3:].flip(1) * np.sqrt(200)  # RMS 1 columns, eigenvalue order
    loss, ev = eigen.neuralef_loss(top, Kx)
    np.testing.assert_allclose(ev.numpy(), w[-3:].flip(0).numpy(), atol=1e-8)
    assert float(loss) == pytest.approx(-float(w[-3:].sum()), abs=1e-8)  # no penalty: orthogonal
    # a later function copying an earlier one gains nothing (its penalty cancels its quotient)
    dup = torch.stack([top[:, 0], top[:, 1], top[:, 0]], 1)
    assert float(eigen.neuralef_loss(dup, Kx)[0]) == pytest.approx(-float(w[-1] + w[-2]), abs=1e-8)


def test_learned_eigenfunctions_span_the_top_eigenvectors_and_cluster_the_classes(tmp_path):
    X, lab = _points()
    cl = eigen.fit_eigen_clusters(X, K, seed=0, params=eigen.EigenParams(steps=300, batch=600))
    Kx = eigen.affinity_kernel(torch.from_numpy(X)).numpy()
    w, V = np.linalg.eigh(Kx)
    with torch.no_grad():
        E = cl.net(torch.from_numpy(X)).numpy()
    E /= np.linalg.norm(E, axis=0)
    cosines = np.linalg.svd(V[:, -K:].T @ E)[1]  # principal angles to the exact top-K space
    assert cosines.min() > 0.98, cosines
    np.testing.assert_allclose(sorted(cl.info["eigenvalues"]), w[-K:], atol=0.03)
    a = cl.assign(X)
    assert _matched_accuracy(a, lab) == 1.0
    # state round trip (no pickle) gives the same clusters
    path = tmp_path / "eigen_state.npz"
    path.write_bytes(cl.to_npz_bytes())
    again = eigen.EigenClusters.from_npz(path)
    np.testing.assert_array_equal(again.assign(X), a)
    # the eval probe scores code maps with the same clusters
    probe = eigen.EigenClusterProbe(again)
    code = torch.from_numpy(X[:16]).T.reshape(1, D, 4, 4)
    scores = probe.scores(code)
    assert scores.shape == (1, K, 4, 4)
    np.testing.assert_array_equal(scores.argmax(1).reshape(-1).numpy(), a[:16])
    with pytest.raises(ValueError, match="not a readable eigenfunction state"):
        (tmp_path / "bad.npz").write_bytes(b"junk")
        eigen.EigenClusters.from_npz(tmp_path / "bad.npz")


def test_eigen_fit_is_seeded():
    X, _ = _points(300)
    p = eigen.EigenParams(steps=20, batch=128)
    a = eigen.fit_eigen_clusters(X, K, 5, p)
    b = eigen.fit_eigen_clusters(X, K, 5, p)
    np.testing.assert_array_equal(a.embed(X), b.embed(X))
    with pytest.raises(ValueError, match="kernel_power=0"):
        eigen.EigenParams(kernel_power=0)


# --------------------------------------------------------------------------- as criteria


def test_cluster_criterion_with_unassigned_rows_round_trips_through_a_shard(tmp_path):
    rng = np.random.default_rng(0)
    N = 40
    F = rng.normal(size=(N, D)).astype(np.float32)
    F /= np.linalg.norm(F, axis=1, keepdims=True)
    cluster_of = rng.integers(0, 3, N)
    cluster_of[[3, 7, 20]] = -1
    anchors = np.array([0, 3, 5, 20, 39])
    mb = mine_batch(F, anchors, "primaps", MineParams(), cluster_of=cluster_of)
    un = {3, 7, 20}
    for i, a in enumerate(anchors):
        pos, amb = set(mb.sets().pos(i).tolist()), set(mb.sets().amb(i).tolist())
        if cluster_of[a] < 0:
            assert pos == set() and amb == set(range(N)) - {a}
        else:
            assert pos == set(np.flatnonzero(cluster_of == cluster_of[a]).tolist()) - {a}
            assert amb == un
        assert mb.n_pos[i] == len(pos) and mb.n_amb[i] == len(amb)
    path = shards.shard_path(tmp_path, 0, 0)
    stats = shards.write_shard(path, mb, 0, 0, np.arange(4), "primaps")
    assert stats["anchors_without_positive"] == 2
    sh = shards.read_shard(path)
    np.testing.assert_array_equal(sh.cluster_of, cluster_of)
    rec = recover.recover_sets(sh, F)
    for name in ("pos_indptr", "pos_indices", "amb_indptr", "amb_indices"):
        np.testing.assert_array_equal(getattr(rec, name), getattr(mb.sets(), name))
    # k-means shards (no unassigned rows) keep the earlier layout: no extra array
    km = mine_batch(F, anchors, "kmeans", MineParams(), cluster_of=np.maximum(cluster_of, 0))
    p2 = shards.shard_path(tmp_path, 0, 1)
    shards.write_shard(p2, km, 0, 1, np.arange(4), "kmeans")
    with np.load(p2) as z:
        assert "unassigned" not in z.files
    with np.load(path) as z:
        assert "unassigned" in z.files
    with pytest.raises(ValueError, match="integers >= -1"):
        mine_batch(F, anchors, "eigen", MineParams(), cluster_of=cluster_of - 1)
