"""The seed criteria other than PPAP's propagation, on one batch (docs/method.md §3): sets from one
label per row (k-means / PriMaPs / eigen clusters: same label minus self, unassigned rows
ambiguous), HP's per-row thresholds against its pool, and the k-means centroids and assignment."""

from __future__ import annotations

import numpy as np

from pipeline.mining.sets import _cat, _indptr, _strict_float32


def _same_cluster_sets(cluster_of: np.ndarray, anchors: np.ndarray,
                       keep_sets: bool) -> tuple[np.ndarray, np.ndarray | None]:
    """Per anchor the rows sharing its cluster, minus the anchor: (counts, concatenated cols).

    Rows labelled -1 (unassigned) are nobody's positives; an unassigned anchor has none."""
    assigned = cluster_of >= 0
    n_clusters = int(cluster_of.max()) + 1 if assigned.any() else 0
    sizes = np.bincount(cluster_of[assigned], minlength=n_clusters)
    ca = cluster_of[anchors]
    counts = np.where(ca >= 0, sizes[np.maximum(ca, 0)] - 1 if n_clusters else 0, 0)
    if not keep_sets:
        return counts.astype(np.int64), None
    rows = np.flatnonzero(assigned)
    order = rows[np.argsort(cluster_of[rows], kind="stable")]  # grouped by cluster, sorted rows
    starts = _indptr(sizes)
    parts = []
    for a in anchors:
        k = cluster_of[a]
        if k < 0:
            continue
        seg = order[starts[k]:starts[k + 1]]
        parts.append(seg[seg != a])
    return counts.astype(np.int64), _cat(parts, np.int64)


def _unassigned_amb_sets(cluster_of: np.ndarray, anchors: np.ndarray,
                         keep_sets: bool) -> tuple[np.ndarray, np.ndarray | None]:
    """Ambiguous sets of a cluster criterion: an assigned anchor's are the unassigned rows (-1);
    an unassigned anchor's are all other rows (no decision either way). (counts, cols)."""
    N = len(cluster_of)
    un = np.flatnonzero(cluster_of < 0)
    a_un = cluster_of[anchors] < 0
    counts = np.where(a_un, N - 1, len(un)).astype(np.int64)
    if not keep_sets:
        return counts, None
    if not un.size:
        return counts, np.zeros(0, np.int64)
    everything = np.arange(N, dtype=np.int64)
    parts = [everything[everything != a] if u else un for a, u in zip(anchors, a_un)]
    return counts, _cat(parts, np.int64)


def _check_unit_matrix(name: str, X: np.ndarray, dim: int | None = None) -> np.ndarray:
    if not isinstance(X, np.ndarray) or X.ndim != 2 or X.dtype != np.float32 or len(X) == 0:
        raise ValueError(f"{name} must be a non-empty 2-D float32 array, got "
                         f"{getattr(X, 'dtype', type(X))} {getattr(X, 'shape', '')}; "
                         "normalise it with pipeline.artifacts.features.normalise")
    if dim is not None and X.shape[1] != dim:
        raise ValueError(f"{name} has dimension {X.shape[1]}, the features have {dim}; "
                         "build it from the same feature store")
    return np.ascontiguousarray(X)


def hp_row_thresholds(F: np.ndarray, pool: np.ndarray, backend: str = "faiss",
                      device: str = "cpu", mem_budget_mb: float = 512) -> np.ndarray:
    """c_j = max cosine of row j of F to the pool (float32 products, returned as float64)."""
    pool = _check_unit_matrix("hp_pool", pool, F.shape[1])
    if backend == "faiss" and device == "cpu":
        import faiss

        D, _ = faiss.knn(F, pool, 1, metric=faiss.METRIC_INNER_PRODUCT)
        return D[:, 0].astype(np.float64)
    import torch

    dev = torch.device(device)
    P = torch.from_numpy(pool).to(dev)
    with _strict_float32():
        return _max_cosine(torch, F, P, dev, mem_budget_mb)


def _max_cosine(torch, F: np.ndarray, P, dev, mem_budget_mb: float) -> np.ndarray:
    N, R = len(F), P.shape[0]
    step = max(1, min(N, int(mem_budget_mb * 2**20 // (4 * R))))
    out = np.empty(N, np.float64)
    for i in range(0, N, step):
        blk = torch.from_numpy(F[i:i + step]).to(dev)
        out[i:i + step] = torch.mm(blk, P.t()).amax(1).cpu().numpy()
    return out


def fit_kmeans(X: np.ndarray, k: int, seed: int, niter: int = 20) -> np.ndarray:
    """Spherical k-means centroids (k, D) float32 of unit rows X, seeded, one run (no restarts)."""
    from pipeline.evaluation.probes import spherical_kmeans

    X = _check_unit_matrix("X", X)
    if not (isinstance(k, (int, np.integer)) and 1 <= k <= len(X)):
        raise ValueError(f"k={k} must be an integer in [1, {len(X)}] (the number of samples); "
                         "lower --kmeans-k or draw more samples")
    return spherical_kmeans(X, k, seed, niter=niter, nredo=1, normalise=False)


def assign_clusters(F: np.ndarray, centroids: np.ndarray, mem_budget_mb: float = 512) -> np.ndarray:
    """Cluster of every row: argmax cosine to the centroids (ties -> lowest index)."""
    C = _check_unit_matrix("centroids", centroids, F.shape[1])
    step = max(1, min(len(F), int(mem_budget_mb * 2**20 // (4 * len(C)))))
    out = np.empty(len(F), np.int64)
    for i in range(0, len(F), step):
        out[i:i + step] = np.argmax(F[i:i + step] @ C.T, axis=1)
    return out
