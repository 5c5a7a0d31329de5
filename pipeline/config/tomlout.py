"""TOML text of resolved stage configs (`ppap-pipe config`), readable back by `--config`.

Only what the configs hold is needed: str, int, float, bool, None and flat lists of these.
None has no TOML spelling: such a key is written commented out (`# n_clusters = (unset)`),
so reading the file back leaves it at its default, which is None.
"""

from __future__ import annotations

import json
import math
from typing import Any, Mapping


def value(v: Any) -> str:
    """One TOML value."""
    if isinstance(v, bool):
        return "true" if v else "false"
    if isinstance(v, int):
        return str(v)
    if isinstance(v, float):
        if math.isnan(v):
            return "nan"
        if math.isinf(v):
            return "inf" if v > 0 else "-inf"
        return repr(v)
    if isinstance(v, str):
        return json.dumps(v, ensure_ascii=False)  # a JSON string is a TOML basic string
    if isinstance(v, (list, tuple)):
        return "[" + ", ".join(value(x) for x in v) + "]"
    raise TypeError(f"no TOML spelling for {v!r} ({type(v).__name__})")


def _key(k: str) -> str:
    return k if k.replace("_", "").replace("-", "").isalnum() else json.dumps(k)


def dumps(tables: Mapping[str, Mapping[str, Any]], header: str = "") -> str:
    """`[table]` sections of `key = value` lines, in the given order."""
    lines = [f"# {h}" if h else "#" for h in header.splitlines()] if header else []
    for name, items in tables.items():
        if lines:
            lines.append("")
        lines.append(f"[{_key(name)}]")
        for k, v in items.items():
            lines.append(f"# {_key(k)} = (unset)" if v is None else f"{_key(k)} = {value(v)}")
    return "\n".join(lines) + "\n"
