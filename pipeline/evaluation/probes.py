"""Probes that measure a representation, not an optimiser, and label-free collapse signals.

Everything here works on *rows*: code vectors of patches, (n, D). Used by evaluation (fitted
probes for the frozen baseline and for trained runs) and by training-time selection on the
held-out part of the training split (pipeline.training.selection).

Cluster probe: spherical k-means with K = classes (faiss, seeded, `nredo` restarts, the run with
the best objective kept), scored after Hungarian matching.

Linear probe: multinomial logistic regression fitted to convergence, full batch, with L-BFGS
(strong Wolfe line search) on *standardised* code (per-dimension mean and standard deviation of
the training rows; DINOv2 code carries a large common component that otherwise slows
first-order fitting by orders of magnitude), with a small L2 penalty `l2` (default 1e-4 on the
mean loss) so the optimum is unique even on separable data. Targets are per-patch class
histograms: the loss is the pixel cross-entropy with the logits held constant over each patch,
i.e. every labelled pixel counts once. The fit is returned folded back onto raw code
(W' = W / std, b' = b - W' . mean), so it is an ordinary 1x1 conv on code; because a 1x1 conv
commutes with bilinear upsampling, evaluation applies it to code upsampled to the label size
exactly as before. Convergence: stops when the max-abs gradient falls below `tol` or after
`max_iter` L-BFGS iterations; the final gradient norm and iteration count are reported.

Collapse signals (`code_stats`): on L2-normalised rows, the effective rank
exp(H(lambda / sum lambda)) of the centred covariance eigenvalues lambda (Roy & Vetterli 2007),
the share of variance in the top-3 principal components, and the mean pairwise cosine.
"""

from __future__ import annotations

import logging
from dataclasses import dataclass

import numpy as np
import torch

from pipeline.evaluation.metrics import (
    Confusion,
    Scores,
    cluster_scores,
    confusion,
    linear_scores,
)

log = logging.getLogger("ppap.probes")

KMEANS_NITER = 30
KMEANS_NREDO = 3
LINEAR_L2 = 1e-3
LINEAR_MAX_ITER = 500
LINEAR_TOL = 1e-5


# ---------------------------------------------------------------------------------------------
# collapse signals
# ---------------------------------------------------------------------------------------------


@dataclass(frozen=True)
class CodeStats:
    erank: float  # effective rank of the centred covariance of unit rows
    top3_share: float  # share of variance in the 3 largest principal components
    mean_cos: float  # mean cosine over distinct pairs of rows

    def as_dict(self, prefix: str = "") -> dict[str, float]:
        return {f"{prefix}erank": round(self.erank, 4), f"{prefix}top3_share": round(self.top3_share, 4),
                f"{prefix}mean_cos": round(self.mean_cos, 4)}


def code_stats(rows: np.ndarray | torch.Tensor) -> CodeStats:
    """Effective rank, top-3 variance share and mean cosine of rows (n, D), n >= 2."""
    x = torch.as_tensor(rows).detach().to(torch.float64)
    if x.ndim != 2 or x.shape[0] < 2:
        raise ValueError(f"code_stats needs (n >= 2, D) rows, got shape {tuple(x.shape)}")
    u = x / x.norm(dim=1, keepdim=True).clamp_min(1e-12)
    n = u.shape[0]
    s = u.sum(0)
    mean_cos = float((s @ s - n) / (n * (n - 1)))
    c = u - u.mean(0, keepdim=True)
    # numpy's LAPACK: torch's eigvalsh can stall for seconds on a busy multi-threaded CPU
    lam = np.clip(np.linalg.eigvalsh((c.T @ c / n).numpy()), 0, None)[::-1]
    total = float(lam.sum())
    if total <= 0:
        return CodeStats(erank=1.0, top3_share=1.0, mean_cos=mean_cos)
    p = lam / total
    nz = p[p > 0]
    erank = float(np.exp(-(nz * np.log(nz)).sum()))
    return CodeStats(erank=erank, top3_share=float(p[:3].sum()), mean_cos=mean_cos)


# ---------------------------------------------------------------------------------------------
# cluster probe
# ---------------------------------------------------------------------------------------------


def unit_rows(x: np.ndarray) -> np.ndarray:
    x = np.asarray(x, dtype=np.float32)
    n = np.sqrt(np.einsum("ij,ij->i", x, x, dtype=np.float32))[:, None]
    return np.ascontiguousarray(x / np.maximum(n, np.float32(1e-12)))


def spherical_kmeans(x: np.ndarray, k: int, seed: int, niter: int = KMEANS_NITER,
                     nredo: int = KMEANS_NREDO, normalise: bool = True) -> np.ndarray:
    """Centroids (k, D) float32 of spherical k-means on the rows of `x` (normalised here).

    faiss.Kmeans, seeded; `nredo` restarts, the one with the best objective is kept. The one
    k-means of the project: probes (evaluate, selection) and the k-means mining criterion
    (pipeline.mining.criteria.fit_kmeans, niter 20, one run, rows already unit: `normalise=False`).
    """
    import faiss

    x = unit_rows(x) if normalise else np.ascontiguousarray(x, dtype=np.float32)
    if len(x) < k:
        raise ValueError(f"{len(x)} rows cannot make k={k} clusters; use more images or a smaller k")
    km = faiss.Kmeans(x.shape[1], int(k), niter=int(niter), nredo=int(nredo), seed=int(seed),
                      spherical=True, verbose=False, min_points_per_centroid=1,
                      max_points_per_centroid=max(256, -(-len(x) // k)))
    km.train(x)
    return np.ascontiguousarray(km.centroids, dtype=np.float32).reshape(k, x.shape[1])


def assign(x: np.ndarray, centroids: np.ndarray, block: int = 65536) -> np.ndarray:
    """Argmax cosine of each row to the centroids (ties -> lowest index)."""
    c = unit_rows(centroids)
    out = np.empty(len(x), np.int64)
    for s in range(0, len(x), block):
        out[s:s + block] = np.argmax(unit_rows(x[s:s + block]) @ c.T, axis=1)
    return out


# ---------------------------------------------------------------------------------------------
# linear probe
# ---------------------------------------------------------------------------------------------


@dataclass
class LinearFit:
    """A converged multinomial logistic regression on raw code rows: logits = x @ weight.T + bias."""

    weight: np.ndarray  # (K, D) float32, on raw (unstandardised) code
    bias: np.ndarray  # (K,) float32
    iterations: int
    grad_max: float  # max-abs gradient of the objective at the end (standardised space)
    loss: float  # final mean cross-entropy (without the L2 term)
    converged: bool
    l2: float

    def logits(self, x: np.ndarray) -> np.ndarray:
        return np.asarray(x, np.float32) @ self.weight.T + self.bias

    def predict(self, x: np.ndarray) -> np.ndarray:
        return np.argmax(self.logits(x), axis=1)

    def info(self) -> dict[str, float | int | bool]:
        return {"linear_fit": "lbfgs", "linear_iterations": self.iterations,
                "linear_grad_max": self.grad_max, "linear_loss": self.loss,
                "linear_converged": self.converged, "linear_l2": self.l2}


def patch_histograms(labels: np.ndarray, grid: tuple[int, int], num_classes: int) -> np.ndarray:
    """(n, S, S) pixel labels (ignore < 0) -> (n * h * w, K) float32 counts of each class under
    each patch, rows b*h*w + y*w + x. The label side must be a multiple of the grid."""
    labels = np.asarray(labels)
    n, S1, S2 = labels.shape
    h, w = grid
    if S1 % h or S2 % w:
        raise ValueError(f"label size {S1}x{S2} is not a multiple of the patch grid {h}x{w}")
    ph, pw = S1 // h, S2 // w
    lab = labels.reshape(n, h, ph, w, pw).transpose(0, 1, 3, 2, 4).reshape(n * h * w, ph * pw)
    lab = lab.astype(np.int64)
    ok = (lab >= 0) & (lab < num_classes)
    rows = np.broadcast_to(np.arange(lab.shape[0])[:, None], lab.shape)
    flat = rows[ok] * num_classes + lab[ok]
    counts = np.bincount(flat, minlength=lab.shape[0] * num_classes)
    return counts.reshape(lab.shape[0], num_classes).astype(np.float32)


def fit_linear(x: np.ndarray, targets: np.ndarray, num_classes: int | None = None, *,
               l2: float = LINEAR_L2, max_iter: int = LINEAR_MAX_ITER, tol: float = LINEAR_TOL,
               device: str | torch.device = "cpu") -> LinearFit:
    """Fit multinomial logistic regression to convergence (see module docstring).

    `targets`: (n,) int class ids (< 0 ignored) or (n, K) non-negative class counts / weights
    per row (e.g. patch_histograms); rows with no target mass are dropped.
    """
    x = np.asarray(x, dtype=np.float32)
    t = np.asarray(targets)
    if t.ndim == 1:
        if num_classes is None:
            raise ValueError("pass num_classes with integer targets")
        keep = (t >= 0) & (t < num_classes)
        y = np.zeros((len(t), num_classes), np.float32)
        y[np.flatnonzero(keep), t[keep].astype(np.int64)] = 1.0
    else:
        y = t.astype(np.float32, copy=False)
        if y.min(initial=0) < 0:
            raise ValueError("target histograms must be non-negative")
    if len(y) != len(x):
        raise ValueError(f"{len(x)} rows of code but {len(y)} rows of targets")
    k = y.shape[1]
    mass = y.sum(1)
    keep = mass > 0
    x, y, mass = x[keep], y[keep], mass[keep]
    if len(x) == 0:
        raise ValueError("no labelled rows to fit a linear probe on")
    dev = torch.device(device)
    X = torch.from_numpy(x).to(dev)
    mean = X.mean(0)
    std = X.std(0).clamp_min(1e-6)
    Z = (X - mean) / std
    del X
    Y = torch.from_numpy(y).to(dev)
    total_mass = float(mass.sum())
    W = torch.zeros(k, Z.shape[1], device=dev, requires_grad=True)
    b = torch.zeros(k, device=dev, requires_grad=True)
    opt = torch.optim.LBFGS([W, b], lr=1, max_iter=max_iter, tolerance_grad=tol,
                            tolerance_change=1e-12, history_size=20, line_search_fn="strong_wolfe")
    state = {"ce": float("nan")}

    def closure():
        opt.zero_grad(set_to_none=True)
        logp = torch.log_softmax(Z @ W.T + b, dim=1)
        ce = -(Y * logp).sum() / total_mass
        loss = ce + 0.5 * l2 * (W * W).sum()
        loss.backward()
        state["ce"] = float(ce.detach())
        return loss

    with torch.enable_grad():
        opt.step(closure)
        closure()  # gradient at the final point
    grad_max = float(max(W.grad.abs().max(), b.grad.abs().max()))
    n_iter = int(opt.state[opt._params[0]].get("n_iter", 0))
    with torch.no_grad():
        w_raw = (W / std).detach()
        b_raw = (b - (w_raw * mean).sum(1)).detach()
    converged = grad_max <= tol * 10
    if not converged:
        log.warning("linear probe: L-BFGS stopped after %d iterations with max gradient %.2e "
                    "(tolerance %.0e)", n_iter, grad_max, tol)
    return LinearFit(weight=w_raw.cpu().numpy().astype(np.float32),
                     bias=b_raw.cpu().numpy().astype(np.float32), iterations=n_iter,
                     grad_max=grad_max, loss=state["ce"], converged=converged, l2=l2)


# ---------------------------------------------------------------------------------------------
# patch-level scores (selection on held-out training images)
# ---------------------------------------------------------------------------------------------


def cluster_miou(x: np.ndarray, patch_labels: np.ndarray, k: int, seed: int,
                 num_classes: int | None = None) -> Scores:
    """Spherical k-means (k clusters) of the rows, Hungarian-matched to patch labels (-1 ignored)."""
    num_classes = num_classes or k
    cent = spherical_kmeans(x, k, seed)
    pred = assign(x, cent)
    conf = confusion(patch_labels, pred, num_classes, k)
    return cluster_scores(conf)[0]


def crossfit_linear_miou(x: np.ndarray, hist: np.ndarray, patch_labels: np.ndarray,
                         groups: np.ndarray, num_classes: int, folds: int = 2,
                         seed: int = 0) -> Scores:
    """Linear-probe mIoU by cross-fitting: source images (`groups`) are split into `folds`
    seeded folds; each fold is predicted by a probe fitted to convergence on the others."""
    uniq = np.unique(groups)
    if len(uniq) < folds:
        raise ValueError(f"{len(uniq)} held-out images cannot make {folds} folds")
    rng = np.random.default_rng([seed, 0x4C50])
    fold_of = dict(zip(uniq.tolist(), (rng.permutation(len(uniq)) % folds).tolist()))
    f = np.array([fold_of[g] for g in groups.tolist()])
    conf = Confusion(num_classes)
    for i in range(folds):
        test = f == i
        fit = fit_linear(x[~test], hist[~test])
        conf.update(patch_labels[test], fit.predict(x[test]))
    return linear_scores(conf.matrix)

