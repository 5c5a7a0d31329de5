"""Mining one batch (docs/method.md §2-3): `mine_batch` checks the features and anchors, picks
the similarity engine (faiss or torch, CPU or GPU), blocks the anchors to the memory budget
(`block_rows`) and returns the P/A/N sets of every anchor under the chosen criterion."""

from __future__ import annotations

import logging

import numpy as np

from pipeline.config.options import CRITERIA
from pipeline.mining.criteria import (
    _same_cluster_sets,
    _unassigned_amb_sets,
    hp_row_thresholds,
)
from pipeline.mining.engines import _make_engine

log = logging.getLogger("ppap.mining")
from pipeline.mining.sets import (
    CLUSTER_CRITERIA,
    MinedBatch,
    MineParams,
    _cat,
    _indptr,
    _strict_float32,
)


def _check_inputs(F: np.ndarray, anchors: np.ndarray) -> tuple[np.ndarray, np.ndarray]:
    if not isinstance(F, np.ndarray) or F.ndim != 2 or F.dtype != np.float32:
        raise ValueError(
            f"F must be a 2-D float32 numpy array (N, D), got "
            f"{getattr(F, 'dtype', type(F))} {getattr(F, 'shape', '')}; "
            "pass pipeline.artifacts.features.normalise(feats) reshaped to (N, D)"
        )
    if F.shape[0] < 2:
        raise ValueError(f"F has {F.shape[0]} row(s); a batch needs at least 2 patches to mine")
    F = np.ascontiguousarray(F)
    a = np.asarray(anchors)
    if a.ndim != 1 or a.size == 0 or not np.issubdtype(a.dtype, np.integer):
        raise ValueError(f"anchors must be a non-empty 1-D integer array of rows of F, got "
                         f"{a.dtype} shape {a.shape}; use pipeline.mining.batching.anchor_rows")
    if a.min() < 0 or a.max() >= F.shape[0]:
        raise ValueError(f"anchors must lie in [0, {F.shape[0]}) (rows of F); got values "
                         f"{int(a.min())}..{int(a.max())}")
    return F, np.ascontiguousarray(a, dtype=np.int64)


def block_rows(n_rows: int, n_anchors: int, bytes_per_pair: int, mem_budget_mb: float) -> int:
    """Anchors per block so that block x n_rows x bytes_per_pair fits the budget."""
    if not mem_budget_mb > 0:
        raise ValueError(f"mem_budget_mb={mem_budget_mb} must be > 0")
    per_anchor = n_rows * bytes_per_pair
    m = int(mem_budget_mb * 2**20 // per_anchor)
    if m < 1:
        need = per_anchor / 2**20
        raise ValueError(
            f"mem_budget_mb={mem_budget_mb} cannot hold one anchor's similarities over "
            f"{n_rows} rows ({need:.2f} MB); raise --mem-budget-mb to at least {need:.2f}"
        )
    return min(m, n_anchors)


def mine_batch(
    F: np.ndarray,
    anchors: np.ndarray,
    criterion: str,
    params: MineParams,
    backend: str = "faiss",
    device: str = "cpu",
    mem_budget_mb: float = 512,
    band: float = 1e-4,
    hp_pool: np.ndarray | None = None,
    cluster_of: np.ndarray | None = None,
    keep_sets: bool = True,
) -> MinedBatch:
    """Mine one batch: F (N, D) float32 unit rows, anchors (M,) rows of F.

    criterion: 'ppap' (§2), 'p0' (positives P⁰ minus self), 'hp' (needs hp_pool (R, D)
    float32 unit features), 'kmeans' / 'primaps' / 'eigen' (need cluster_of (N,): the label of
    every row of F; -1 = unassigned, ambiguous for every anchor and an anchor without positives).
    band (> 0, threshold criteria): width of the stored band around Φ_T / Ψ_T that makes
    shard recovery exact; it must dwarf float32 rounding (default 1e-4).
    """
    if criterion not in CRITERIA:
        raise ValueError(f"criterion={criterion!r}: choose one of {', '.join(CRITERIA)}")
    if not isinstance(params, MineParams):
        raise ValueError(f"params must be a MineParams, got {type(params).__name__}; "
                         "use MineParams.from_config(cfg)")
    F, a = _check_inputs(F, anchors)
    N, D = F.shape
    M = len(a)
    if criterion == "ppap" and not params.psi0 < params.phi0:
        raise ValueError(f"phi0={params.phi0} must be greater than psi0={params.psi0}; "
                         "lower --psi0 or raise --phi0")
    if criterion in ("ppap", "p0") and not (1e-6 <= band <= 0.01):
        raise ValueError(f"band={band} must lie in [1e-6, 0.01]: it must dwarf float32 rounding "
                         "(~1e-6) and stay small to keep shards small; use the default 1e-4")

    if criterion in CLUSTER_CRITERIA:
        if cluster_of is None:
            raise ValueError(f"criterion={criterion!r} needs cluster_of (N,) for every row of F; "
                             "compute it with the criterion's state (e.g. fit_kmeans + "
                             "assign_clusters)")
        cl = np.asarray(cluster_of)
        if cl.shape != (N,) or not np.issubdtype(cl.dtype, np.integer) or cl.min() < -1:
            raise ValueError(f"cluster_of must be ({N},) integers >= -1 (-1 = unassigned), got "
                             f"{cl.dtype} {cl.shape}")
        cl = cl.astype(np.int64)
        counts, cols = _same_cluster_sets(cl, a, keep_sets)
        amb_counts, amb_cols = _unassigned_amb_sets(cl, a, keep_sets)
        mb = MinedBatch(criterion, N, a, F[a].copy(), np.full(M, np.nan), np.full(M, np.nan),
                        counts, amb_counts, 0, band, cluster_of=cl)
        if keep_sets:
            mb.pos_indptr, mb.pos_indices = _indptr(counts), cols
            mb.amb_indptr, mb.amb_indices = _indptr(amb_counts), amb_cols
        return mb

    engine = _make_engine(F, backend, device)
    c = None
    flops = 0
    if criterion == "hp":
        if hp_pool is None:
            raise ValueError("criterion='hp' needs hp_pool (R, D) float32 unit features; draw it "
                             "with pipeline.mining.batching.sample_patches on the training split")
        c = hp_row_thresholds(F, hp_pool, backend=backend, device=device,
                              mem_budget_mb=mem_budget_mb)
        flops += 2 * N * len(hp_pool) * D

    m_blk = block_rows(N, M, engine.bytes_per_pair(keep_sets), mem_budget_mb)
    log.debug("mining %d anchors over %d rows in blocks of %d (%s, %s)", M, N, m_blk, backend, device)
    engine.alloc(m_blk)
    with _strict_float32():
        blocks = [engine.block(a[i:i + m_blk], criterion, params, c, band, keep_sets)
                  for i in range(0, M, m_blk)]

    n_pos = _cat([b.n_pos for b in blocks], np.int64)
    n_amb = _cat([b.n_amb for b in blocks], np.int64)
    mb = MinedBatch(
        criterion=criterion, n_rows=N, anchors=a,
        proxy=np.concatenate([b.proxy for b in blocks]).astype(np.float32, copy=False),
        phi=_cat([b.phi for b in blocks], np.float64), psi=_cat([b.psi for b in blocks], np.float64),
        n_pos=n_pos, n_amb=n_amb, flops=flops + sum(b.flops for b in blocks), band=float(band),
        row_threshold=c,
    )
    if keep_sets:
        mb.pos_indptr, mb.pos_indices = _indptr(n_pos), _cat([b.pos_cols for b in blocks], np.int64)
        mb.amb_indptr, mb.amb_indices = _indptr(n_amb), _cat([b.amb_cols for b in blocks], np.int64)
    if criterion in ("ppap", "p0"):
        mb.band_indptr = _indptr(_cat([b.band_count for b in blocks], np.int64))
        mb.band_indices = _cat([b.band_cols for b in blocks], np.int64)
        mb.band_class = _cat([b.band_class for b in blocks], np.int8)
    return mb
