"""The errors a stage reports when the world gets in the way (full disk, damaged files, NaN,
a second writer): ValueErrors whose messages name the path, the step or crop, and the fix.

It imports nothing of the project, so the atomic writes (`cache/store.py`) and the checksums and
locks (`cache/integrity.py`) can both raise them without importing each other.
"""

from __future__ import annotations

import errno
import shutil
from contextlib import contextmanager
from pathlib import Path
from typing import Iterator


class CorruptArtifact(ValueError):
    """A file a stage relies on is missing, cut off or does not match its checksum."""


class DiskFull(ValueError):
    """No space left (or quota exceeded) while writing a named path."""


class RunLocked(ValueError):
    """Another process is writing the same run directory."""


class NonFinite(ValueError):
    """NaN or Inf where numbers must be finite (inputs, losses, weights)."""


# ----------------------------------------------------------------------------------- checksums


# ----------------------------------------------------------------------------------- disk full


def is_disk_full(exc: BaseException) -> bool:
    return isinstance(exc, OSError) and exc.errno in (errno.ENOSPC, errno.EDQUOT)


def _fmt_bytes(n: float) -> str:
    for unit in ("B", "KB", "MB", "GB", "TB"):
        if abs(n) < 1024 or unit == "TB":
            return f"{n:.0f} {unit}" if unit == "B" else f"{n:.1f} {unit}"
        n /= 1024
    return f"{n:.1f} TB"


def disk_full(path: str | Path, need: int | None = None) -> DiskFull:
    """The error for a write to `path` that ran out of space, with the free space there."""
    p = Path(path)
    probe = p
    while not probe.exists() and probe != probe.parent:
        probe = probe.parent
    try:
        free = _fmt_bytes(shutil.disk_usage(probe).free)
    except OSError:
        free = "unknown"
    want = f" ({_fmt_bytes(need)} to write)" if need else ""
    return DiskFull(
        f"no space left on the device while writing {p}{want}; {free} free on the filesystem of "
        f"{probe}. Free some space (or write to another --out), then rerun the same command: "
        "finished work is kept")


@contextmanager
def disk_guard(path: str | Path, need: int | None = None) -> Iterator[None]:
    """Turn ENOSPC/EDQUOT raised inside the block into DiskFull naming `path`."""
    try:
        yield
    except OSError as exc:
        if is_disk_full(exc):
            raise disk_full(getattr(exc, "filename", None) or path, need) from None
        raise
