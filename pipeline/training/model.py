"""The trained parts of PPAP (docs/method.md §1): fine-tuned last block, projection head, probes.

The fine-tuned branch consumes the cached mid tokens (tokens entering the backbone's last
block, CLS first) and never runs the rest of the backbone:

    tokens (B, P+h*w, D) -> copy of last block (trainable) -> backbone norm (frozen) -> drop prefix
        -> code (B, D, h, w)                       (== the cached frozen feats at initialisation)
        -> Linear(D, D) -> L2 normalise -> z (B*h*w, D), rows b*h*w + y*w + x (the rows of F)

Probes train on `code.detach()` and serve evaluation only: a 1x1-conv linear probe (logits
upsampled bilinearly to the label size, cross-entropy, ignore = -1) and a cluster probe of K
learnable centroids (loss = -mean over pixels of the max cosine to a centroid).

All random initialisation draws from an explicit torch.Generator (never the global RNG).

Checkpoints hold these modules' state dicts (their keys and the file's checksum:
pipeline/artifacts/training.py); `modules_from_checkpoint` rebuilds the modules from one.
"""

from __future__ import annotations

import copy
import logging
import math
from typing import Any, NamedTuple

import torch
import torch.nn.functional as Fn
from torch import nn

log = logging.getLogger("ppap.model")

CKPT_FORMAT = "ppap-train/1"
# cluster-probe size when the cache has no labels to count classes from (COCO-Stuff-27's K)
UNLABELLED_CLUSTERS = 27


def _seeded_uniform_(t: torch.Tensor, bound: float, gen: torch.Generator) -> None:
    with torch.no_grad():
        t.copy_(torch.rand(t.shape, generator=gen, dtype=t.dtype) * (2 * bound) - bound)


def last_block_and_norm(backbone: nn.Module) -> tuple[nn.Module, nn.Module]:
    """The backbone's last transformer block and final norm (pipeline.data.backbones when present)."""
    try:
        from pipeline.data.backbones import last_block_and_norm as from_backbones
    except ImportError:
        from_backbones = None
    if from_backbones is not None:
        return from_backbones(backbone)
    if not hasattr(backbone, "blocks") or not hasattr(backbone, "norm"):
        raise ValueError(f"{type(backbone).__name__} has no .blocks/.norm; pass a ViT backbone")
    return backbone.blocks[-1], backbone.norm


class FineTunedBranch(nn.Module):
    """Trainable copy of the last block + frozen copy of the norm + projection head."""

    def __init__(self, block: nn.Module, norm: nn.Module, grid: tuple[int, int], embed_dim: int,
                 generator: torch.Generator | None = None):
        super().__init__()
        self.grid = (int(grid[0]), int(grid[1]))
        self.embed_dim = int(embed_dim)
        self.block = copy.deepcopy(block)
        self.block.requires_grad_(True)
        self.norm = copy.deepcopy(norm)
        self.norm.requires_grad_(False)
        gen = generator if generator is not None else torch.Generator().manual_seed(0)
        self.head = nn.Linear(embed_dim, embed_dim, device="meta").to_empty(device="cpu")
        bound = 1.0 / math.sqrt(embed_dim)
        _seeded_uniform_(self.head.weight, bound, gen)
        _seeded_uniform_(self.head.bias, bound, gen)
        self.train()

    def train(self, mode: bool = True) -> "FineTunedBranch":
        # dropout/drop-path in the copied block stay off: training is deterministic and the
        # initial code equals the frozen features exactly (the backbone ran in eval mode).
        super().train(mode)
        self.block.eval()
        self.norm.eval()
        return self

    def encode(self, tokens: torch.Tensor, grid: tuple[int, int] | None = None) -> torch.Tensor:
        """code (B, D, h, w) from mid tokens (B, P+h*w, D); `grid` defaults to the training grid."""
        h, w = grid if grid is not None else self.grid
        if tokens.ndim != 3 or tokens.shape[-1] != self.embed_dim or tokens.shape[1] < h * w:
            raise ValueError(
                f"tokens of shape {tuple(tokens.shape)} do not fit grid {h}x{w} with dim "
                f"{self.embed_dim}; expected (B, 1+{h * w}, {self.embed_dim})"
            )
        x = self.norm(self.block(tokens))
        patches = x[:, x.shape[1] - h * w:]  # drop CLS (and any other prefix tokens)
        return patches.transpose(1, 2).reshape(x.shape[0], self.embed_dim, h, w)

    def project(self, code: torch.Tensor) -> torch.Tensor:
        """z (B*h*w, D): head + L2 normalisation, rows b*h*w + y*w + x."""
        rows = code.flatten(2).transpose(1, 2).reshape(-1, self.embed_dim)
        return Fn.normalize(self.head(rows), dim=1)

    def forward(self, tokens: torch.Tensor, grid: tuple[int, int] | None = None):
        code = self.encode(tokens, grid)
        return code, self.project(code)

    def net_parameters(self) -> list[nn.Parameter]:
        """What the network optimiser updates: the block copy and the head (not the norm)."""
        return [p for p in self.parameters() if p.requires_grad]


class LinearProbe(nn.Module):
    """Conv2d(D, K, 1) on code; cross-entropy on labels (ignore = -1) at label resolution."""

    def __init__(self, embed_dim: int, num_classes: int, generator: torch.Generator):
        super().__init__()
        self.conv = nn.Conv2d(embed_dim, num_classes, 1, device="meta").to_empty(device="cpu")
        bound = 1.0 / math.sqrt(embed_dim)
        _seeded_uniform_(self.conv.weight, bound, generator)
        _seeded_uniform_(self.conv.bias, bound, generator)

    @property
    def num_classes(self) -> int:
        return self.conv.out_channels

    def predict_logits(self, code: torch.Tensor, size: tuple[int, int]) -> torch.Tensor:
        """Logits (B, K, H, W) at `size`. A 1x1 conv commutes with bilinear upsampling, so this
        equals the probe applied to code upsampled to `size` (docs/method.md §6)."""
        logits = self.conv(code)
        if tuple(logits.shape[-2:]) != tuple(size):
            logits = Fn.interpolate(logits, size=tuple(size), mode="bilinear", align_corners=False)
        return logits

    def loss(self, code: torch.Tensor, labels: torch.Tensor) -> torch.Tensor:
        """Mean cross-entropy over labelled pixels (0 when none is labelled)."""
        logits = self.predict_logits(code, tuple(labels.shape[-2:]))
        labels = labels.long()
        if not bool((labels >= 0).any()):
            return logits.sum() * 0.0
        return Fn.cross_entropy(logits.float(), labels, ignore_index=-1)


class ClusterProbe(nn.Module):
    """K learnable centroids; spherical k-means loss on code."""

    def __init__(self, embed_dim: int, n_clusters: int, generator: torch.Generator):
        super().__init__()
        self.centroids = nn.Parameter(torch.randn(n_clusters, embed_dim, generator=generator))

    @property
    def n_clusters(self) -> int:
        return self.centroids.shape[0]

    def scores(self, code: torch.Tensor) -> torch.Tensor:
        """Cosines (B, K, h, w) between each code vector and each centroid."""
        c = Fn.normalize(code.float(), dim=1)
        k = Fn.normalize(self.centroids.float(), dim=1)
        return torch.einsum("bdhw,kd->bkhw", c, k)

    def loss(self, code: torch.Tensor) -> torch.Tensor:
        return -self.scores(code).max(dim=1).values.mean()


class Model(NamedTuple):
    """The trained modules (unpacks as `branch, linear, cluster`)."""

    branch: FineTunedBranch
    linear: LinearProbe | None  # None for a cache without labels
    cluster: ClusterProbe


class TrainedModel(NamedTuple):
    """What `modules_from_checkpoint` returns (unpacks as `branch, linear, cluster, config`)."""

    branch: FineTunedBranch
    linear: LinearProbe | None
    cluster: ClusterProbe
    config: dict[str, Any]  # resolved TrainConfig dict + model/fingerprints/step/epoch


def build_model(manifest: dict[str, Any], backbone: nn.Module, *,
                n_clusters: int | None = None, seed: int = 0, device: str = "cpu") -> Model:
    """(branch, linear_probe or None, cluster_probe) for a feature-cache manifest.

    The branch copies `backbone`'s last block and norm; head and probes are drawn from one
    torch.Generator seeded with `seed`, in a fixed order (head, linear probe, centroids).
    """
    block, norm = last_block_and_norm(backbone)
    dim = int(manifest["embed_dim"])
    grid = tuple(manifest["grid_train"])
    if n_clusters is not None:
        k = int(n_clusters)
    elif int(manifest.get("num_classes") or 0) > 0:
        k = int(manifest["num_classes"])
    else:  # an unlabelled folder: no class count to copy
        k = UNLABELLED_CLUSTERS
        log.info("the feature cache has no labels: the cluster probe has %d clusters (the "
                 "COCO-Stuff-27 convention); choose another number with --n-clusters", k)
    if k < 1:
        raise ValueError(f"n_clusters={k} must be at least 1; pass --n-clusters with a positive "
                         "number of clusters")
    gen = torch.Generator().manual_seed(int(seed))
    branch = FineTunedBranch(block, norm, grid, dim, generator=gen)
    linear = None
    if manifest.get("has_labels"):
        linear = LinearProbe(dim, int(manifest["num_classes"]), gen)
    cluster = ClusterProbe(dim, k, gen)
    mods = (branch, linear, cluster)
    return Model(*(m.to(device) if m is not None else None for m in mods))


def modules_from_checkpoint(ckpt: dict[str, Any], device: str = "cpu") -> TrainedModel:
    """(branch, linear_probe or None, cluster_probe, cfg) of a loaded checkpoint dict, in eval
    mode, gradients off (read the file with pipeline.artifacts.training.Checkpoint).

    `cfg` is the resolved TrainConfig dict plus keys `model`, `features_fingerprint`,
    `mined_fingerprint`, `step`, `epoch` and `selection` (the record of a selected state). The block architecture is rebuilt by loading the
    backbone named in the checkpoint (cheap; no forward pass).
    """
    meta = ckpt["model"]
    dim = int(meta["embed_dim"])
    from pipeline.data.backbones import load_backbone

    backbone = load_backbone(meta["backbone"], weights=meta.get("weights"), device="cpu",
                             seed=int(meta.get("backbone_seed") or 0)).model
    block, norm = last_block_and_norm(backbone)
    gen = torch.Generator().manual_seed(0)  # initial values are overwritten by the state dicts
    branch = FineTunedBranch(block, norm, tuple(meta["grid"]), dim, generator=gen)
    branch.load_state_dict(ckpt["branch"])
    linear = None
    if ckpt.get("linear_probe") is not None:
        linear = LinearProbe(dim, int(meta["num_classes"]), gen)
        linear.load_state_dict(ckpt["linear_probe"])
    cluster = ClusterProbe(dim, int(meta["n_clusters"]), gen)
    cluster.load_state_dict(ckpt["cluster_probe"])
    del backbone
    cfg = {**ckpt["config"], "model": meta, "step": ckpt["step"], "epoch": ckpt["epoch"],
           "features_fingerprint": ckpt["features_fingerprint"],
           "mined_fingerprint": ckpt["mined_fingerprint"], "selection": ckpt.get("selection")}
    mods = [m.to(device).eval() if m is not None else None for m in (branch, linear, cluster)]
    for m in mods:
        if m is not None:
            m.requires_grad_(False)
    return TrainedModel(mods[0], mods[1], mods[2], cfg)
