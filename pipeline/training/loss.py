"""The PPAP contrastive loss (docs/method.md §3, Eq. 8) over CSR-encoded mined sets.

For anchor i with positives P_i (and ambiguous A_i, both excluding i), negatives N_i are every
other row of `z` except i, P_i and A_i, and

    l_i = -(1/|P_i|) sum_{p in P_i} log( exp(z_i.z_p/tau) / sum_{n in P_i u N_i} exp(z_i.z_n/tau) )
        = logsumexp_{n in P_i u N_i}(z_i.z_n / tau) - mean_{p in P_i}(z_i.z_p / tau).

The loss is the mean of l_i over anchors with P_i non-empty (0, not NaN, when there are none),
optionally times tau/0.07 (the authors' base-temperature factor). Anchors are processed in
chunks of `chunk` rows; with gradients on, each chunk is recomputed in the backward pass
(activation checkpointing), so peak memory is O(chunk * N) instead of O(M * N) and the value
does not depend on the chunk size beyond float rounding.
"""

from __future__ import annotations

import math
from dataclasses import dataclass

import numpy as np
import torch
from torch.utils.checkpoint import checkpoint

AUTHORS_BASE_TAU = 0.07


@dataclass(frozen=True)
class LossStats:
    anchors: int  # anchors in the batch (M)
    anchors_used: int  # anchors with at least one positive (those that enter the mean)
    mean_pos: float  # mean |P_i| over all anchors
    mean_amb: float  # mean |A_i| over all anchors
    mean_neg: float  # mean |N_i| over all anchors

    def as_dict(self) -> dict[str, float]:
        return {"anchors": self.anchors, "anchors_used": self.anchors_used,
                "mean_pos": self.mean_pos, "mean_amb": self.mean_amb, "mean_neg": self.mean_neg}


def _as_index(x, name: str) -> np.ndarray:
    a = np.asarray(x.detach().cpu().numpy() if isinstance(x, torch.Tensor) else x)
    if a.ndim != 1 or (a.size and not np.issubdtype(a.dtype, np.integer)):
        raise ValueError(f"{name} must be a 1-D integer array, got shape {a.shape} dtype {a.dtype}")
    return a.astype(np.int64, copy=False)


def _check_csr(indptr: np.ndarray, indices: np.ndarray, m: int, n: int, name: str) -> None:
    if indptr.shape != (m + 1,) or indptr[0] != 0 or indptr[-1] != indices.size:
        raise ValueError(
            f"{name}_indptr has shape {indptr.shape} and ends at "
            f"{indptr[-1] if indptr.size else None}; expected {m + 1} entries from 0 to "
            f"len({name}_indices)={indices.size} (one row per anchor)"
        )
    if np.any(np.diff(indptr) < 0):
        raise ValueError(f"{name}_indptr must be non-decreasing; the CSR sets are corrupt")
    if indices.size and (indices.min() < 0 or indices.max() >= n):
        raise ValueError(
            f"{name}_indices hold values in [{indices.min()}, {indices.max()}] outside the "
            f"{n} rows of z; the sets were recovered for another batch"
        )


def _chunk_sum(z: torch.Tensor, anchor_rows: torch.Tensor, pos_r: torch.Tensor, pos_c: torch.Tensor,
               inv_npos: torch.Tensor, self_c: torch.Tensor, amb_r: torch.Tensor,
               amb_c: torch.Tensor, inv_tau: float, log_amb_weight: float | None) -> torch.Tensor:
    """Sum of l_i over one chunk of anchors (all with at least one positive)."""
    s = (z[anchor_rows] @ z.T) * inv_tau  # (c, N) float32
    self_r = torch.arange(len(anchor_rows), device=s.device)
    masked = s.index_put((self_r, self_c), torch.tensor(float("-inf"), device=s.device))
    if log_amb_weight is None:  # Eq. 8: ambiguous rows leave the denominator
        masked = masked.index_put((amb_r, amb_c), torch.tensor(float("-inf"), device=s.device))
    else:  # variant: ambiguous rows stay in the denominator as weak negatives (weight w)
        masked = masked.index_put((amb_r, amb_c), masked[amb_r, amb_c] + log_amb_weight)
    lse = torch.logsumexp(masked, dim=1)  # over P_i u N_i (+ w * A_i)
    pos_mean = torch.zeros_like(lse).index_add(0, pos_r, s[pos_r, pos_c]) * inv_npos
    return (lse - pos_mean).sum()


def ppap_loss(
    z: torch.Tensor,
    anchors,
    pos_indptr,
    pos_indices,
    amb_indptr,
    amb_indices,
    *,
    tau: float,
    parity_factor: bool = False,
    chunk: int = 1024,
    amb_weight: float = 0.0,
) -> tuple[torch.Tensor, LossStats]:
    """Eq. 8 on rows of `z` (N, D), L2-normalised; `anchors` (M,) are row indices of z.

    The CSR pairs give, for anchor k, its positives pos_indices[pos_indptr[k]:pos_indptr[k+1]]
    and its ambiguous rows likewise (row indices of z, anchor excluded). Returns the scalar loss
    (float32, differentiable w.r.t. z) and LossStats.

    `amb_weight` w > 0 is a variant of Eq. 8 that keeps ambiguous rows in the denominator with
    weight w (weak negatives: local repulsion inside the ambiguous band); w = 0 is the paper.
    """
    if z.ndim != 2:
        raise ValueError(f"z must be (N, D), got shape {tuple(z.shape)}")
    if not tau > 0:
        raise ValueError(f"tau={tau} must be > 0")
    if chunk <= 0:
        raise ValueError(f"chunk={chunk} must be a positive number of anchors")
    if not (0.0 <= amb_weight <= 1.0):
        raise ValueError(f"amb_weight={amb_weight} must lie in [0, 1] (0 = ambiguous rows excluded)")
    n = z.shape[0]
    a = _as_index(anchors, "anchors")
    pptr, pidx = _as_index(pos_indptr, "pos_indptr"), _as_index(pos_indices, "pos_indices")
    aptr, aidx = _as_index(amb_indptr, "amb_indptr"), _as_index(amb_indices, "amb_indices")
    m = a.size
    if m and (a.min() < 0 or a.max() >= n):
        raise ValueError(f"anchors hold values in [{a.min()}, {a.max()}] outside the {n} rows of z")
    _check_csr(pptr, pidx, m, n, "pos")
    _check_csr(aptr, aidx, m, n, "amb")
    npos, namb = np.diff(pptr), np.diff(aptr)
    pos_rows = np.repeat(np.arange(m), npos)
    amb_rows = np.repeat(np.arange(m), namb)
    if np.any(pidx == a[pos_rows]) or np.any(aidx == a[amb_rows]):
        raise ValueError("an anchor appears in its own positive/ambiguous set; "
                         "the sets must exclude it")

    stats = LossStats(
        anchors=int(m),
        anchors_used=int(np.count_nonzero(npos)),
        mean_pos=float(npos.mean()) if m else 0.0,
        mean_amb=float(namb.mean()) if m else 0.0,
        mean_neg=float((n - 1 - npos - namb).mean()) if m else 0.0,
    )
    zf = z.float()
    if stats.anchors_used == 0:  # keep the graph, zero gradient, never NaN
        return zf.sum() * 0.0, stats

    # keep only anchors with positives; re-base their CSR rows to 0..U-1
    used = np.flatnonzero(npos)
    remap = np.full(m, -1, np.int64)
    remap[used] = np.arange(used.size)
    keep_p, keep_a = remap[pos_rows] >= 0, remap[amb_rows] >= 0
    sets = _UsedSets(
        anchor=a[used], npos=npos[used],
        pptr=np.concatenate([[0], np.cumsum(npos[used])]),
        aptr=np.concatenate([[0], np.cumsum(namb[used])]),
        pos_rows=remap[pos_rows[keep_p]], pos_cols=pidx[keep_p],
        amb_rows=remap[amb_rows[keep_a]], amb_cols=aidx[keep_a],
    )
    with torch.autocast(device_type=z.device.type, enabled=False):  # float32 log-sum-exp, always
        log_w = math.log(amb_weight) if amb_weight > 0 else None
        total = _sum_chunks(zf, sets, chunk, 1.0 / tau, log_w)
    loss = total / used.size
    if parity_factor:
        loss = loss * (tau / AUTHORS_BASE_TAU)
    return loss, stats


@dataclass(frozen=True)
class _UsedSets:
    """CSR sets restricted to the anchors that have positives (rows 0..U-1)."""

    anchor: np.ndarray  # (U,) row of z of each anchor
    npos: np.ndarray  # (U,) |P_i| > 0
    pptr: np.ndarray  # (U+1,) offsets into pos_rows/pos_cols
    aptr: np.ndarray  # (U+1,) offsets into amb_rows/amb_cols
    pos_rows: np.ndarray
    pos_cols: np.ndarray
    amb_rows: np.ndarray
    amb_cols: np.ndarray


def _sum_chunks(zf: torch.Tensor, s: _UsedSets, chunk: int, inv_tau: float,
                log_amb_weight: float | None = None) -> torch.Tensor:
    def t(x: np.ndarray) -> torch.Tensor:
        return torch.from_numpy(np.ascontiguousarray(x)).to(zf.device)

    n_used = s.anchor.size
    n_chunks = -(-n_used // chunk)
    total = zf.new_zeros(())
    for c in range(n_chunks):
        k0, k1 = c * chunk, min(n_used, (c + 1) * chunk)
        p0, p1, a0, a1 = s.pptr[k0], s.pptr[k1], s.aptr[k0], s.aptr[k1]
        # out of the denominator: the anchor itself, and (Eq. 8) its ambiguous rows
        args = (zf, t(s.anchor[k0:k1]), t(s.pos_rows[p0:p1] - k0), t(s.pos_cols[p0:p1]),
                t(1.0 / s.npos[k0:k1]).float(), t(s.anchor[k0:k1]), t(s.amb_rows[a0:a1] - k0),
                t(s.amb_cols[a0:a1]), inv_tau, log_amb_weight)
        if zf.requires_grad and n_chunks > 1:  # recomputed in backward: O(chunk * N) memory
            total = total + checkpoint(_chunk_sum, *args, use_reentrant=False,
                                       preserve_rng_state=False)
        else:
            total = total + _chunk_sum(*args)
    return total
