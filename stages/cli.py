"""`ppap-pipe` command line: one command per stage config, its options generated from the
config's fields (help text and spelling: `config.option`), so a new field is a new option.

Each command resolves its config (defaults <- --preset <- --config FILE <- flags given on the
command line; former option names renamed by `config.upgrade_names`) and calls its stage's
`run(cfg)`.
"""

from __future__ import annotations

import dataclasses
import errno
import importlib
import inspect
import logging
import sys
import typing
from typing import Any, Callable, List, Optional

import typer

from pipeline import __version__
from pipeline.config.options import flag_name, option_flags
from pipeline.config.presets import PRESETS
from pipeline.config.resolve import (
    DEPRECATED_NAMES,
    load_config_file,
    preset_values,
    resolve,
    upgrade_names,
)
from pipeline.config.schema import STAGE_CONFIGS

log = logging.getLogger("ppap.cli")

# command -> (module under stages/, help), in the order of `ppap-pipe --help`; the command's
# config is STAGE_CONFIGS[command]
COMMANDS: dict[str, tuple[str, str]] = {
    "features": ("features", "Stage 1: cache the frozen backbone's tokens of a dataset in Zarr "
                             "(resumable)."),
    "mine": ("mine", "Stage 2: mine PPAP (or P0/HP/k-means/PriMaPs/eigen) sets on fixed seeded "
                     "batches into shards."),
    "export": ("export", "Write one mined batch as .npz: features, anchors, CSR positive/ambiguous "
                         "sets, proxies."),
    "train": ("train", "Stage 3: train the last-block copy + head from cached tokens and mined "
                       "shards (resumable)."),
    "sweep-train": ("sweep", "Train a grid of runs and tabulate their held-out (training-split) "
                             "scores; never reads the evaluation split."),
    "eval": ("evaluate", "Stage 4: Hungarian-matched cluster and linear-probe metrics, with and "
                         "without CRF."),
    "predict": ("predict", "Segment a folder of new images with a trained run: label, colour "
                           "and overlay images per image (resumable)."),
    "audit": ("audit", "Precision of mined sets against ground truth, side by side (paper Table 6, "
                       "Fig. 1b)."),
    "show": ("show", "Render anchors with their positive and ambiguous patches on every image of "
                     "the batch."),
}
ECHO = {"show"}  # commands that print the paths their stage returns

# Options of every command, not config fields; a config field of the same name (SweepConfig's)
# receives the value given.
COMMON_HELP = {
    "preset": f"One of: {', '.join(PRESETS)}.",
    "config": r"TOML/JSON file of option values (flat, or \[stage] tables).",
}


def _cli_type(cls: type, name: str, hint: Any) -> Any:
    """The typer annotation of a config field: Optional[T]; tuples become repeatable lists."""
    args = typing.get_args(hint)
    if type(None) in args and len(args) == 2:
        hint = next(a for a in args if a is not type(None))
    if typing.get_origin(hint) is tuple and typing.get_args(hint)[1:] == (Ellipsis,):
        hint = List[typing.get_args(hint)[0]]
    elif hint not in (str, int, float, bool):
        raise TypeError(f"{cls.__name__}.{name}: the command line has no option type for {hint}; "
                        "use str, int, float, bool, tuple[T, ...] (or option(..., cli=False))")
    return Optional[hint]


def _parameter(name: str, annotation: Any, flags: tuple[str, ...],
               help_text: str) -> inspect.Parameter:
    if annotation == Optional[bool] and not any("/" in f for f in flags):
        flags = tuple(f"{f}/--no-{f[2:]}" for f in flags[:1]) + flags[1:]
    return inspect.Parameter(name, inspect.Parameter.KEYWORD_ONLY, annotation=annotation,
                             default=typer.Option(None, *flags, help=help_text))


def _with_default(f: dataclasses.Field) -> str:
    """The field's help with its built-in default, unless the help already states one (a
    --preset or --config value replaces it; `ppap-pipe config` prints the resolved values)."""
    text = f.metadata.get("help", "")
    if f.default is not dataclasses.MISSING:
        value = f.default
    elif f.default_factory is not dataclasses.MISSING:  # type: ignore[misc]
        value = f.default_factory()  # type: ignore[misc]
    else:
        return text
    if value is None or "default" in text.lower() or value in ((), [], ""):
        return text
    if isinstance(value, bool):
        shown = "on" if value else "off"
    elif isinstance(value, (tuple, list)):
        shown = " ".join(str(v) for v in value)
    else:
        shown = str(value)
    return f"{text} (default: {shown})".strip()


def parameters(stage: str, cls: type) -> list[inspect.Parameter]:
    """One keyword parameter per command-line field of `cls` (and per former name of one, see
    DEPRECATED_NAMES), with --preset and --config after --out."""
    hints = typing.get_type_hints(cls)
    common = [_parameter(k, Optional[str], (flag_name(k),), h) for k, h in COMMON_HELP.items()]
    params: list[inspect.Parameter] = []
    for f in dataclasses.fields(cls):
        if f.name in COMMON_HELP or not f.metadata.get("cli", True):
            continue
        annotation = _cli_type(cls, f.name, hints[f.name])
        flags = option_flags(f)
        params.append(_parameter(f.name, annotation, flags, _with_default(f)))
        params += [_parameter(old, annotation, (flag_name(old),), f"Deprecated: use {flags[0]}.")
                   for old, new in DEPRECATED_NAMES.get(stage, {}).items() if new == f.name]
    at = 1 if params and params[0].name == "out" else 0
    params[at:at] = common
    seen: dict[str, str] = {}
    for p in params:
        for flag in p.default.param_decls:
            for spelling in flag.split("/"):
                if spelling in seen:
                    raise TypeError(f"`{stage}`: {spelling} spells both {seen[spelling]} and "
                                    f"{p.name}; give one of them other flags (option(flags=...))")
                seen[spelling] = p.name
    return params


def _file_names_out(config_file: str | None, stage: str) -> bool:
    """Whether a --config file sets `out` (flat or in its [stage] table): then it, not the
    data_cache/<preset> default, says where the run is (e.g. a run's own saved config.json)."""
    if config_file is None:
        return False
    data = load_config_file(config_file)
    return "out" in data or "out" in data.get(stage, {})


def _command(stage: str, cls: type, module: str) -> Callable[..., None]:
    """The typer callback of `stage`: its signature is generated from `cls` (`parameters`)."""

    def command(**given: Any) -> None:
        values = {k: tuple(v) if isinstance(v, list) else v for k, v in given.items()
                  if v is not None and v != []}
        preset, config_file = values.pop("preset", None), values.pop("config", None)
        values = upgrade_names(stage, values, "command line", flags=True)
        names = {f.name for f in dataclasses.fields(cls)}
        if "out" in names and "out" not in values and not _file_names_out(config_file, stage):
            values["out"] = f"data_cache/{preset or 'demo'}"
        cfg = resolve(cls, preset=preset, config_file=config_file, stage=stage, **values)
        # a config's own `preset` / `config` fields (SweepConfig: for the runs under its grid)
        # take the --preset / --config given
        own = {k: v for k, v in (("preset", preset), ("config", config_file))
               if v is not None and k in names}
        if own:
            cfg = dataclasses.replace(cfg, **own)
        result = importlib.import_module(f"stages.{module}").run(cfg)
        if stage in ECHO:
            for p in result:
                typer.echo(str(p))

    params = parameters(stage, cls)
    command.__signature__ = inspect.Signature(params)  # type: ignore[attr-defined]
    command.__annotations__ = {p.name: p.annotation for p in params}
    command.__name__ = command.__qualname__ = stage.replace("-", "_")
    return command


class _TerminalHandler(logging.StreamHandler):
    """On a terminal, log lines go through tqdm.write: live bars are cleared and redrawn around
    them instead of being glued to them (log files get whole-line progress, executor.progress)."""

    def emit(self, record: logging.LogRecord) -> None:
        from tqdm import tqdm

        try:
            tqdm.write(self.format(record), file=self.stream)
        except Exception:  # noqa: BLE001 - logging must never raise
            self.handleError(record)


def _setup_logging(verbose: bool) -> None:
    stream = sys.stderr
    tty = hasattr(stream, "isatty") and stream.isatty()
    handler = _TerminalHandler(stream) if tty else logging.StreamHandler(stream)
    handler.setFormatter(logging.Formatter("%(asctime)s %(name)s %(levelname)s %(message)s",
                                           datefmt="%H:%M:%S"))
    logging.basicConfig(level=logging.DEBUG if verbose else logging.INFO, handlers=[handler])
    if not verbose:  # faiss logs which SIMD build it probes for at import (not our business)
        logging.getLogger("faiss.loader").setLevel(logging.WARNING)


def _print_version(value: bool) -> None:
    if value:  # eager: answered before typer asks for a command
        typer.echo(__version__)
        raise typer.Exit()


def _main(
    verbose: bool = typer.Option(False, "--verbose", "-v", help="Debug logging."),
    version: bool = typer.Option(False, "--version", help="Print the version and exit.",
                                 callback=_print_version, is_eager=True),
):
    _setup_logging(verbose)


def show_config(
    preset: Optional[str] = typer.Option(None, "--preset", help=COMMON_HELP["preset"]),
    config: Optional[str] = typer.Option(None, "--config", help=COMMON_HELP["config"]),
    stage: Optional[List[str]] = typer.Option(None, "--stage", help="Only these stages "
                                              "(repeatable; default: every stage)."),
    out: Optional[str] = typer.Option(None, "--out", help="Run directory (default "
                                      "data_cache/<preset or demo>)."),
    fmt: str = typer.Option("toml", "--format", help="toml (readable back by --config) or json."),
) -> None:
    """Print the resolved settings of every stage: defaults <- --preset <- --config FILE."""
    import json

    from pipeline.config import tomlout

    if fmt not in ("toml", "json"):
        raise ValueError(f"--format {fmt!r}: choose toml or json")
    stages = list(stage or COMMANDS)
    unknown = [s for s in stages if s not in COMMANDS]
    if unknown:
        raise ValueError(f"--stage {unknown[0]!r}: choose among {', '.join(COMMANDS)}")
    tables: dict[str, dict[str, Any]] = {}
    notes: list[str] = []
    for name in stages:
        cls = STAGE_CONFIGS[name]
        fields = {f.name for f in dataclasses.fields(cls)}
        given = {"out": out or f"data_cache/{preset or 'demo'}"} if "out" in fields else {}
        try:
            cfg = resolve(cls, preset=preset, config_file=config, stage=name, **given)
            values = dataclasses.asdict(cfg)
        except ValueError as exc:  # e.g. predict without --images: defaults and preset only
            notes.append(f"{name}: needs more on its command line ({exc})")
            values = {f.name: (f.default if f.default is not dataclasses.MISSING
                               else f.default_factory())  # type: ignore[misc]
                      for f in dataclasses.fields(cls)}
            values.update(given)
            if preset is not None:
                values.update(preset_values(preset, cls))
        tables[name] = {k: (list(v) if isinstance(v, tuple) else v) for k, v in values.items()}
    if fmt == "json":
        typer.echo(json.dumps({"preset": preset, "config": config, "stages": tables,
                               "not_resolved": notes}, indent=2))
        return
    header = (f"ppap-pipe {__version__}: settings of preset {preset or '(none)'}"
              + (f" with {config}" if config else "")
              + "; give this file to any stage with --config FILE"
              + "".join(f"\n{n}" for n in notes))
    typer.echo(tomlout.dumps(tables, header=header), nl=False)


def make_app() -> typer.Typer:
    """The `ppap-pipe` app: a command per entry of COMMANDS, its options from STAGE_CONFIGS now."""
    app = typer.Typer(
        add_completion=False,
        no_args_is_help=True,
        help="Offline PPAP pipeline: features -> mine -> train -> eval, plus audit/show/export.",
        context_settings={"help_option_names": ["-h", "--help"]},
    )
    app.callback()(_main)
    for stage, (module, help_text) in COMMANDS.items():
        app.command(stage, help=help_text)(_command(stage, STAGE_CONFIGS[stage], module))
    app.command("config", help="Print every stage's resolved settings (defaults <- --preset <- "
                "--config) as TOML that --config reads back.")(show_config)
    return app


app = make_app()


def main() -> None:
    """Entry point: clear one-line errors for bad input, exit code 2."""
    from pipeline.cache.integrity import disk_full, is_disk_full
    from pipeline.executor import StageInterrupted

    try:
        app()
    except (ValueError, FileNotFoundError) as exc:
        typer.echo(f"error: {exc}", err=True)
        sys.exit(2)
    except OSError as exc:  # not caught where it happened: still name the path, no traceback
        if is_disk_full(exc):
            typer.echo(f"error: {disk_full(exc.filename or '.')}", err=True)
        elif isinstance(exc, PermissionError) or exc.errno == errno.EROFS:
            typer.echo(f"error: cannot write {exc.filename or 'an output file'}: {exc.strerror}; "
                       "use an --out you can write to", err=True)
        else:
            raise
        sys.exit(2)
    except (StageInterrupted, KeyboardInterrupt) as exc:
        typer.echo(f"interrupted: {exc or 'finished units are kept; rerun the same command to resume'}", err=True)
        sys.exit(130)


if __name__ == "__main__":
    main()
