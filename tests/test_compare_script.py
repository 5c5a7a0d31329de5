"""scripts/compare_criteria.py: extra stage flags pass through, whatever they start with."""

from __future__ import annotations

import importlib.util
from pathlib import Path

import pytest

SCRIPT = Path(__file__).resolve().parents[1] / "scripts" / "compare_criteria.py"


@pytest.fixture(scope="module")
def mod():
    """The script, loaded once as a module (scripts/ is not a package)."""
    spec = importlib.util.spec_from_file_location("compare_criteria", SCRIPT)
    module = importlib.util.module_from_spec(spec)
    spec.loader.exec_module(module)
    return module


def test_a_pass_through_value_may_start_with_a_dash(mod):
    argv = ["train-eval", "--eval-args", "--no-crf", "--mine-args", "--plans 10", "--seeds", "2"]
    assert mod.join_pass_through(argv) == [
        "train-eval", "--eval-args=--no-crf", "--mine-args=--plans 10", "--seeds", "2"]
    # the '=' spelling and a trailing flag without a value are left as they are
    assert mod.join_pass_through(["--eval-args=--no-crf", "--eval-args"]) == [
        "--eval-args=--no-crf", "--eval-args"]


def test_dry_run_passes_the_flags_to_every_eval(mod, tmp_path, capsys):
    mod.main(["train-eval", "--out", str(tmp_path), "--criteria", "p0", "--seeds", "2",
              "--eval-args", "--no-crf", "--mine-args", "--plans 2", "--dry-run"])
    lines = [ln for ln in capsys.readouterr().out.splitlines() if ln.startswith("$ ")]
    evals = [ln for ln in lines if " eval " in ln]
    mines = [ln for ln in lines if " mine " in ln]
    assert evals and all(ln.endswith("--no-crf") for ln in evals)
    assert len(mines) == 2 and all(ln.endswith("--plans 2") for ln in mines)
    assert any("--name p0-seed1" in ln for ln in mines)
