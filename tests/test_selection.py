"""Held-out training images: never mined, never trained on; selection and the collapse guard."""

from __future__ import annotations

import json
from pathlib import Path

import numpy as np
import pytest
import torch
from _fixtures import make_folder

from pipeline.artifacts.features import FeatureStore
from pipeline.cache import build as features
from pipeline.config.presets import PRESETS
from pipeline.config.schema import EvalConfig, FeaturesConfig, MineConfig, TrainConfig
from pipeline.mining import batching, mine, shards
from pipeline.training import train
from pipeline.training.selection import best_choice, labelfree_choice

N_IMAGES, HOLDOUT = 10, 0.2  # -> 2 held-out source images


@pytest.fixture(scope="module")
def cache(tmp_path_factory) -> Path:
    root = make_folder(tmp_path_factory.mktemp("data"), n=N_IMAGES, size=(64, 80))
    out = tmp_path_factory.mktemp("run")
    features.run(FeaturesConfig(out=str(out), dataset="folder", data_root=str(root),
                                backbone="vit_tiny_random", train_size=48, eval_size=48,
                                splits=("train",), chunk_size=4))
    return out


def mine_cfg(out: Path, **kw) -> MineConfig:
    F = FeatureStore(out).mining_features(np.arange(8))
    s = F[::7] @ F.T
    base = dict(out=str(out), phi0=float(np.round(np.quantile(s, 0.85), 2)),
                psi0=float(np.round(np.quantile(s, 0.5), 2)), prop_iters=2, sigma_pos=3.0,
                sigma_amb=3.0, batch_size=8, anchors_per_image="1/4", plans=2, seed=3,
                holdout=HOLDOUT)
    return MineConfig(**{**base, **kw})


@pytest.fixture(scope="module")
def mined(cache) -> Path:
    mine.run(mine_cfg(cache))
    return cache / "mine" / "ppap"


def test_holdout_split_keeps_whole_images_out_and_is_seeded():
    image_index = np.repeat(np.arange(20), 3)
    valid = np.ones(60, bool)
    valid[5] = False
    tr, ho = batching.holdout_split(1, image_index, valid, 0.25)
    assert len(np.unique(image_index[ho])) == 5  # floor(0.25 * 20) source images
    assert not set(image_index[tr]) & set(image_index[ho])  # no image on both sides
    assert sorted(np.concatenate([tr, ho]).tolist()) == np.flatnonzero(valid).tolist()
    tr2, ho2 = batching.holdout_split(1, image_index, valid, 0.25)
    np.testing.assert_array_equal(ho, ho2)
    assert not np.array_equal(ho, batching.holdout_split(2, image_index, valid, 0.25)[1])
    tr0, ho0 = batching.holdout_split(1, image_index, valid, 0.0)
    assert len(ho0) == 0 and len(tr0) == 59


def test_held_out_crops_are_never_mined(cache, mined):
    cfg = mine_cfg(cache)
    held = set(mine.mining_plan(cfg).held.tolist())
    store = FeatureStore(cache)
    src = np.asarray(store.split("train")["image_index"][:])
    assert len(np.unique(src[sorted(held)])) == int(N_IMAGES * HOLDOUT)
    seen = set()
    for path in sorted((mined / "shards").rglob("*.npz")):
        with np.load(path) as z:
            images = set(z["images"].tolist())
        assert not images & held, path
        seen |= images
    assert seen == set(mine.mining_plan(cfg).items.tolist())  # every other crop is mined
    assert json.loads((mined / "config.json").read_text())["holdout"] == HOLDOUT
    # another holdout is another identity: refused in the same directory
    with pytest.raises(Exception, match="holdout"):
        mine.run(mine_cfg(cache, holdout=0.3))


def _records(run_dir: Path) -> list[dict]:
    return [json.loads(x) for x in (run_dir / "selection.jsonl").read_text().splitlines()]


def test_training_selects_on_the_holdout_only(cache, mined):
    cfg = TrainConfig(out=str(cache), mined="ppap", name="sel", epochs=2, tau=0.2, lr=1e-4,
                      select_every=2, ckpt_every=2, seed=0)
    summary = train.run(cfg)
    run_dir = cache / "train" / "sel"
    recs = _records(run_dir)
    steps = summary["steps"]
    assert [r["step"] for r in recs] == sorted({0, *range(2, steps + 1, 2), steps})
    held = mine.mining_plan(mine_cfg(cache)).held
    ck = torch.load(run_dir / "best.pt", map_location="cpu", weights_only=False)
    assert ck["selection"]["holdout_crops"] == len(held)
    for r in recs:
        assert {"erank", "top3_share", "mean_cos", "cluster_miou", "linear_miou"} <= set(r)
    # best.pt is the record with the best held-out cluster mIoU; labelfree.pt the rank rule
    bi, li = best_choice(recs, "cluster_miou"), labelfree_choice(recs, cfg.rank_floor)
    assert ck["step"] == recs[bi]["step"]
    lf = torch.load(run_dir / "labelfree.pt", map_location="cpu", weights_only=False)
    assert lf["step"] == recs[li]["step"]
    sel = json.loads((run_dir / "selection.json").read_text())
    assert sel["best_step"] == recs[bi]["step"] and sel["labelfree_step"] == recs[li]["step"]
    # the training batches are exactly the mined shards: no held-out crop is ever trained on
    rows = [json.loads(x) for x in (run_dir / "metrics.jsonl").read_text().splitlines()]
    for r in rows:
        with np.load(shards.shard_path(mined, r["plan"], r["batch"])) as z:
            assert not set(z["images"].tolist()) & set(held.tolist())
    # a different --holdout than the mined sets' is refused with the fix
    with pytest.raises(ValueError, match="holdout"):
        train.run(TrainConfig(out=str(cache), mined="ppap", name="sel2", holdout=0.5))


def test_eval_checkpoint_choices(cache, mined):
    from pipeline.artifacts.training import TrainRun
    from pipeline.evaluation import fitting

    train.run(TrainConfig(out=str(cache), mined="ppap", name="ev", epochs=1, tau=0.2, lr=1e-4,
                          select_every=2, seed=0))
    # step 0 (frozen features) is scored once per cache/holdout/seed and reused by later runs
    assert len(list((cache / "train" / ".frozen-holdout").glob("*.json"))) == 1
    first = lambda name: {k: v for k, v in _records(cache / "train" / name)[0].items() if k != "seconds"}
    assert first("ev") == first("sel")
    for ck in ("best", "last", "labelfree"):
        assert (cache / "train" / "ev" / f"{ck}.pt").is_file()
        assert TrainRun(cache, "ev").checkpoint_for_eval(ck)[1].path.name == f"{ck}.pt"
    assert fitting.report_name(EvalConfig(out=str(cache), trained="ev", checkpoint="labelfree")) == "ev-labelfree"


def test_sweep_train_grid_over_training_and_mining_settings(cache, mined):
    from typer.testing import CliRunner

    from stages import cli

    base_psi0 = json.loads((mined / "config.json").read_text())["psi0"]
    other_psi0 = round(base_psi0 - 0.05, 4)
    args = ["sweep-train", "--out", str(cache), "--mined", "ppap", "--name", "sw",
            "--grid", "tau=0.1,0.5", "--grid", f"psi0={other_psi0}", "--max-steps", "2",
            "--select-every", "1", "--fixed", "lr=1e-4"]
    res = CliRunner().invoke(cli.app, args)
    assert res.exit_code == 0, res.output + repr(res.exception)
    dest = cache / "sweep" / "sw"
    report = json.loads((dest / "results.json").read_text())
    assert [r["label"] for r in report["runs"]] == [f"tau0.1_psi0{other_psi0:g}", f"tau0.5_psi0{other_psi0:g}"]
    for r in report["runs"]:
        assert r["config"]["lr"] == 1e-4 and r["config"]["max_steps"] == 2
        assert [x["step"] for x in r["records"]] == [0, 1, 2]
        # the mined sets with the other Psi0 were derived from the base run: same batches/holdout
        dcfg = json.loads((cache / "mine" / r["mined"] / "config.json").read_text())
        assert dcfg["psi0"] == other_psi0 and dcfg["holdout"] == HOLDOUT and dcfg["seed"] == 3
    table = (dest / "table.md").read_text()
    assert table.count("\n") >= 4 and "frozen" in table
    assert (dest / "sweep.png").stat().st_size > 1000
    # rerunning is a no-op that reproduces the report
    res2 = CliRunner().invoke(cli.app, args)
    assert res2.exit_code == 0
    again = json.loads((dest / "results.json").read_text())
    assert [r["records"] for r in again["runs"]] == [r["records"] for r in report["runs"]]
    # the grid names what it can sweep
    bad = CliRunner().invoke(cli.app, ["sweep-train", "--out", str(cache), "--grid", "colour=1,2"])
    assert bad.exit_code != 0 and "cannot be swept" in str(bad.exception)




def test_held_out_cluster_score_is_the_mean_over_kmeans_seeds(cache, mined):
    """Every selection point scores the held-out code with select_seeds k-means seeds; the
    record keeps each seed's value, their mean (what best.pt maximises) and std; curve.png is
    drawn; a run made before select_seeds existed (one seed) still resumes."""
    from pipeline.artifacts.training import TrainRun

    recs = _records(cache / "train" / "sel")  # the default: 3 seeds
    for r in recs:
        assert len(r["cluster_miou_seeds"]) == 3
        assert r["cluster_miou"] == pytest.approx(np.mean(r["cluster_miou_seeds"]), abs=1e-3)
        assert r["cluster_miou_std"] == pytest.approx(np.std(r["cluster_miou_seeds"], ddof=1), abs=1e-3)
    assert (cache / "train" / "sel" / "curve.png").stat().st_size > 1000
    base = dict(out=str(cache), mined="ppap", name="oneseed", epochs=1, tau=0.2, lr=1e-4,
                select_every=2, seed=0)
    train.run(TrainConfig(**base, select_seeds=1))
    one = _records(cache / "train" / "oneseed")
    assert all("cluster_miou_seeds" not in r for r in one)
    # one seed is the former behaviour: not part of the run's identity, so older runs resume
    manifest = json.loads(TrainRun(cache, "oneseed").manifest_path.read_text())
    assert "select_seeds" not in manifest["identity"]
    with pytest.raises(ValueError, match="select_seeds"):
        train.run(TrainConfig(**base, select_seeds=3))
    with pytest.raises(ValueError, match="select_seeds=0"):
        TrainConfig(**base, select_seeds=0)


def test_sweep_train_seeds_repeat_every_point_with_new_batches(cache, mined):
    from typer.testing import CliRunner

    from stages import cli

    args = ["sweep-train", "--out", str(cache), "--mined", "ppap", "--name", "sd",
            "--grid", "tau=0.1,0.5", "--max-steps", "2", "--select-every", "1", "--seeds", "2",
            "--seed", "4"]
    res = CliRunner().invoke(cli.app, args)
    assert res.exit_code == 0, res.output + repr(res.exception)
    dest = cache / "sweep" / "sd"
    report = json.loads((dest / "results.json").read_text())
    assert report["seeds"] == [4, 5]
    runs = report["runs"]
    assert [(r["label"], r["seed"], r["run"], r["mined"]) for r in runs] == [
        ("tau0.1", 4, "sd-tau0.1", "ppap"), ("tau0.1", 5, "sd-tau0.1-seed5", "ppap-seed4"),
        ("tau0.5", 4, "sd-tau0.5", "ppap"), ("tau0.5", 5, "sd-tau0.5-seed5", "ppap-seed4")]
    assert [r["config"]["seed"] for r in runs] == [4, 5, 4, 5]
    # the second seed's sets: the base sets' settings with the mining seed one higher (3 -> 4)
    base = json.loads((mined / "config.json").read_text())
    other = json.loads((cache / "mine" / "ppap-seed4" / "config.json").read_text())
    assert other["seed"] == base["seed"] + 1
    assert {k: v for k, v in other.items() if k not in ("seed", "name")} == {
        k: v for k, v in base.items() if k not in ("seed", "name")}
    # one table row per grid point, its figures over 2 seeds
    table = (dest / "table.md").read_text().splitlines()
    rows = [line for line in table if line.startswith("| 0.1 ") or line.startswith("| 0.5 ")]
    assert len(rows) == 2 and all(r.split(" | ")[1] == "2" for r in rows)
    assert all("±" in r for r in rows)
    assert (dest / "sweep.png").stat().st_size > 1000
    with pytest.raises(ValueError, match="seeds=0"):
        from pipeline.config.schema import SweepConfig
        SweepConfig(grid=("tau=0.1",), seeds=0)


@pytest.mark.parametrize("preset", ["camvid", "demo"])
def test_preset_recipe_lowers_the_loss_without_collapsing_rank(cache, mined, preset):
    """The training settings the presets ship (chosen by the held-out sweep) on a small cache:
    the loss goes down and the code keeps its effective rank."""
    keys = ("tau", "lr", "weight_decay", "optimizer", "amb_weight", "grad_clip")
    recipe = {k: v for k, v in PRESETS[preset]["train"].items() if k in keys}
    cfg = TrainConfig(out=str(cache), mined="ppap", name=f"recipe-{preset}", epochs=6,
                        select_every=0, seed=1, **recipe)
    train.run(cfg)
    rows = [json.loads(x) for x in (cache / "train" / cfg.name / "metrics.jsonl").read_text().splitlines()]
    third = len(rows) // 3
    first = np.mean([r["loss"] for r in rows[:third]])
    last = np.mean([r["loss"] for r in rows[-third:]])
    assert last < first, (first, last)
    ratio = np.mean([r["erank"] / r["erank_frozen"] for r in rows[-third:]])
    assert ratio > cfg.collapse_ratio, ratio
