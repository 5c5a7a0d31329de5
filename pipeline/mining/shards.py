"""Mined-set shards on disk: one file per (epoch, batch), its format and its marker.

Layout under a mined-set directory `<out>/mine/<name>/`:

    shards/e{epoch:03d}/b{batch:05d}.npz    the shard (written to a temp name, then os.replace)
    shards/e{epoch:03d}/b{batch:05d}.done   JSON stats + sha256 of the shard, written LAST

A shard is complete only when its `.done` marker exists; iter_shards lists only those.
read_shard verifies the shard's bytes against the sha256 in its marker and refuses shards
without one (mined by an older ppap-pipe); `mine` re-mines such shards (shard_state).

What a shard stores (always: images, anchors, proxy (M, D) float32, phi/psi (M,) float64):
  threshold mode (ppap, p0)  + the "band": every (anchor, j) whose mined similarity lies within
      `band` (1e-4) of Φ_T or Ψ_T, with the class the miner gave it. Recovery recomputes
      s = proxy · F (float32 or float64) and classifies by the thresholds, except band pairs,
      which take the stored class: exact, since arithmetic differences (~1e-7) ≪ band.
      Size does not depend on the size of the ambiguous zone (~1.2 KB per anchor at D = 384,
      nearly all of it the float32 proxy).
  explicit mode (hp)         positive CSR, delta-encoded and compressed.
  clusters mode (kmeans, primaps, eigen)   the label of every row of F (sets = same label minus
      self). Rows a criterion leaves unassigned (label -1; PriMaPs with coverage < 1) are
      stored as a separate row list `unassigned` and are ambiguous: neither positive nor
      negative for any anchor; an unassigned anchor has no positives and all other rows
      ambiguous. Shards without unassigned rows are byte-identical to the earlier format.
Integer arrays are stored as byte planes + zlib (small deltas compress to about a byte).

API
---
shard_path(mine_dir, epoch, batch) -> Path;  done_path(path) -> Path;  is_done(path) -> bool
needs_sets(criterion) -> bool: pass keep_sets=needs_sets(criterion) to mine_batch in the stage
write_shard(path, mined, epoch, batch, images, criterion, meta=None) -> dict (marker stats)
read_shard(path) -> Shard (verified);  shard_state(path) -> (state, reason) for resuming
iter_shards(mine_dir, epoch) -> list[Path] (completed shards, batch order);  n_epochs(mine_dir)
In pipeline.mining.recover: recover_sets(shard, F) -> SetsCSR (exact); export_batch(...).
"""

from __future__ import annotations

import io
import json
import logging
import re
import zipfile
import zlib
from dataclasses import dataclass, field
from pathlib import Path
from typing import Any, Mapping

import numpy as np

from pipeline.cache.integrity import CorruptArtifact, sha256_bytes
from pipeline.cache.store import atomic_write_bytes, atomic_write_json, read_json
from pipeline.mining.sets import MinedBatch

log = logging.getLogger("ppap.shards")

SHARD_FORMAT = 1
MODES = {"ppap": "threshold", "p0": "threshold", "hp": "explicit", "kmeans": "clusters",
         "primaps": "clusters", "eigen": "clusters"}
_BATCH_RE = re.compile(r"^b(\d{5,})\.npz$")
_EPOCH_RE = re.compile(r"^e(\d{3,})$")


# ----------------------------------------------------------------------------------------
# paths
# ----------------------------------------------------------------------------------------


def needs_sets(criterion: str) -> bool:
    """Whether write_shard needs the mined sets (mine_batch(..., keep_sets=needs_sets(c)))."""
    if criterion not in MODES:
        raise ValueError(f"criterion={criterion!r}: choose one of {', '.join(MODES)}")
    return MODES[criterion] == "explicit"


def shard_path(mine_dir: str | Path, epoch: int, batch: int) -> Path:
    return Path(mine_dir) / "shards" / f"e{int(epoch):03d}" / f"b{int(batch):05d}.npz"


def done_path(path: str | Path) -> Path:
    return Path(path).with_suffix(".done")


def is_done(path: str | Path) -> bool:
    return done_path(path).exists() and Path(path).exists()


def iter_shards(mine_dir: str | Path, epoch: int) -> list[Path]:
    """Completed shards (marker present) of one epoch, in batch order."""
    d = Path(mine_dir) / "shards" / f"e{int(epoch):03d}"
    if not d.is_dir():
        return []
    found = []
    for p in d.iterdir():
        m = _BATCH_RE.match(p.name)
        if m and is_done(p):
            found.append((int(m.group(1)), p))
    return [p for _, p in sorted(found)]


def n_epochs(mine_dir: str | Path) -> int:
    """Number of consecutive epochs e000, e001, ... holding at least one completed shard."""
    root = Path(mine_dir) / "shards"
    have = set()
    if root.is_dir():
        for p in root.iterdir():
            m = _EPOCH_RE.match(p.name)
            if m and p.is_dir():
                have.add(int(m.group(1)))
    n = 0
    while n in have and iter_shards(mine_dir, n):
        n += 1
    return n


# ----------------------------------------------------------------------------------------
# compact encodings
# ----------------------------------------------------------------------------------------


def pack_uints(x: np.ndarray, level: int = 6) -> np.ndarray:
    """Non-negative integers -> uint8 blob: 16-byte header (width, n), zlib of byte planes."""
    x = np.asarray(x).ravel()
    if x.size and int(x.min()) < 0:
        raise ValueError("pack_uints takes non-negative integers only")
    top = int(x.max()) if x.size else 0
    width = 1 if top < 2**8 else 2 if top < 2**16 else 4 if top < 2**32 else 8
    planes = np.ascontiguousarray(x.astype(f"<u{width}").view(np.uint8).reshape(-1, width).T)
    head = np.array([width, x.size], dtype="<u8").tobytes()
    return np.frombuffer(head + zlib.compress(planes.tobytes(), level), dtype=np.uint8)


def unpack_uints(blob: np.ndarray) -> np.ndarray:
    raw = np.asarray(blob, dtype=np.uint8).tobytes()
    width, n = (int(v) for v in np.frombuffer(raw[:16], dtype="<u8"))
    planes = np.frombuffer(zlib.decompress(raw[16:]), dtype=np.uint8).reshape(width, n)
    return np.ascontiguousarray(planes.T).view(f"<u{width}").ravel().astype(np.int64)


def pack_float32(x: np.ndarray, level: int = 1) -> np.ndarray:
    """float32 array -> uint8 blob (byte-shuffled + zlib; lossless)."""
    x = np.ascontiguousarray(x, dtype="<f4")
    planes = np.ascontiguousarray(x.view(np.uint8).reshape(-1, 4).T)
    head = np.array([x.ndim, *x.shape], dtype="<u8").tobytes()
    return np.frombuffer(head + zlib.compress(planes.tobytes(), level), dtype=np.uint8)


def unpack_float32(blob: np.ndarray) -> np.ndarray:
    raw = np.asarray(blob, dtype=np.uint8).tobytes()
    ndim = int(np.frombuffer(raw[:8], dtype="<u8")[0])
    shape = tuple(int(v) for v in np.frombuffer(raw[8:8 + 8 * ndim], dtype="<u8"))
    planes = np.frombuffer(zlib.decompress(raw[8 + 8 * ndim:]), dtype=np.uint8).reshape(4, -1)
    return np.ascontiguousarray(planes.T).view("<f4").reshape(shape).astype(np.float32)


def _csr_deltas(indptr: np.ndarray, indices: np.ndarray) -> np.ndarray:
    """Sorted columns per row -> first column, then gaps (all >= 0)."""
    d = np.asarray(indices, dtype=np.int64).copy()
    if d.size:
        d[1:] -= indices[:-1]
        starts = indptr[:-1][np.diff(indptr) > 0]
        d[starts] = indices[starts]
    return d


def _csr_undeltas(indptr: np.ndarray, deltas: np.ndarray) -> np.ndarray:
    if not deltas.size:
        return deltas.astype(np.int64)
    c = np.cumsum(deltas)
    counts = np.diff(indptr)
    base = np.where(indptr[:-1] > 0, c[np.maximum(indptr[:-1] - 1, 0)], 0)
    return c - np.repeat(base, counts)


def _pack_csr(prefix: str, indptr: np.ndarray, indices: np.ndarray) -> dict[str, np.ndarray]:
    return {f"{prefix}_counts": pack_uints(np.diff(indptr)),
            f"{prefix}_deltas": pack_uints(_csr_deltas(indptr, indices))}


def _unpack_csr(z: Mapping[str, np.ndarray], prefix: str) -> tuple[np.ndarray, np.ndarray]:
    counts = unpack_uints(z[f"{prefix}_counts"])
    indptr = np.zeros(len(counts) + 1, np.int64)
    np.cumsum(counts, out=indptr[1:])
    return indptr, _csr_undeltas(indptr, unpack_uints(z[f"{prefix}_deltas"]))


# ----------------------------------------------------------------------------------------
# write / read
# ----------------------------------------------------------------------------------------


@dataclass
class Shard:
    """One mined batch as stored. Sets: recover_sets(shard, F)."""

    path: Path
    epoch: int
    batch: int
    criterion: str
    mode: str  # threshold | explicit | clusters
    n_rows: int  # N = rows of F (B * h * w)
    dim: int
    images: np.ndarray  # (B,) int64 crop indices into the train split
    anchors: np.ndarray  # (M,) int64 rows of F
    proxy: np.ndarray  # (M, D) float32
    phi: np.ndarray  # (M,) float64
    psi: np.ndarray  # (M,) float64
    band: float
    has_amb: bool
    band_indptr: np.ndarray | None = None
    band_indices: np.ndarray | None = None
    band_class: np.ndarray | None = None
    pos_indptr: np.ndarray | None = None  # explicit mode
    pos_indices: np.ndarray | None = None
    cluster_of: np.ndarray | None = None  # clusters mode; -1 = unassigned
    meta: dict[str, Any] = field(default_factory=dict)


def write_shard(
    path: str | Path,
    mined: MinedBatch,
    epoch: int,
    batch: int,
    images: np.ndarray,
    criterion: str,
    meta: Mapping[str, Any] | None = None,
) -> dict[str, Any]:
    """Write one shard atomically, then its `.done` marker (last). Returns the marker stats.

    `images` are the batch's crop indices in F's row order; `meta` (JSON-able) is kept as is.
    A marker left by an earlier write is removed first, so a crash never pairs it with new data.
    """
    path = Path(path)
    if criterion != mined.criterion:
        raise ValueError(f"criterion={criterion!r} but the batch was mined with "
                         f"{mined.criterion!r}; pass the criterion used for mining")
    if criterion not in MODES:
        raise ValueError(f"criterion={criterion!r}: choose one of {', '.join(MODES)}")
    images = np.asarray(images, dtype=np.int64).ravel()
    if images.size == 0 or mined.n_rows % images.size:
        raise ValueError(f"{images.size} images cannot make up the batch's {mined.n_rows} rows; "
                         "pass the batch's crop indices in row order")
    mode = MODES[criterion]
    M, D = mined.proxy.shape
    unassigned = (np.flatnonzero(mined.cluster_of < 0)
                  if mode == "clusters" and mined.cluster_of is not None else np.zeros(0, np.int64))
    head = dict(format=SHARD_FORMAT, epoch=int(epoch), batch=int(batch), criterion=criterion,
                mode=mode, n_rows=int(mined.n_rows), dim=int(D), band=float(mined.band),
                has_amb=criterion == "ppap" or bool(unassigned.size), meta=dict(meta or {}))
    arrays: dict[str, np.ndarray] = {
        "images": images,
        "anchors": pack_uints(mined.anchors),
        "proxy": pack_float32(mined.proxy),
        "phi": np.asarray(mined.phi, dtype="<f8"),
        "psi": np.asarray(mined.psi, dtype="<f8"),
    }
    if mode == "threshold":
        if mined.band_indptr is None:
            raise ValueError("this MinedBatch has no band pairs; mine it with mine_batch")
        arrays.update(_pack_csr("band", mined.band_indptr, mined.band_indices))
        arrays["band_class"] = pack_uints(mined.band_class.astype(np.uint8))
    elif mode == "explicit":
        if not mined.has_sets:
            raise ValueError(f"criterion {criterion!r} is stored as explicit sets; "
                             "mine it with keep_sets=True")
        arrays.update(_pack_csr("pos", mined.pos_indptr, mined.pos_indices))
    else:
        if mined.cluster_of is None:
            raise ValueError(f"criterion {criterion!r} is stored as one label per row; this "
                             "MinedBatch has no cluster_of")
        arrays["cluster_of"] = pack_uints(np.maximum(mined.cluster_of, 0))
        if unassigned.size:
            arrays["unassigned"] = pack_uints(unassigned)
    arrays["header"] = np.frombuffer(json.dumps(head, sort_keys=True, default=str).encode(),
                                     dtype=np.uint8)
    buf = io.BytesIO()
    np.savez(buf, **arrays)
    data = buf.getvalue()

    marker = done_path(path)
    if marker.exists():
        marker.unlink()
    atomic_write_bytes(path, data)
    stats = dict(
        epoch=int(epoch), batch=int(batch), criterion=criterion, n_anchors=int(M),
        n_rows=int(mined.n_rows), bytes=len(data), bytes_per_anchor=len(data) / max(M, 1),
        mean_pos=float(mined.n_pos.mean()), mean_amb=float(mined.n_amb.mean()),
        mean_neg=float(mined.n_neg.mean()), anchors_without_positive=int((mined.n_pos == 0).sum()),
        flops=int(mined.flops), sha256=sha256_bytes(data),
    )
    atomic_write_json(marker, stats)
    return stats


def remine_hint(path: str | Path) -> str:
    """The command that re-mines a damaged shard `.../<name>/shards/eNNN/bNNNNN.npz`."""
    mine_dir = Path(path).parent.parent.parent
    cfg = mine_dir / "config.json"
    try:
        read_json(cfg)  # readable: it names every setting (its `out` is relative to it)
        cmd = f"ppap-pipe mine --out {mine_dir.parent.parent} --config {cfg}"
    except (OSError, ValueError, KeyError, TypeError):
        cmd = f"ppap-pipe mine --out {mine_dir.parent.parent} --name {mine_dir.name} <its settings>"
    return (f"rerun `{cmd}`: it re-mines shards that are missing, corrupt or have no checksum, "
            "and keeps the others")


def shard_state(path: str | Path, verify: bool = True) -> tuple[str, str]:
    """('ok' | 'missing' | 'legacy' | 'corrupt', reason) of one shard, for resuming `mine`.

    'legacy': marker without a checksum (older ppap-pipe); 'corrupt': unreadable or empty
    marker, or (verify) shard bytes that do not match the checksum.
    """
    path = Path(path)
    marker = done_path(path)
    if not marker.exists() or not path.exists():
        return "missing", ""
    try:
        rec = read_json(marker)
        want = rec.get("sha256") if isinstance(rec, dict) else None
    except (OSError, ValueError) as exc:
        return "corrupt", str(exc)
    if want is None:
        return "legacy", f"{marker} has no checksum"
    if verify:
        try:
            if sha256_bytes(path.read_bytes()) != want:
                return "corrupt", f"{path} does not match the checksum in {marker.name}"
        except OSError as exc:
            return "corrupt", f"{path} is unreadable ({exc})"
    return "ok", ""


def read_shard(path: str | Path, verify: bool = True) -> Shard:
    """Read one shard; with `verify` (default) its bytes must match the checksum in its marker."""
    path = Path(path)
    want = None
    if verify:
        marker = done_path(path)
        if not marker.is_file():
            raise CorruptArtifact(f"{path} has no {marker.name} marker: its batch was never "
                                  f"finished; {remine_hint(path)}")
        rec = read_json(marker)
        want = rec.get("sha256") if isinstance(rec, dict) else None
        if want is None:
            raise CorruptArtifact(f"{path} was mined by an older ppap-pipe and has no checksum in "
                                  f"{marker.name}, so it cannot be verified; {remine_hint(path)}")
    try:
        data = path.read_bytes()
    except OSError as exc:
        raise CorruptArtifact(f"{path} is unreadable ({exc}); {remine_hint(path)}") from None
    if want is not None and sha256_bytes(data) != want:
        raise CorruptArtifact(f"{path} does not match the checksum in its marker (corrupt or cut "
                              f"off, {len(data)} bytes); {remine_hint(path)}")
    try:
        return _parse_shard(path, data)
    except CorruptArtifact:
        raise
    except (OSError, ValueError, KeyError, EOFError, TypeError, zipfile.BadZipFile, zlib.error) as exc:
        raise CorruptArtifact(f"{path} is not a readable mining shard ({type(exc).__name__}: "
                              f"{exc}); {remine_hint(path)}") from None


def _parse_shard(path: Path, data: bytes) -> Shard:
    with np.load(io.BytesIO(data), allow_pickle=False) as z:
        z = {k: z[k] for k in z.files}
    head = json.loads(z["header"].tobytes().decode())
    if head.get("format") != SHARD_FORMAT:
        raise CorruptArtifact(f"{path} has shard format {head.get('format')!r}, this code reads "
                              f"{SHARD_FORMAT}; mine again into a new --name")
    sh = Shard(
        path=path, epoch=head["epoch"], batch=head["batch"], criterion=head["criterion"],
        mode=head["mode"], n_rows=head["n_rows"], dim=head["dim"], images=z["images"].astype(np.int64),
        anchors=unpack_uints(z["anchors"]), proxy=unpack_float32(z["proxy"]),
        phi=z["phi"].astype(np.float64), psi=z["psi"].astype(np.float64), band=head["band"],
        has_amb=head["has_amb"], meta=head.get("meta", {}),
    )
    if sh.mode == "threshold":
        sh.band_indptr, sh.band_indices = _unpack_csr(z, "band")
        sh.band_class = unpack_uints(z["band_class"]).astype(np.int8)
    elif sh.mode == "explicit":
        sh.pos_indptr, sh.pos_indices = _unpack_csr(z, "pos")
    else:
        sh.cluster_of = unpack_uints(z["cluster_of"])
        if "unassigned" in z:
            sh.cluster_of[unpack_uints(z["unassigned"])] = -1
    return sh


# ----------------------------------------------------------------------------------------
# recovery and export
# ----------------------------------------------------------------------------------------


def read_marker(path: str | Path) -> dict[str, Any]:
    """The stats written with a shard's `.done` marker."""
    return read_json(done_path(path))
