"""Shared test fixtures: the one builder of tiny synthetic feature caches (`fake_cache`)."""

from __future__ import annotations

from dataclasses import dataclass
from pathlib import Path
from typing import Any, Callable

import numpy as np
import pytest
import zarr

from pipeline.artifacts.features import STORE_NAME, FeatureStore, create_split


@dataclass(frozen=True)
class SplitSpec:
    """Shape of one split of a fake cache: `n` crops of `grid` x `grid` patches of `patch` px."""

    n: int
    grid: int
    chunk: int = 4
    labelled: bool | None = None  # arrays for labels; None: as the cache's `labelled`


def build_fake_cache(
    out: Path, *, dim: int, patch: int, num_classes: int, train: SplitSpec,
    val: SplitSpec | None = None, labelled: bool = True,
    fill: Callable[[str, zarr.Group, SplitSpec], Any] | None = None,
    class_names: list[str] | None = None, fingerprint: str = "synthetic", **manifest: Any,
) -> FeatureStore:
    """`<out>/features.zarr` laid out like stages/features.py writes it, filled by `fill`.

    Every split gets `create_split` arrays (tokens = CLS + grid² patch tokens of width `dim`),
    `image_index` = crop number and `valid` = 1; then `fill(split, group, spec)` writes the data
    (features, labels, rgb, or its own image_index / valid). The manifest carries the usual keys
    (`has_labels` = `labelled`, the eval grid from `val`, else the train grid) plus `manifest`.
    """
    root = zarr.open_group(str(out / STORE_NAME), mode="w", zarr_format=3)
    splits = {"train": train, **({"val": val} if val is not None else {})}
    for split, spec in splits.items():
        side = spec.grid * patch
        has_arrays = labelled if spec.labelled is None else spec.labelled
        g = create_split(root, split, spec.n, n_tokens=1 + spec.grid * spec.grid, dim=dim,
                         grid=(spec.grid, spec.grid), side=side, labelled=has_arrays,
                         chunk=spec.chunk)
        g["image_index"][:] = np.arange(spec.n, dtype=np.int32)
        g["valid"][:] = 1
        if fill is not None:
            fill(split, g, spec)
    eval_spec = val if val is not None else train
    root.attrs["manifest"] = {
        "dataset": "synthetic", "patch_size": patch, "embed_dim": dim, "num_classes": num_classes,
        "class_names": class_names or [f"c{i}" for i in range(num_classes)],
        "has_labels": labelled, "train_size": train.grid * patch,
        "eval_size": eval_spec.grid * patch, "grid_train": [train.grid] * 2,
        "grid_eval": [eval_spec.grid] * 2, "fingerprint": fingerprint, **manifest,
    }
    return FeatureStore(out)


@pytest.fixture(scope="session")
def fake_cache() -> Callable[..., FeatureStore]:
    """The fake-cache builder (`build_fake_cache`), for tests and fixtures of any scope."""
    return build_fake_cache
