"""Segmentation metrics over a whole split (docs/method.md §6).

One confusion matrix is accumulated over every valid pixel of the split (0 <= gt < K); rows are
ground-truth classes, columns predicted ids. Cluster predictions (C ids, C may differ from K) are
matched to classes once, on that matrix, by the Hungarian algorithm (maximising matched pixels);
clusters left unmatched when C > K count as wrong everywhere. Linear-probe predictions are class
ids already (identity matching). IoU_k = TP/(TP+FP+FN); mIoU averages the classes whose IoU is
defined (TP+FP+FN > 0); pixel accuracy = sum TP / sum valid. Reported values are x100.
"""

from __future__ import annotations

from dataclasses import dataclass

import numpy as np
from scipy.optimize import linear_sum_assignment


def confusion(gt: np.ndarray, pred: np.ndarray, num_classes: int, num_pred: int | None = None) -> np.ndarray:
    """(K, C) int64 counts of (gt, pred) over pixels with 0 <= gt < K; pred must lie in [0, C)."""
    num_pred = num_classes if num_pred is None else num_pred
    gt = np.asarray(gt)
    pred = np.asarray(pred)
    if gt.shape != pred.shape:
        raise ValueError(f"ground truth shape {gt.shape} and prediction shape {pred.shape} differ; "
                         "upsample predictions to the label size first")
    if num_classes <= 0 or num_pred <= 0:
        raise ValueError(f"num_classes={num_classes} and num_pred={num_pred} must be positive")
    g = gt.reshape(-1).astype(np.int64, copy=False)
    p = pred.reshape(-1).astype(np.int64, copy=False)
    keep = (g >= 0) & (g < num_classes)
    g, p = g[keep], p[keep]
    if p.size and (p.min() < 0 or p.max() >= num_pred):
        raise ValueError(f"prediction ids span [{p.min()}, {p.max()}] but must lie in [0, {num_pred}); "
                         "pass the right number of predicted ids (num_pred)")
    counts = np.bincount(g * num_pred + p, minlength=num_classes * num_pred)
    return counts.reshape(num_classes, num_pred).astype(np.int64, copy=False)


class Confusion:
    """Running (K, C) confusion matrix; `update` adds a batch of label maps."""

    def __init__(self, num_classes: int, num_pred: int | None = None):
        self.num_classes = int(num_classes)
        self.num_pred = int(num_classes if num_pred is None else num_pred)
        self.matrix = np.zeros((self.num_classes, self.num_pred), dtype=np.int64)

    def update(self, gt: np.ndarray, pred: np.ndarray) -> None:
        self.matrix += confusion(gt, pred, self.num_classes, self.num_pred)


def hungarian_mapping(conf: np.ndarray) -> np.ndarray:
    """For each predicted id (column), the class it is matched to, or -1 if unmatched.

    One-to-one assignment maximising the matched pixel count; works on rectangular matrices.
    """
    conf = np.asarray(conf)
    rows, cols = linear_sum_assignment(conf, maximize=True)
    mapping = np.full(conf.shape[1], -1, dtype=np.int64)
    mapping[cols] = rows
    return mapping


def matched_confusion(conf: np.ndarray, mapping: np.ndarray) -> np.ndarray:
    """(K, K+1) matrix with columns re-labelled as classes; the last column holds the pixels
    predicted as unmatched ids (wrong for every class, a false positive for none)."""
    conf = np.asarray(conf, dtype=np.int64)
    k = conf.shape[0]
    if mapping.shape != (conf.shape[1],):
        raise ValueError(f"mapping has shape {mapping.shape}, expected ({conf.shape[1]},)")
    out = np.zeros((k, k + 1), dtype=np.int64)
    target = np.where(mapping >= 0, mapping, k)
    np.add.at(out.T, target, conf.T)
    return out


@dataclass(frozen=True)
class Scores:
    accuracy: float  # pixel accuracy x100
    miou: float  # mean IoU over classes with a defined IoU, x100
    per_class_iou: list[float | None]  # x100; None where TP+FP+FN = 0


def scores(matched: np.ndarray) -> Scores:
    """Metrics of a (K, K) or (K, K+1) class-aligned confusion matrix (extra column = unmatched)."""
    m = np.asarray(matched, dtype=np.float64)
    k = m.shape[0]
    if m.shape[1] not in (k, k + 1):
        raise ValueError(f"matched confusion must be (K, K) or (K, K+1), got {m.shape}")
    tp = np.diag(m[:, :k])
    fn = m.sum(axis=1) - tp  # every pixel of class k not predicted as k (incl. unmatched)
    fp = m[:, :k].sum(axis=0) - tp
    denom = tp + fp + fn
    with np.errstate(invalid="ignore", divide="ignore"):
        iou = np.where(denom > 0, tp / np.where(denom > 0, denom, 1), np.nan)
    total = m.sum()
    acc = float(tp.sum() / total * 100) if total > 0 else float("nan")
    defined = ~np.isnan(iou)
    miou = float(iou[defined].mean() * 100) if defined.any() else float("nan")
    per_class = [None if np.isnan(v) else float(v * 100) for v in iou]
    return Scores(accuracy=acc, miou=miou, per_class_iou=per_class)


def cluster_scores(conf: np.ndarray) -> tuple[Scores, np.ndarray]:
    """Hungarian-matched metrics of a (K, C) cluster confusion; returns (scores, mapping)."""
    mapping = hungarian_mapping(conf)
    return scores(matched_confusion(conf, mapping)), mapping


def linear_scores(conf: np.ndarray) -> Scores:
    """Identity-matched metrics of a (K, K) class confusion."""
    conf = np.asarray(conf)
    if conf.shape[0] != conf.shape[1]:
        raise ValueError(f"a linear-probe confusion must be square (K, K), got {conf.shape}")
    return scores(conf)
