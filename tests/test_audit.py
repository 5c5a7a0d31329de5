"""Audit of mined sets (docs/method.md §8): hand-computed numbers, exact aggregation, Fig. 1b,
sweep parsing, and the audit/show stages on a synthetic store with real shards."""

from __future__ import annotations

import json
from pathlib import Path

import numpy as np
import pytest
import zarr
from conftest import SplitSpec

from pipeline.artifacts.features import FeatureStore
from pipeline.audit.metrics import (
    AnchorStats,
    audit_summary,
    batch_stats,
    concat,
    fig1b_curve,
    format_table,
    parse_sweep,
    parse_sweep_spec,
    sample_positions,
    subset_batch,
    sweep_points,
)
from pipeline.config.schema import AuditConfig, MineConfig, ShowConfig

# ---------------------------------------------------------------------------------------------
# A hand-computable batch: 2 images x 4 patches = 8 rows.
#   row:    0  1  2  3  4  5  6  7
#   label:  0  0  1 -1  0  1  1  0      (row 3 is ignore)
# Labelled rows: 7 (class 0: rows 0,1,4,7 -> 4; class 1: rows 2,5,6 -> 3).
# Anchors: row 0 (class 0), row 3 (ignore -> skipped), row 5 (class 1).
#   anchor 0: P = {1,2,3,4}, A = {6}
#   anchor 3: P = {0,1},     A = {}       (skipped entirely)
#   anchor 5: P = {},        A = {2,3,6}
# ---------------------------------------------------------------------------------------------


def hand_batch() -> dict:
    return {
        "anchors": np.array([0, 3, 5]),
        "pos_indptr": np.array([0, 4, 6, 6]),
        "pos_indices": np.array([1, 2, 3, 4, 0, 1]),
        "amb_indptr": np.array([0, 1, 1, 4]),
        "amb_indices": np.array([6, 2, 3, 6]),
        "patch_label": np.array([0, 0, 1, -1, 0, 1, 1, 0]),
    }


def test_hand_example_counts():
    s = batch_stats(hand_batch())
    assert s.n_skipped == 1  # anchor row 3 is ignore-labelled
    np.testing.assert_array_equal(s.label, [0, 1])
    # anchor 0: labelled P = {1,2,4} (3 dropped as ignore) -> 3; TP = {1,4} -> 2
    # anchor 5: P empty
    np.testing.assert_array_equal(s.n_pos, [3, 0])
    np.testing.assert_array_equal(s.n_tp, [2, 0])
    # anchor 0: A = {6} (class 1) -> 1, 0 same; anchor 5: labelled A = {2,6}, both class 1
    np.testing.assert_array_equal(s.n_amb, [1, 2])
    np.testing.assert_array_equal(s.n_amb_same, [0, 2])
    # candidates = 7 labelled rows - the anchor = 6; N = 6 - |P| - |A|
    # anchor 0: N = {5,7} -> 2; anchor 5: N = {0,1,4,7} -> 4
    np.testing.assert_array_equal(s.n_neg, [2, 4])
    # same-class in N: anchor 0 -> row 7; anchor 5 -> none (rows 2,6 are ambiguous)
    np.testing.assert_array_equal(s.n_fn, [1, 0])
    # same-class candidates: class 0 has 4 rows - self = 3; class 1 has 3 - self = 2
    np.testing.assert_array_equal(s.n_same, [3, 2])


def test_hand_example_summary():
    r = audit_summary(batch_stats(hand_batch()), num_classes=2, class_names=["road", "sky"])
    assert r["n_anchors"] == 2 and r["n_skipped"] == 1
    assert r["n_pos"] == pytest.approx(1.5)  # (3 + 0) / 2
    assert r["tp_in_p"] == pytest.approx(200 / 3)  # only anchor 0 has positives: 2/3
    assert r["tp_in_p_pooled"] == pytest.approx(200 / 3)  # 2 / 3
    assert r["n_neg"] == pytest.approx(3.0)  # (2 + 4) / 2
    assert r["fp_in_n"] == pytest.approx(25.0)  # mean(1/2, 0/4)
    assert r["fp_in_n_pooled"] == pytest.approx(100 / 6)  # (1 + 0) / (2 + 4)
    assert r["n_amb"] == pytest.approx(1.5)  # (1 + 2) / 2
    assert r["recall"] == pytest.approx(40.0)  # (2 + 0) / (3 + 2)
    assert r["recall_mean"] == pytest.approx(100 / 3)  # mean(2/3, 0/2)
    assert r["no_pos"] == 1 and r["no_pos_pct"] == pytest.approx(50.0)
    road, sky = r["per_class"]
    assert road == {"class": 0, "name": "road", "n_anchors": 1, "n_pos": 3.0,
                    "precision": pytest.approx(200 / 3), "precision_pooled": pytest.approx(200 / 3),
                    "recall": pytest.approx(200 / 3),  # 2 of 3 same-class candidates
                    "fp_in_n_pooled": pytest.approx(50.0)}  # 1 of N = {5, 7}
    assert sky["n_anchors"] == 1 and sky["n_pos"] == 0.0
    assert sky["precision"] is None and sky["precision_pooled"] is None  # no positives at all
    assert sky["recall"] == 0.0  # 0 of rows {2, 6}
    assert sky["fp_in_n_pooled"] == 0.0
    json.dumps(r)  # JSON-ready (None, not NaN)


def test_self_in_sets_is_ignored():
    b = hand_batch()
    # put the anchor itself (row 0) into its own P: must not change anything
    b["pos_indptr"] = np.array([0, 5, 7, 7])
    b["pos_indices"] = np.array([0, 1, 2, 3, 4, 0, 1])
    s = batch_stats(b)
    np.testing.assert_array_equal(s.n_pos, [3, 0])
    np.testing.assert_array_equal(s.n_neg, [2, 4])


def second_batch() -> dict:
    # 1 image x 4 patches, labels [2, 2, 2, 0]; anchor row 0 (class 2): P = {1}, A = {}
    # -> |P| = 1, TP = 1, N = {2, 3} (2 rows), same-class in N = {2} (1), same-class = 2
    return {
        "anchors": np.array([0]),
        "pos_indptr": np.array([0, 1]), "pos_indices": np.array([1]),
        "amb_indptr": np.array([0, 0]), "amb_indices": np.array([], dtype=np.int64),
        "patch_label": np.array([2, 2, 2, 0]),
    }


def test_aggregation_over_two_batches_is_exact():
    s = concat([batch_stats(hand_batch()), batch_stats(second_batch())])
    r = audit_summary(s, num_classes=3)
    assert r["n_anchors"] == 3 and r["n_skipped"] == 1
    assert r["n_pos"] == pytest.approx(4 / 3)  # (3 + 0 + 1) / 3 anchors
    assert r["tp_in_p"] == pytest.approx(100 * (2 / 3 + 1) / 2)  # per anchor with |P| > 0
    assert r["tp_in_p_pooled"] == pytest.approx(75.0)  # (2 + 1) / (3 + 1), not mean of batches
    assert r["n_neg"] == pytest.approx(8 / 3)  # (2 + 4 + 2) / 3
    assert r["fp_in_n"] == pytest.approx(100 * (0.5 + 0 + 0.5) / 3)
    assert r["fp_in_n_pooled"] == pytest.approx(25.0)  # (1 + 0 + 1) / (2 + 4 + 2)
    assert r["recall"] == pytest.approx(300 / 7)  # (2 + 0 + 1) / (3 + 2 + 2)
    assert r["no_pos"] == 1 and r["no_pos_pct"] == pytest.approx(100 / 3)
    assert [c["n_anchors"] for c in r["per_class"]] == [1, 1, 1]
    assert r["per_class"][2]["precision"] == pytest.approx(100.0)
    # per-anchor means over all anchors of all batches, whatever the batch split
    one = audit_summary(concat([batch_stats(hand_batch())]), num_classes=3)
    assert one["tp_in_p_pooled"] != r["tp_in_p_pooled"]


def test_fig1b_curve_tiny():
    # 4 anchors: |P| = [5, 0, 2, 2], TP = [4, 0, 1, 2]; sorted by |P| (stable): 1, 2, 3, 0
    z = np.zeros(4, np.int64)
    s = AnchorStats(label=z, n_pos=np.array([5, 0, 2, 2]), n_tp=np.array([4, 0, 1, 2]),
                    n_amb=z, n_amb_same=z, n_neg=z, n_fn=z, n_same=z)
    c = fig1b_curve(s, qs=(25, 50, 75, 100))
    assert c["n_anchors"] == [1, 2, 3, 4]
    assert c["mean_pos"] == pytest.approx([0.0, 1.0, 4 / 3, 9 / 4])
    # q=25: only the |P|=0 anchor -> undefined; q=50: [1/2]; q=75: mean(1/2, 2/2);
    # q=100: mean(1/2, 2/2, 4/5)
    assert c["precision"][0] is None
    assert c["precision"][1:] == pytest.approx([50.0, 75.0, 100 * (0.5 + 1 + 0.8) / 3])
    assert c["precision_pooled"][0] is None
    assert c["precision_pooled"][1:] == pytest.approx([50.0, 75.0, 700 / 9])  # 1/2, 3/4, 7/9
    # default quantiles 5..100; ceil(5% of 4) = 1 anchor
    d = fig1b_curve(s)
    assert d["q"] == list(range(5, 101, 5)) and d["n_anchors"][0] == 1 and d["n_anchors"][-1] == 4
    with pytest.raises(ValueError, match="q=0"):
        fig1b_curve(s, qs=(0,))


def _brute_force(b: dict) -> dict:
    """Loop oracle straight from §8's definitions."""
    lab = b["patch_label"]
    n = lab.shape[0]
    out = {k: [] for k in ("n_pos", "n_tp", "n_amb", "n_neg", "n_fn", "n_same")}
    for i, a in enumerate(b["anchors"]):
        c = lab[a]
        if c < 0:
            continue
        cand = {j for j in range(n) if j != a and lab[j] >= 0}
        P = cand & set(b["pos_indices"][b["pos_indptr"][i]:b["pos_indptr"][i + 1]].tolist())
        Am = cand & set(b["amb_indices"][b["amb_indptr"][i]:b["amb_indptr"][i + 1]].tolist())
        N = cand - P - Am
        out["n_pos"].append(len(P))
        out["n_tp"].append(sum(lab[j] == c for j in P))
        out["n_amb"].append(len(Am))
        out["n_neg"].append(len(N))
        out["n_fn"].append(sum(lab[j] == c for j in N))
        out["n_same"].append(sum(lab[j] == c for j in cand))
    return out


def _random_batch(rng: np.random.Generator, n: int, m: int, k: int) -> dict:
    lab = rng.integers(-1, k, size=n)
    anchors = np.sort(rng.choice(n, size=m, replace=False))
    pos, amb, pp, ap = [], [], [0], [0]
    for a in anchors:
        r = rng.random(n)
        r[a] = 1.0
        p = np.flatnonzero(r < 0.2)
        q = np.flatnonzero((r >= 0.2) & (r < 0.35))
        pos.append(p); amb.append(q)
        pp.append(pp[-1] + p.size); ap.append(ap[-1] + q.size)
    return {"anchors": anchors, "patch_label": lab,
            "pos_indptr": np.array(pp), "pos_indices": np.concatenate(pos),
            "amb_indptr": np.array(ap), "amb_indices": np.concatenate(amb)}


def test_vectorised_counts_match_brute_force():
    rng = np.random.default_rng(3)
    for _ in range(3):
        b = _random_batch(rng, n=120, m=25, k=4)
        s = batch_stats(b)
        ref = _brute_force(b)
        for key, val in ref.items():
            np.testing.assert_array_equal(getattr(s, key), val, err_msg=key)


def test_select_rows_and_subset():
    b = hand_batch()
    sub = subset_batch(b, np.array([2, 0]))
    np.testing.assert_array_equal(sub["anchors"], [5, 0])
    np.testing.assert_array_equal(sub["pos_indptr"], [0, 0, 4])
    np.testing.assert_array_equal(sub["pos_indices"], [1, 2, 3, 4])
    np.testing.assert_array_equal(sub["amb_indptr"], [0, 3, 4])
    np.testing.assert_array_equal(sub["amb_indices"], [2, 3, 6, 6])
    rng = np.random.default_rng(0)
    pos = sample_positions(10, 4, rng)
    assert len(pos) == 4 and np.all(np.diff(pos) > 0)
    np.testing.assert_array_equal(sample_positions(3, 4, rng), [0, 1, 2])
    np.testing.assert_array_equal(sample_positions(3, None, rng), [0, 1, 2])


def test_bad_inputs_raise():
    b = hand_batch()
    b["pos_indptr"] = np.array([0, 4, 6])
    with pytest.raises(ValueError, match="pos_indptr"):
        batch_stats(b)
    b = hand_batch()
    b["pos_indices"] = np.array([1, 2, 3, 40, 0, 1])
    with pytest.raises(ValueError, match="same batch"):
        batch_stats(b)
    with pytest.raises(ValueError, match="patch_label"):
        batch_stats({k: v for k, v in hand_batch().items() if k != "patch_label"})


# --------------------------------------------------------------------------------------------- sweep


def test_parse_sweep_ranges_and_lists():
    assert parse_sweep_spec("phi0=0.45:0.65:0.05") == ("phi0", [0.45, 0.5, 0.55, 0.6, 0.65])
    assert parse_sweep_spec("psi0=0.1:0.3:0.05") == ("psi0", [0.1, 0.15, 0.2, 0.25, 0.3])
    assert parse_sweep_spec("sigma_amb=2,4, 3") == ("sigma_amb", [2.0, 3.0, 4.0])
    assert parse_sweep_spec("prop_iters=0:3:1") == ("prop_iters", [0, 1, 2, 3])
    assert parse_sweep_spec("phi0=0.9:0.95:0.1") == ("phi0", [0.9])
    grid = parse_sweep(["phi0=0.5,0.6", "psi0=0.1:0.2:0.1"])
    assert sweep_points(grid) == [
        {"phi0": 0.5, "psi0": 0.1}, {"phi0": 0.5, "psi0": 0.2},
        {"phi0": 0.6, "psi0": 0.1}, {"phi0": 0.6, "psi0": 0.2},
    ]


@pytest.mark.parametrize("spec, message", [
    ("phi0", "lacks '='"),
    ("tau=0.5", "'tau' cannot be swept"),
    ("phi0=", "no values"),
    ("phi0=0.5:0.4:0.1", "stop=0.4 is below start=0.5"),
    ("phi0=0.4:0.5:0", "step=0 must be > 0"),
    ("phi0=0.4:0.5", "START:STOP:STEP"),
    ("phi0=a,b", "'a' is not a number"),
    ("prop_iters=1.5,2", "takes integers"),
])
def test_parse_sweep_errors(spec, message):
    with pytest.raises(ValueError, match=message.replace("(", r"\(")):
        parse_sweep_spec(spec)


def test_parse_sweep_duplicate_name():
    with pytest.raises(ValueError, match="twice"):
        parse_sweep(["phi0=0.5", "phi0=0.6"])


def test_format_table():
    r = audit_summary(batch_stats(hand_batch()), num_classes=2)
    text = format_table([{**r, "name": "ppap"}])
    assert "%FP in N" in text and "ppap" in text and "1 (50.0%)" in text


# ---------------------------------------------------------------------------------------------
# Stage tests on a synthetic labelled store (12 crops, 4x4 patches of 8 px, D = 16, 3 classes)
# with real shards written by pipeline.mining.shards.
# ---------------------------------------------------------------------------------------------

N_CROPS, GRID, PATCH, DIM, K = 12, 4, 8, 16, 3
SIDE = GRID * PATCH
CLASS_NAMES = ["red", "green", "blue"]


def make_store(fake_cache, out, labelled: bool = True, seed: int = 0) -> np.ndarray:
    """Features = class prototype + noise; returns the (n, h, w) patch labels (-1 = ignore)."""
    rng = np.random.default_rng(seed)
    protos = rng.normal(size=(K, DIM))
    protos /= np.linalg.norm(protos, axis=1, keepdims=True)
    pl = rng.integers(0, K, size=(N_CROPS, GRID, GRID))
    truth = pl.copy()
    pl[rng.random(pl.shape) < 0.15] = -1  # some mostly-ignore patches (their features keep a class)
    feats = protos[truth] + 0.2 * rng.normal(size=truth.shape + (DIM,))
    colours = np.array([[200, 40, 40], [40, 200, 40], [40, 40, 200]])
    rgb = colours[truth].repeat(PATCH, 1).repeat(PATCH, 2) + rng.integers(0, 40, (N_CROPS, SIDE, SIDE, 3))

    def fill(split, g, spec):
        g["feats"][:] = feats.reshape(N_CROPS, GRID * GRID, DIM).astype(np.float16)
        g["rgb"][:] = np.clip(rgb, 0, 255).astype(np.uint8)
        g["image_index"][:] = np.arange(N_CROPS) // 5
        if labelled:
            g["patch_labels"][:] = pl.astype(np.int16)
            g["labels"][:] = pl.repeat(PATCH, 1).repeat(PATCH, 2).astype(np.int16)

    fake_cache(out, dim=DIM, patch=PATCH, num_classes=K, train=SplitSpec(N_CROPS, GRID, chunk=4),
               labelled=labelled, fill=fill, class_names=CLASS_NAMES,
               fingerprint=f"synthetic{seed}{labelled}", backbone="none")
    return pl


def mine_run(out, name: str, criterion: str = "ppap", **kw) -> MineConfig:
    """Mine epoch 0 with the real mine stage (3 batches of 4 crops, 4 anchors per crop)."""
    from pipeline.mining import mine

    args = dict(phi0=0.8, psi0=0.5, prop_iters=2, sigma_pos=3.0, sigma_amb=3.0, batch_size=4,
                anchors_per_image="1/4", plans=1, seed=0, hp_pool_size=8)
    cfg = MineConfig(out=str(out), name=name, criterion=criterion, **{**args, **kw})
    mine.run(cfg)
    return cfg


@pytest.fixture(scope="module")
def mined_store(fake_cache, tmp_path_factory):
    out = tmp_path_factory.mktemp("auditstore")
    pl = make_store(fake_cache, out)
    mine_run(out, "ppap")
    mine_run(out, "p0", criterion="p0")
    mine_run(out, "hp", criterion="hp")
    mine_run(out, "other_seed", seed=1)
    return out, pl


RUN_KEYS = {"name", "criterion", "config", "n_pos", "tp_in_p", "tp_in_p_pooled", "n_neg", "fp_in_n",
            "fp_in_n_pooled", "n_amb", "recall", "no_pos", "no_pos_pct", "per_class", "curve"}


def test_audit_stage_writes_table_json_and_plot(mined_store, tmp_path, capsys):
    from PIL import Image

    from pipeline.audit import report as stage

    out, pl = mined_store
    cfg = AuditConfig(out=str(out), mined=("ppap", "p0", "hp"), batches=2, max_anchors=None,
                      json=str(tmp_path / "a.json"), plot=str(tmp_path / "f.png"))
    rep = stage.run(cfg)
    text = capsys.readouterr().out
    assert "%FP in N" in text and all(n in text for n in ("ppap", "p0", "hp"))
    data = json.loads((tmp_path / "a.json").read_text())
    assert [r["name"] for r in data["runs"]] == ["ppap", "p0", "hp"]
    for r in data["runs"]:
        assert RUN_KEYS <= set(r)
        assert r["n_anchors"] == 2 * 4 * 4 - r["n_skipped"]  # 2 batches x 4 crops x 4 anchors
        assert [c["name"] for c in r["per_class"]] == CLASS_NAMES
    assert data["runs"][0]["config"]["criterion"] == "ppap" and data["batches"] == [0, 1]
    assert data["runs"][0]["n_amb"] > 0 and data["runs"][1]["n_amb"] == 0  # p0/hp: nothing ambiguous
    assert data["runs"][0]["tp_in_p"] > 90  # separable synthetic classes
    with Image.open(tmp_path / "f.png") as im:
        assert im.format == "PNG" and im.size == (900, 450)
    assert rep["plot"] == str(tmp_path / "f.png")

    # oracle for p0: P = {j != i : cos > phi0} over the batch's features, brute force
    from pipeline.mining.shards import read_shard, shard_path

    store = FeatureStore(out)
    n_pos, n_tp, n_fn = [], [], []
    for k in (0, 1):
        sh = read_shard(shard_path(out / "mine" / "p0", 0, k))
        F = store.mining_features(sh.images).astype(np.float64)
        lab = pl[sh.images].reshape(-1)
        for a in sh.anchors:
            if lab[a] < 0:
                continue
            s = F @ F[a]
            cand = (lab >= 0) & (np.arange(len(lab)) != a)
            P = cand & (s > 0.8)
            n_pos.append(P.sum()); n_tp.append((P & (lab == lab[a])).sum())
            n_fn.append((cand & ~P & (lab == lab[a])).sum())
    p0 = data["runs"][1]
    assert p0["n_pos"] == pytest.approx(np.mean(n_pos))
    assert p0["tp_in_p_pooled"] == pytest.approx(100 * np.sum(n_tp) / np.sum(n_pos))
    assert p0["no_pos"] == int(np.sum(np.array(n_pos) == 0))


def test_audit_default_paths_and_anchor_sample(mined_store):
    from pipeline.audit import report as stage

    out, _ = mined_store
    rep = stage.run(AuditConfig(out=str(out), mined=("ppap", "p0"), batches=3, max_anchors=5, seed=3))
    d = out / "audit" / "ppap+p0"
    assert rep["json"] == str(d / "audit.json") and (d / "fig1b.png").is_file()
    assert rep["anchors_audited"] == [5, 5, 5] and rep["anchors_in_batches"] == [16, 16, 16]
    # the same sampled anchors for every run
    assert rep["runs"][0]["n_anchors"] + rep["runs"][0]["n_skipped"] == 15
    assert rep["runs"][0]["n_skipped"] == rep["runs"][1]["n_skipped"]


def test_audits_of_other_sets_or_settings_never_overwrite_each_other(mined_store):
    from pipeline.audit import report as stage

    out, _ = mined_store
    first = stage.run(AuditConfig(out=str(out), mined=("ppap",), batches=2, max_anchors=5))
    second = stage.run(AuditConfig(out=str(out), mined=("hp",), batches=2, max_anchors=5))
    assert Path(first["json"]).parent.name == "ppap" and Path(second["json"]).parent.name == "hp"
    kept = Path(first["json"]).read_bytes(), Path(first["plot"]).read_bytes()
    with pytest.raises(ValueError, match=r"other settings \(batches=2; now batches=3\).*--name"):
        stage.run(AuditConfig(out=str(out), mined=("ppap",), batches=3, max_anchors=5))
    assert (Path(first["json"]).read_bytes(), Path(first["plot"]).read_bytes()) == kept
    # the same audit again is a rerun (same folder); another --name keeps both
    assert stage.run(AuditConfig(out=str(out), mined=("ppap",), batches=2, max_anchors=5))["json"] == first["json"]
    third = stage.run(AuditConfig(out=str(out), mined=("ppap",), batches=3, max_anchors=5, name="b3"))
    assert third["json"] == str(out / "audit" / "b3" / "audit.json")
    assert json.loads(Path(first["json"]).read_text())["audit_config"]["batches"] == 2


def test_audit_refuses_mixed_plans_and_unknown_runs(mined_store):
    from pipeline.audit import report as stage

    out, _ = mined_store
    with pytest.raises(ValueError, match="different batches/anchors.*seed"):
        stage.run(AuditConfig(out=str(out), mined=("ppap", "other_seed")))
    with pytest.raises(ValueError, match="no mined sets named 'nope'.*found: hp, other_seed, p0, ppap"):
        stage.run(AuditConfig(out=str(out), mined=("nope",)))
    with pytest.raises(ValueError, match="epoch=3 does not exist"):
        stage.run(AuditConfig(out=str(out), mined=("ppap",), epoch=3))
    # the mined run must come from this very cache
    root = zarr.open_group(str(out / "features.zarr"), mode="r+")
    manifest = root.attrs["manifest"]
    root.attrs["manifest"] = {**manifest, "fingerprint": "another"}
    try:
        with pytest.raises(ValueError, match="fingerprint"):
            stage.run(AuditConfig(out=str(out), mined=("ppap",)))
    finally:
        root.attrs["manifest"] = manifest


def test_audit_refuses_unlabelled_cache(fake_cache, tmp_path):
    from pipeline.audit import report as stage

    make_store(fake_cache, tmp_path, labelled=False)
    with pytest.raises(ValueError, match="no labels"):
        stage.run(AuditConfig(out=str(tmp_path), mined=("ppap",)))


def test_sweep_matches_mined_run_and_skips_invalid_points(mined_store, tmp_path, capsys):
    from pipeline.audit import report as stage

    out, _ = mined_store
    cfg = AuditConfig(out=str(out), mined=("ppap",), batches=2, max_anchors=7,
                      sweep=("phi0=0.7,0.8", "psi0=0.5:0.8:0.3"), json=str(tmp_path / "s.json"),
                      plot=str(tmp_path / "f.png"))
    rep = stage.run(cfg)
    assert "skipped 2 invalid" in capsys.readouterr().out
    assert [p["params"] for p in rep["sweep"]] == [{"phi0": 0.7, "psi0": 0.5}, {"phi0": 0.8, "psi0": 0.5}]
    assert len(rep["sweep_skipped"]) == 2 and "psi0" in rep["sweep_skipped"][0]["reason"]
    # the grid point with the mined run's parameters reproduces its audit exactly
    same, run = rep["sweep"][1], rep["runs"][0]
    for key in ("n_anchors", "n_pos", "tp_in_p", "tp_in_p_pooled", "n_neg", "fp_in_n", "n_amb",
                "recall", "no_pos", "curve"):
        assert same[key] == run[key], key
    # lower phi0: at least as many positives
    assert rep["sweep"][0]["n_pos"] >= rep["sweep"][1]["n_pos"]
    assert (tmp_path / "f_sweep.png").is_file()
    data = json.loads((tmp_path / "s.json").read_text())
    assert data["sweep_grid"] == {"phi0": [0.7, 0.8], "psi0": [0.5, 0.8]}
    assert RUN_KEYS <= set(data["sweep"][0]) and data["sweep_base"]["phi0"] == 0.8


def test_sweep_without_mined_runs_uses_the_batch_plan(mined_store, tmp_path):
    from pipeline.audit import report as stage

    out, _ = mined_store
    rep = stage.run(AuditConfig(out=str(out), mined=("absent",), batches=1, max_anchors=None,
                                sweep=("phi0=0.8",), json=str(tmp_path / "s.json"),
                                plot=str(tmp_path / "f.png")))
    assert rep["runs"] == [] and rep["plot"] is None
    # defaults: batch of all 12 crops (64 clamped), 1/4 of 16 patches = 4 anchors per crop
    assert rep["anchors_in_batches"] == [48] and len(rep["sweep"]) == 1
    assert rep["sweep"][0]["config"]["psi0"] == 0.15 and (tmp_path / "f_sweep.png").is_file()


def test_show_renders_expected_pngs(mined_store, tmp_path):
    from PIL import Image

    from pipeline.audit import show
    from pipeline.mining.recover import recover_sets
    from pipeline.mining.shards import read_shard, shard_path

    out, pl = mined_store
    cfg = ShowConfig(out=str(out), mined="ppap", epoch=0, batch=1, anchors=(0, 5), random=1, seed=0,
                     dest=str(tmp_path))
    paths = show.run(cfg)
    assert len(paths) == 3 and paths[0].name == "e0_b1_a0.png" and paths[1].name == "e0_b1_a5.png"
    sh = read_shard(shard_path(out / "mine" / "ppap", 0, 1))
    sets = recover_sets(sh, FeatureStore(out).mining_features(sh.images))
    for p in paths:
        a = int(p.stem.split("_a")[1])
        shown, _, _ = show.choose_images(int(sh.anchors[a]), sets.pos(a), sets.amb(a), GRID * GRID, 4)
        with Image.open(p) as im:
            assert im.size == show.layout(len(shown), labelled=True)[2]
    assert show.layout(4, True) == (1, 8, (2000, 330))  # 8 axes of 250 px; 270 px + 60 px header
    assert show.layout(5, False) == (2, 4, (1000, 600))
    with pytest.raises(ValueError, match="outside this shard"):
        show.run(ShowConfig(out=str(out), mined="ppap", batch=1, anchors=(99,), dest=str(tmp_path)))
    with pytest.raises(ValueError, match="batch 9 of epoch 0 is not mined"):
        show.run(ShowConfig(out=str(out), mined="ppap", batch=9, anchors=(0,), dest=str(tmp_path)))


def test_show_set_colours_never_read_as_a_class_colour():
    from pipeline.audit import show
    from pipeline.evaluation.viz import palette

    classes = palette(60).astype(float)
    for rgba in (show.POS_RGBA, show.AMB_RGBA):
        rgb = 255.0 * np.asarray(rgba[:3])
        assert np.sqrt(((classes - rgb) ** 2).sum(1)).min() >= 130, rgba
    assert show._settings({"criterion": "ppap", "phi0": 0.95, "psi0": 0.7, "prop_iters": 2}) == \
        "ppap phi0=0.95 psi0=0.7 T=2"


def test_choose_images_order():
    from pipeline.audit.show import choose_images

    # hw = 4; anchor row 5 -> image 1; pos in images 0 (1), 2 (3); amb in image 3 (2)
    shown, n_pos, n_amb = choose_images(5, np.array([0, 8, 9, 10]), np.array([12, 13]), 4, 5)
    assert shown == [1, 2, 3, 0]  # own image, then by count 3, 2, 1
    np.testing.assert_array_equal(n_pos, [1, 0, 3, 0, 0])
    np.testing.assert_array_equal(n_amb, [0, 0, 0, 2, 0])


def test_sweep_base_from_matching_preset(fake_cache, tmp_path):
    from pipeline.audit import report as stage

    make_store(fake_cache, tmp_path)
    root = zarr.open_group(str(tmp_path / "features.zarr"), mode="r+")
    root.attrs["manifest"] = {**root.attrs["manifest"], "dataset": "demo",
                              "backbone": "dinov2_vits14_offline"}
    rep = stage.run(AuditConfig(out=str(tmp_path), mined=(), batches=1, sweep=("psi0=0.6",)))
    # preset 'demo': phi0 0.95, batch 16 (clamped to the 12 crops), anchors 1/16 of 16 patches
    assert rep["sweep_base"]["phi0"] == 0.95 and rep["sweep"][0]["config"]["psi0"] == 0.6
    assert rep["anchors_in_batches"] == [12 * 1]
