"""Scoring a training run on held-out *training* images, to select checkpoints without ever
looking at the evaluation split.

The held-out crops are the crops of whole source images that mining left out
(`mine --holdout`, pipeline.mining.batching.holdout_split): never mined, never trained on. At a
selection point the branch encodes their cached mid tokens and the run is scored at patch level
(each patch's label = the majority label of its pixels, -1 if mostly ignore):

  cluster_miou / cluster_acc  spherical k-means (K = classes) on the held-out code,
                              Hungarian-matched to the patch labels: the mean over `seeds`
                              k-means seeds (seed, seed+1, ...; each with restarts), which
                              steadies the score between selection points; the seeds' values
                              and their std are kept (`cluster_miou_seeds`, `cluster_miou_std`)
  linear_miou / linear_acc    2-fold cross-fitting by source image: a linear probe fitted to
                              convergence on one half of the held-out images predicts the other
  erank, top3_share, mean_cos label-free collapse signals of the held-out code
                              (pipeline.evaluation.probes.code_stats)

Without labels only the label-free signals are computed. Selection rules:

  best       the point with the highest `select_metric` (ties: the earlier point)
  labelfree  the last point, in order, whose held-out effective rank is still at least
             `rank_floor` x the rank at step 0 (the frozen features), stopping at the first point
             that falls below it: a stopping rule that needs no labels at all
"""

from __future__ import annotations

import logging
from dataclasses import dataclass
from typing import Any

import numpy as np
import torch

from pipeline.artifacts.features import FeatureStore, take_rows
from pipeline.evaluation import probes
from pipeline.evaluation.seeds import seed_list, spread

log = logging.getLogger("ppap.selection")

ENCODE_BATCH = 32
SELECT_METRICS = ("cluster_miou", "linear_miou", "labelfree")


@dataclass
class Holdout:
    """The held-out crops of a feature cache's training split, loaded once."""

    crops: np.ndarray  # (n,) crop indices into the training split
    tokens: torch.Tensor  # (n, 1+h*w, D) float32 mid tokens
    groups: np.ndarray  # (n*h*w,) source image of each patch row
    patch_labels: np.ndarray | None  # (n*h*w,) int64, -1 ignore
    histograms: np.ndarray | None  # (n*h*w, K) pixel counts per class under each patch
    num_classes: int
    grid: tuple[int, int]

    @property
    def n_images(self) -> int:
        return int(len(np.unique(self.groups)))

    @classmethod
    def load(cls, store: FeatureStore, crops: np.ndarray) -> "Holdout":
        g = store.split("train")
        crops = np.sort(np.asarray(crops, dtype=np.int64))
        h, w = store.grid("train")
        tokens = torch.from_numpy(take_rows(g["tokens"], crops).astype(np.float32))
        src = np.asarray(g["image_index"][:])[crops]
        groups = np.repeat(src, h * w)
        labels = hist = None
        if store.has_labels:
            labels = take_rows(g["patch_labels"], crops).reshape(-1).astype(np.int64)
            hist = probes.patch_histograms(take_rows(g["labels"], crops), (h, w), store.num_classes)
        return cls(crops, tokens, groups, labels, hist, store.num_classes, (h, w))

    def code(self, branch) -> np.ndarray:
        """Held-out code rows (n*h*w, D) float32, rows b*h*w + y*w + x."""
        dev = next(branch.parameters()).device
        out = []
        was_training = branch.training
        branch.eval()
        with torch.no_grad():
            for s in range(0, len(self.tokens), ENCODE_BATCH):
                c = branch.encode(self.tokens[s:s + ENCODE_BATCH].to(dev), self.grid).float()
                out.append(c.flatten(2).transpose(1, 2).reshape(-1, c.shape[1]).cpu().numpy())
        branch.train(was_training)
        return np.concatenate(out)

    def score(self, branch, seed: int, seeds: int = 1) -> dict[str, Any]:
        """The selection record of `branch` now (see the module docstring); the cluster scores
        are means over `seeds` k-means seeds."""
        x = self.code(branch)
        rec: dict[str, Any] = probes.code_stats(x).as_dict()
        if self.patch_labels is not None:
            fits = [probes.cluster_miou(x, self.patch_labels, self.num_classes, s)
                    for s in seed_list(seed, seeds)]
            miou, acc = spread(f.miou for f in fits), spread(f.accuracy for f in fits)
            rec.update(cluster_miou=round(miou.mean, 3), cluster_acc=round(acc.mean, 3))
            if seeds > 1:
                rec.update(cluster_miou_std=round(miou.std, 3),
                           cluster_miou_seeds=[round(v, 3) for v in miou.values])
            if self.n_images >= 2:
                ls = probes.crossfit_linear_miou(x, self.histograms, self.patch_labels, self.groups,
                                                 self.num_classes, folds=2, seed=seed)
                rec.update(linear_miou=round(ls.miou, 3), linear_acc=round(ls.accuracy, 3))
        return rec


def labelfree_choice(records: list[dict[str, Any]], rank_floor: float) -> int | None:
    """Index of the label-free choice among selection records in step order (see module doc)."""
    if not records:
        return None
    ref = records[0]["erank"]
    choice = 0
    for i, r in enumerate(records):
        if r["erank"] < rank_floor * ref:
            break
        choice = i
    return choice


def best_choice(records: list[dict[str, Any]], metric: str) -> int | None:
    """Index of the record with the highest `metric` (earliest on ties)."""
    vals = [r.get(metric) for r in records]
    if not records or any(v is None for v in vals):
        return None
    return int(np.argmax(np.asarray(vals, dtype=np.float64)))
