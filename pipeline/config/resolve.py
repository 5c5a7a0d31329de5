"""Resolving a stage config: dataclass defaults <- preset <- config file (TOML or JSON) <- flags.

Also the names settings had before a rename (`DEPRECATED_NAMES`), type checks of file values that
name the key and the file, and the config hash that identifies a run's settings."""

from __future__ import annotations

import dataclasses
import json
import logging
from dataclasses import fields
from pathlib import Path
from typing import Any, Mapping

from pipeline import RELATIVE_OUT
from pipeline.config.options import (
    flag_name,
)
from pipeline.config.presets import PRESET_TABLES, PRESETS
from pipeline.config.schema import STAGE_CONFIGS, MineConfig

log = logging.getLogger("ppap.config")

# Former option names still accepted (with a warning) in a config file's [stage] table and on
# that stage's command line: {stage: {old name: new name}}.
DEPRECATED_NAMES: dict[str, dict[str, str]] = {
    "mine": {"epochs": "plans"},
    "eval": {"workers": "crf_workers"},
}


def stage_of(cls: type) -> str | None:
    """The stage (command) name of a config class, e.g. MineConfig -> 'mine'."""
    return next((k for k, v in STAGE_CONFIGS.items() if v is cls), None)


def preset_values(preset: str, cls: type) -> dict[str, Any]:
    """The `cls` stage's table of `preset` (empty for stages a preset does not set)."""
    if preset not in PRESETS:
        raise ValueError(f"preset={preset!r} is unknown; choose one of {', '.join(PRESETS)}")
    tables = PRESETS[preset]
    bad_tables = sorted(set(tables) - set(PRESET_TABLES))
    if bad_tables:
        raise ValueError(f"preset {preset!r} has unknown table(s) {bad_tables}; "
                         f"tables are {', '.join(PRESET_TABLES)}")
    stage = stage_of(cls)
    table = dict(tables.get(stage, {})) if stage else {}
    bad = sorted(set(table) - {f.name for f in fields(cls)})
    if bad:
        raise ValueError(f"preset {preset!r}: [{stage}] has unknown option(s) {bad}; "
                         f"the names are the fields of {cls.__name__}")
    return table


def upgrade_names(stage: str, values: Mapping[str, Any], where: str,
                  flags: bool = False) -> dict[str, Any]:
    """Rename deprecated option names of `stage` (DEPRECATED_NAMES) in `values`, warning once
    per name; giving both the old and the new name with different values is refused.

    `values` holds only the options that were given. `flags=True` words the messages for
    command-line flags (`--epochs 3`) instead of config keys (`epochs=3`).
    """
    out = dict(values)
    for old, new in DEPRECATED_NAMES.get(stage, {}).items():
        if old not in out:
            continue
        value = out.pop(old)
        if flags:
            o, n = flag_name(old), flag_name(new)
            given, other = f"{o} {value}", f"{n} {out.get(new)}"
        else:
            o, n = old, new
            given, other = f"{old}={value!r}", f"{new}={out.get(new)!r}"
        if new in out and out[new] != value:
            raise ValueError(f"{where}: {given} and {other} name the same option of `{stage}` "
                             f"({o} is its former name); keep only {n}")
        if flags:
            log.warning("%s: %s is deprecated, use %s (same meaning)", where, o, n)
        else:
            log.warning("%s: %r is deprecated for `%s`, use %r (same meaning)", where, o, stage, n)
        out[new] = value
    return out


def mine_config_dict(d: Mapping[str, Any]) -> dict[str, Any]:
    """MineConfig fields of a mined run's config.json (runs mined before the rename say
    `epochs` for `plans`); other keys are dropped."""
    d = dict(d)
    if "plans" not in d and "epochs" in d:
        d["plans"] = d["epochs"]
    names = {f.name for f in fields(MineConfig)}
    return {k: v for k, v in d.items() if k in names}


def mined_plans(d: Mapping[str, Any]) -> int | None:
    """Batch plans a mined run's config.json asked for (`plans`, or `epochs` before the rename)."""
    value = mine_config_dict(d).get("plans")
    return None if value is None else int(value)


def load_config_file(path: str | Path) -> dict[str, Any]:
    """Read a flat TOML or JSON mapping; a [stage] table overrides the flat keys for that stage.

    A flat key applies to every stage whose config has a field of that name (e.g. `seed`,
    `device`); names that mean different things per stage are distinct (`plans` of mine vs
    `epochs` of train, `workers` = dask processes vs `crf_workers` of eval).
    """
    p = Path(path)
    if not p.is_file():
        raise ValueError(f"config file {str(p)!r} does not exist; pass an existing .toml or .json file")
    try:
        text = p.read_text()
    except UnicodeDecodeError:
        raise ValueError(f"config file {str(p)!r} is not a text file; pass a .toml or .json file") from None
    if p.suffix == ".json":
        try:
            data = json.loads(text)
        except json.JSONDecodeError as exc:
            raise ValueError(f"config file {str(p)!r} is not valid JSON: {exc}") from None
    else:
        import tomllib

        try:
            data = tomllib.loads(text)
        except tomllib.TOMLDecodeError as exc:
            raise ValueError(f"config file {str(p)!r} is not valid TOML: {exc}") from None
    if not isinstance(data, dict):
        raise ValueError(f"config file {str(p)!r} must hold a mapping of option names to values")
    if data.pop(RELATIVE_OUT, False) and isinstance(data.get("out"), str):
        # a config.json a stage saved: its `out` is relative to the file (the run may have moved)
        data["out"] = str((p.resolve().parent / data["out"]).resolve())
    tables = {k: v for k, v in data.items() if isinstance(v, dict)}
    unknown = sorted(set(tables) - set(STAGE_CONFIGS))
    if unknown:
        raise ValueError(
            f"config file {str(p)!r} has unknown table(s) {['[' + t + ']' for t in unknown]}; "
            f"tables are named after stages: {', '.join('[' + t + ']' for t in STAGE_CONFIGS)}")
    for stage, table in tables.items():
        names = {f.name for f in fields(STAGE_CONFIGS[stage])} | set(DEPRECATED_NAMES.get(stage, {}))
        bad = sorted(set(table) - names)
        if bad:
            raise ValueError(
                f"config file {str(p)!r}: [{stage}] has unknown option(s) {bad}; "
                f"see `ppap-pipe {stage} --help` for the names")
    return data


def check_types(cls: type, values: Mapping[str, Any],
                written: Mapping[str, str] | None = None) -> dict[str, Any]:
    """Values for `cls` with their declared types (ints stay ints, '0.5' is not a float, ...).

    Integral floats (3.0) pass as ints and ints as floats; lists become tuples; anything else of
    the wrong type raises ValueError naming the option as the user wrote it (`written`: field ->
    the former name it was given under), the value and the expected type.
    """
    import typing

    def fail(name: str, value: Any, want: str) -> ValueError:
        said = (written or {}).get(name, name)
        field = f"{cls.__name__}.{name}" + (f", formerly {said!r}" if said != name else "")
        return ValueError(f"{said}={value!r} ({type(value).__name__}) is not a valid value for "
                          f"{field}: expected {want}")

    hints = typing.get_type_hints(cls)
    out = dict(values)
    for name, value in values.items():
        hint = hints.get(name)
        if hint is None:
            continue
        args = typing.get_args(hint)
        optional = type(None) in args
        base = [a for a in args if a is not type(None)] if optional else [hint]
        if value is None:
            if not optional:
                raise fail(name, value, getattr(base[0], "__name__", str(base[0])))
            continue
        t = base[0]
        origin = typing.get_origin(t)
        if origin is tuple:
            inner = typing.get_args(t)[0]
            if isinstance(value, str) or not isinstance(value, (list, tuple)) or not all(
                    isinstance(v, inner) and not isinstance(v, bool) for v in value):
                raise fail(name, value, f"a list of {inner.__name__}")
            out[name] = tuple(value)
        elif t is bool:
            if not isinstance(value, bool):
                raise fail(name, value, "true or false")
        elif t is int:
            if isinstance(value, float) and value.is_integer():
                value = out[name] = int(value)
            if isinstance(value, bool) or not isinstance(value, int):
                raise fail(name, value, "an integer")
        elif t is float:
            if isinstance(value, bool) or not isinstance(value, (int, float)):
                raise fail(name, value, "a number")
            out[name] = float(value)
        elif t is str:
            if isinstance(value, (int, float)) and not isinstance(value, bool):
                out[name] = str(value)  # e.g. anchors_per_image = 0.25
            elif not isinstance(value, str):
                raise fail(name, value, "a string")
    return out


def resolve(
    cls: type,
    preset: str | None = None,
    config_file: str | Path | None = None,
    stage: str | None = None,
    **overrides: Any,
):
    """defaults <- preset <- config file <- CLI overrides (None means 'not given').

    The preset contributes its table for this config's stage only (`preset_values`); a config
    file its flat keys that are fields of `cls`, then its `[stage]` table (deprecated names of
    that stage are renamed, with a warning: `upgrade_names`).
    """
    names = {f.name for f in fields(cls)}
    merged: dict[str, Any] = {}
    if preset is not None:
        merged.update(preset_values(preset, cls))
    if config_file is not None:
        data = load_config_file(config_file)
        section = data.get(stage, {}) if stage else {}
        written = {new: old for old, new in DEPRECATED_NAMES.get(stage, {}).items()
                   if old in section and new not in section}
        section = upgrade_names(stage, section, f"config file {str(config_file)!r} [{stage}]")
        flat = {k: v for k, v in data.items() if not isinstance(v, dict)}
        unknown = set(flat) - _all_option_names()
        if unknown:
            raise ValueError(
                f"config file {str(config_file)!r} has unknown option(s) {sorted(unknown)}; "
                "see `ppap-pipe <stage> --help` for the names"
            )
        from_file = {**{k: v for k, v in flat.items() if k in names},
                     **{k: v for k, v in section.items() if k in names}}
        try:
            check_types(cls, from_file, written)
        except ValueError as exc:
            raise ValueError(f"config file {str(config_file)!r}: {exc}") from None
        merged.update(from_file)
    merged.update({k: v for k, v in overrides.items() if v is not None and k in names})
    for k in ("splits", "mined", "sweep", "anchors", "grid", "fixed"):
        if k in merged and isinstance(merged[k], list):
            merged[k] = tuple(merged[k])
    return cls(**check_types(cls, merged))


def _all_option_names() -> set[str]:
    out: set[str] = set()
    for c in STAGE_CONFIGS.values():
        out |= {f.name for f in fields(c)}
    return out


def to_dict(cfg: Any) -> dict[str, Any]:
    d = dataclasses.asdict(cfg)
    return {k: (list(v) if isinstance(v, tuple) else v) for k, v in d.items()}


def config_hash(d: Mapping[str, Any], ignore: tuple[str, ...] = ()) -> str:
    """Stable short hash of the settings that change results."""
    import hashlib

    keep = {k: v for k, v in sorted(d.items()) if k not in ignore}
    return hashlib.sha256(json.dumps(keep, sort_keys=True, default=str).encode()).hexdigest()[:16]
