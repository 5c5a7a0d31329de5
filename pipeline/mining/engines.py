"""Mining one batch: PPAP (docs/method.md §2) and the comparison criteria of §7.

Semantics (§2): s = v · Fᵀ in float32; P⁰ = {j : s_ij > Φ0}; for t = 1..T the proxy is the
normalised sum of the previous set, d = 1 − v_{t−1}·v_t, Φ −= d/σpos, Ψ += d/σamb (per-anchor
scalars, float64). Final sets w.r.t. the T-th proxy: positive s > Φ, ambiguous Ψ ≤ s ≤ Φ, negative
the rest; the anchor is excluded from all three (it still takes part in the proxies). Where Ψ
overtakes Φ nothing is ambiguous. An empty intermediate set leaves the proxy where it was.
Float32 similarities are compared with float64 thresholds exactly: s > Φ is evaluated as
s > (largest float32 ≤ Φ), s ≥ Ψ as s ≥ (smallest float32 ≥ Ψ).

Memory: anchors stream in blocks whose working set (block × N similarities, masks) fits
`mem_budget_mb`; nothing of shape (M, N, D) and no (M, N) matrix for the whole batch exists.
The returned sets come on top (8 bytes per positive/ambiguous pair): pass keep_sets=False when
only a shard is written (threshold criteria are stored as proxy + thresholds + band).

Backends (same results up to pairs within ~1e-5 of a threshold):
  faiss, cpu   faiss range search (BLAS inside faiss) queried at the block's lowest threshold,
               filtered per anchor; proxies = CSR mask × F (scipy) or dense mask × F (torch),
               whichever is cheaper at the set density.
  faiss, cuda  faiss GPU brute-force distances (bfKnn, all pairs) into a torch block; rest on GPU.
  torch        dense torch block matmuls (CPU or CUDA), the fastest path on CPU (MKL).

API
---
MineParams(phi0, psi0, prop_iters, sigma_pos, sigma_amb); MineParams.from_config(cfg)
mine_batch(F, anchors, criterion, params, backend="faiss", device="cpu", mem_budget_mb=512,
           band=1e-4, hp_pool=None, cluster_of=None, keep_sets=True) -> MinedBatch
SetsCSR(pos_indptr, pos_indices, amb_indptr, amb_indices)   int64 CSR over anchors
hp_row_thresholds(F, pool, backend="faiss", device="cpu", mem_budget_mb=512) -> (N,) float64
    c_j = max cosine of row j to the HP pool (§7); mine_batch computes it from hp_pool.
fit_kmeans(X, k, seed, niter=20) -> (k, D) float32 spherical centroids (probes.spherical_kmeans)
assign_clusters(F, centroids, mem_budget_mb=512) -> (N,) int64 (max cosine)
Helpers to draw the HP pool / k-means sample live in pipeline.mining.batching.sample_patches.
"""

from __future__ import annotations

import logging
from contextlib import contextmanager
from dataclasses import dataclass, fields
from typing import Any

import numpy as np

from pipeline.config.options import CRITERIA, check_mine_params
from pipeline.config.schema import MineConfig

log = logging.getLogger("ppap.mining")

# criteria decided by a label per row of F (sets = same label minus self); label -1 = unassigned
CLUSTER_CRITERIA = ("kmeans", "primaps", "eigen")
BACKENDS = ("faiss", "torch")
# band-pair classes stored in MinedBatch.band_class and in shards
NEG, AMB, POS = 0, 1, 2
# a CSR mask product beats a dense one below this fraction of selected pairs (measured on
# 2 AVX2 cores: scipy CSR x F vs MKL dense, m=1000, N=50,176, D=384: crossover ~2.5%)
SPARSE_MAX_DENSITY = 0.02
FAISS_ROW_TILE = 4096  # rows of F per faiss BLAS tile in range search (faiss default 1024)


# ----------------------------------------------------------------------------------------
# parameters and results
# ----------------------------------------------------------------------------------------


_DEFAULTS = {f.name: f.default for f in fields(MineConfig)}  # one source of the defaults


@dataclass(frozen=True)
class MineParams:
    """The propagation parameters of MineConfig (same defaults, same checks)."""

    phi0: float = _DEFAULTS["phi0"]  # Φ0, initial positive threshold
    psi0: float = _DEFAULTS["psi0"]  # Ψ0, initial ambiguity threshold
    prop_iters: int = _DEFAULTS["prop_iters"]  # T (0 = the anchor itself is the proxy)
    sigma_pos: float = _DEFAULTS["sigma_pos"]  # Φ -= d / σpos
    sigma_amb: float = _DEFAULTS["sigma_amb"]  # Ψ += d / σamb

    def __post_init__(self) -> None:
        check_mine_params(self.phi0, self.psi0, self.prop_iters, self.sigma_pos, self.sigma_amb)

    @classmethod
    def from_config(cls, cfg: Any) -> "MineParams":
        """From a MineConfig (or anything with the same attribute names)."""
        return cls(float(cfg.phi0), float(cfg.psi0), int(cfg.prop_iters),
                   float(cfg.sigma_pos), float(cfg.sigma_amb))


@dataclass
class SetsCSR:
    """Per-anchor positive and ambiguous sets: int64 CSR, sorted columns (rows of F).

    Negatives of anchor i = every other row except the anchor, its positives and ambiguous.
    """

    pos_indptr: np.ndarray
    pos_indices: np.ndarray
    amb_indptr: np.ndarray
    amb_indices: np.ndarray

    def pos(self, i: int) -> np.ndarray:
        return self.pos_indices[self.pos_indptr[i]:self.pos_indptr[i + 1]]

    def amb(self, i: int) -> np.ndarray:
        return self.amb_indices[self.amb_indptr[i]:self.amb_indptr[i + 1]]


@dataclass
class MinedBatch:
    """What mining one batch decided (M anchors, N rows of F, D dims).

    proxy: final proxy v_T (float32, the anchor's feature for T = 0, p0, hp and cluster criteria);
    phi/psi: final Φ_T/Ψ_T (p0: both Φ0; hp: both c_i; kmeans, primaps, eigen: NaN).
    band_*: every (anchor, j ≠ anchor) whose similarity lies within `band` of Φ_T or Ψ_T,
    with the class the miner gave it (NEG/AMB/POS); threshold criteria only.
    Set arrays are None when mined with keep_sets=False.
    """

    criterion: str
    n_rows: int
    anchors: np.ndarray  # (M,) int64 rows of F
    proxy: np.ndarray  # (M, D) float32
    phi: np.ndarray  # (M,) float64
    psi: np.ndarray  # (M,) float64
    n_pos: np.ndarray  # (M,) int64
    n_amb: np.ndarray  # (M,) int64
    flops: int  # multiply-adds x 2 actually performed by the similarity and proxy products
    band: float
    pos_indptr: np.ndarray | None = None
    pos_indices: np.ndarray | None = None
    amb_indptr: np.ndarray | None = None
    amb_indices: np.ndarray | None = None
    band_indptr: np.ndarray | None = None
    band_indices: np.ndarray | None = None
    band_class: np.ndarray | None = None  # int8 NEG/AMB/POS
    cluster_of: np.ndarray | None = None  # cluster criteria: (N,) label of every row, -1 unassigned
    row_threshold: np.ndarray | None = None  # hp: (N,) c_j of every row

    @property
    def n_neg(self) -> np.ndarray:
        return self.n_rows - 1 - self.n_pos - self.n_amb

    @property
    def has_sets(self) -> bool:
        return self.pos_indices is not None

    def sets(self) -> SetsCSR:
        if not self.has_sets:
            raise ValueError("this batch was mined with keep_sets=False; mine with keep_sets=True "
                             "or recover the sets from its shard (pipeline.mining.shards.recover_sets)")
        return SetsCSR(self.pos_indptr, self.pos_indices, self.amb_indptr, self.amb_indices)


# ----------------------------------------------------------------------------------------
# exact float32-vs-float64 comparisons
# ----------------------------------------------------------------------------------------


def f32_floor(x: np.ndarray) -> np.ndarray:
    """Largest float32 <= x (so that for float32 s: s > x  <=>  s > f32_floor(x))."""
    x = np.asarray(x, dtype=np.float64)
    y = x.astype(np.float32)
    over = y.astype(np.float64) > x
    y[over] = np.nextafter(y[over], np.float32(-np.inf))
    return y


def f32_ceil(x: np.ndarray) -> np.ndarray:
    """Smallest float32 >= x (so that for float32 s: s >= x  <=>  s >= f32_ceil(x))."""
    x = np.asarray(x, dtype=np.float64)
    y = x.astype(np.float32)
    under = y.astype(np.float64) < x
    y[under] = np.nextafter(y[under], np.float32(np.inf))
    return y


def _normalise_rows64(raw: np.ndarray, prev: np.ndarray) -> np.ndarray:
    """float64 unit rows of `raw`; rows that sum to zero (empty set) keep `prev`."""
    raw = raw.astype(np.float64)
    norm = np.sqrt(np.einsum("ij,ij->i", raw, raw))
    ok = norm > 0
    out = prev.copy()
    out[ok] = raw[ok] / norm[ok, None]
    return out


# ----------------------------------------------------------------------------------------
# block results and the assembly of a batch
# ----------------------------------------------------------------------------------------


def _propagate(raw: np.ndarray, v64: np.ndarray, phi: np.ndarray, psi: np.ndarray,
               p: MineParams) -> tuple[np.ndarray, np.ndarray, np.ndarray]:
    """One step of §2 for a block: new proxy from the set sums, thresholds moved by d = 1 − v·v'."""
    new = _normalise_rows64(raw, v64)
    d = 1.0 - np.einsum("ij,ij->i", v64, new)
    return new, phi - d / p.sigma_pos, psi + d / p.sigma_amb


@dataclass
class _Block:
    proxy: np.ndarray
    phi: np.ndarray
    psi: np.ndarray
    n_pos: np.ndarray
    n_amb: np.ndarray
    flops: int
    pos_cols: np.ndarray | None = None  # concatenated per row, sorted within rows
    amb_cols: np.ndarray | None = None
    band_count: np.ndarray | None = None
    band_cols: np.ndarray | None = None
    band_class: np.ndarray | None = None


def _indptr(counts: np.ndarray) -> np.ndarray:
    out = np.zeros(len(counts) + 1, dtype=np.int64)
    np.cumsum(counts, out=out[1:])
    return out


def _cat(parts: list, dtype) -> np.ndarray:
    return np.concatenate(parts).astype(dtype, copy=False) if parts else np.zeros(0, dtype)


# ----------------------------------------------------------------------------------------
# the dense engine (torch; CPU, CUDA, or faiss GPU distances)
# ----------------------------------------------------------------------------------------


class _DenseEngine:
    """Dense (block, N) similarity blocks with torch; masks reuse the similarity buffer."""

    def __init__(self, F: np.ndarray, device: str, faiss_gpu: bool):
        import torch

        self.torch = torch
        self.dev = torch.device(device)
        self.F = torch.from_numpy(F).to(self.dev)
        self.N, self.D = F.shape
        self.res = None
        if faiss_gpu:
            import faiss
            import faiss.contrib.torch_utils  # noqa: F401  (lets faiss take torch CUDA tensors)

            self.faiss = faiss
            self.res = faiss.StandardGpuResources()

    @staticmethod
    def bytes_per_pair(keep_sets: bool) -> int:
        # similarity float32 + 5 bool masks, + 8 bytes per selected pair for the sets' indices
        return 9 + (8 if keep_sets else 0)

    def alloc(self, m: int) -> None:
        t = self.torch
        self.S_buf = t.empty((m, self.N), dtype=t.float32, device=self.dev)
        self.B_buf = [t.empty((m, self.N), dtype=t.bool, device=self.dev) for _ in range(5)]

    def sim(self, Q, out) -> None:
        if self.res is not None:
            self.faiss.pairwise_distance_gpu(self.res, Q.contiguous(), self.F, D=out,
                                             metric=self.faiss.METRIC_INNER_PRODUCT)
        else:
            self.torch.mm(Q, self.F.t(), out=out)

    def _col(self, x: np.ndarray):
        return self.torch.from_numpy(np.ascontiguousarray(x)).to(self.dev)[:, None]

    def _mask_product(self, S, B) -> tuple[Any, int]:
        """S holds the 0/1 float mask of bool B; returns (mask @ F as float32 numpy, flops)."""
        t = self.torch
        m = S.shape[0]
        if self.dev.type == "cpu":
            nnz = int(np.count_nonzero(B.numpy()))  # numpy counts bools ~20x faster than torch
            if nnz < SPARSE_MAX_DENSITY * m * self.N:
                import scipy.sparse as sp

                flat = S.view(-1).nonzero().squeeze(1).numpy()
                rows, cols = np.divmod(flat, self.N)
                csr = sp.csr_matrix((np.ones(len(cols), np.float32), (rows, cols)), shape=(m, self.N))
                return np.asarray(csr @ self.F.numpy(), dtype=np.float32), 2 * nnz * self.D
        return t.mm(S, self.F).cpu().numpy(), 2 * m * self.N * self.D

    def block(self, a: np.ndarray, criterion: str, p: MineParams, c: np.ndarray | None,
              band: float, keep_sets: bool) -> _Block:
        t = self.torch
        m, N, D = len(a), self.N, self.D
        S = self.S_buf[:m]
        pos, amb, b1, b2, b3 = (b[:m] for b in self.B_buf)
        a_t = t.from_numpy(a).to(self.dev)
        Q = self.F.index_select(0, a_t)
        v64 = Q.cpu().numpy().astype(np.float64)
        proxy32 = Q
        T = p.prop_iters if criterion == "ppap" else 0
        phi = np.full(m, p.phi0, np.float64)
        psi = np.full(m, p.psi0 if criterion == "ppap" else p.phi0, np.float64)
        self.sim(Q, S)
        flops = 2 * m * N * D
        for _ in range(T):
            t.gt(S, self._col(f32_floor(phi)), out=b1)
            S.copy_(b1)  # the set as a 0/1 float mask, in the similarity buffer
            raw, f = self._mask_product(S, b1)
            flops += f
            v64, phi, psi = _propagate(raw, v64, phi, psi, p)
            proxy32 = t.from_numpy(v64.astype(np.float32)).to(self.dev)
            self.sim(proxy32, S)
            flops += 2 * m * N * D
        rows = t.arange(m, device=self.dev)
        has_amb = criterion == "ppap"
        if criterion == "hp":
            ca = c[a]
            phi = psi = ca.copy()
            t.gt(S, self._col(ca.astype(np.float32)), out=pos)
            t.gt(S, t.from_numpy(c.astype(np.float32)).to(self.dev)[None, :], out=b1)
            pos |= b1
        else:
            t.gt(S, self._col(f32_floor(phi)), out=pos)
        pos[rows, a_t] = False
        if has_amb:
            t.ge(S, self._col(f32_ceil(psi)), out=amb)
            t.le(S, self._col(f32_floor(phi)), out=b1)
            amb &= b1
            amb[rows, a_t] = False
        out = _Block(proxy=proxy32.cpu().numpy().astype(np.float32, copy=False), phi=phi, psi=psi,
                     n_pos=self._row_counts(pos),
                     n_amb=self._row_counts(amb) if has_amb else np.zeros(m, np.int64),
                     flops=flops)
        if keep_sets:
            out.pos_cols = self._cols(pos)
            out.amb_cols = self._cols(amb) if has_amb else np.zeros(0, np.int64)
        if criterion in ("ppap", "p0"):
            # band: pairs within `band` of Φ_T or Ψ_T (a superset is harmless)
            for k, thr in enumerate((phi, psi) if has_amb else (phi,)):
                t.ge(S, self._col((thr - band).astype(np.float32)), out=b2)
                t.le(S, self._col((thr + band).astype(np.float32)), out=b3)
                if k == 0:
                    t.logical_and(b2, b3, out=b1)
                else:
                    b2 &= b3
                    b1 |= b2
            b1[rows, a_t] = False
            flat = b1.view(-1).nonzero().squeeze(1)
            cls = pos.view(-1)[flat].to(t.int8) * POS
            if has_amb:
                cls += amb.view(-1)[flat].to(t.int8) * AMB
            out.band_count = self._row_counts(b1)
            out.band_cols = (flat % N).cpu().numpy().astype(np.int64)
            out.band_class = cls.cpu().numpy().astype(np.int8)
        return out

    def _row_counts(self, mask) -> np.ndarray:
        if self.dev.type == "cpu":
            return np.count_nonzero(mask.numpy(), axis=1).astype(np.int64)
        return self.torch.count_nonzero(mask, dim=1).cpu().numpy().astype(np.int64)

    def _cols(self, mask) -> np.ndarray:
        flat = mask.view(-1).nonzero().squeeze(1)
        return flat.remainder_(self.N).cpu().numpy()


# ----------------------------------------------------------------------------------------
# the faiss CPU engine (range search)
# ----------------------------------------------------------------------------------------


class _FaissCpuEngine:
    """faiss range search over F per block of anchors, filtered with per-anchor thresholds."""

    def __init__(self, F: np.ndarray):
        import faiss

        self.faiss = faiss
        self.F = F
        self.N, self.D = F.shape

    @staticmethod
    def bytes_per_pair(keep_sets: bool) -> int:
        # worst case every pair in range: distance float32 + label int64 + row int32 + masks,
        # and a dense float32 mask when the proxy product goes dense
        return 24 + (8 if keep_sets else 0)

    def alloc(self, m: int) -> None:
        pass

    def _range(self, Q: np.ndarray, radius: np.float32):
        """All (row, j, s) with s > radius, rows sorted then j sorted."""
        faiss = self.faiss
        m = Q.shape[0]
        res = faiss.RangeSearchResult(m)
        Q = np.ascontiguousarray(Q, dtype=np.float32)
        # faiss's BLAS tiles are 4096 queries x 1024 rows by default; wider row tiles measured
        # ~20% faster here. The setting is process-global: set for this call, then restored.
        old = faiss.cvar.distance_compute_blas_database_bs
        faiss.cvar.distance_compute_blas_database_bs = FAISS_ROW_TILE
        try:
            faiss.range_search_inner_product(faiss.swig_ptr(Q), faiss.swig_ptr(self.F), self.D, m,
                                             self.N, float(radius), res)
        finally:
            faiss.cvar.distance_compute_blas_database_bs = old
        lims = faiss.rev_swig_ptr(res.lims, m + 1).astype(np.int64)
        nnz = int(lims[-1])
        dist = faiss.rev_swig_ptr(res.distances, nnz).copy() if nnz else np.zeros(0, np.float32)
        lab = faiss.rev_swig_ptr(res.labels, nnz).copy() if nnz else np.zeros(0, np.int64)
        del res
        rows = np.repeat(np.arange(m, dtype=np.int32), np.diff(lims))
        if nnz > 1:
            step = np.diff(lab)
            if not np.all((step > 0) | (np.diff(rows) > 0)):
                order = np.lexsort((lab, rows))
                lab, dist = lab[order], dist[order]
        return rows, lab, dist

    def _mask_product(self, rows: np.ndarray, cols: np.ndarray, m: int) -> tuple[np.ndarray, int]:
        nnz = len(cols)
        if nnz < SPARSE_MAX_DENSITY * m * self.N:
            import scipy.sparse as sp

            csr = sp.csr_matrix((np.ones(nnz, np.float32), (rows, cols)), shape=(m, self.N))
            return np.asarray(csr @ self.F, dtype=np.float32), 2 * nnz * self.D
        import torch

        mask = torch.zeros((m, self.N), dtype=torch.float32)
        mask.view(-1)[torch.from_numpy(rows.astype(np.int64) * self.N + cols)] = 1.0
        return torch.mm(mask, torch.from_numpy(self.F)).numpy(), 2 * m * self.N * self.D

    def block(self, a: np.ndarray, criterion: str, p: MineParams, c: np.ndarray | None,
              band: float, keep_sets: bool) -> _Block:
        m, N, D = len(a), self.N, self.D
        Q = self.F[a]
        v64 = Q.astype(np.float64)
        T = p.prop_iters if criterion == "ppap" else 0
        phi = np.full(m, p.phi0, np.float64)
        psi = np.full(m, p.psi0 if criterion == "ppap" else p.phi0, np.float64)
        flops = 0
        for _ in range(T):
            thr = f32_floor(phi)
            rows, lab, dist = self._range(Q, np.nextafter(thr.min(), np.float32(-np.inf)))
            flops += 2 * m * N * D
            keep = dist > thr[rows]
            raw, f = self._mask_product(rows[keep], lab[keep], m)
            del rows, lab, dist, keep
            flops += f
            v64, phi, psi = _propagate(raw, v64, phi, psi, p)
            Q = v64.astype(np.float32)
        has_amb = criterion == "ppap"
        if criterion == "hp":
            ca = c[a]
            phi = psi = ca.copy()
            radius = min(ca.min(), c.min())
        else:
            lows = [phi - band] + ([psi - band] if has_amb else [])
            radius = min(float(x.min()) for x in lows)
        rows, lab, dist = self._range(Q, np.nextafter(f32_floor(np.array([radius]))[0],
                                                      np.float32(-np.inf)))
        flops += 2 * m * N * D
        not_self = lab != a[rows]
        if criterion == "hp":
            c32 = c.astype(np.float32)
            pos = ((dist > c32[a][rows]) | (dist > c32[lab])) & not_self
        else:
            pos = (dist > f32_floor(phi)[rows]) & not_self
        amb = None
        if has_amb:
            amb = (dist >= f32_ceil(psi)[rows]) & ~pos & not_self
            amb &= dist <= f32_floor(phi)[rows]
        out = _Block(proxy=np.ascontiguousarray(Q, dtype=np.float32), phi=phi, psi=psi,
                     n_pos=np.bincount(rows[pos], minlength=m).astype(np.int64),
                     n_amb=(np.bincount(rows[amb], minlength=m).astype(np.int64) if has_amb
                            else np.zeros(m, np.int64)), flops=flops)
        if keep_sets:
            out.pos_cols = lab[pos]
            out.amb_cols = lab[amb] if has_amb else np.zeros(0, np.int64)
        if criterion in ("ppap", "p0"):
            d32 = dist
            inb = np.zeros(len(dist), bool)
            for thr in (phi, psi) if has_amb else (phi,):
                lo = (thr - band).astype(np.float32)[rows]
                hi = (thr + band).astype(np.float32)[rows]
                inb |= (d32 >= lo) & (d32 <= hi)
            inb &= not_self
            cls = pos[inb].astype(np.int8) * POS
            if has_amb:
                cls += amb[inb].astype(np.int8) * AMB
            out.band_count = np.bincount(rows[inb], minlength=m).astype(np.int64)
            out.band_cols = lab[inb]
            out.band_class = cls
        return out


# ----------------------------------------------------------------------------------------
# criteria without similarities (kmeans, primaps, eigen) and the public entry point
# ----------------------------------------------------------------------------------------


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


@contextmanager
def _strict_float32():
    """Full float32 matmuls for torch (no TF32/bf16 even if the process asked for them):
    the shards' exact recovery relies on float32-accurate similarities."""
    import torch

    old = torch.get_float32_matmul_precision()
    torch.set_float32_matmul_precision("highest")
    try:
        yield
    finally:
        torch.set_float32_matmul_precision(old)


def _faiss_num_gpus() -> int:
    try:
        import faiss

        return int(faiss.get_num_gpus())
    except Exception:  # pragma: no cover - faiss builds without GPU symbols
        return 0


def _make_engine(F: np.ndarray, backend: str, device: str):
    if backend not in BACKENDS:
        raise ValueError(f"backend={backend!r}: choose one of {', '.join(BACKENDS)}")
    if device != "cpu" and not str(device).startswith("cuda"):
        raise ValueError(f"device={device!r} is not supported; use 'cpu' or 'cuda' (or 'cuda:N')")
    if device.startswith("cuda"):
        import torch

        if not torch.cuda.is_available():
            raise ValueError(f"device={device!r} but torch sees no CUDA device; use --device cpu")
        if backend == "faiss":
            if _faiss_num_gpus() == 0:
                raise ValueError(
                    "backend='faiss' with a CUDA device needs faiss built with GPU support "
                    "(faiss.get_num_gpus() is 0); use --backend torch or --device cpu"
                )
            return _DenseEngine(F, device, faiss_gpu=True)
        return _DenseEngine(F, device, faiss_gpu=False)
    if backend == "faiss":
        return _FaissCpuEngine(F)
    return _DenseEngine(F, "cpu", faiss_gpu=False)


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


# ----------------------------------------------------------------------------------------
# helpers for the comparison criteria (call them on the training split)
# ----------------------------------------------------------------------------------------


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
