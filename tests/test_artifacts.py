"""The artifact layer: one owner per artifact, every path from RunLayout, stages that only call it."""

from __future__ import annotations

import ast
import json
import os
from pathlib import Path

import numpy as np
import pytest
import torch
from _fixtures import make_folder

from pipeline.artifacts.features import FeatureStore
from pipeline.artifacts.layout import FEATURES_LOCK, RunLayout
from pipeline.artifacts.mined import MinedSets, MiningPlan
from pipeline.artifacts.reports import EvalReport
from pipeline.artifacts.training import Checkpoint, TrainRun
from pipeline.cache.integrity import CorruptArtifact, NonFinite
from pipeline.config.schema import (
    AuditConfig,
    EvalConfig,
    FeaturesConfig,
    MineConfig,
    ShowConfig,
    SweepConfig,
    TrainConfig,
)
from pipeline.training.model import CKPT_FORMAT

REPO = Path(__file__).resolve().parents[1]


# ----------------------------------------------------------------------------- structure


def _imports(path: Path) -> set[str]:
    """Top-level names of the modules `path` imports (`from stages import mine` -> stages.mine)."""
    found: set[str] = set()
    for node in ast.walk(ast.parse(path.read_text())):
        if isinstance(node, ast.Import):
            found |= {a.name for a in node.names}
        elif isinstance(node, ast.ImportFrom) and node.module:
            found.add(node.module)
            found |= {f"{node.module}.{a.name}" for a in node.names}
    return found


def test_the_library_never_imports_stages_and_stages_do_not_import_each_other():
    for path in sorted((REPO / "pipeline").rglob("*.py")):
        bad = {m for m in _imports(path) if m == "stages" or m.startswith("stages.")}
        assert not bad, f"{path.relative_to(REPO)} imports {bad}: the library must not use stages"
    stages = {p.stem for p in (REPO / "stages").glob("*.py")} - {"__init__"}
    # the CLI calls every stage; the library's sweep runs mine and train through their run(cfg)
    allowed = {"cli": stages}
    for name in sorted(stages):
        used = {m.split(".")[1] for m in _imports(REPO / "stages" / f"{name}.py")
                if m.startswith("stages.") and m.split(".")[1] in stages}
        assert used <= allowed.get(name, set()), f"stages/{name}.py imports stages {used}"


def test_run_paths_are_spelled_only_in_the_layout():
    """No stage, script, benchmark or library module joins run-directory names by hand (split
    names inside the Zarr store, `features_store / "train"`, are not run paths)."""
    import re

    pattern = re.compile(r'(?<!features_store )(?<!\.path )/ "(mine|train|eval|audit|show|sweep|'
                         r'markers|features\.zarr|features_\w+\.json|\.frozen-holdout)"')
    files = [*(REPO / "stages").glob("*.py"), *(REPO / "scripts").glob("*.py"),
             *(REPO / "benchmarks").glob("*.py"), *(REPO / "pipeline").rglob("*.py")]
    for path in files:
        if path.name == "layout.py":
            continue
        for n, line in enumerate(path.read_text().splitlines(), 1):
            assert not pattern.search(line), (
                f"{path.relative_to(REPO)}:{n} builds a run path by hand ({line.strip()}); "
                "use pipeline.artifacts.layout.RunLayout")


# ----------------------------------------------------------------------------- a whole run


@pytest.fixture(scope="module")
def run_dir(tmp_path_factory) -> Path:
    """Every stage once on a tiny labelled folder dataset, through the stages' run(cfg)."""
    from pipeline.audit import report as audit
    from pipeline.audit import show
    from pipeline.cache import build as features
    from pipeline.evaluation import evaluate
    from pipeline.mining import mine
    from pipeline.training import sweep, train

    root = make_folder(tmp_path_factory.mktemp("data"), n=8, size=(64, 80))
    out = tmp_path_factory.mktemp("run")
    features.run(FeaturesConfig(out=str(out), dataset="folder", data_root=str(root),
                                backbone="vit_tiny_random", train_size=48, eval_size=48,
                                chunk_size=4))
    F = FeatureStore(out).mining_features(np.arange(8))
    s = F[::7] @ F.T
    phi0, psi0 = float(np.round(np.quantile(s, 0.85), 2)), float(np.round(np.quantile(s, 0.5), 2))
    mine.run(MineConfig(out=str(out), phi0=phi0, psi0=psi0, batch_size=8, anchors_per_image="1/4",
                        plans=2, seed=3, holdout=0.25))
    train.run(TrainConfig(out=str(out), mined="ppap", epochs=1, tau=0.2, lr=1e-4,
                          select_every=2, seed=0))
    evaluate.run(EvalConfig(out=str(out), trained="ppap", crf=False, n_show=2))
    audit.run(AuditConfig(out=str(out), mined=("ppap",), batches=1))
    show.run(ShowConfig(out=str(out), mined="ppap", random=1))
    sweep.run(SweepConfig(out=str(out), mined="ppap", name="sw", grid=("tau=0.2",), max_steps=2,
                          select_every=2))
    return out


def test_every_file_a_run_writes_lives_where_the_layout_says(run_dir):
    lay = RunLayout(run_dir)
    mined = lay.mined_names()
    trained = sorted(p.name for p in lay.train_root.iterdir() if not p.name.startswith("."))
    evals = sorted(p.name for p in (run_dir / "eval").iterdir())
    assert mined == ["ppap"] and trained == ["ppap", "sw-tau0.2"] and evals == ["ppap-best"]
    roots = [lay.features_store, lay.feature_markers, lay.audit, lay.show("ppap"), lay.sweep("sw"),
             lay.frozen_holdout, *(lay.mined(n) for n in mined), *(lay.train(n) for n in trained),
             *(lay.eval(n) for n in evals)]
    files = [lay.features_manifest, lay.features_config, lay.features_report,
             run_dir / FEATURES_LOCK]
    for dirpath, _, names in os.walk(run_dir):
        for name in names:
            f = Path(dirpath) / name
            assert f in files or any(r in f.parents for r in roots), f"{f} is outside the layout"
    for r in roots:
        assert r.is_dir(), r


def test_readers_give_back_what_the_stages_wrote(run_dir):
    store = FeatureStore(run_dir)
    sets = MinedSets.open(store, "ppap")
    plan = MiningPlan.for_config(store, sets.mine_config())
    assert sets.plan.population() == plan.population() == sets.manifest["items"]
    plans = sets.complete_plans()
    assert [len(p) for p in plans] == [plan.n_batches(0), plan.n_batches(1)]
    for e, paths in enumerate(plans):
        for b, p in enumerate(paths):
            assert p == sets.shard_path(e, b)
            np.testing.assert_array_equal(sets.read_shard(e, b).images, plan.batch_images(e, b))
    assert not set(plan.held.tolist()) & set(plan.items.tolist()) and len(plan.held)
    np.testing.assert_array_equal(sets.holdout_crops, plan.held)
    assert json.loads(sets.summary_path.read_text())["shards"] == sum(map(len, plans))

    run = TrainRun(run_dir, "ppap")
    records = run.selection_records()
    assert records[0]["step"] == 0 and run.selection()["points"] == len(records)
    assert len(run.metrics()) == run.checkpoint("last").read()["step"]
    model, info = run.load_for_eval("best", store)
    assert info["checkpoint_kind"] == "best" and info["selection"]["metric"] == "cluster_miou"
    assert model.config["selection"]["step"] == info["step"]

    report = EvalReport(run_dir, "ppap-best")
    assert report.metrics()["name"] == "ppap-best"
    n = report.metrics()["n_seeds"]
    assert n == 3 and set(report.confusions()) == {"cluster_no_crf", "linear_no_crf"} | {
        f"cluster_no_crf_seed{s}" for s in range(n)} | {"linear_no_crf_seed0"}
    assert report.probes()["centroids"].shape[0] == store.num_classes
    assert [f["seed"] for f in report.probes()["fits"]] == list(range(n))


def test_mined_sets_refuse_missing_and_foreign_runs(run_dir, tmp_path):
    store = FeatureStore(run_dir)
    with pytest.raises(ValueError, match=r"no mined sets named 'absent' .*found: ppap\).*"
                                         r"ppap-pipe mine --out .* --name absent"):
        MinedSets.open(store, "absent")
    sets = MinedSets.open(store, "ppap")
    with pytest.raises(ValueError, match="epoch=5 does not exist"):
        sets.finished_shards(5)
    with pytest.raises(ValueError, match="batch 99 of epoch 0 is not mined"):
        sets.read_shard(0, 99)
    manifest = json.loads(sets.manifest_path.read_text())
    try:
        foreign = {**manifest, "identity": {**manifest["identity"], "features_fingerprint": "x"}}
        sets.manifest_path.write_text(json.dumps(foreign))
        with pytest.raises(ValueError, match="fingerprint 'x'.*mine again"):
            MinedSets.open(store, "ppap")
    finally:
        sets.manifest_path.write_text(json.dumps(manifest))


# ----------------------------------------------------------------------------- checkpoints


def _state(w: float = 1.0) -> dict:
    return {"format": CKPT_FORMAT, "branch": {"w": torch.full((3,), w)}, "linear_probe": None,
            "cluster_probe": {"c": torch.ones(2)}, "step": 4}


def test_checkpoint_round_trip_and_refusals(tmp_path):
    ck = Checkpoint(tmp_path / "run" / "last.pt")
    assert "starts at step 0" in ck.resume_point()
    ck.write(_state())
    got = ck.read()
    assert torch.equal(got["branch"]["w"], torch.ones(3)) and got["step"] == 4
    assert "at step 4" in ck.resume_point()
    data = bytearray(ck.path.read_bytes())
    data[len(data) // 2] ^= 0xFF
    ck.path.write_bytes(bytes(data))
    with pytest.raises(CorruptArtifact, match="does not match its checksum"):
        ck.read()
    ck.write(_state(float("nan")))
    with pytest.raises(NonFinite, match=r"NaN/Inf weights \(branch.w\)"):
        ck.read()
    ck.write({**_state(), "format": "other"})
    with pytest.raises(ValueError, match="format='other'"):
        ck.read()
    with pytest.raises(ValueError, match="no checkpoint at"):
        Checkpoint(tmp_path / "absent.pt").read()


def test_eval_falls_back_to_last_only_for_runs_that_never_selected(tmp_path):
    run = TrainRun(tmp_path, "r")
    with pytest.raises(ValueError, match="no checkpoint at .*best.pt; run `ppap-pipe train"):
        run.checkpoint_for_eval("best")
    run.checkpoint("last").write(_state())
    kind, ck = run.checkpoint_for_eval("best")
    assert kind == "last" and ck.path.name == "last.pt"
    run.selection_records_path.write_text("")  # it selected, but best.pt is gone: no fallback
    with pytest.raises(ValueError, match="has no best.pt.*--checkpoint last"):
        run.checkpoint_for_eval("best")
    with pytest.raises(ValueError, match="checkpoint='final'"):
        run.checkpoint("final")


def test_truncated_records_drop_steps_past_the_resume_point(tmp_path):
    run = TrainRun(tmp_path, "r")
    run.dir.mkdir(parents=True)
    for step in (1, 2, 3):
        run.append_metric({"step": step, "loss": float(step)})
    run.append_selection({"step": 2})
    with open(run.metrics_path, "a") as fh:
        fh.write('{"step": 4, "lo')  # torn by a kill
    run.truncate_records(2)
    assert [r["step"] for r in run.metrics()] == [1, 2] and run.last_metric("loss") == 2.0
    assert [r["step"] for r in run.selection_records()] == [2]


# ----------------------------------------------------------------------------- reports


def test_eval_report_writes_metrics_last_and_leaves_nothing_stale(tmp_path):
    from pipeline.cache.integrity import releases_locks

    report = EvalReport(tmp_path, "frozen")
    write = releases_locks(report.write)  # as inside the eval stage's run()
    with pytest.raises(ValueError, match="no evaluation report"):
        report.metrics()
    conf = {"cluster_no_crf": np.eye(2, dtype=np.int64)}
    write(config={"a": 1}, metrics={"name": "frozen"}, confusions=conf,
          confusion_png=b"png", predictions_png=b"png", probes={"centroids": torch.ones(2, 3)})
    names = {p.name for p in report.dir.iterdir()}
    assert {"metrics.json", "config.json", "confusion.npz", "confusion.png", "predictions.png",
            "probes.pt"} <= names
    assert max(report.dir.iterdir(), key=lambda p: p.stat().st_mtime_ns).name in ("metrics.json", ".lock")
    assert report.metrics() == {"name": "frozen"}
    np.testing.assert_array_equal(report.confusions()["cluster_no_crf"], np.eye(2))
    write(config={}, metrics={"name": "frozen"}, confusions=conf, confusion_png=b"png",
          predictions_png=None, probes=None)
    assert not (report.dir / "predictions.png").exists() and not report.probes_path.exists()


def test_a_moved_run_directory_stays_valid(run_dir, tmp_path):
    """Nothing a run writes names its own absolute location: copied elsewhere (the original
    deleted from view by renaming), every saved config reads back pointing at the new place and
    every stage resumes there with nothing to redo."""
    import shutil
    import subprocess
    import sys

    from pipeline.config.resolve import resolve
    from pipeline.evaluation import evaluate
    from pipeline.training import train

    moved = tmp_path / "elsewhere" / "run"
    shutil.copytree(run_dir, moved)
    old = str(run_dir.resolve())
    for f in moved.rglob("*.json*"):
        if f.name not in ("zarr.json",):
            assert old not in f.read_text(), f"{f.relative_to(moved)} names the old run directory"
    cfg = moved / "mine" / "ppap" / "config.json"
    assert resolve(MineConfig, config_file=cfg, stage="mine").out == str(moved.resolve())
    assert MinedSets(moved, "ppap").mine_config().out == str(moved)
    # the saved config alone (no --out) resumes the mined sets where they are now
    res = subprocess.run([sys.executable, "-m", "stages.cli", "mine", "--config", str(cfg)],
                         cwd=Path(__file__).resolve().parents[1], capture_output=True, text=True)
    assert res.returncode == 0, res.stderr
    assert "already done" in res.stderr and "0 already done" not in res.stderr
    summary = train.run(resolve(TrainConfig, config_file=moved / "train" / "ppap" / "config.json",
                                stage="train"))
    assert summary["steps_this_run"] == 0 and summary["finished"]
    evaluate.run(EvalConfig(out=str(moved), trained="ppap", crf=False, n_show=0))
    metrics = json.loads((moved / "eval" / "ppap-best" / "metrics.json").read_text())
    assert metrics["model"]["checkpoint"] == "train/ppap/best.pt"
