"""Mining against an independent float64 dense reference of docs/method.md §2 and §7."""

import numpy as np
import pytest

from pipeline.mining.batch import block_rows, mine_batch
from pipeline.mining.criteria import assign_clusters, fit_kmeans
from pipeline.mining.sets import MineParams, f32_ceil, f32_floor

EPS = 1e-5  # pairs this close to a threshold may legitimately differ (float32 vs float64)
BACKENDS = ["torch", "faiss"]


# ----------------------------------------------------------------------------------------
# structured synthetic features
# ----------------------------------------------------------------------------------------


def clustered(seed: int, n: int = 1000, d: int = 32, k: int = 6, common: float = 0.0):
    """Unit float32 rows: k clusters of different spreads, isotropic outliers, exact duplicates.

    Returns (F, labels, outliers, duplicate pairs); `common` adds a shared direction (DINOv2-like).
    """
    rng = np.random.default_rng(seed)
    centres = rng.standard_normal((k, d))
    centres /= np.linalg.norm(centres, axis=1, keepdims=True)
    spreads = np.linspace(0.35, 1.1, k)
    lab = rng.integers(0, k, n)
    X = centres[lab] + spreads[lab, None] * rng.standard_normal((n, d)) / np.sqrt(d)
    n_out = n // 25
    outliers = rng.choice(n, n_out, replace=False)
    X[outliers] = rng.standard_normal((n_out, d))
    lab[outliers] = -1
    if common:
        X = X / np.linalg.norm(X, axis=1, keepdims=True) + common * np.ones(d) / np.sqrt(d)
    src = rng.choice(np.setdiff1d(np.arange(n), outliers), 20, replace=False)
    dst = rng.choice(np.setdiff1d(np.arange(n), np.concatenate([outliers, src])), 20, replace=False)
    X[dst] = X[src]
    lab[dst] = lab[src]
    X = X.astype(np.float32)
    X /= np.linalg.norm(X, axis=1, keepdims=True)
    return np.ascontiguousarray(X), lab, outliers, np.stack([src, dst], 1)


def anchors_for(n: int, outliers, dups, step: int = 4) -> np.ndarray:
    return np.unique(np.concatenate([np.arange(0, n, step), outliers, dups.ravel()])).astype(np.int64)


@pytest.fixture(scope="module")
def data():
    F, lab, out, dups = clustered(0)
    return F, anchors_for(len(F), out, dups), out, dups


# ----------------------------------------------------------------------------------------
# the float64 dense reference (independent of pipeline.mining.engines)
# ----------------------------------------------------------------------------------------


def reference_ppap(F, anchors, phi0, psi0, T, sigma_pos, sigma_amb):
    """Dense float64 §2. Returns dict with pos, amb, near (final pairs within EPS of Φ_T or Ψ_T),
    unstable (anchors with an intermediate pair within EPS of Φ_t), phi, psi, proxy."""
    F64 = F.astype(np.float64)
    M = len(anchors)
    V = F64[anchors]
    phi = np.full(M, float(phi0))
    psi = np.full(M, float(psi0))
    S = V @ F64.T
    unstable = np.zeros(M, bool)
    for _ in range(T):
        unstable |= (np.abs(S - phi[:, None]) < EPS).any(1)
        members = (S > phi[:, None]).astype(np.float64)
        raw = members @ F64
        norm = np.linalg.norm(raw, axis=1)
        new = V.copy()
        ok = norm > 0
        new[ok] = raw[ok] / norm[ok, None]
        move = 1.0 - np.sum(V * new, axis=1)
        phi = phi - move / sigma_pos
        psi = psi + move / sigma_amb
        V = new
        S = V @ F64.T
    rows = np.arange(M)
    pos = S > phi[:, None]
    amb = (S >= psi[:, None]) & (S <= phi[:, None])
    pos[rows, anchors] = False
    amb[rows, anchors] = False
    near = (np.abs(S - phi[:, None]) < EPS) | (np.abs(S - psi[:, None]) < EPS)
    return dict(pos=pos, amb=amb, near=near, unstable=unstable, phi=phi, psi=psi, proxy=V, S=S)


def dense(indptr, indices, n_cols):
    out = np.zeros((len(indptr) - 1, n_cols), bool)
    rows = np.repeat(np.arange(len(indptr) - 1), np.diff(indptr))
    out[rows, indices] = True
    return out


def check_csr(indptr, indices, anchors, n_cols):
    assert indptr.dtype == np.int64 and indices.dtype == np.int64
    assert indptr[0] == 0 and indptr[-1] == len(indices) and np.all(np.diff(indptr) >= 0)
    for i in range(len(anchors)):
        row = indices[indptr[i]:indptr[i + 1]]
        assert np.all(np.diff(row) > 0) and (row.size == 0 or (row[0] >= 0 and row[-1] < n_cols))
        assert anchors[i] not in row


def assert_sets_match(mb, ref, anchors, n_cols, max_unstable=0.05):
    check_csr(mb.pos_indptr, mb.pos_indices, anchors, n_cols)
    check_csr(mb.amb_indptr, mb.amb_indices, anchors, n_cols)
    pos = dense(mb.pos_indptr, mb.pos_indices, n_cols)
    amb = dense(mb.amb_indptr, mb.amb_indices, n_cols)
    stable = ~ref["unstable"]
    assert stable.mean() >= 1 - max_unstable, f"{(~stable).sum()} unstable anchors"
    assert ref["near"].mean() < 1e-3  # pairs at a threshold are rare
    bad_pos = (pos != ref["pos"]) & ~ref["near"] & stable[:, None]
    bad_amb = (amb != ref["amb"]) & ~ref["near"] & stable[:, None]
    assert not bad_pos.any(), f"{bad_pos.sum()} positive pairs differ from the reference"
    assert not bad_amb.any(), f"{bad_amb.sum()} ambiguous pairs differ from the reference"
    np.testing.assert_array_equal(mb.n_pos, pos.sum(1))
    np.testing.assert_array_equal(mb.n_amb, amb.sum(1))
    np.testing.assert_array_equal(mb.n_neg, n_cols - 1 - pos.sum(1) - amb.sum(1))
    return pos, amb


# (phi0, psi0, T, sigma_pos, sigma_amb)
SETTINGS = {
    "paper": (0.55, 0.15, 2, 3.0, 4.0),
    "T0": (0.55, 0.15, 0, 3.0, 4.0),
    "T1-high": (0.85, 0.6, 1, 3.0, 3.0),
    "T3-overtake": (0.6, 0.45, 3, 0.3, 0.3),
    "negative": (0.1, -0.2, 2, 2.0, 5.0),
}


@pytest.mark.parametrize("backend", BACKENDS)
@pytest.mark.parametrize("setting", list(SETTINGS))
def test_ppap_matches_float64_reference(data, backend, setting):
    F, anchors, outliers, dups = data
    phi0, psi0, T, sp, sa = SETTINGS[setting]
    p = MineParams(phi0, psi0, T, sp, sa)
    mb = mine_batch(F, anchors, "ppap", p, backend=backend, mem_budget_mb=4)
    ref = reference_ppap(F, anchors, phi0, psi0, T, sp, sa)
    # low thresholds put ~half the rows in every set, so an intermediate pair within EPS of Φ_t
    # is ~20x likelier per anchor than at the paper's thresholds
    pos, amb = assert_sets_match(mb, ref, anchors, len(F),
                                 max_unstable=0.12 if setting == "negative" else 0.06)
    stable = ~ref["unstable"]
    np.testing.assert_allclose(mb.phi[stable], ref["phi"][stable], atol=1e-6)
    np.testing.assert_allclose(mb.psi[stable], ref["psi"][stable], atol=1e-6)
    assert mb.proxy.dtype == np.float32 and mb.phi.dtype == np.float64
    np.testing.assert_allclose(mb.proxy[stable], ref["proxy"][stable], atol=1e-5)
    product = 2 * len(anchors) * F.shape[0] * F.shape[1]  # one dense (M, N, D) product
    assert (T + 1) * product <= mb.flops <= (2 * T + 1) * product  # sparse proxies cost less
    if T == 0:
        np.testing.assert_array_equal(mb.proxy, F[anchors])
        assert np.all(mb.phi == phi0) and np.all(mb.psi == psi0)
    if setting == "T3-overtake":
        over = mb.psi > mb.phi
        assert over.sum() > 10, "the setting must make Ψ overtake Φ for some anchors"
        assert np.all(mb.n_amb[over] == 0)
    # duplicates: each copy is a positive of the other whenever the copy is above Φ_T
    where = {a: i for i, a in enumerate(anchors)}
    for s, d in dups:
        i = where[s]
        assert pos[i, d] == (ref["S"][i, d] > ref["phi"][i])
    if setting == "paper":
        out_rows = [where[o] for o in outliers]
        assert np.mean(mb.n_pos[out_rows] == 0) > 0.5  # isolated anchors have no positive
        assert mb.n_pos.mean() > 20 and mb.n_amb.mean() > 20


def test_strict_inequalities_at_exact_thresholds():
    # s = 0.5 exactly and s = 0.25 exactly (dyadic), thresholds representable
    e = np.eye(4, dtype=np.float32)
    at_phi = np.array([0.5, np.sqrt(0.75), 0, 0], np.float32)
    at_psi = np.array([0.25, 0, np.sqrt(1 - 0.0625), 0], np.float32)
    above = np.array([0.6, 0.8, 0, 0], np.float32)
    F = np.stack([e[0], at_phi, at_psi, above, e[3]]).astype(np.float32)
    for backend in BACKENDS:
        mb = mine_batch(F, np.array([0]), "ppap", MineParams(0.5, 0.25, 0, 3, 3), backend=backend)
        assert mb.pos_indices.tolist() == [3]  # 0.5 is not > 0.5
        assert mb.amb_indices.tolist() == [1, 2]  # Ψ ≤ s ≤ Φ, both ends included
        assert mb.n_neg.tolist() == [1]
        # the band records both threshold pairs with the miner's class
        band = dict(zip(mb.band_indices.tolist(), mb.band_class.tolist()))
        assert band == {1: 1, 2: 1}
        p0 = mine_batch(F, np.array([0]), "p0", MineParams(0.5, 0.25, 0, 3, 3), backend=backend)
        assert p0.pos_indices.tolist() == [3] and p0.amb_indices.size == 0
        assert dict(zip(p0.band_indices.tolist(), p0.band_class.tolist())) == {1: 0}


def test_threshold_rounding_helpers():
    rng = np.random.default_rng(0)
    x = rng.uniform(-1, 1, 2000)
    x[:10] = np.float32(x[:10]).astype(np.float64)  # representable thresholds too
    s = rng.uniform(-1, 1, 2000).astype(np.float32)
    s[:1000] = x[:1000].astype(np.float32)  # neighbours of the thresholds
    s[500:1000] = np.nextafter(s[500:1000], np.float32(2))
    s64 = s.astype(np.float64)
    assert np.array_equal(s > f32_floor(x), s64 > x)
    assert np.array_equal(s >= f32_ceil(x), s64 >= x)
    assert np.array_equal(s <= f32_floor(x), s64 <= x)


@pytest.mark.parametrize("backend", BACKENDS)
def test_block_streaming_does_not_change_results(data, backend):
    F, anchors, _, _ = data
    p = MineParams(*SETTINGS["paper"])
    one = mine_batch(F, anchors, "ppap", p, backend=backend, mem_budget_mb=512)
    many = mine_batch(F, anchors, "ppap", p, backend=backend, mem_budget_mb=0.5)  # 15-30 per block
    assert block_rows(len(F), len(anchors), 17, 0.5) <= 30  # many blocks (torch engine sizing)
    ref = reference_ppap(F, anchors, *SETTINGS["paper"])
    n = len(F)
    diff_pos = dense(one.pos_indptr, one.pos_indices, n) != dense(many.pos_indptr, many.pos_indices, n)
    diff_amb = dense(one.amb_indptr, one.amb_indices, n) != dense(many.amb_indptr, many.amb_indices, n)
    stable = ~ref["unstable"][:, None]
    assert not (diff_pos & ~ref["near"] & stable).any()
    assert not (diff_amb & ~ref["near"] & stable).any()
    assert (diff_pos | diff_amb).sum() <= 2  # essentially identical
    np.testing.assert_allclose(one.phi, many.phi, atol=1e-6)
    np.testing.assert_allclose(one.proxy, many.proxy, atol=1e-6)


def test_float32_precision_is_enforced_and_restored(data):
    torch = pytest.importorskip("torch")
    F, anchors, _, _ = data
    p = MineParams(*SETTINGS["paper"])
    strict = mine_batch(F, anchors, "ppap", p, backend="torch")
    old = torch.get_float32_matmul_precision()
    try:
        torch.set_float32_matmul_precision("medium")  # bf16/TF32 allowed for the rest of a process
        loose = mine_batch(F, anchors, "ppap", p, backend="torch")
        assert torch.get_float32_matmul_precision() == "medium"
    finally:
        torch.set_float32_matmul_precision(old)
    np.testing.assert_array_equal(strict.proxy, loose.proxy)
    np.testing.assert_array_equal(strict.pos_indices, loose.pos_indices)


def test_backends_agree_on_dinov2_like_features():
    # a shared component pushes cosines up (median ~0.5); high thresholds as for DINOv2
    F, _, out, dups = clustered(7, n=1200, common=1.2)
    anchors = anchors_for(len(F), out, dups, step=5)
    p = MineParams(0.95, 0.7, 2, 3.0, 3.0)
    ref = reference_ppap(F, anchors, 0.95, 0.7, 2, 3.0, 3.0)
    assert np.median(ref["S"]) > 0.3
    for backend in BACKENDS:
        mb = mine_batch(F, anchors, "ppap", p, backend=backend, mem_budget_mb=1)
        assert_sets_match(mb, ref, anchors, len(F))


@pytest.mark.parametrize("backend", BACKENDS)
def test_keep_sets_false_keeps_counts_and_band(data, backend):
    F, anchors, _, _ = data
    p = MineParams(*SETTINGS["paper"])
    full = mine_batch(F, anchors, "ppap", p, backend=backend)
    lean = mine_batch(F, anchors, "ppap", p, backend=backend, keep_sets=False)
    assert not lean.has_sets and lean.pos_indices is None
    np.testing.assert_array_equal(full.n_pos, lean.n_pos)
    np.testing.assert_array_equal(full.band_indices, lean.band_indices)
    np.testing.assert_array_equal(full.proxy, lean.proxy)
    with pytest.raises(ValueError, match="keep_sets"):
        lean.sets()


def test_band_holds_exactly_the_pairs_near_the_final_thresholds(data):
    F, anchors, _, _ = data
    p = MineParams(*SETTINGS["paper"])
    band = 1e-3
    mb = mine_batch(F, anchors, "ppap", p, backend="torch", band=band)
    S = mb.proxy.astype(np.float64) @ F.astype(np.float64).T
    dist = np.minimum(np.abs(S - mb.phi[:, None]), np.abs(S - mb.psi[:, None]))
    got = dense(mb.band_indptr, mb.band_indices, len(F))
    rows = np.arange(len(anchors))
    dist[rows, anchors] = np.inf
    assert np.all(got[dist < band - 1e-6]) and not np.any(got[dist > band + 1e-6])
    pos = dense(mb.pos_indptr, mb.pos_indices, len(F))
    amb = dense(mb.amb_indptr, mb.amb_indices, len(F))
    r, c = np.nonzero(got)
    expected = np.where(pos[r, c], 2, np.where(amb[r, c], 1, 0))
    order = np.argsort(np.repeat(rows, np.diff(mb.band_indptr)) * len(F) + mb.band_indices)
    np.testing.assert_array_equal(mb.band_class[order], expected)


# ----------------------------------------------------------------------------------------
# comparison criteria (§7) against their own tiny dense references
# ----------------------------------------------------------------------------------------


@pytest.mark.parametrize("backend", BACKENDS)
def test_p0_is_the_first_set_minus_self(data, backend):
    F, anchors, _, _ = data
    p = MineParams(0.55, 0.15, 2, 3.0, 4.0)  # ψ and T are ignored by p0
    mb = mine_batch(F, anchors, "p0", p, backend=backend)
    S = F[anchors].astype(np.float64) @ F.astype(np.float64).T
    ref_pos = S > 0.55
    ref_pos[np.arange(len(anchors)), anchors] = False
    near = np.abs(S - 0.55) < EPS
    pos = dense(mb.pos_indptr, mb.pos_indices, len(F))
    assert not ((pos != ref_pos) & ~near).any()
    assert mb.amb_indices.size == 0 and np.all(mb.n_amb == 0)
    assert np.all(mb.phi == 0.55) and np.all(mb.psi == 0.55)
    np.testing.assert_array_equal(mb.proxy, F[anchors])


@pytest.mark.parametrize("backend", BACKENDS)
def test_hp_criterion(data, backend):
    F, anchors, _, _ = data
    pool_src, _, _, _ = clustered(11, n=400)
    pool = pool_src[::4].copy()  # R = 100
    mb = mine_batch(F, anchors, "hp", MineParams(), backend=backend, hp_pool=pool, mem_budget_mb=2)
    F64 = F.astype(np.float64)
    c = (F64 @ pool.astype(np.float64).T).max(1)
    S = F64[anchors] @ F64.T
    ca = c[anchors][:, None]
    ref_pos = (S > ca) | (S > c[None, :])
    ref_pos[np.arange(len(anchors)), anchors] = False
    near = (np.abs(S - ca) < EPS) | (np.abs(S - c[None, :]) < EPS)
    pos = dense(mb.pos_indptr, mb.pos_indices, len(F))
    assert not ((pos != ref_pos) & ~near).any()
    assert ref_pos.sum(1).mean() > 1 and mb.amb_indices.size == 0
    np.testing.assert_allclose(mb.row_threshold, c, atol=1e-6)
    np.testing.assert_allclose(mb.phi, c[anchors], atol=1e-6)


def test_kmeans_criterion_and_helpers(data):
    F, anchors, _, _ = data
    C1 = fit_kmeans(F[::2].copy(), k=6, seed=3)
    C2 = fit_kmeans(F[::2].copy(), k=6, seed=3)
    np.testing.assert_array_equal(C1, C2)  # seeded
    assert C1.shape == (6, F.shape[1]) and np.allclose(np.linalg.norm(C1, axis=1), 1, atol=1e-5)
    cl = assign_clusters(F, C1, mem_budget_mb=0.01)  # tiny budget: many blocks
    np.testing.assert_array_equal(cl, np.argmax(F @ C1.T, axis=1))
    mb = mine_batch(F, anchors, "kmeans", MineParams(), cluster_of=cl)
    ref_pos = cl[anchors][:, None] == cl[None, :]
    ref_pos[np.arange(len(anchors)), anchors] = False
    np.testing.assert_array_equal(dense(mb.pos_indptr, mb.pos_indices, len(F)), ref_pos)
    check_csr(mb.pos_indptr, mb.pos_indices, anchors, len(F))
    assert mb.flops == 0 and np.all(np.isnan(mb.phi))
    lean = mine_batch(F, anchors, "kmeans", MineParams(), cluster_of=cl, keep_sets=False)
    np.testing.assert_array_equal(lean.n_pos, ref_pos.sum(1))


# ----------------------------------------------------------------------------------------
# validation
# ----------------------------------------------------------------------------------------


def test_bad_inputs_raise_with_the_fix(data):
    F, anchors, _, _ = data
    p = MineParams()
    cases = [
        (dict(F=F.astype(np.float64)), "float32"),
        (dict(anchors=np.array([len(F)])), r"\[0, 1000\)"),
        (dict(anchors=np.array([], np.int64)), "non-empty"),
        (dict(criterion="knn"), "criterion"),
        (dict(backend="cuvs"), "backend"),
        (dict(device="tpu"), "device"),
        (dict(params=MineParams(0.2, 0.3)), "phi0=0.2 must be greater than psi0=0.3"),
        (dict(mem_budget_mb=0.001), "mem-budget-mb"),
        (dict(band=0.0), "band"),
        (dict(criterion="hp"), "hp_pool"),
        (dict(criterion="kmeans"), "cluster_of"),
        (dict(params={"phi0": 0.5}), "MineParams"),
    ]
    for over, msg in cases:
        kw = dict(F=F, anchors=anchors, criterion="ppap", params=p)
        kw.update(over)
        with pytest.raises(ValueError, match=msg):
            mine_batch(**kw)
    for bad in (dict(phi0=1.5), dict(prop_iters=-1), dict(sigma_pos=0.0)):
        with pytest.raises(ValueError):
            MineParams(**bad)


def test_params_from_config():
    from pipeline.config.schema import MineConfig

    cfg = MineConfig(phi0=0.6, psi0=0.2, prop_iters=3, sigma_pos=3.0, sigma_amb=2.0)
    assert MineParams.from_config(cfg) == MineParams(0.6, 0.2, 3, 3.0, 2.0)


@pytest.mark.gpu
@pytest.mark.parametrize("backend", BACKENDS)
def test_cuda_matches_reference(data, backend):
    torch = pytest.importorskip("torch")
    if not torch.cuda.is_available():
        pytest.skip("no CUDA device")
    if backend == "faiss":
        import faiss

        if faiss.get_num_gpus() == 0:
            pytest.skip("faiss without GPU support")
    F, anchors, _, _ = data
    for setting in ("paper", "T3-overtake"):
        args = SETTINGS[setting]
        mb = mine_batch(F, anchors, "ppap", MineParams(*args), backend=backend, device="cuda",
                        mem_budget_mb=2)
        assert_sets_match(mb, reference_ppap(F, anchors, *args), anchors, len(F))


def test_mine_params_share_defaults_and_checks_with_mine_config():
    from pipeline.config.schema import MineConfig

    cfg = MineConfig()
    assert MineParams() == MineParams.from_config(cfg)
    for bad, match in ((dict(psi0=1.5), r"psi0=1.5 must be a cosine"),
                       (dict(phi0=-2.0), r"phi0=-2.0 must be a cosine"),
                       (dict(prop_iters=-1), r"prop_iters=-1 must be an integer >= 0"),
                       (dict(sigma_amb=0.0), r"sigma_amb=0.0 must be > 0")):
        with pytest.raises(ValueError, match=match):
            MineParams(**bad)
        with pytest.raises(ValueError, match=match):
            MineConfig(criterion="p0", **bad)
