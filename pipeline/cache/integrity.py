"""What keeps results honest when things go wrong: checksums, run locks, clear I/O errors.

- Checksums: every artifact a later stage trusts carries the sha256 of its bytes in its marker
  (feature chunks in `markers/features/*.done`, shards in their `.done`) or in a sidecar
  `<file>.sha256` (checkpoints, criterion state; `write_checked` / `read_checked`). Readers
  verify before use and name the file and the command that repairs it.
- Run locks: one writer per run directory (`hold_lock` inside a function decorated with
  `@releases_locks`): an advisory `fcntl.flock` on `<dir>/.lock`, released when the stage
  returns or its process dies; a second writer is refused naming the holder's pid.
- Orphans: temporary files left by a killed writer (`.*.tmp` from our atomic writes, `*.partial`
  from Zarr) are removed on resume, under the lock.
- Disk full / non-finite numbers / missing CUDA: ValueErrors whose message says which path,
  how much space, which step or crop, and what to do.
"""

from __future__ import annotations

import contextvars
import errno
import functools
import hashlib
import json
import logging
import os
from pathlib import Path
from typing import Any, Callable

from pipeline.cache.errors import (  # noqa: F401  (the errors of these checks, named here too)
    CorruptArtifact,
    DiskFull,
    NonFinite,
    RunLocked,
    disk_full,
    disk_guard,
    is_disk_full,
)
from pipeline.cache.store import atomic_write_bytes, atomic_write_json

log = logging.getLogger("ppap.integrity")

LOCK_NAME = ".lock"
SUM_SUFFIX = ".sha256"



def sha256_bytes(data) -> str:
    return hashlib.sha256(data).hexdigest()


def sha256_file(path: str | Path, chunk: int = 1 << 22) -> str:
    h = hashlib.sha256()
    with open(path, "rb") as fh:
        while block := fh.read(chunk):
            h.update(block)
    return h.hexdigest()


def sum_path(path: str | Path) -> Path:
    path = Path(path)
    return path.with_name(path.name + SUM_SUFFIX)


def write_checked(path: str | Path, data: bytes) -> str:
    """Write `data` atomically with its checksum in `<path>.sha256`; returns the digest.

    The sidecar is written first and also names the digest of the file being replaced, so a
    process killed between the two writes leaves a pair that still verifies (old or new file).
    """
    path = Path(path)
    digest = sha256_bytes(data)
    previous = None
    side = sum_path(path)
    if side.is_file() and path.is_file():
        try:
            previous = json.loads(side.read_text()).get("sha256")
        except (OSError, ValueError):
            previous = None
    atomic_write_json(side, {"sha256": digest, "bytes": len(data), "previous": previous})
    atomic_write_bytes(path, data)
    return digest


def read_checked(path: str | Path, *, what: str, fix: str, legacy_ok: bool = True) -> bytes:
    """The bytes of `path`, verified against `<path>.sha256`.

    A mismatch (bit flip, truncation) raises CorruptArtifact naming the file and `fix`. A file
    without a sidecar was written by an older ppap-pipe: accepted with a warning when
    `legacy_ok`, else refused.
    """
    path = Path(path)
    try:
        data = path.read_bytes()
    except FileNotFoundError:
        raise CorruptArtifact(f"{what} {path} does not exist; {fix}") from None
    side = sum_path(path)
    if not side.is_file():
        if not legacy_ok:
            raise CorruptArtifact(f"{what} {path} has no checksum ({side.name} is missing: written "
                                  f"by an older ppap-pipe or cut off); {fix}")
        log.warning("%s %s has no checksum (written by an older ppap-pipe); using it unverified",
                    what, path)
        return data
    try:
        rec = json.loads(side.read_text())
        want = {rec["sha256"], rec.get("previous")} - {None}
    except (OSError, ValueError, KeyError, TypeError, AttributeError):
        raise CorruptArtifact(f"the checksum file {side} of {what} {path} is unreadable; "
                              f"{fix}") from None
    got = sha256_bytes(data)
    if got not in want:
        raise CorruptArtifact(
            f"{what} {path} does not match its checksum ({len(data)} bytes, sha256 {got[:12]}…, "
            f"expected {rec.get('bytes')} bytes, {str(rec['sha256'])[:12]}…): the file is corrupt "
            f"or cut off; {fix}")
    return data


def remove_checked(path: str | Path) -> None:
    Path(path).unlink(missing_ok=True)
    sum_path(path).unlink(missing_ok=True)


# ----------------------------------------------------------------------------------- run locks

_held: contextvars.ContextVar[list | None] = contextvars.ContextVar("ppap_locks", default=None)


class RunLock:
    """Exclusive advisory lock on `<directory>/<name>` (fcntl.flock, non-blocking)."""

    def __init__(self, directory: str | Path, what: str = "run directory", name: str = LOCK_NAME):
        self.directory = Path(directory)
        self.what = what
        self.path = self.directory / name
        self.fh = None
        self.created_dir = False

    def acquire(self) -> "RunLock":
        import fcntl

        self.created_dir = not self.directory.exists()
        self.directory.mkdir(parents=True, exist_ok=True)
        fh = open(self.path, "a+")
        try:
            fcntl.flock(fh.fileno(), fcntl.LOCK_EX | fcntl.LOCK_NB)
        except OSError as exc:
            if exc.errno not in (errno.EWOULDBLOCK, errno.EAGAIN, errno.EACCES):
                fh.close()
                raise
            fh.seek(0)
            holder = fh.read().strip() or "unknown"
            fh.close()
            raise RunLocked(
                f"{self.directory} is being written by another ppap-pipe process (pid {holder}); "
                f"wait for it to finish (or stop it) before writing this {self.what} again, or "
                "write to another --name/--out") from None
        fh.seek(0)
        fh.truncate()
        fh.write(f"{os.getpid()}\n")
        fh.flush()
        self.fh = fh
        return self

    def release(self, failed: bool = False) -> None:
        if self.fh is None:
            return
        try:
            # a directory this lock created and nothing else was written to: leave no stub
            if failed and self.created_dir and [p.name for p in self.directory.iterdir()] == [self.path.name]:
                self.path.unlink(missing_ok=True)
                self.directory.rmdir()
        except OSError:
            pass
        finally:
            self.fh.close()  # closing the descriptor releases the flock
            self.fh = None

    def __enter__(self) -> "RunLock":
        return self.acquire()

    def __exit__(self, exc_type, *exc) -> None:
        self.release(failed=exc_type is not None)


def releases_locks(fn: Callable) -> Callable:
    """Decorator for a stage's `run`: locks taken with `hold_lock` are released when it returns."""

    @functools.wraps(fn)
    def wrapper(*args, **kwargs):
        held: list[RunLock] = []
        token = _held.set(held)
        failed = True
        try:
            out = fn(*args, **kwargs)
            failed = False
            return out
        finally:
            _held.reset(token)
            for lock in reversed(held):
                lock.release(failed=failed)

    return wrapper


def hold_lock(directory: str | Path, what: str = "run directory", name: str = LOCK_NAME) -> RunLock:
    """Lock `directory` for writing until the enclosing `@releases_locks` function returns."""
    held = _held.get()
    if held is None:
        raise RuntimeError("hold_lock() must be called inside a function decorated with "
                           "@releases_locks")
    directory = Path(directory)
    for lock in held:  # re-entrant within one stage call
        if lock.directory.resolve() == directory.resolve() and lock.path.name == name:
            return lock
    lock = RunLock(directory, what, name).acquire()
    held.append(lock)
    return lock


# ----------------------------------------------------------------------------------- orphans


def is_orphan(name: str) -> bool:
    """Temporary files of interrupted writers: `.x.abc.tmp` (atomic_write_bytes), `*.partial` (Zarr)."""
    return (name.startswith(".") and name.endswith(".tmp")) or name.endswith(".partial")


def clean_orphans(root: str | Path, recursive: bool = True) -> int:
    """Delete temporary files left by killed writers under `root` (call with its lock held)."""
    root = Path(root)
    if not root.is_dir():
        return 0
    n = 0
    walker = os.walk(root) if recursive else [(str(root), [], os.listdir(root))]
    for dirpath, _, files in walker:
        for f in files:
            if is_orphan(f) and os.path.isfile(os.path.join(dirpath, f)):
                try:
                    os.unlink(os.path.join(dirpath, f))
                    n += 1
                except FileNotFoundError:
                    pass
    if n:
        log.info("removed %d temporary file(s) left by an interrupted run under %s", n, root)
    return n


# ----------------------------------------------------------------------------------- devices


def require_device(device: str) -> None:
    """Refuse a CUDA device when CUDA is unavailable (before anything is written)."""
    if device.startswith("cuda"):
        import torch

        if not torch.cuda.is_available():
            raise ValueError(f"device={device!r} but CUDA is not available on this machine; "
                             "use --device cpu")
        if ":" in device:
            idx = int(device.split(":", 1)[1])
            if idx >= torch.cuda.device_count():
                raise ValueError(f"device={device!r} but this machine has "
                                 f"{torch.cuda.device_count()} CUDA device(s); use cuda:0..")


# ----------------------------------------------------------------------------------- numbers


def nonfinite_rows(x: Any) -> "Any":
    """Indices along axis 0 of `x` (numpy or torch) holding any NaN/Inf; empty when all finite."""
    import numpy as np

    if hasattr(x, "detach"):  # torch
        import torch

        bad = ~torch.isfinite(x.detach()).reshape(x.shape[0], -1).all(dim=1)
        return np.flatnonzero(bad.cpu().numpy())
    a = np.asarray(x)
    if a.dtype.kind not in "fc":
        return np.zeros(0, np.int64)
    if np.isfinite(a).all():  # the common case, one pass
        return np.zeros(0, np.int64)
    return np.flatnonzero(~np.isfinite(a).reshape(a.shape[0], -1).all(axis=1))
