"""PriMaPs: principal mask proposals per crop, their pseudo-labels, and PriMaPs-EM prototypes.

After Hahn, Araslanov, Schaub-Meyer and Roth, "Boosting Unsupervised Semantic Segmentation with
Principal Mask Proposals" (TMLR 2024). Everything here works on cached patch features (no image
forward pass) and is a pure, seeded function of its inputs.

Mask proposals of one crop (`principal_masks`), on its L2-normalised patch features f̂:
  repeat while less than `coverage` of the crop's patches are assigned:
    1. v = first principal component of the not-yet-assigned features (centred, exact SVD via
       the smaller Gram matrix). A principal direction has no sign; we take the end of the
       axis that some remaining feature is most aligned with (max |f̂ · v|), so the result does
       not depend on the sign LAPACK happens to return.
    2. f~ = the remaining feature nearest to that direction (max cosine).
    3. M = f~ · f̂ over the remaining patches; mask = {remaining j : M_j > psi · max M}
       (max M = 1, f~ itself, so the mask is never empty and the loop ends).
  Patches left when the loop stops are *unassigned* (mask id -1). PriMaPs stops at 95%
  (COVERAGE) like the authors' code; coverage = 1 assigns every patch.
  Deviations from the paper, for cached patch-level features: masks are computed at patch
  resolution, without the 3x3 median filter, the "background" residual mask and the dense CRF
  that the authors apply at pixel resolution.

Pseudo-labels (`pseudo_labels`): each mask takes the majority class of its patches under a
class assignment (nearest of K spherical prototypes; ties -> lowest class); unassigned patches
keep -1.

PriMaPs-EM (`fit_primaps_em`): K class prototypes on the unit sphere, fitted to any features:
  init  batch-wise spherical (cosine) k-means: k-means++ seeds (distance 1 - cosine, among a
        seeded sample of PLUSPLUS_SAMPLE patches), then
        `init_epochs` passes over the crops in seeded batches, each centre the normalised running
        sum of the patches assigned to it in the current pass (Sculley's mini-batch k-means,
        per-centre rate 1/count, restarted from the current centres every pass); a centre that
        received nothing in a pass is re-seeded on a random patch.
  EM    student prototypes S (trained, Adam) and an EMA teacher T (decay `ema_decay` per step,
        0.98 as the authors). Per step, on a seeded batch of crops: teacher classes =
        argmax cos(f̂, T); pseudo-label of every mask = majority teacher class in it; loss =
        focal-weighted cross-entropy of softmax(cos(f̂, S) / temperature) against the
        pseudo-labels (class weight (1 - mean predicted probability of the class)^gamma,
        gamma 2 as the authors; unassigned patches ignored).
  The result is the teacher's prototypes, normalised: a cosine cluster probe scored exactly
  like k-means centroids (Hungarian matching).
PriMaPs reports DINOv2 ViT-S/14 on COCO-Stuff-27 cluster mIoU 22.9 (k-means) -> 23.8 (PriMaPs-EM).

API
---
principal_masks(X, psi=PSI, coverage=COVERAGE) -> (n,) int64 mask per patch (0.., -1 unassigned)
crop_masks(F, patches_per_crop, psi, coverage) -> (N,) int64 batch-wide mask ids (-1 unassigned)
majority_labels(mask_id, classes, n_classes) -> (N,) int64 majority class of each row's mask
pseudo_labels(F, patches_per_crop, prototypes, psi, coverage) -> (N,) int64 (-1 unassigned)
minibatch_spherical_kmeans(X, k, seed, epochs, batch_crops) -> (k, D) float32
fit_primaps_em(X, k, seed, params=EMParams(), masks=None, progress=None) -> (prototypes, info)
"""

from __future__ import annotations

import logging
from dataclasses import asdict, dataclass
from typing import Any, Callable

import numpy as np

log = logging.getLogger("ppap.primaps")

PLUSPLUS_SAMPLE = 20_000  # patches among which the k-means++ seeds of the EM init are drawn
PSI = 0.4  # mask threshold relative to the cosine map's maximum (the paper's value)
COVERAGE = 0.95  # stop once this fraction of a crop's patches is assigned (the authors' code)


def _check_psi_coverage(psi: float, coverage: float) -> None:
    if not (0.0 <= float(psi) < 1.0):
        raise ValueError(f"psi={psi} must lie in [0, 1): masks keep patches with cosine above "
                         "psi x the maximum; PriMaPs uses 0.4")
    if not (0.0 < float(coverage) <= 1.0):
        raise ValueError(f"coverage={coverage} must lie in (0, 1]: the fraction of a crop's "
                         "patches to assign before stopping (PriMaPs: 0.95)")


def _unit_rows(X: np.ndarray) -> np.ndarray:
    X = np.asarray(X, dtype=np.float32)
    n = np.sqrt(np.einsum("ij,ij->i", X, X))
    return X / np.maximum(n, 1e-12)[:, None]


def _first_pc(R: np.ndarray) -> np.ndarray:
    """Unit first principal direction of the rows of R (centred), via the smaller Gram matrix."""
    Rc = (R - R.mean(0, dtype=np.float64)).astype(np.float64)
    n, d = Rc.shape
    if n <= d:
        w, U = np.linalg.eigh(Rc @ Rc.T)
        v = Rc.T @ U[:, -1]
    else:
        w, V = np.linalg.eigh(Rc.T @ Rc)
        v = V[:, -1]
    norm = np.linalg.norm(v)
    return v / norm if norm > 0 else v


def principal_masks(X: np.ndarray, psi: float = PSI, coverage: float = COVERAGE) -> np.ndarray:
    """Mask proposals of one crop's patch features X (n, D) -> (n,) int64 mask ids, -1 unassigned.

    Masks are numbered in extraction order (mask 0 follows the dominant principal direction).
    """
    _check_psi_coverage(psi, coverage)
    X = np.asarray(X)
    if X.ndim != 2 or X.shape[0] == 0:
        raise ValueError(f"X must be the (n, D) patch features of one crop, got shape {X.shape}")
    Xn = _unit_rows(X).astype(np.float64)
    n = Xn.shape[0]
    out = np.full(n, -1, np.int64)
    remaining = np.ones(n, bool)
    need = int(np.ceil(coverage * n - 1e-9))
    m = 0
    while n - remaining.sum() < need:
        idx = np.flatnonzero(remaining)
        R = Xn[idx]
        if len(idx) == 1:
            nearest = 0
        else:
            v = _first_pc(R)
            proj = R @ v
            hi, lo = proj.max(), proj.min()
            nearest = int(np.argmax(proj)) if hi >= -lo else int(np.argmin(proj))
        ft = R[nearest]
        M = R @ ft
        top = M.max()
        if not top > 0:  # only zero features left: nothing to propose
            break
        sel = M > psi * top
        sel[nearest] = True  # the seed always belongs to its own mask (guards float ties)
        out[idx[sel]] = m
        remaining[idx[sel]] = False
        m += 1
    return out


def crop_masks(F: np.ndarray, patches_per_crop: int, psi: float = PSI,
               coverage: float = COVERAGE) -> np.ndarray:
    """Masks of every crop of a batch F (N = B * patches_per_crop rows, crop-major).

    Returns batch-wide ids: crop b's mask m gets id b * patches_per_crop + m; -1 = unassigned.
    """
    F = np.asarray(F)
    hw = int(patches_per_crop)
    if F.ndim != 2 or hw <= 0 or F.shape[0] % hw:
        raise ValueError(f"F of shape {F.shape} is not a whole number of crops of "
                         f"{patches_per_crop} patches; pass the batch's (B*h*w, D) features")
    out = np.empty(F.shape[0], np.int64)
    for b in range(F.shape[0] // hw):
        local = principal_masks(F[b * hw:(b + 1) * hw], psi, coverage)
        out[b * hw:(b + 1) * hw] = np.where(local >= 0, local + b * hw, -1)
    return out


def majority_labels(mask_id: np.ndarray, classes: np.ndarray, n_classes: int) -> np.ndarray:
    """Each row gets the majority class (ties -> lowest) of the rows sharing its mask; -1 stays."""
    mask_id = np.asarray(mask_id, np.int64).ravel()
    classes = np.asarray(classes, np.int64).ravel()
    if mask_id.shape != classes.shape:
        raise ValueError(f"mask_id {mask_id.shape} and classes {classes.shape} must match")
    out = np.full(mask_id.shape, -1, np.int64)
    ok = mask_id >= 0
    if not ok.any():
        return out
    if classes[ok].min() < 0 or classes[ok].max() >= n_classes:
        raise ValueError(f"classes of assigned rows must lie in [0, {n_classes})")
    uniq, compact = np.unique(mask_id[ok], return_inverse=True)
    votes = np.bincount(compact * n_classes + classes[ok], minlength=len(uniq) * n_classes)
    winner = votes.reshape(len(uniq), n_classes).argmax(1)
    out[ok] = winner[compact]
    return out


def nearest_prototype(F: np.ndarray, prototypes: np.ndarray) -> np.ndarray:
    """argmax cosine of every row of F to the (normalised) prototypes; ties -> lowest index."""
    P = _unit_rows(prototypes)
    out = np.empty(len(F), np.int64)
    step = 65536
    for i in range(0, len(F), step):
        out[i:i + step] = np.argmax(np.asarray(F[i:i + step], np.float32) @ P.T, axis=1)
    return out


def pseudo_labels(F: np.ndarray, patches_per_crop: int, prototypes: np.ndarray,
                  psi: float = PSI, coverage: float = COVERAGE) -> np.ndarray:
    """PriMaPs pseudo-label of every row of a batch: its mask's majority prototype class."""
    masks = crop_masks(F, patches_per_crop, psi, coverage)
    return majority_labels(masks, nearest_prototype(F, prototypes), len(prototypes))


# ----------------------------------------------------------------------------------------
# PriMaPs-EM
# ----------------------------------------------------------------------------------------


@dataclass(frozen=True)
class EMParams:
    steps: int = 2000  # EM optimisation steps (one batch of crops each)
    batch_crops: int = 32  # crops per step (the authors' batch size)
    init_epochs: int = 2  # passes of batch-wise spherical k-means before EM
    lr: float = 5e-3  # Adam on the student prototypes (the authors' segmentation-head lr)
    ema_decay: float = 0.98  # teacher = EMA of the student, per step (the authors' value)
    focal_gamma: float = 2.0  # focal exponent (the authors' value)
    temperature: float = 0.1  # student logits = cosine / temperature
    psi: float = PSI
    coverage: float = COVERAGE

    def __post_init__(self) -> None:
        _check_psi_coverage(self.psi, self.coverage)
        for name in ("steps", "init_epochs"):
            if int(getattr(self, name)) < 0:
                raise ValueError(f"{name}={getattr(self, name)} must be >= 0")
        if self.batch_crops <= 0:
            raise ValueError(f"batch_crops={self.batch_crops} must be positive")
        for name in ("lr", "temperature"):
            if not getattr(self, name) > 0:
                raise ValueError(f"{name}={getattr(self, name)} must be > 0")
        if not 0.0 <= self.ema_decay < 1.0:
            raise ValueError(f"ema_decay={self.ema_decay} must lie in [0, 1)")
        if self.focal_gamma < 0:
            raise ValueError(f"focal_gamma={self.focal_gamma} must be >= 0")


def _check_crops(X: np.ndarray, k: int) -> tuple[int, int, int]:
    X = np.asarray(X) if not hasattr(X, "shape") else X
    if len(X.shape) != 3 or X.shape[0] == 0 or X.shape[1] == 0:
        raise ValueError(f"X must hold crops of patch features (n_crops, h*w, D), got {X.shape}")
    n, hw, d = (int(s) for s in X.shape)
    if not (isinstance(k, (int, np.integer)) and 1 <= k <= n * hw):
        raise ValueError(f"k={k} prototypes need 1 <= k <= {n * hw} patches")
    return n, hw, d


def _batches(rng: np.random.Generator, n: int, size: int) -> list[np.ndarray]:
    perm = rng.permutation(n)
    return [np.sort(perm[i:i + size]) for i in range(0, n, size)]


def minibatch_spherical_kmeans(X: np.ndarray, k: int, seed: int, epochs: int = 2,
                               batch_crops: int = 32) -> np.ndarray:
    """Batch-wise cosine k-means over crops X (n, h*w, D) -> (k, D) unit prototypes (seeded)."""
    n, hw, d = _check_crops(X, k)
    rng = np.random.default_rng(np.random.SeedSequence([int(seed), 0x454D]))  # "EM"
    # k-means++ seeding (distance 1 - cosine) on a seeded sample of patches
    flat = np.sort(rng.choice(n * hw, size=min(n * hw, PLUSPLUS_SAMPLE), replace=False))
    pool = _unit_rows(np.stack([np.asarray(X[i // hw][i % hw], np.float32) for i in flat]))
    chosen = [int(rng.integers(len(pool)))]
    dist = 1.0 - pool @ pool[chosen[0]]
    for _ in range(1, k):
        w = np.maximum(dist, 0).astype(np.float64) ** 2
        nxt = int(rng.choice(len(pool), p=w / w.sum())) if w.sum() > 0 else int(rng.integers(len(pool)))
        chosen.append(nxt)
        dist = np.minimum(dist, 1.0 - pool @ pool[nxt])
    C = pool[chosen].copy()
    for _ in range(int(epochs)):
        S = C.astype(np.float64).copy()  # running sums of this pass (the centre counts once)
        hit = np.zeros(k, np.int64)
        for b in _batches(rng, n, batch_crops):
            R = _unit_rows(np.asarray(X[b], np.float32).reshape(-1, d))
            a = np.argmax(R @ C.T, axis=1)
            np.add.at(S, a, R.astype(np.float64))
            hit += np.bincount(a, minlength=k)
            C = _unit_rows(S.astype(np.float32))
        dead = np.flatnonzero(hit == 0)
        if dead.size:  # re-seed centres that attracted nothing in this pass
            flat = rng.choice(n * hw, size=dead.size, replace=False)
            S[dead] = _unit_rows(np.stack([np.asarray(X[i // hw][i % hw], np.float32) for i in flat]))
            C = _unit_rows(S.astype(np.float32))
    return np.ascontiguousarray(C, dtype=np.float32)


def focal_cross_entropy(logits, target, gamma: float):
    """PriMaPs' focal loss: CE with class weights (1 - batch-mean probability of the class)^gamma,
    summed over labelled rows (target >= 0) and divided by their number (0 if none)."""
    import torch
    import torch.nn.functional as Fn

    ok = target >= 0
    if not bool(ok.any()):
        return logits.sum() * 0.0
    with torch.no_grad():
        weight = (1.0 - Fn.softmax(logits.detach(), dim=1).mean(0)).clamp_min(0) ** gamma
    ce = Fn.cross_entropy(logits[ok], target[ok], reduction="none")
    return (weight[target[ok]] * ce).sum() / ok.sum()


def fit_primaps_em(
    X: np.ndarray,
    k: int,
    seed: int,
    params: EMParams = EMParams(),
    masks: np.ndarray | None = None,
    progress: Callable[[int, float], None] | None = None,
    init: np.ndarray | None = None,
) -> tuple[np.ndarray, dict[str, Any]]:
    """PriMaPs-EM class prototypes (k, D) float32 (unit rows) from crops X (n, h*w, D).

    X: features of every crop (any float dtype; normalised here), e.g. a float16 array.
    masks: (n, h*w) mask ids per crop as from principal_masks (computed when None).
    progress(step, loss): optional callback after each EM step.
    init: (k, D) starting prototypes instead of the batch-wise k-means (e.g. to test EM alone).
    Returns (prototypes, info) where info records the settings, mask statistics and losses.
    """
    import torch

    n, hw, d = _check_crops(X, k)
    if masks is None:
        masks = np.stack([principal_masks(X[i], params.psi, params.coverage) for i in range(n)])
    masks = np.asarray(masks, np.int64)
    if masks.shape != (n, hw):
        raise ValueError(f"masks must have shape ({n}, {hw}), got {masks.shape}")
    if init is None:
        init = minibatch_spherical_kmeans(X, k, seed, params.init_epochs, params.batch_crops)
    elif np.shape(init) != (k, d):
        raise ValueError(f"init must have shape ({k}, {d}), got {np.shape(init)}")
    init = _unit_rows(init)
    student = torch.nn.Parameter(torch.from_numpy(init.copy()))
    teacher = torch.from_numpy(init.copy())
    opt = torch.optim.Adam([student], lr=params.lr)
    rng = np.random.default_rng(np.random.SeedSequence([int(seed), 0x50454D]))  # "PEM"
    offsets = (np.arange(n, dtype=np.int64) * hw)[:, None]
    gids = np.where(masks >= 0, masks + offsets, -1)  # masks numbered batch-wide
    order: list[np.ndarray] = []
    losses = []
    with torch.enable_grad():
        for step in range(int(params.steps)):
            if not order:
                order = _batches(rng, n, params.batch_crops)[::-1]
            b = order.pop()
            R = torch.from_numpy(_unit_rows(np.asarray(X[b], np.float32).reshape(-1, d)))
            with torch.no_grad():
                t_cls = (R @ torch.nn.functional.normalize(teacher, dim=1).T).argmax(1).numpy()
            target = torch.from_numpy(majority_labels(gids[b].ravel(), t_cls, k))
            logits = R @ torch.nn.functional.normalize(student, dim=1).T / params.temperature
            loss = focal_cross_entropy(logits, target, params.focal_gamma)
            opt.zero_grad(set_to_none=True)
            loss.backward()
            opt.step()
            with torch.no_grad():
                teacher.mul_(params.ema_decay).add_(student.detach(), alpha=1 - params.ema_decay)
            losses.append(float(loss.detach()))
            if progress is not None:
                progress(step + 1, losses[-1])
    protos = _unit_rows(teacher.numpy())
    assigned = masks >= 0
    info = {
        "method": "primaps-em", **asdict(params), "k": int(k), "crops": int(n),
        "masks_per_crop": float(np.mean([len(np.unique(m[m >= 0])) for m in masks])),
        "assigned_fraction": float(assigned.mean()),
        "loss_first": losses[0] if losses else None,
        "loss_last": float(np.mean(losses[-20:])) if losses else None,
    }
    return np.ascontiguousarray(protos, dtype=np.float32), info
