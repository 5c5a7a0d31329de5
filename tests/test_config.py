"""Config resolution: per-stage preset tables, distinct option names, deprecated aliases, and
mined runs written before the `epochs` -> `plans` rename."""

from __future__ import annotations

import dataclasses
import json
import logging

import pytest
from test_audit import make_store, mine_run
from typer.testing import CliRunner

from pipeline.config.presets import PRESET_TABLES, PRESETS
from pipeline.config.resolve import (
    DEPRECATED_NAMES,
    mine_config_dict,
    preset_values,
    resolve,
)
from pipeline.config.schema import (
    STAGE_CONFIGS,
    EvalConfig,
    FeaturesConfig,
    MineConfig,
    TrainConfig,
)


def test_presets_do_not_leak_between_stages():
    assert resolve(FeaturesConfig, preset="camvid").batch_size == 16  # the forward-pass default
    assert resolve(MineConfig, preset="camvid").batch_size == 64  # the mining batch
    assert resolve(MineConfig, preset="demo").batch_size == 16
    assert resolve(MineConfig, preset="camvid").plans == 2
    assert resolve(TrainConfig, preset="camvid").epochs == 2
    assert resolve(TrainConfig, preset="camvid").tau == 0.1  # the held-out sweep's recipe
    assert resolve(TrainConfig, preset="camvid").select_every == 10
    assert resolve(MineConfig, preset="cocostuff27-vits8").plans == 5
    assert resolve(EvalConfig, preset="camvid").eigen_kernel_power == 4.0
    assert resolve(EvalConfig, preset="camvid").crf_workers == 0
    assert resolve(FeaturesConfig, preset="camvid").data_root == "../shared/camvid"


@pytest.mark.parametrize("preset", sorted(PRESETS))
def test_every_preset_key_is_a_field_of_its_stage(preset):
    assert set(PRESETS[preset]) <= set(PRESET_TABLES)
    for stage in PRESET_TABLES:
        cls = STAGE_CONFIGS[stage]
        table = PRESETS[preset].get(stage, {})
        assert set(table) <= {f.name for f in dataclasses.fields(cls)}, (preset, stage)
        resolve(cls, preset=preset)  # valid values


def test_a_misspelt_preset_key_is_refused(monkeypatch):
    monkeypatch.setitem(PRESETS, "typo", {"mine": {"epochs": 3}})
    with pytest.raises(ValueError, match=r"preset 'typo': \[mine\] has unknown option\(s\) \['epochs'\]"):
        preset_values("typo", MineConfig)
    with pytest.raises(ValueError, match="preset='nope' is unknown"):
        resolve(MineConfig, preset="nope")


def test_flat_config_keys_mean_one_thing(tmp_path):
    path = tmp_path / "c.toml"
    path.write_text("epochs = 7\nworkers = 2\nbatch_size = 32\n")
    assert resolve(TrainConfig, config_file=path, stage="train").epochs == 7
    mine_cfg = resolve(MineConfig, config_file=path, stage="mine")
    assert mine_cfg.plans == 1 and mine_cfg.workers == 2 and mine_cfg.batch_size == 32
    assert resolve(EvalConfig, config_file=path, stage="eval").crf_workers == 0


def test_deprecated_names_in_a_stage_table(tmp_path, caplog):
    path = tmp_path / "c.toml"
    path.write_text("[mine]\nepochs = 3\n[eval]\nworkers = 2\n")
    with caplog.at_level(logging.WARNING, logger="ppap.config"):
        assert resolve(MineConfig, config_file=path, stage="mine").plans == 3
        assert resolve(EvalConfig, config_file=path, stage="eval").crf_workers == 2
    assert "'epochs' is deprecated for `mine`, use 'plans'" in caplog.text
    assert "'workers' is deprecated for `eval`, use 'crf_workers'" in caplog.text
    path.write_text("[mine]\nepochs = 3\nplans = 4\n")
    with pytest.raises(ValueError, match="epochs=3 and plans=4 name the same option"):
        resolve(MineConfig, config_file=path, stage="mine")
    assert DEPRECATED_NAMES["mine"] == {"epochs": "plans"}
    # a wrongly typed value is reported under the name the user wrote
    path.write_text('[mine]\nepochs = "two"\n')
    with pytest.raises(ValueError, match=r"epochs='two' \(str\) is not a valid value for "
                                         r"MineConfig.plans, formerly 'epochs': expected an integer"):
        resolve(MineConfig, config_file=path, stage="mine")


def _capture(monkeypatch, module: str) -> list:
    import importlib

    seen: list = []
    monkeypatch.setattr(importlib.import_module(module), "run", lambda cfg: seen.append(cfg) or [])
    return seen


def _cli():
    from stages import cli

    return cli


def test_deprecated_cli_aliases(monkeypatch, tmp_path, caplog):
    cli = _cli()
    seen = _capture(monkeypatch, "stages.mine")
    with caplog.at_level(logging.WARNING):
        res = CliRunner().invoke(cli.app, ["mine", "--out", str(tmp_path), "--epochs", "3"])
        assert res.exit_code == 0, res.output
        res = CliRunner().invoke(cli.app, ["mine", "--out", str(tmp_path), "--plans", "4"])
        assert res.exit_code == 0, res.output
    assert [c.plans for c in seen] == [3, 4]
    assert "--epochs is deprecated, use --plans" in caplog.text
    res = CliRunner().invoke(cli.app, ["mine", "--out", str(tmp_path), "--epochs", "3", "--plans", "4"])
    assert res.exit_code != 0 and "--epochs 3 and --plans 4 name the same option" in str(res.exception)

    seen = _capture(monkeypatch, "stages.evaluate")
    for flag in ("--workers", "--crf-workers"):
        res = CliRunner().invoke(cli.app, ["eval", "--out", str(tmp_path), "--baseline", "frozen", flag, "2"])
        assert res.exit_code == 0, res.output
    assert [c.crf_workers for c in seen] == [2, 2]
    for stage in ("mine", "eval"):
        assert "Deprecated" in CliRunner().invoke(cli.app, [stage, "--help"]).output


def test_a_mined_run_from_before_the_rename_is_still_read(fake_cache, tmp_path, caplog):
    """config.json / manifest of an older run say `epochs`: train, audit, sweep and a rerun of
    mine read them, and its identity (fingerprint) is unchanged."""
    from pipeline.artifacts.features import FeatureStore
    from pipeline.artifacts.mined import MinedSets
    from pipeline.audit import report as audit
    from pipeline.config.schema import AuditConfig, SweepConfig
    from pipeline.mining import mine
    from pipeline.training import sweep

    make_store(fake_cache, tmp_path)
    cfg = mine_run(tmp_path, "old", plans=2)
    d = tmp_path / "mine" / "old"
    manifest = json.loads((d / "manifest.json").read_text())
    for path, data in ((d / "config.json", json.loads((d / "config.json").read_text())),
                       (d / "manifest.json", manifest)):
        conf = data.get("config", data)
        conf["epochs"] = conf.pop("plans")  # as ppap-pipe wrote it before the rename
        path.write_text(json.dumps(data))
    store = FeatureStore(tmp_path)
    run = MinedSets.open(store, "old")
    assert len(run.complete_plans()) == 2
    assert mine_config_dict(json.loads((d / "config.json").read_text()))["plans"] == 2
    # a rerun of mine into it is not refused and finds everything done
    with caplog.at_level(logging.INFO, logger="ppap.mine"):
        mine.run(cfg)
    assert "6 batches, 6 already done" in caplog.text
    assert json.loads((d / "manifest.json").read_text())["identity"] == manifest["identity"]
    # audit and sweep read its config
    report = audit.run(AuditConfig(out=str(tmp_path), mined=("old",), batches=1,
                                   sweep=("phi0=0.8",)))
    assert report["sweep_base"]["plans"] == 2
    (d / "config.json").write_text(json.dumps({**json.loads((d / "config.json").read_text())}))
    name = sweep.mined_for(SweepConfig(out=str(tmp_path), mined="old", grid=("phi0=0.85",)),
                           {"phi0": 0.85})
    derived = json.loads((tmp_path / "mine" / name / "config.json").read_text())
    assert derived["plans"] == 2 and "epochs" not in derived
