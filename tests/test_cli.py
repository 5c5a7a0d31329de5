"""The generated command line (stages/cli.py): every config field is an option with its help
text, a new field needs nothing else, former names still work, export's --to/--file, and the
resolution order defaults <- preset <- config file <- flag."""

from __future__ import annotations

import dataclasses
import importlib
import json
import logging
import re
import sys

import pytest
import typer
from typer.testing import CliRunner

import pipeline
from pipeline.config.options import flag_name, option, option_flags
from pipeline.config.presets import PRESETS
from pipeline.config.resolve import DEPRECATED_NAMES
from pipeline.config.schema import STAGE_CONFIGS, ShowConfig
from stages import cli


def capture(monkeypatch, stage: str) -> list:
    """Replace the stage's run(cfg) by one that records the config it gets."""
    seen: list = []
    module = importlib.import_module(f"stages.{cli.COMMANDS[stage][0]}")
    monkeypatch.setattr(module, "run", lambda cfg: seen.append(cfg) or [])
    return seen


def invoke(app, *argv) -> str:
    """Run the app in this process (wide terminal: --help is never cut short); its output."""
    res = CliRunner().invoke(app, [str(a) for a in argv], env={"COLUMNS": "1000"})
    assert res.exit_code == 0, (argv, res.output, res.exception)
    return res.output


def squeeze(text: str) -> str:
    """Help text without the box drawing and whitespace, whatever the terminal width wrapped."""
    return re.sub(r"[\s│╭╮╰╯─]+", "", text)


def cli_fields(cls: type) -> list[dataclasses.Field]:
    return [f for f in dataclasses.fields(cls)
            if f.metadata.get("cli", True) and f.name not in cli.COMMON_HELP]


def test_version_needs_no_command():
    assert invoke(cli.app, "--version").strip() == pipeline.__version__


def test_every_stage_config_is_a_command():
    assert list(cli.COMMANDS) == ["features", "mine", "export", "train", "sweep-train", "eval",
                                  "predict", "audit", "show"]
    assert set(cli.COMMANDS) == set(STAGE_CONFIGS)


@pytest.mark.parametrize("stage", list(STAGE_CONFIGS))
def test_every_field_is_an_option_with_its_help(stage):
    cls = STAGE_CONFIGS[stage]
    command = typer.main.get_command(cli.app).commands[stage]
    options = {p.name: p for p in command.params}
    help_out = squeeze(invoke(cli.app, stage, "--help"))
    for f in cli_fields(cls):
        assert f.metadata.get("help"), f"{cls.__name__}.{f.name} has no help text"
        opt = options[f.name]
        assert tuple(opt.opts) == option_flags(f), f.name
        if f.type in ("bool", bool):
            assert opt.secondary_opts == ["--no-" + option_flags(f)[0][2:]]
        assert opt.help == cli._with_default(f) and opt.help.startswith(f.metadata["help"])
        assert squeeze(f.metadata["help"]) in help_out, f"{stage} --help lacks {f.name}'s help"
        for flag in option_flags(f):
            assert flag in help_out
    for k, text in cli.COMMON_HELP.items():
        assert options[k].opts == [flag_name(k)]
        # rendered as written (rich markup would swallow a bare "[stage]")
        assert squeeze(text.replace("\\[", "[")) in help_out, f"{stage} --help mangles --{k}"
    # nothing else: the options are exactly the fields, the common ones and the former names
    expected = ({f.name for f in cli_fields(cls)} | set(cli.COMMON_HELP)
                | set(DEPRECATED_NAMES.get(stage, {})))
    assert set(options) == expected


def test_spellings_kept_from_the_hand_written_options():
    """Flags whose spelling is not the field name's, and the on/off flags."""
    commands = typer.main.get_command(cli.app).commands
    flags = {s: {o for p in c.params for o in (*p.opts, *p.secondary_opts)}
             for s, c in commands.items()}
    assert {"--anchor", "--random", "--dest"} <= flags["show"] and "--anchors" not in flags["show"]
    assert {"--json", "--mined", "--sweep", "--max-anchors"} <= flags["audit"]
    assert {"--to", "--file"} <= flags["export"]
    assert {"--parity-factor", "--no-parity-factor", "--amp", "--no-amp",
            "--n-clusters"} <= flags["train"]
    assert {"--crf", "--no-crf", "--crf-workers", "--workers", "--primaps-psi"} <= flags["eval"]
    assert {"--phi0", "--psi0", "--epochs", "--plans", "--eigen-kernel-power"} <= flags["mine"]
    assert "--band" not in flags["mine"]  # config files only
    assert {"--splits", "--data-root", "--scheduler"} <= flags["features"]
    repeatable = {s: {p.name for p in c.params if p.multiple} for s, c in commands.items()}
    assert repeatable["audit"] == {"mined", "sweep"} and repeatable["show"] == {"anchors"}
    assert repeatable["features"] == {"splits"} and repeatable["sweep-train"] == {"grid", "fixed"}
    assert not repeatable["train"] and not repeatable["eval"]


def test_a_new_config_field_is_a_working_option(monkeypatch, tmp_path):
    """One field added to a stage config: an option in --help, from flags and config files."""
    extra = dataclasses.make_dataclass("ShowExtra", [
        ("knob", int, option(3, "A knob nobody has yet.")),
        ("loud", bool, option(False, "Say more.")),
        ("tags", tuple[str, ...], option((), "Tags (repeatable).")),
        ("hidden", float, option(0.5, "Config files only.", cli=False)),
    ], bases=(ShowConfig,), frozen=True)
    monkeypatch.setitem(STAGE_CONFIGS, "show", extra)
    app = cli.make_app()
    help_out = squeeze(invoke(app, "show", "--help"))
    for text in ("--knob", "Aknobnobodyhasyet.", "--loud", "--no-loud", "Saymore.", "--tags"):
        assert text in help_out
    assert "--hidden" not in help_out
    seen = capture(monkeypatch, "show")
    invoke(app, "show", "--out", tmp_path, "--random", 1, "--knob", 5, "--loud", "--tags", "a",
           "--tags", "b")
    cfg = seen[-1]
    assert type(cfg) is extra
    assert (cfg.knob, cfg.loud, cfg.tags, cfg.hidden) == (5, True, ("a", "b"), 0.5)
    conf = tmp_path / "c.toml"
    conf.write_text("[show]\nknob = 7\nhidden = 0.25\nloud = true\n")
    invoke(app, "show", "--out", tmp_path, "--random", 1, "--config", conf)
    assert (seen[-1].knob, seen[-1].hidden, seen[-1].loud) == (7, 0.25, True)
    invoke(app, "show", "--out", tmp_path, "--random", 1, "--config", conf, "--knob", 9,
           "--no-loud")
    assert (seen[-1].knob, seen[-1].loud) == (9, False)
    # an unsupported type is refused when the command is built, naming the field
    odd = dataclasses.make_dataclass("ShowOdd", [("pair", dict, option(None, "?"))],
                                     bases=(ShowConfig,), frozen=True)
    monkeypatch.setitem(STAGE_CONFIGS, "show", odd)
    with pytest.raises(TypeError, match=r"ShowOdd\.pair.*cli=False"):
        cli.make_app()


def test_a_field_spelt_like_another_option_is_refused(monkeypatch):
    clash = dataclasses.make_dataclass("ShowClash", [
        ("others", int, option(0, "?", flags=("--random",)))], bases=(ShowConfig,), frozen=True)
    monkeypatch.setitem(STAGE_CONFIGS, "show", clash)
    with pytest.raises(TypeError, match="--random spells both random and others"):
        cli.make_app()


def test_former_names_are_generated_options(monkeypatch, tmp_path, caplog):
    for stage, names in DEPRECATED_NAMES.items():
        help_out = squeeze(invoke(cli.app, stage, "--help"))
        for old, new in names.items():
            assert squeeze(f"{flag_name(old)} <int> Deprecated: use {flag_name(new)}.") in help_out
    # a former name added to the table is an option of that command, with a warning
    monkeypatch.setitem(DEPRECATED_NAMES, "show", {"count": "random"})
    app = cli.make_app()
    assert "Deprecated:use--random." in squeeze(invoke(app, "show", "--help"))
    seen = capture(monkeypatch, "show")
    with caplog.at_level(logging.WARNING):
        invoke(app, "show", "--out", tmp_path, "--count", 3)
    assert seen[-1].random == 3
    assert "--count is deprecated, use --random" in caplog.text
    res = CliRunner().invoke(app, ["show", "--out", str(tmp_path), "--count", "3", "--random", "2"])
    assert res.exit_code != 0
    assert "--count 3 and --random 2 name the same option" in str(res.exception)


def test_export_to_or_file(monkeypatch, tmp_path, capsys):
    seen = capture(monkeypatch, "export")
    invoke(cli.app, "export", "--out", tmp_path, "--mined", "kmeans", "--batch", 2, "--to", "a.npz")
    invoke(cli.app, "export", "--preset", "camvid", "--file", "b.npz")
    assert [(c.out, c.mined, c.epoch, c.batch, c.to) for c in seen] == [
        (str(tmp_path), "kmeans", 0, 2, "a.npz"), ("data_cache/camvid", "ppap", 0, 0, "b.npz")]
    res = CliRunner().invoke(cli.app, ["export", "--out", str(tmp_path)])
    assert isinstance(res.exception, ValueError) and "give --to FILE.npz" in str(res.exception)
    old = sys.argv
    sys.argv = ["ppap-pipe", "export", "--out", str(tmp_path)]
    try:
        with pytest.raises(SystemExit) as exc:
            cli.main()
    finally:
        sys.argv = old
    assert exc.value.code == 2 and "error: to=None: give --to FILE.npz" in capsys.readouterr().err


def test_defaults_preset_config_file_flag(monkeypatch, tmp_path):
    """defaults <- preset <- config file <- flag, for generated options (a float, a bool, the new
    --n-clusters), and --out's default data_cache/<preset or demo>."""
    seen = capture(monkeypatch, "mine")
    conf = tmp_path / "c.toml"
    conf.write_text("[mine]\nphi0 = 0.9\n[train]\namp = false\nn_clusters = 4\n")
    demo = PRESETS["demo"]["mine"]["phi0"]
    for argv, phi0 in ([(), 0.55], [("--preset", "demo"), demo],
                       [("--preset", "demo", "--config", conf), 0.9],
                       [("--preset", "demo", "--config", conf, "--phi0", 0.85), 0.85]):
        invoke(cli.app, "mine", "--psi0", 0.1, *argv)
        assert seen[-1].phi0 == phi0, argv
    assert seen[0].out == "data_cache/demo"
    seen = capture(monkeypatch, "train")
    invoke(cli.app, "train", "--preset", "camvid")
    assert (seen[-1].out, seen[-1].amp, seen[-1].n_clusters) == ("data_cache/camvid", True, None)
    invoke(cli.app, "train", "--preset", "camvid", "--config", conf, "--out", tmp_path)
    assert (seen[-1].out, seen[-1].amp, seen[-1].n_clusters) == (str(tmp_path), False, 4)
    invoke(cli.app, "train", "--config", conf, "--amp", "--n-clusters", 6)
    assert (seen[-1].amp, seen[-1].n_clusters) == (True, 6)


def test_sweep_train_passes_preset_and_config_to_its_runs(monkeypatch, tmp_path):
    seen = capture(monkeypatch, "sweep-train")
    conf = tmp_path / "c.json"
    conf.write_text(json.dumps({"train": {"tau": 0.2}, "sweep-train": {"name": "fromfile"}}))
    invoke(cli.app, "sweep-train", "--grid", "lr=1e-4,1e-3")
    assert (seen[-1].preset, seen[-1].config, seen[-1].name) == (None, None, "sweep")
    invoke(cli.app, "sweep-train", "--preset", "camvid", "--config", conf, "--grid", "lr=1e-4")
    cfg = seen[-1]
    assert (cfg.preset, cfg.config, cfg.name, cfg.out) == ("camvid", str(conf), "fromfile",
                                                          "data_cache/camvid")


def test_help_shows_each_options_default():
    text = squeeze(invoke(cli.app, "mine", "--help"))
    assert "InitialpositivethresholdΦ0.(default:0.55)" in text
    assert "ppap,p0,hp,kmeans,primapsoreigen.(default:ppap)" in text
    assert squeeze("(default: on)") in squeeze(invoke(cli.app, "eval", "--help"))  # --crf/--no-crf
    # a help text that already says its default is left as written
    assert text.count("(default:thecriterion)") == 1


def test_config_prints_the_resolved_settings_and_reads_back(tmp_path):
    import tomllib

    from pipeline.config.resolve import resolve
    from pipeline.config.schema import MineConfig, TrainConfig

    text = invoke(cli.app, "config", "--preset", "camvid")
    data = tomllib.loads(text)
    assert data["mine"]["phi0"] == PRESETS["camvid"]["mine"]["phi0"] == 0.95
    assert data["train"]["out"] == "data_cache/camvid" and "n_clusters" not in data["train"]
    assert "# n_clusters = (unset)" in text
    assert "predict: needs more on its command line" in text and "images" not in data["predict"]
    path = tmp_path / "camvid.toml"
    path.write_text(text)
    for stage, cls in (("mine", MineConfig), ("train", TrainConfig)):
        assert resolve(cls, config_file=path, stage=stage) == \
            resolve(cls, preset="camvid", stage=stage, out="data_cache/camvid")
    # a config file on top of the preset, one stage, JSON
    (tmp_path / "tight.toml").write_text("[mine]\nphi0 = 0.97\n")
    out = json.loads(invoke(cli.app, "config", "--preset", "camvid", "--config",
                            tmp_path / "tight.toml", "--stage", "mine", "--format", "json"))
    assert list(out["stages"]) == ["mine"] and out["stages"]["mine"]["phi0"] == 0.97
    res = CliRunner().invoke(cli.app, ["config", "--stage", "mien"])
    assert res.exit_code != 0 and "choose among" in str(res.exception)
