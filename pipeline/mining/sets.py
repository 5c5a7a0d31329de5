"""What one mined batch is: the mining parameters (`MineParams`, defaults from MineConfig), the
P/A/N sets in CSR form (`SetsCSR`), a batch's result (`MinedBatch`), and the float32 rounding
helpers that keep float32 similarities exact against float64 thresholds (docs/method.md §2)."""

from __future__ import annotations

from contextlib import contextmanager
from dataclasses import dataclass, fields
from typing import Any

import numpy as np

from pipeline.config.options import check_mine_params
from pipeline.config.schema import MineConfig

# criteria decided by a label per row of F (sets = same label minus self); label -1 = unassigned
CLUSTER_CRITERIA = ("kmeans", "primaps", "eigen")


BACKENDS = ("faiss", "torch")


# band-pair classes stored in MinedBatch.band_class and in shards
NEG = 0


AMB = 1


POS = 2


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
                             "or recover the sets from its shard (pipeline.mining.recover.recover_sets)")
        return SetsCSR(self.pos_indptr, self.pos_indices, self.amb_indptr, self.amb_indices)


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


def _indptr(counts: np.ndarray) -> np.ndarray:
    out = np.zeros(len(counts) + 1, dtype=np.int64)
    np.cumsum(counts, out=out[1:])
    return out


def _cat(parts: list, dtype) -> np.ndarray:
    return np.concatenate(parts).astype(dtype, copy=False) if parts else np.zeros(0, dtype)


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
