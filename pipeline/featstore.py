"""The stage-1 feature cache: one Zarr v3 group per run, `<out>/features.zarr`.

Layout (one group per split, n = crops in the split; the training split holds 5 crops/image):

    features.zarr/                attrs["manifest"]: dataset, backbone, grids, classes, ...
      <split>/tokens        (n, 1+h*w, D) float16  tokens entering the last ViT block (CLS first)
      <split>/feats         (n, h*w, D)   float16  frozen last block + norm, CLS dropped (raw)
      <split>/labels        (n, S, S)     int16    per-pixel labels, ignore = -1   [if labelled]
      <split>/patch_labels  (n, h, w)     int16    majority label per patch         [if labelled]
      <split>/rgb           (n, S, S, 3)  uint8    the crop as fed to the backbone
      <split>/image_index   (n,)          int32    source image of the crop
      <split>/crop_box      (n, 4)        int32    x0, y0, x1, y1 in source pixels
      <split>/valid         (n,)          uint8    1 = written from a readable image
    <out>/markers/features/<split>-<chunk>.done   completion marker per chunk, written last

Arrays are preallocated and written by index; a chunk of `chunk_size` crops is the unit of work.
"""

from __future__ import annotations

from pathlib import Path
from typing import Any

import numpy as np
import zarr

STORE_NAME = "features.zarr"


def normalise(feats: np.ndarray) -> np.ndarray:
    """THE L2 normalisation of mining features: float32 rows of unit norm (zero rows stay 0)."""
    f = np.asarray(feats, dtype=np.float32)
    norm = np.sqrt(np.einsum("...d,...d->...", f, f, dtype=np.float32))[..., None]
    return f / np.maximum(norm, np.float32(1e-12))


def take_rows(arr, crops: np.ndarray) -> np.ndarray:
    """arr[crops] for a zarr array and distinct crop indices in any order (read sorted)."""
    crops = np.asarray(crops, dtype=np.int64)
    order = np.argsort(crops, kind="stable")
    sel = (crops[order],) + (slice(None),) * (len(arr.shape) - 1)
    data = arr.get_orthogonal_selection(sel)
    out = np.empty_like(data)
    out[order] = data
    return out


class FeatureStore:
    """Read access to a finished (or partly written) feature cache."""

    def __init__(self, out: str | Path):
        self.out = Path(out)
        self.path = self.out / STORE_NAME
        if not self.path.exists():
            raise ValueError(
                f"no feature cache at {self.path}; run `ppap-pipe features --out {self.out}` first"
            )
        try:
            self.root = zarr.open_group(str(self.path), mode="r")
        except Exception as exc:  # zarr raises several types for foreign/old stores
            raise ValueError(
                f"{self.path} is not a readable Zarr v3 feature cache ({exc}); "
                "rerun `ppap-pipe features` into a new --out"
            ) from None
        self.manifest: dict[str, Any] = dict(self.root.attrs.get("manifest", {}))
        if not self.manifest:
            raise ValueError(
                f"{self.path} has no manifest (written by an incompatible version?); "
                "rerun `ppap-pipe features` into a new --out"
            )

    def split(self, name: str) -> zarr.Group:
        if name not in self.root:
            raise ValueError(
                f"the feature cache {self.path} has no split {name!r}; "
                f"run `ppap-pipe features --splits {name}` for it"
            )
        return self.root[name]

    def n(self, split: str) -> int:
        return int(self.split(split)["tokens"].shape[0])

    def grid(self, split: str) -> tuple[int, int]:
        key = "grid_train" if split == "train" else "grid_eval"
        h, w = self.manifest[key]
        return int(h), int(w)

    @property
    def has_labels(self) -> bool:
        return bool(self.manifest.get("has_labels"))

    @property
    def num_classes(self) -> int:
        return int(self.manifest["num_classes"])

    @property
    def class_names(self) -> list[str]:
        return list(self.manifest["class_names"])

    @property
    def embed_dim(self) -> int:
        return int(self.manifest["embed_dim"])

    @property
    def fingerprint(self) -> str:
        """Identifies the cache contents for downstream manifests."""
        return str(self.manifest["fingerprint"])

    def mining_features(self, crops: np.ndarray) -> np.ndarray:
        """F for a batch: normalised frozen features of `crops`, rows b*h*w + y*w + x."""
        feats = take_rows(self.split("train")["feats"], crops)
        return normalise(feats.reshape(-1, feats.shape[-1]))


def create_split(
    root: zarr.Group, split: str, n: int, *, n_tokens: int, dim: int, grid: tuple[int, int],
    side: int, labelled: bool, chunk: int,
) -> zarr.Group:
    """Preallocate a split's arrays (idempotent: existing arrays of the same shape are kept)."""
    from zarr.codecs import BloscCodec

    comp = [BloscCodec(cname="zstd", clevel=3, shuffle="bitshuffle")]
    g = root.require_group(split)
    h, w = grid
    specs: dict[str, tuple[tuple[int, ...], Any, tuple[int, ...]]] = {
        "tokens": ((n, n_tokens, dim), "float16", (chunk, n_tokens, dim)),
        "feats": ((n, h * w, dim), "float16", (chunk, h * w, dim)),
        "rgb": ((n, side, side, 3), "uint8", (chunk, side, side, 3)),
        "image_index": ((n,), "int32", (max(n, 1),)),
        "crop_box": ((n, 4), "int32", (max(n, 1), 4)),
        "valid": ((n,), "uint8", (max(n, 1),)),
    }
    if labelled:
        specs["labels"] = ((n, side, side), "int16", (chunk, side, side))
        specs["patch_labels"] = ((n, h, w), "int16", (chunk, h, w))
    for name, (shape, dtype, chunks) in specs.items():
        if name in g:
            arr = g[name]
            if tuple(arr.shape) != shape or str(arr.dtype) != dtype:
                raise ValueError(
                    f"{split}/{name} in the cache has shape {arr.shape} {arr.dtype}, expected "
                    f"{shape} {dtype}; delete the run directory or use another --out"
                )
            continue
        # small per-crop vectors are rewritten by every chunk: keep them in one uncompressed
        # chunk per chunk-of-crops boundary instead, so concurrent writers never share a chunk
        if len(shape) == 1 or name == "crop_box":
            chunks = (chunk,) + shape[1:]
        g.create_array(name, shape=shape, dtype=dtype, chunks=chunks,
                       compressors=comp if name in ("rgb", "labels", "patch_labels") else None,
                       fill_value=0)
    return g
