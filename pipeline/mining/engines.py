"""The similarity engines behind `mine_batch`: PPAP propagation (docs/method.md §2) per anchor block.

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

Where the rest lives: `pipeline.mining.batch.mine_batch` (the entry point, blocks to the memory
budget), `pipeline.mining.sets` (MineParams, SetsCSR, MinedBatch), `pipeline.mining.criteria`
(the HP thresholds, k-means fit and assignment of §7). `_make_engine(F, backend, device)` gives
the engine whose `.block(anchors, ...)` returns one block's sets.
"""

from __future__ import annotations

import logging
from dataclasses import dataclass
from typing import Any

import numpy as np

from pipeline.mining.sets import (
    AMB,
    BACKENDS,
    POS,
    MineParams,
    f32_ceil,
    f32_floor,
)

log = logging.getLogger("ppap.mining")

# a CSR mask product beats a dense one below this fraction of selected pairs (measured on
# 2 AVX2 cores: scipy CSR x F vs MKL dense, m=1000, N=50,176, D=384: crossover ~2.5%)
SPARSE_MAX_DENSITY = 0.02
FAISS_ROW_TILE = 4096  # rows of F per faiss BLAS tile in range search (faiss default 1024)


# ----------------------------------------------------------------------------------------
# parameters and results
# ----------------------------------------------------------------------------------------


# ----------------------------------------------------------------------------------------
# exact float32-vs-float64 comparisons
# ----------------------------------------------------------------------------------------


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


# ----------------------------------------------------------------------------------------
# helpers for the comparison criteria (call them on the training split)
# ----------------------------------------------------------------------------------------
