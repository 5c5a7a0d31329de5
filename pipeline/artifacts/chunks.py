"""Chunk bookkeeping of the feature cache: markers, recorded chunk files, checked reads.

A feature unit is one chunk of crops of one split (unit_key). Its marker
`markers/features/<split>-<chunk>.done` records every array's chunk file with its size and
sha256 (chunk_records). check_units tells, for every unit of a split, whether it is ok,
missing or damaged (cheap: files exist with their recorded, or for older markers a plausible,
size; deep: hash them). CheckedStore is the Zarr store readers use: it verifies each chunk
file against its marker the first time it is read and raises CorruptArtifact naming the file
and the command that rewrites it."""

from __future__ import annotations

import json
from dataclasses import dataclass, field
from pathlib import Path
from typing import Any

import numpy as np
from zarr.storage import LocalStore

from pipeline.artifacts.layout import RunLayout
from pipeline.cache.integrity import (
    CorruptArtifact,
    sha256_bytes,
    sha256_file,
)


def unit_key(split: str, chunk: int) -> str:
    """Name of feature unit `chunk` of `split` (its marker is `markers/features/<key>.done`)."""
    return f"{split}-{int(chunk):05d}"


def marker_path(out: str | Path, key: str) -> Path:
    return RunLayout(out).feature_marker(key)


def features_command(out: str | Path) -> str:
    """The command that (re)runs the features stage of `out` with its saved settings."""
    cfg = RunLayout(out).features_config
    if cfg.is_file():
        return f"ppap-pipe features --out {out} --config {cfg}"
    return f"ppap-pipe features --out {out} <the settings that started it>"


def _array_metas(store_path: Path, split: str) -> dict[str, dict[str, Any]]:
    """zarr.json of every array of a split, by array name."""
    g = store_path / split
    out = {}
    if g.is_dir():
        for d in sorted(g.iterdir()):
            meta = d / "zarr.json"
            if meta.is_file():
                m = json.loads(meta.read_text())
                if m.get("node_type") == "array":
                    out[d.name] = m
    return out


def chunk_key(meta: dict[str, Any], index: int) -> str:
    """Store key (relative to the array) of chunk `index` along axis 0."""
    coords = [int(index)] + [0] * (len(meta["shape"]) - 1)
    enc = meta.get("chunk_key_encoding", {})
    sep = enc.get("configuration", {}).get("separator", "/")
    if enc.get("name", "default") == "v2":
        return sep.join(map(str, coords))
    return "c" + sep + sep.join(map(str, coords))


def _raw_chunk_bytes(meta: dict[str, Any]) -> int:
    shape = meta["chunk_grid"]["configuration"]["chunk_shape"]
    return int(np.prod(shape)) * np.dtype(meta["data_type"]).itemsize


def plausible_chunk(meta: dict[str, Any], size: int, head: bytes) -> str | None:
    """Why a chunk file of `size` bytes starting with `head` cannot be whole, or None.

    Without a recorded checksum: uncompressed chunks must have exactly the raw size, blosc
    chunks the compressed size written in their header.
    """
    names = [c.get("name") for c in meta.get("codecs", [])]
    raw = _raw_chunk_bytes(meta)
    if names == ["bytes"]:
        return None if size == raw else f"has {size} bytes, an uncompressed chunk has {raw}"
    if names[-1:] == ["blosc"] and len(head) >= 16:
        nbytes, _, cbytes = np.frombuffer(head[4:16], "<u4")
        if int(cbytes) != size or int(nbytes) != raw:
            return (f"has {size} bytes, its blosc header says {int(cbytes)} "
                    f"(of {int(nbytes)} raw, expected {raw})")
    elif names[-1:] == ["blosc"]:
        return f"has {size} bytes, too short for a blosc chunk"
    return None


@dataclass
class UnitCheck:
    """State of one feature unit on disk (see check_units)."""

    key: str
    state: str  # ok | missing (no marker) | damaged
    reason: str = ""
    records: dict[str, dict[str, Any]] = field(default_factory=dict)  # array -> key/bytes/sha256
    legacy: bool = False  # marker without chunk checksums (older ppap-pipe)


def expected_units(manifest: dict[str, Any], split: str) -> int | None:
    """Number of units of `split`, or None for a cache not written by the features stage."""
    s = manifest.get("splits", {}).get(split) if isinstance(manifest.get("splits"), dict) else None
    if s is None or not manifest.get("chunk_size"):
        return None
    return -(-int(s["n_images"]) // int(manifest["chunk_size"]))


def check_units(out: str | Path, manifest: dict[str, Any], split: str,
                deep: bool = False) -> list[UnitCheck]:
    """Markers and chunk files of every unit of `split`.

    Cheap mode: the marker is readable and every chunk file exists with its recorded (or a
    plausible) size. `deep`: also hash every chunk file (and fill `records` for old markers).
    """
    out = Path(out)
    store_path = RunLayout(out).features_store
    n = expected_units(manifest, split)
    metas = _array_metas(store_path, split)
    result = []
    for c in range(n or 0):
        key = unit_key(split, c)
        mp = marker_path(out, key)
        if not mp.is_file():
            result.append(UnitCheck(key, "missing"))
            continue
        try:
            marker = json.loads(mp.read_text())
            if not isinstance(marker, dict):
                raise ValueError("not a JSON object")
        except (OSError, ValueError) as exc:
            why = "is empty" if mp.stat().st_size == 0 else f"is unreadable ({exc})"
            result.append(UnitCheck(key, "damaged", f"its marker {mp} {why}"))
            continue
        recs = marker.get("chunks") or {}
        check = UnitCheck(key, "ok", legacy=not recs)
        for name, meta in metas.items():
            ck = chunk_key(meta, c)
            f = store_path / split / name / ck
            rel = f"{split}/{name}/{ck}"
            rec = recs.get(name)
            try:
                size = f.stat().st_size
            except FileNotFoundError:
                check.state, check.reason = "damaged", f"chunk file {rel} is missing"
                break
            if rec is not None:
                if size != rec["bytes"]:
                    check.state = "damaged"
                    check.reason = f"chunk file {rel} has {size} bytes, {rec['bytes']} were written"
                    break
                if deep and sha256_file(f) != rec["sha256"]:
                    check.state, check.reason = "damaged", f"chunk file {rel} fails its checksum"
                    break
                check.records[name] = dict(rec)
            else:
                with open(f, "rb") as fh:
                    head = fh.read(16)
                why = plausible_chunk(meta, size, head)
                if why:
                    check.state, check.reason = "damaged", f"chunk file {rel} {why}"
                    break
                check.records[name] = {"key": ck, "bytes": size,
                                       "sha256": sha256_file(f) if deep else None}
        result.append(check)
    return result


def chunk_records(out: str | Path, split: str, chunk: int) -> dict[str, dict[str, Any]]:
    """Size and sha256 of chunk file `chunk` of every array of `split` (for its marker)."""
    store_path = RunLayout(out).features_store
    recs = {}
    for name, meta in _array_metas(store_path, split).items():
        ck = chunk_key(meta, chunk)
        f = store_path / split / name / ck
        data = f.read_bytes()
        recs[name] = {"key": ck, "bytes": len(data), "sha256": sha256_bytes(data)}
    return recs


class CheckedStore(LocalStore):
    """Read-only LocalStore that checks every chunk the first time it is read.

    `expected` maps store keys (`<split>/<array>/c/...`) to (bytes, sha256 or None) for chunks of
    completed units: such a chunk must exist (never read back as the fill value) and match its
    checksum. Other chunks get the plausibility check of `plausible_chunk`.
    """

    def __init__(self, root, *, read_only: bool = True) -> None:
        super().__init__(root, read_only=True)
        self.expected: dict[str, tuple[int, str | None]] = {}
        self.context: dict[str, str] = {}  # split -> fix hint
        self._verified: set[str] = set()
        self._metas: dict[str, dict[str, Any] | None] = {}

    def with_read_only(self, read_only: bool = False):
        return self

    def _meta(self, array_path: str) -> dict[str, Any] | None:
        if array_path not in self._metas:
            f = Path(self.root) / array_path / "zarr.json"
            self._metas[array_path] = json.loads(f.read_text()) if f.is_file() else None
        return self._metas[array_path]

    def _fail(self, key: str, why: str) -> CorruptArtifact:
        split = key.split("/", 1)[0]
        array_path, _, ck = key.partition("/c/")
        fix = self.context.get(split, "rebuild the cache with `ppap-pipe features`")
        return CorruptArtifact(f"the feature cache {self.root} is damaged: chunk c/{ck} of array "
                               f"{array_path} ({Path(self.root) / key}) {why}; {fix}")

    def verify(self, key: str, data) -> None:
        if key in self._verified or "/c/" not in key:
            return
        view = memoryview(data).cast("B")
        exp = self.expected.get(key)
        if exp is not None and exp[1] is not None:
            if len(view) != exp[0] or sha256_bytes(view) != exp[1]:
                raise self._fail(key, f"does not match its checksum ({len(view)} bytes, "
                                      f"{exp[0]} written)")
        else:
            meta = self._meta(key.partition("/c/")[0])
            why = plausible_chunk(meta, len(view), bytes(view[:16])) if meta else None
            if why:
                raise self._fail(key, why)
        self._verified.add(key)

    async def get(self, key, prototype=None, byte_range=None):
        buf = await super().get(key, prototype, byte_range)
        if byte_range is not None or key.endswith("zarr.json"):
            return buf
        if buf is None:
            if key in self.expected:
                raise self._fail(key, "is missing although its unit is marked done")
            return None
        self.verify(key, buf.as_numpy_array())
        return buf
