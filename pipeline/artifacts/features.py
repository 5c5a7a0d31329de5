"""The feature-cache artifact: `<out>/features.zarr` (Zarr v3), its manifest and chunk markers.

`FeatureStore` reads a cache (refusing unfinished or damaged splits, verifying chunk checksums,
refusing NaN/Inf rows); `FeatureCacheWriter` is the only code that writes one (stage 1 calls it).

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
    <out>/features_manifest.json, features_config.json, features_report.json   (RunLayout)

Arrays are preallocated and written by index; a chunk of `chunk_size` crops is the unit of work.
Chunk c of every array of a split holds exactly unit c's crops, so unit c is complete when its
marker exists and each array's chunk file c is there. Markers written by this version record
each chunk file's size and sha256 (`chunks`); readers check that every unit of a split is
marked and every chunk file exists with its recorded size before using the split
(`FeatureStore.split`), and verify each chunk's checksum the first time it is read (CheckedStore).
Markers of older versions have no `chunks`: their chunk files must exist and have a plausible
size (uncompressed size, or the size in the blosc header); a features rerun adds checksums.
"""

from __future__ import annotations

import logging
from pathlib import Path
from typing import Any

import numpy as np
import zarr

from pipeline.artifacts.chunks import (
    CheckedStore,
    _array_metas,
    check_units,
    chunk_key,
    chunk_records,
    expected_units,
    features_command,
    marker_path,
    unit_key,
)
from pipeline.artifacts.layout import FEATURES_LOCK, FEATURES_STORE, RunLayout
from pipeline.cache.integrity import (
    CorruptArtifact,
    NonFinite,
    clean_orphans,
    disk_guard,
    hold_lock,
    nonfinite_rows,
)
from pipeline.cache.store import (
    Markers,
    atomic_write_json,
    check_or_write_manifest,
    portable_config,
    read_json,
)

log = logging.getLogger("ppap.features")

STORE_NAME = FEATURES_STORE


# ------------------------------------------------------------------------- chunk bookkeeping


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
        self.layout = RunLayout(out)
        self.path = self.layout.features_store
        if not self.path.exists():
            raise ValueError(
                f"no feature cache at {self.path}; run `ppap-pipe features --out {self.out}` first"
            )
        try:
            self._store = CheckedStore(self.path)
            self.root = zarr.open_group(store=self._store, mode="r")
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
        self._checked: set[str] = set()

    def split(self, name: str) -> zarr.Group:
        """A split's arrays, after checking that every unit of it is complete and intact."""
        if name not in self.root:
            raise ValueError(
                f"the feature cache {self.path} has no split {name!r}; "
                f"run `ppap-pipe features --splits {name}` for it"
            )
        if name not in self._checked:
            self.check_complete(name)
            self._checked.add(name)
        return self.root[name]

    def check_complete(self, split: str) -> None:
        """Refuse an unfinished or damaged split; arm chunk checksums for reading it.

        Caches not written by the features stage (no unit plan in the manifest) are not checked.
        """
        n = expected_units(self.manifest, split)
        if n is None:
            return
        cmd = features_command(self.out)
        checks = check_units(self.out, self.manifest, split)
        missing = [c.key for c in checks if c.state == "missing"]
        damaged = [c for c in checks if c.state == "damaged"]
        if missing:
            raise ValueError(
                f"the feature cache {self.path} is incomplete: split {split!r} has "
                f"{n - len(missing)} of {n} chunks done (first missing: {missing[0]}). Finish it "
                f"by rerunning the features command that started it: `{cmd}`; then rerun this "
                "command")
        if damaged:
            shown = "; ".join(f"{c.key}: {c.reason}" for c in damaged[:3])
            more = f" (and {len(damaged) - 3} more)" if len(damaged) > 3 else ""
            raise CorruptArtifact(
                f"the feature cache {self.path} is damaged: {shown}{more}. Rerun `{cmd}`: it "
                "checks every chunk and recomputes the damaged ones")
        self._store.context[split] = (f"rerun `{cmd}`: it checks every chunk and recomputes "
                                      "the damaged ones")
        for c in checks:
            for name, rec in c.records.items():
                self._store.expected[f"{split}/{name}/{rec['key']}"] = (rec["bytes"], rec["sha256"])

    def require_finite(self, split: str, array: str, crops: np.ndarray, data) -> None:
        """Refuse NaN/Inf in rows `data` (one per crop of `crops`) read from `split/array`."""
        bad = nonfinite_rows(data)
        if not len(bad):
            return
        crops = np.asarray(crops).reshape(-1)
        bad_crops = sorted(int(crops[i]) for i in bad)
        chunk = int(self.root[split][array].chunks[0])
        units = sorted({unit_key(split, c // chunk) for c in bad_crops})
        shown = ", ".join(map(str, bad_crops[:8])) + (" ..." if len(bad_crops) > 8 else "")
        markers = " ".join(str(marker_path(self.out, u)) for u in units[:4])
        raise NonFinite(
            f"{self.path}/{split}/{array} holds NaN/Inf values for crop(s) {shown} (feature "
            f"chunk(s) {', '.join(units)}); nothing was computed from them. Recompute those "
            f"chunks: delete {markers} and rerun `{features_command(self.out)}`")

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
        self.require_finite("train", "feats", crops, feats)
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


# ------------------------------------------------------------------------------- the writer


class FeatureCacheWriter:
    """The one writer of `<out>`'s feature cache (used by stage 1).

    `open` (in the stage's process, inside `@releases_locks`) locks `<out>`, removes temporary
    files of killed writers, checks or writes `features_manifest.json` (a cache made from other
    inputs is refused), preallocates the Zarr arrays and saves the resolved config.
    `write_unit` (in any worker process) writes one chunk's region of every array, `valid`
    last, then the chunk's marker with the size and sha256 of every chunk file it wrote.
    """

    IDENTITY_KEYS = ("dataset", "backbone", "weights_fingerprint", "seed", "preprocessing",
                     "limit", "chunk_size", "splits")

    def __init__(self, out: str | Path):
        self.out = Path(out)
        self.layout = RunLayout(out)
        self.path = self.layout.features_store
        self.markers = Markers(self.layout.feature_markers)

    def open(self, manifest: dict[str, Any], chunk_crops: dict[str, int],
             config: dict[str, Any]) -> None:
        """Lock, clean, check/write the manifest, preallocate every split, save `config`.

        `manifest` is the full cache description (its `IDENTITY_KEYS` must match an existing
        cache; `fingerprint` identifies it); `chunk_crops[split]` = crops per unit of work.
        """
        hold_lock(self.out, "feature cache", name=FEATURES_LOCK)
        for path, deep in ((self.out, False), (self.path, True), (self.layout.markers, True)):
            clean_orphans(path, recursive=deep)
        check_or_write_manifest(self.layout.features_manifest,
                                {k: manifest[k] for k in self.IDENTITY_KEYS}, what="feature cache")
        root = self._open_group(manifest)
        for split, s in manifest["splits"].items():
            h, w = s["grid"]
            create_split(root, split, s["n_crops"], n_tokens=1 + h * w,
                         dim=int(manifest["embed_dim"]), grid=(h, w), side=s["side"],
                         labelled=manifest["has_labels"], chunk=chunk_crops[split])
        root.attrs["manifest"] = manifest
        atomic_write_json(self.layout.features_config,
                          portable_config(config, self.layout.features_config, self.out))

    def _open_group(self, manifest: dict[str, Any]) -> zarr.Group:
        path = self.path
        if path.exists() and not (path / "zarr.json").is_file():
            found = ", ".join(sorted(p.name for p in path.iterdir())[:5]) or "nothing"
            raise ValueError(
                f"{path} exists but is not a Zarr v3 store written by ppap-pipe (found {found}); "
                "it was left untouched: use another --out or delete it")
        try:
            root = zarr.open_group(str(path), mode="a", zarr_format=3)
        except Exception as exc:  # zarr raises several types for foreign/old stores
            raise ValueError(f"{path} exists but is not a Zarr v3 store this version can write "
                             f"({exc}); use another --out or delete it") from None
        old = root.attrs.get("manifest")
        if old is not None and old.get("fingerprint") != manifest["fingerprint"]:
            raise ValueError(f"{path} holds a cache with fingerprint {old.get('fingerprint')} but "
                             f"this run has {manifest['fingerprint']}; use another --out or delete it")
        return root

    def intact_units(self, manifest: dict[str, Any], chunks: dict[str, int]) -> set[str]:
        """Keys (of `chunks`: unit key -> chunk index) whose marker and chunk files are intact,
        checksums verified. A damaged unit loses its marker and chunk files (it is recomputed);
        markers of older versions get their checksums."""
        ok: set[str] = set()
        for split in manifest["splits"]:
            for check in check_units(self.out, manifest, split, deep=True):
                if check.key not in chunks or check.state == "missing":
                    continue
                if check.state == "damaged":
                    log.warning("features: chunk %s is damaged (%s); recomputing it", check.key,
                                check.reason)
                    marker_path(self.out, check.key).unlink(missing_ok=True)
                    for name, meta in _array_metas(self.path, split).items():
                        (self.path / split / name / chunk_key(meta, chunks[check.key])
                         ).unlink(missing_ok=True)
                    continue
                if check.legacy:
                    self.markers.mark(check.key, {**self.unit_stats(check.key),
                                                  "chunks": check.records})
                ok.add(check.key)
        return ok

    def write_unit(self, split: str, chunk: int, lo: int, hi: int,
                   arrays: dict[str, np.ndarray], stats: dict[str, Any]) -> dict[str, Any]:
        """Write rows lo:hi of `split` (every array of the unit, `valid` last), then the marker
        `stats` + chunk checksums; returns the marker. Safe to redo after a crash."""
        # every chunk is written, even all-zero ones: a chunk file that is missing is then
        # always damage, never "all fill value"
        with zarr.config.set({"array.write_empty_chunks": True}), disk_guard(self.path / split):
            g = zarr.open_group(str(self.path), mode="r+")[split]
            for name in sorted(arrays, key=lambda n: n == "valid"):
                g[name][lo:hi] = arrays[name]
        marker = {**stats, "chunks": chunk_records(self.out, split, chunk)}
        self.markers.mark(unit_key(split, chunk), marker)
        return marker

    def unit_stats(self, key: str) -> dict[str, Any]:
        """The marker of a finished unit."""
        return read_json(marker_path(self.out, key))

    def write_report(self, report: dict[str, Any]) -> Path:
        atomic_write_json(self.layout.features_report, report)
        return self.layout.features_report
