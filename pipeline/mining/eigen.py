"""Neural eigenfunctions of a patch-affinity kernel, discretised into clusters.

After Deng, Shi and Zhu, "NeuralEF: Deconstructing Kernels by Deep Neural Networks" (ICML 2022)
and "Neural Eigenfunctions Are Structured Representation Learners" (2023). A small MLP ψ maps
an L2-normalised patch feature to K outputs trained to approximate the top-K eigenfunctions of
a kernel on patches; clusters come from discretising the outputs.

Kernel (the thresholded, symmetrically normalised cosine affinity that Deng et al. use for
segmentation), on a batch of B patches x_1..x_B:
    A_ij = max(0, cos(x_i, x_j)) for i != j, A_ii = 0;  d_i = sum_j A_ij;
    k(x_i, x_j) = A_ij / sqrt(d_i d_j).
Its top eigenfunction is the trivial sqrt-degree one (eigenvalue 1); the next ones separate
groups of mutually similar patches (normalised spectral clustering).

Objective (NeuralEF): outputs are batch-normalised (each column divided by its root mean
square over the batch, so E[ψ_j²] = 1); with R = Ψᵀ K Ψ / B and R̂_ij = ψ̂_iᵀ K ψ_j / B (ψ̂ =
stop-gradient), minimise  Σ_j [ −R_jj + Σ_{i<j} R̂_ij² / R̂_ii ]: each ψ_j maximises its
Rayleigh quotient while being orthogonal (under the kernel) to the earlier, fixed ones.
R_jj estimates the j-th eigenvalue.

Discretisation: ψ(x) divided by the RMS of each output over the fitting sample, each row then
L2-normalised (Ng-Jordan-Weiss), seeded spherical k-means (faiss) on the fitting sample; a
patch's cluster = nearest centre by cosine.

Defaults: K = n_eigen = the number of clusters (= classes), MLP D -> 256 -> 256 -> K (GELU),
Adam lr 1e-3, STEPS steps of BATCH patches drawn (seeded) from the fitting sample.

API
---
EigenParams(n_eigen=None, hidden=256, steps=STEPS, batch=BATCH, lr=1e-3)
affinity_kernel(X) -> (B, B) torch kernel of unit rows X
neuralef_loss(out, K) -> (loss, eigenvalue estimates)
fit_eigenfunctions(X, n_eigen, seed, params) -> (EigenNet, info)
fit_eigen_clusters(X, n_clusters, seed, params) -> EigenClusters (net + centres)
EigenClusters.embed(F) / .assign(F) / .to_npz_bytes() / EigenClusters.from_npz(path)
EigenClusterProbe(clusters): cluster-probe-like module (scores(code) -> cosines) for eval
"""

from __future__ import annotations

import io
import json
import logging
from dataclasses import asdict, dataclass
from pathlib import Path
from typing import Any, Callable

import numpy as np
import torch
import torch.nn.functional as Fn
from torch import nn

log = logging.getLogger("ppap.eigen")

STEPS = 1500
BATCH = 1024
EMBED_CHUNK = 65536  # rows per forward pass when embedding many patches


@dataclass(frozen=True)
class EigenParams:
    n_eigen: int | None = None  # K eigenfunctions (None: = the number of clusters)
    hidden: int = 256  # MLP width (two hidden layers)
    steps: int = STEPS
    batch: int = BATCH  # patches per step (the kernel is B x B)
    lr: float = 1e-3
    kernel_power: float = 1.0  # A_ij = max(0, cos)^power (1 = Deng et al.'s thresholded cosine)

    def __post_init__(self) -> None:
        if self.n_eigen is not None and self.n_eigen < 1:
            raise ValueError(f"n_eigen={self.n_eigen} must be at least 1 (or None = clusters)")
        for name in ("hidden", "steps", "batch"):
            if int(getattr(self, name)) <= 0:
                raise ValueError(f"{name}={getattr(self, name)} must be a positive integer")
        if self.batch < 2:
            raise ValueError(f"batch={self.batch} must be at least 2 (a kernel needs pairs)")
        if not self.lr > 0:
            raise ValueError(f"lr={self.lr} must be > 0")
        if not self.kernel_power > 0:
            raise ValueError(f"kernel_power={self.kernel_power} must be > 0")


class EigenNet(nn.Module):
    """ψ: unit feature (D) -> K eigenfunction values; `scale` = per-output RMS on the fit sample."""

    def __init__(self, dim: int, n_eigen: int, hidden: int, generator: torch.Generator):
        super().__init__()
        self.fn = nn.Sequential(nn.Linear(dim, hidden), nn.GELU(), nn.Linear(hidden, hidden),
                                nn.GELU(), nn.Linear(hidden, n_eigen))
        with torch.no_grad():
            for m in self.fn:
                if isinstance(m, nn.Linear):
                    bound = 1.0 / np.sqrt(m.in_features)
                    m.weight.copy_(torch.rand(m.weight.shape, generator=generator) * 2 * bound - bound)
                    m.bias.copy_(torch.rand(m.bias.shape, generator=generator) * 2 * bound - bound)
        self.register_buffer("scale", torch.ones(n_eigen))

    @property
    def n_eigen(self) -> int:
        return int(self.fn[-1].out_features)

    def forward(self, x: torch.Tensor) -> torch.Tensor:
        return self.fn(Fn.normalize(x.float(), dim=-1))


def affinity_kernel(X: torch.Tensor, power: float = 1.0) -> torch.Tensor:
    """Thresholded cosine affinity (to `power`), zero diagonal, degree-normalised (B, B)."""
    Xn = Fn.normalize(X.float(), dim=1)
    A = (Xn @ Xn.T).clamp_min_(0)
    if power != 1.0:
        A = A.pow_(power)
    A.fill_diagonal_(0)
    d = A.sum(1).clamp_min(1e-12).rsqrt()
    return d[:, None] * A * d[None, :]


def neuralef_loss(out: torch.Tensor, K: torch.Tensor) -> tuple[torch.Tensor, torch.Tensor]:
    """NeuralEF loss of raw outputs `out` (B, k) under the batch kernel K (B, B).

    Returns (loss, eigenvalue estimates R_jj)."""
    B = out.shape[0]
    psi = out / out.pow(2).mean(0).clamp_min(1e-12).sqrt()
    KP = K @ psi
    R = psi.T @ KP / B
    R_hat = psi.detach().T @ KP / B  # row i: stop-gradient ψ_i against live ψ_j
    diag = torch.diagonal(R_hat).detach().clamp_min(1e-6)
    penalty = (torch.triu(R_hat, diagonal=1) ** 2 / diag[:, None]).sum()
    return -torch.diagonal(R).sum() + penalty, torch.diagonal(R).detach()


def _check_unit(X: np.ndarray) -> np.ndarray:
    if not isinstance(X, np.ndarray) or X.ndim != 2 or len(X) < 2:
        raise ValueError(f"X must be a 2-D array of at least 2 patch features, got "
                         f"{getattr(X, 'shape', type(X))}")
    return np.ascontiguousarray(X, dtype=np.float32)


def fit_eigenfunctions(X: np.ndarray, n_eigen: int, seed: int, params: EigenParams = EigenParams(),
                       progress: Callable[[int, float], None] | None = None
                       ) -> tuple[EigenNet, dict[str, Any]]:
    """Train ψ on patches X (n, D) (normalised inside) with the NeuralEF objective (seeded)."""
    X = _check_unit(X)
    if not (isinstance(n_eigen, (int, np.integer)) and 1 <= n_eigen):
        raise ValueError(f"n_eigen={n_eigen} must be a positive integer")
    gen = torch.Generator().manual_seed(int(seed))
    net = EigenNet(X.shape[1], int(n_eigen), params.hidden, gen)
    opt = torch.optim.Adam(net.fn.parameters(), lr=params.lr)
    rng = np.random.default_rng(np.random.SeedSequence([int(seed), 0x4E4546]))  # "NEF"
    B = min(params.batch, len(X))
    Xt = torch.from_numpy(X)
    eig = torch.zeros(n_eigen)
    losses = []
    with torch.enable_grad():
        for step in range(int(params.steps)):
            idx = torch.from_numpy(np.sort(rng.choice(len(X), size=B, replace=False)))
            xb = Xt[idx]
            with torch.no_grad():
                K = affinity_kernel(xb, params.kernel_power)
            loss, ev = neuralef_loss(net(xb), K)
            opt.zero_grad(set_to_none=True)
            loss.backward()
            opt.step()
            eig = ev if step == 0 else 0.9 * eig + 0.1 * ev
            losses.append(float(loss.detach()))
            if progress is not None:
                progress(step + 1, losses[-1])
    net.eval().requires_grad_(False)
    with torch.no_grad():
        sq = torch.zeros(n_eigen, dtype=torch.float64)
        for i in range(0, len(X), EMBED_CHUNK):
            sq += net(Xt[i:i + EMBED_CHUNK]).double().pow(2).sum(0)
        net.scale.copy_((sq / len(X)).sqrt().clamp_min(1e-12).float())
    info = {"n_eigen": int(n_eigen), **{k: v for k, v in asdict(params).items() if k != "n_eigen"},
            "batch_used": int(B), "samples": int(len(X)),
            "eigenvalues": [round(float(v), 5) for v in eig],
            "loss_first": losses[0] if losses else None,
            "loss_last": float(np.mean(losses[-20:])) if losses else None,
            "kernel": "max(0, cos) off-diagonal, D^-1/2 A D^-1/2 per batch"}
    return net, info


class EigenClusters:
    """A fitted eigenfunction net + cluster centres in its (row-normalised) output space."""

    def __init__(self, net: EigenNet, centroids: np.ndarray, info: dict[str, Any] | None = None):
        self.net = net.eval().requires_grad_(False)
        self.centroids = np.ascontiguousarray(centroids, dtype=np.float32)
        self.info = dict(info or {})

    @property
    def n_clusters(self) -> int:
        return int(self.centroids.shape[0])

    @property
    def dim(self) -> int:
        return int(self.net.fn[0].in_features)

    def embed(self, F: np.ndarray) -> np.ndarray:
        """Row-normalised, RMS-scaled eigenfunction values (N, K) float32 of features F (N, D)."""
        F = np.asarray(F, dtype=np.float32)
        if F.ndim != 2 or F.shape[1] != self.dim:
            raise ValueError(f"features of shape {F.shape} do not fit an eigenfunction net of "
                             f"input dimension {self.dim}")
        out = np.empty((len(F), self.net.n_eigen), np.float32)
        with torch.no_grad():
            for i in range(0, len(F), EMBED_CHUNK):
                e = self.net(torch.from_numpy(F[i:i + EMBED_CHUNK])) / self.net.scale
                out[i:i + EMBED_CHUNK] = Fn.normalize(e, dim=1).numpy()
        return out

    def assign(self, F: np.ndarray) -> np.ndarray:
        """Cluster of every row of F (N,) int64: nearest centre by cosine, ties -> lowest."""
        return np.argmax(self.embed(F) @ self.centroids.T, axis=1).astype(np.int64)

    # ------------------------------------------------------------------ (de)serialisation
    def to_npz_bytes(self) -> bytes:
        """The state as an .npz (no pickle): MLP weights, output scale, centres, meta JSON."""
        arrays = {f"p_{k}": v.detach().cpu().numpy() for k, v in self.net.state_dict().items()}
        meta = {"dim": self.dim, "n_eigen": self.net.n_eigen,
                "hidden": int(self.net.fn[0].out_features), "info": self.info}
        arrays["centroids"] = self.centroids
        arrays["meta"] = np.frombuffer(json.dumps(meta, sort_keys=True).encode(), np.uint8)
        buf = io.BytesIO()
        np.savez(buf, **arrays)
        return buf.getvalue()

    @classmethod
    def from_npz(cls, path: str | Path) -> "EigenClusters":
        try:
            with np.load(path, allow_pickle=False) as z:
                data = {k: z[k] for k in z.files}
            meta = json.loads(data.pop("meta").tobytes().decode())
        except (OSError, ValueError, KeyError, json.JSONDecodeError) as exc:
            raise ValueError(f"{path} is not a readable eigenfunction state ({exc}); delete it "
                             "and rerun the command to refit") from None
        net = EigenNet(meta["dim"], meta["n_eigen"], meta["hidden"], torch.Generator().manual_seed(0))
        net.load_state_dict({k[2:]: torch.from_numpy(v) for k, v in data.items() if k.startswith("p_")})
        return cls(net, data["centroids"], meta.get("info"))


def fit_eigen_clusters(X: np.ndarray, n_clusters: int, seed: int,
                       params: EigenParams = EigenParams(), kmeans_niter: int = 30,
                       progress: Callable[[int, float], None] | None = None) -> EigenClusters:
    """Eigenfunctions of the affinity kernel on X (n, D), then seeded spherical k-means on them."""
    import faiss

    X = _check_unit(X)
    if not (isinstance(n_clusters, (int, np.integer)) and 2 <= n_clusters <= len(X)):
        raise ValueError(f"n_clusters={n_clusters} must be an integer in [2, {len(X)}]")
    n_eigen = int(params.n_eigen or n_clusters)
    net, info = fit_eigenfunctions(X, n_eigen, seed, params, progress)
    clusters = EigenClusters(net, np.zeros((n_clusters, n_eigen), np.float32), info)
    E = clusters.embed(X)
    km = faiss.Kmeans(n_eigen, int(n_clusters), niter=int(kmeans_niter), seed=int(seed),
                      spherical=True, verbose=False, min_points_per_centroid=1,
                      max_points_per_centroid=max(256, -(-len(E) // n_clusters)))
    km.train(E)
    clusters.centroids = np.ascontiguousarray(km.centroids, dtype=np.float32).reshape(n_clusters, n_eigen)
    clusters.info.update(n_clusters=int(n_clusters), kmeans_niter=int(kmeans_niter))
    return clusters


class EigenClusterProbe(nn.Module):
    """Cluster-probe-like wrapper for evaluation: scores(code) = cosines in eigen space."""

    def __init__(self, clusters: EigenClusters):
        super().__init__()
        self.net = clusters.net
        self.register_buffer("centroids", torch.from_numpy(clusters.centroids.copy()))
        self.info = clusters.info

    @property
    def n_clusters(self) -> int:
        return int(self.centroids.shape[0])

    def scores(self, code: torch.Tensor) -> torch.Tensor:
        """code (B, D, H, W) -> cosines (B, C, H, W) between ψ(code) and the centres."""
        b, d, h, w = code.shape
        rows = code.permute(0, 2, 3, 1).reshape(-1, d)
        out = []
        for i in range(0, rows.shape[0], EMBED_CHUNK):
            e = Fn.normalize(self.net(rows[i:i + EMBED_CHUNK]) / self.net.scale, dim=1)
            out.append(e @ Fn.normalize(self.centroids, dim=1).T)
        return torch.cat(out).reshape(b, h, w, -1).permute(0, 3, 1, 2)
