"""Exact recovery of mined sets from a shard, and the per-batch export (issue format).

recover_sets(shard, F) rebuilds the SetsCSR the miner produced from a shard and the batch's
features: threshold shards recompute proxy · F and classify by the stored thresholds (the
stored band pairs keep the miner's class), explicit shards unpack the positive CSR, cluster
shards expand the label of every row. export_batch writes one batch's sets with their patch
and image indices (pipeline.mining.export)."""

from __future__ import annotations

import numpy as np

from pipeline.mining.batch import block_rows
from pipeline.mining.criteria import _same_cluster_sets, _unassigned_amb_sets
from pipeline.mining.sets import AMB, POS, MinedBatch, SetsCSR, f32_ceil, f32_floor
from pipeline.mining.shards import Shard


def recover_sets(shard: Shard, F: np.ndarray, dtype=np.float32, mem_budget_mb: float = 256) -> SetsCSR:
    """The sets the miner decided, from a shard and the batch's F (exact).

    dtype: arithmetic of the recomputed similarities (float32 or float64; both exact).
    """
    if not isinstance(F, np.ndarray) or F.shape != (shard.n_rows, shard.dim) or F.dtype != np.float32:
        raise ValueError(
            f"F must be the batch's float32 features of shape ({shard.n_rows}, {shard.dim}), got "
            f"{getattr(F, 'dtype', type(F))} {getattr(F, 'shape', '')}; build it with "
            "FeatureStore.mining_features(shard.images)"
        )
    M = len(shard.anchors)
    empty = (np.zeros(M + 1, np.int64), np.zeros(0, np.int64))
    if shard.mode == "explicit":
        return SetsCSR(shard.pos_indptr, shard.pos_indices, *empty)
    if shard.mode == "clusters":
        counts, cols = _same_cluster_sets(shard.cluster_of, shard.anchors, keep_sets=True)
        amb_counts, amb_cols = _unassigned_amb_sets(shard.cluster_of, shard.anchors, keep_sets=True)
        indptr = np.zeros(M + 1, np.int64)
        np.cumsum(counts, out=indptr[1:])
        amb_indptr = np.zeros(M + 1, np.int64)
        np.cumsum(amb_counts, out=amb_indptr[1:])
        return SetsCSR(indptr, cols, amb_indptr, amb_cols)
    dtype = np.dtype(dtype)
    if dtype not in (np.float32, np.float64):
        raise ValueError(f"dtype={dtype} must be float32 or float64")
    N = shard.n_rows
    Fx = F if dtype == np.float32 else F.astype(np.float64)
    step = block_rows(N, M, dtype.itemsize + 3 + 16, mem_budget_mb)
    pos_counts, pos_cols, amb_counts, amb_cols = [], [], [], []
    for i in range(0, M, step):
        j = min(M, i + step)
        m = j - i
        S = shard.proxy[i:j].astype(dtype) @ Fx.T
        if dtype == np.float32:
            pos = S > f32_floor(shard.phi[i:j])[:, None]
            amb = (S >= f32_ceil(shard.psi[i:j])[:, None]) & ~pos if shard.has_amb else None
        else:
            pos = S > shard.phi[i:j, None]
            amb = (S >= shard.psi[i:j, None]) & ~pos if shard.has_amb else None
        del S
        # band pairs take the miner's class
        lo, hi = shard.band_indptr[i], shard.band_indptr[j]
        r = np.repeat(np.arange(m), np.diff(shard.band_indptr[i:j + 1]))
        c = shard.band_indices[lo:hi]
        k = shard.band_class[lo:hi]
        pos[r, c] = k == POS
        rows = np.arange(m)
        pos[rows, shard.anchors[i:j]] = False
        if amb is not None:
            amb[r, c] = k == AMB
            amb[rows, shard.anchors[i:j]] = False
        for mask, counts, cols in ((pos, pos_counts, pos_cols), (amb, amb_counts, amb_cols)):
            if mask is None:
                counts.append(np.zeros(m, np.int64))
                continue
            counts.append(np.count_nonzero(mask, axis=1))
            cols.append(np.nonzero(mask)[1])
    out = []
    for counts, cols in ((pos_counts, pos_cols), (amb_counts, amb_cols)):
        cnt = np.concatenate(counts)
        indptr = np.zeros(M + 1, np.int64)
        np.cumsum(cnt, out=indptr[1:])
        out += [indptr, np.concatenate(cols).astype(np.int64) if cols else np.zeros(0, np.int64)]
    return SetsCSR(*out)


def export_batch(
    F: np.ndarray,
    source: Shard | MinedBatch,
    patch_labels: np.ndarray | None = None,
    image_index: np.ndarray | None = None,
) -> dict[str, np.ndarray]:
    """The export dict of one mined batch (features exactly as mined, sets, proxies, thresholds).

    patch_labels: (N,) or per crop (B, h, w) / (B, h*w) ints, -1 = ignore.
    image_index: (N,) per row, or (B,) per crop (expanded to rows); defaults to the shard's
    crop indices (`images`) for a Shard.
    """
    if isinstance(source, Shard):
        sets = recover_sets(source, F)
        images = source.images
    elif isinstance(source, MinedBatch):
        sets = source.sets()
        images = None
        if F.shape[0] != source.n_rows:
            raise ValueError(f"F has {F.shape[0]} rows, the batch was mined over {source.n_rows}")
    else:
        raise ValueError(f"source must be a Shard or a MinedBatch, got {type(source).__name__}")
    N = F.shape[0]
    out = dict(
        features=np.ascontiguousarray(F, dtype=np.float32), anchors=source.anchors.astype(np.int64),
        pos_indptr=sets.pos_indptr, pos_indices=sets.pos_indices,
        amb_indptr=sets.amb_indptr, amb_indices=sets.amb_indices,
        proxy=source.proxy.astype(np.float32), phi=source.phi.astype(np.float64),
        psi=source.psi.astype(np.float64),
    )
    if patch_labels is not None:
        pl = np.asarray(patch_labels).reshape(-1)
        if pl.size != N or not np.issubdtype(pl.dtype, np.integer):
            raise ValueError(f"patch_labels must hold {N} integer labels (one per row of F), "
                             f"got {pl.dtype} of size {pl.size}")
        out["patch_label"] = pl.astype(np.int64)
    if image_index is None and images is not None:
        image_index = images
    if image_index is not None:
        ix = np.asarray(image_index).reshape(-1).astype(np.int64)
        if ix.size != N:
            if ix.size == 0 or N % ix.size:
                raise ValueError(f"image_index must have {N} entries (per row) or one per crop; "
                                 f"got {ix.size}")
            ix = np.repeat(ix, N // ix.size)
        out["image_index"] = ix
    return out
