"""On-disk bookkeeping shared by all stages: atomic writes, manifests, completion markers.

A stage's unit of work (a feature chunk, a mined batch, a checkpoint) is complete only when its
marker exists; the marker is written last, after the data, through a temporary name and
`os.replace`. A manifest fingerprints what a run directory was made from; a rerun with other
inputs into the same directory is refused with a message naming the difference.
"""

from __future__ import annotations

import hashlib
import json
import os
import subprocess
import tempfile
from pathlib import Path
from typing import Any, Mapping

from pipeline import FORMAT_VERSION, RELATIVE_OUT, __version__
from pipeline.cache.errors import CorruptArtifact, disk_guard


class ManifestMismatch(ValueError):
    """A run directory holds results made from other inputs or settings."""


def file_mode() -> int:
    """The mode a plain `open(path, "w")` would give a new file: 0666 less the umask (0644
    under the usual umask 022)."""
    mask = os.umask(0)
    os.umask(mask)
    return 0o666 & ~mask


def atomic_write_bytes(path: str | Path, data: bytes) -> None:
    """Write to a temporary name in the same folder, fsync, then os.replace.

    Running out of space raises errors.DiskFull naming `path` and the free space left.
    """
    path = Path(path)
    with disk_guard(path, len(data)):
        path.parent.mkdir(parents=True, exist_ok=True)
        fd, tmp = tempfile.mkstemp(prefix=f".{path.name}.", suffix=".tmp", dir=path.parent)
        try:
            os.fchmod(fd, file_mode())  # mkstemp makes 0600; outputs are shared like any file
            with os.fdopen(fd, "wb") as fh:
                fh.write(data)
                fh.flush()
                os.fsync(fh.fileno())
            os.replace(tmp, path)
        except BaseException:
            if os.path.exists(tmp):
                os.unlink(tmp)
            raise


def portable_config(config: Mapping[str, Any], path: str | Path, root: str | Path) -> dict[str, Any]:
    """`config` as saved at `path` inside the run directory `root` (its `out` made relative)."""
    d = dict(config)
    if d.get("out") is not None:
        d["out"] = os.path.relpath(Path(root).resolve(), Path(path).resolve().parent)
        d[RELATIVE_OUT] = True
    return d


def in_run(path: str | Path | None, root: str | Path) -> str | None:
    """`path` relative to the run directory `root` when it lies inside it, else as given: the
    records a run writes (summaries, metrics, audit reports) stay true when it is moved."""
    if path is None:
        return None
    p, r = Path(path).resolve(), Path(root).resolve()
    try:
        rel = p.relative_to(r)
    except ValueError:
        return str(path)
    return str(rel) if str(rel) != "." else "."


def atomic_write_json(path: str | Path, obj: Any) -> None:
    atomic_write_bytes(path, (json.dumps(obj, indent=2, sort_keys=True, default=str) + "\n").encode())


def read_json(path: str | Path) -> Any:
    """Parse a JSON file; an empty or cut-off file raises CorruptArtifact naming it."""
    path = Path(path)
    try:
        text = path.read_text()
        return json.loads(text)
    except (json.JSONDecodeError, UnicodeDecodeError) as exc:
        state = "is empty" if not path.stat().st_size else f"is not valid JSON ({exc})"
        raise CorruptArtifact(
            f"{path} {state}: it was cut off or damaged; delete it and rerun the command that "
            "wrote it (a stage redoes the unit whose marker is missing)") from None


def code_version() -> str:
    """Package version plus the git commit when run from a checkout."""
    try:
        here = Path(__file__).resolve().parent.parent
        rev = subprocess.run(
            ["git", "-C", str(here), "rev-parse", "--short", "HEAD"],
            capture_output=True, text=True, timeout=5,
        )
        if rev.returncode == 0 and rev.stdout.strip():
            return f"{__version__}+g{rev.stdout.strip()}"
    except (OSError, subprocess.SubprocessError):
        pass
    return __version__


def file_fingerprint(path: str | Path, chunk: int = 1 << 20) -> str:
    """sha256 of a file's bytes (weights, label lists)."""
    h = hashlib.sha256()
    with open(path, "rb") as fh:
        while block := fh.read(chunk):
            h.update(block)
    return h.hexdigest()[:16]


def check_or_write_manifest(
    path: str | Path, identity: Mapping[str, Any], extra: Mapping[str, Any] | None = None,
    what: str = "run directory",
) -> dict[str, Any]:
    """Write `identity` (+ `extra`, not compared) to a fresh manifest, or check an existing one.

    `identity` holds everything that changes results; a mismatch raises ManifestMismatch naming
    each differing key and both values, and how to proceed.
    """
    path = Path(path)
    identity = json.loads(json.dumps(dict(identity), default=str))  # normalise tuples etc.
    identity = {"format_version": FORMAT_VERSION, **identity}
    if path.exists():
        try:
            old = read_json(path)
        except (OSError, ValueError) as exc:
            raise ManifestMismatch(
                f"{path} is unreadable ({exc}); delete {path.parent} to start this {what} again"
            ) from None
        old_id = old.get("identity", {})
        if old_id.get("format_version") != FORMAT_VERSION:
            raise ManifestMismatch(
                f"{path.parent} was written with store format {old_id.get('format_version')!r}, "
                f"this ppap-pipe reads format {FORMAT_VERSION}; write to a new --out or delete it"
            )
        diffs = [
            f"{k}: on disk {old_id.get(k)!r}, now {identity.get(k)!r}"
            for k in sorted(set(old_id) | set(identity))
            if old_id.get(k) != identity.get(k)
        ]
        if diffs:
            raise ManifestMismatch(
                f"{path.parent} already holds a {what} made with other settings ("
                + "; ".join(diffs)
                + "). Use another output directory/name, or delete it to start again."
            )
        return old
    record = {"identity": identity, **(dict(extra) if extra else {}), "code_version": code_version()}
    atomic_write_json(path, record)
    return record


class Markers:
    """Completion markers `<dir>/<key>.done` (JSON stats), written last."""

    def __init__(self, root: str | Path):
        self.root = Path(root)

    def path(self, key: str) -> Path:
        return self.root / f"{key}.done"

    def done(self, key: str) -> bool:
        return self.path(key).exists()

    def mark(self, key: str, stats: Mapping[str, Any] | None = None) -> None:
        atomic_write_json(self.path(key), dict(stats or {}))

    def read(self, key: str) -> dict[str, Any]:
        return read_json(self.path(key))
