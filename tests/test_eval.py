"""Stage 4 on a tiny synthetic feature store: frozen baseline, trained checkpoints, outputs."""

from __future__ import annotations

import json
from pathlib import Path

import numpy as np
import pytest
import torch
from conftest import SplitSpec
from PIL import Image

from pipeline.artifacts.features import FeatureStore
from pipeline.config.schema import EvalConfig
from pipeline.evaluation import evaluate
from pipeline.evaluation.metrics import cluster_scores

K = 3
PATCH = 8
TRAIN_SIDE, EVAL_SIDE = 32, 48  # grids 4x4 (train) and 6x6 (val): eval uses its own grid
N_TRAIN, N_VAL = 40, 7
COLOURS = np.array([[220, 40, 40], [40, 200, 60], [40, 60, 220]])
BACKBONE_SEED = 3


def _backbone():
    from pipeline.data.backbones import load_backbone

    model, info, _ = load_backbone("vit_tiny_random", seed=BACKBONE_SEED)
    return model, info


def _fill(g, n, side, rng, backbone, protos, invalid=()):
    """Crops made of 2x2 blocks of patches, one class per block; features follow the class."""
    from pipeline.data.backbones import feats_from_mid

    grid = side // PATCH
    half = grid // 2
    blocks = rng.integers(0, K, size=(n, 2, 2))
    patch = np.kron(blocks, np.ones((half, half), np.int64))  # (n, grid, grid)
    labels = np.kron(patch, np.ones((PATCH, PATCH), np.int64)).astype(np.int16)
    labels[:, :PATCH, :PATCH] = -1  # an ignored corner patch in every crop
    dim = protos.shape[1]
    mid = np.empty((n, 1 + grid * grid, dim), np.float32)
    mid[:, 0] = rng.normal(size=(n, dim))
    mid[:, 1:] = 3.0 * protos[patch.reshape(n, -1)] + rng.normal(0, 0.7, size=(n, grid * grid, dim))
    mid = mid.astype(np.float16)
    with torch.no_grad():
        feats = feats_from_mid(backbone, torch.from_numpy(mid.astype(np.float32))).numpy()
    rgb = np.clip(COLOURS[np.maximum(labels, 0)] + rng.normal(0, 8, labels.shape + (3,)), 0, 255)
    valid = np.ones(n, np.uint8)
    for i in invalid:  # an unreadable image: zero features, misleading labels; must be skipped
        valid[i] = 0
        feats[i] = 0
        mid[i] = 0
        labels[i] = 0
    g["tokens"][:] = mid
    g["feats"][:] = feats.astype(np.float16)
    g["labels"][:] = labels
    g["patch_labels"][:] = patch.astype(np.int16)
    g["rgb"][:] = rgb.astype(np.uint8)
    g["image_index"][:] = np.arange(n, dtype=np.int32)
    g["valid"][:] = valid
    return labels, valid


def make_store(fake_cache, out: Path, seed: int = 0, labelled: bool = True) -> dict:
    backbone, info = _backbone()
    rng = np.random.default_rng(seed)
    protos = rng.normal(size=(K, info.embed_dim)).astype(np.float32)
    info_out = {}
    invalid = {"train": (), "val": (N_VAL - 1,)}

    def fill(split, g, spec):
        info_out[split] = _fill(g, spec.n, spec.grid * PATCH, rng, backbone, protos, invalid[split])

    fake_cache(out, dim=info.embed_dim, patch=PATCH, num_classes=K, labelled=labelled,
               train=SplitSpec(N_TRAIN, TRAIN_SIDE // PATCH, chunk=8, labelled=True),
               val=SplitSpec(N_VAL, EVAL_SIDE // PATCH, chunk=8, labelled=True), fill=fill,
               class_names=["red", "green", "blue"], fingerprint=f"synthetic{seed}",
               backbone="vit_tiny_random", weights_fingerprint=f"random:{BACKBONE_SEED}")
    return info_out


@pytest.fixture(scope="module")
def store_dir(fake_cache, tmp_path_factory):
    out = tmp_path_factory.mktemp("evalstore")
    labels = make_store(fake_cache, out)
    return out, labels


@pytest.fixture(scope="module")
def frozen_report(store_dir):
    out, _ = store_dir
    return evaluate.run(EvalConfig(out=str(out), baseline="frozen", crf=True, crf_workers=1, n_show=3, seed=0))


def _strip(report: dict) -> dict:
    return {k: v for k, v in report.items() if k not in ("seconds",)}


def test_frozen_baseline_outputs_and_quality(store_dir, frozen_report):
    out, labels = store_dir
    dest = out / "eval" / "frozen"
    on_disk = json.loads((dest / "metrics.json").read_text())
    assert _strip(on_disk) == json.loads(json.dumps(_strip(frozen_report)))
    assert on_disk["n_images"] == N_VAL - 1  # the invalid crop is skipped
    assert on_disk["class_names"] == ["red", "green", "blue"]
    for tag in ("no_crf", "crf"):
        block = on_disk[tag]
        metrics = {"cluster_acc", "cluster_miou", "linear_acc", "linear_miou", "per_class_iou"}
        assert set(block) == metrics | {f"{m}_std" for m in metrics}  # mean over 3 probe seeds
        assert set(block["per_class_iou"]) == {"cluster", "linear"}
        assert all(len(v) == K for v in block["per_class_iou"].values())
        # separable classes: both probes get (nearly) everything right
        assert block["cluster_acc"] > 95 and block["linear_acc"] > 95, block
        assert block["cluster_miou"] > 90 and block["linear_miou"] > 90, block
    # confusion matrices cover exactly the valid pixels of the valid crops
    val_labels, valid = labels["val"]
    n_valid_px = int(((val_labels >= 0) & (val_labels < K))[valid > 0].sum())
    confs = np.load(dest / "confusion.npz")
    # the first seed under the plain names, then one per k-means seed; the linear probe is one
    # fit (every seed's subsample is the whole training split)
    assert set(confs.files) == {"cluster_no_crf", "cluster_crf", "linear_no_crf", "linear_crf"} | {
        f"cluster_{t}_seed{s}" for t in ("no_crf", "crf") for s in (0, 1, 2)} | {
        "linear_no_crf_seed0", "linear_crf_seed0"}
    for name in confs.files:
        assert confs[name].shape == (K, K) and confs[name].sum() == n_valid_px
    assert on_disk["n_seeds"] == 3 and [r["seed"] for r in on_disk["seeds"]] == [0, 1, 2]
    for r in on_disk["seeds"]:
        s, _ = cluster_scores(confs[f"cluster_no_crf_seed{r['seed']}"])
        assert s.accuracy == pytest.approx(r["no_crf"]["cluster_acc"])
    assert on_disk["no_crf"]["cluster_acc"] == pytest.approx(
        np.mean([r["no_crf"]["cluster_acc"] for r in on_disk["seeds"]]))
    # images and config
    for png in ("confusion.png", "predictions.png"):
        with Image.open(dest / png) as im:
            im.verify()
        with Image.open(dest / png) as im:
            assert im.size[0] > 100 and im.size[1] > 100
    cfg = json.loads((dest / "config.json").read_text())
    assert cfg["baseline"] == "frozen" and cfg["name"] == "frozen"


def test_frozen_baseline_is_reproducible_and_worker_independent(store_dir, frozen_report, tmp_path):
    out, _ = store_dir
    again = evaluate.run(EvalConfig(out=str(out), baseline="frozen", crf=True, crf_workers=2, n_show=3, seed=0))
    assert _strip(again) == _strip(frozen_report)


def _checkpoint(path: Path, store: FeatureStore, centroids: torch.Tensor, linear_state: dict,
                fingerprint: str | None = None, negate_code: bool = False) -> None:
    """A ppap-train/1 checkpoint whose branch is at initialisation (code == frozen features),
    or, with `negate_code`, whose norm is negated (code == -frozen features)."""
    from pipeline.training.model import CKPT_FORMAT, build_model

    backbone, _ = _backbone()
    manifest = dict(store.manifest)
    branch, linear, cluster = build_model(manifest, backbone, n_clusters=len(centroids), seed=5)
    if negate_code:
        with torch.no_grad():
            branch.norm.weight.neg_()
            branch.norm.bias.neg_()
    linear.load_state_dict(linear_state)
    with torch.no_grad():
        cluster.centroids.copy_(centroids)
    path.parent.mkdir(parents=True, exist_ok=True)
    torch.save({
        "format": CKPT_FORMAT, "branch": branch.state_dict(), "linear_probe": linear.state_dict(),
        "cluster_probe": cluster.state_dict(), "step": 0, "epoch": 0, "batch": 0, "finished": True,
        "config": {"seed": 5},
        "model": {"backbone": "vit_tiny_random", "weights": None, "backbone_seed": BACKBONE_SEED,
                  "patch_size": PATCH, "embed_dim": store.embed_dim, "grid": manifest["grid_train"],
                  "num_classes": K, "n_clusters": len(centroids), "has_labels": True,
                  "class_names": store.class_names},
        "features_fingerprint": fingerprint or store.fingerprint, "mined_fingerprint": "none",
        "code_version": "test",
    }, path)


@pytest.fixture(scope="module")
def frozen_probes(store_dir, frozen_report):
    """The baseline's fitted probes, as saved beside its metrics."""
    out, _ = store_dir
    saved = torch.load(out / "eval" / "frozen" / "probes.pt", weights_only=True)
    return FeatureStore(out), saved["centroids"], saved["linear_probe"]


def test_trained_at_init_with_baseline_probes_matches_baseline(store_dir, frozen_report, frozen_probes):
    out, _ = store_dir
    store, centroids, linear = frozen_probes
    _checkpoint(out / "train" / "init" / "last.pt", store, centroids, linear)
    rep = evaluate.run(EvalConfig(out=str(out), trained="init", checkpoint="last", probes="trained",
                                  crf=True, crf_workers=1, n_show=2))
    assert rep["name"] == "init-last-trained-probes"
    assert rep["model"]["checkpoint"].endswith("init/last.pt")
    for tag in ("no_crf", "crf"):
        for key in ("cluster_acc", "cluster_miou", "linear_acc", "linear_miou"):
            # code from the branch (float32) vs the cached float16 features: near-ties only
            assert rep[tag][key] == pytest.approx(frozen_report[tag][key], abs=0.5), (tag, key)
    dest = out / "eval" / "init-last-trained-probes"
    for f in ("metrics.json", "config.json", "confusion.png", "predictions.png", "confusion.npz"):
        assert (dest / f).is_file()


def test_extra_clusters_stay_unmatched(store_dir, frozen_probes):
    """C = K + 2 clusters, and --no-crf: unmatched clusters are reported, metrics unchanged."""
    out, _ = store_dir
    store, c, linear = frozen_probes
    extra = torch.cat([c, -c[:2]])  # two far-away clusters no pixel picks
    _checkpoint(out / "train" / "extra" / "last.pt", store, extra, linear)
    rep = evaluate.run(EvalConfig(out=str(out), trained="extra", checkpoint="last", probes="trained",
                                  crf=False, n_show=2))
    base = json.loads((out / "eval" / "init-last-trained-probes" / "metrics.json").read_text())
    assert rep["crf"] is None
    assert rep["n_clusters"] == K + 2
    mapping = rep["cluster_mapping"]["no_crf"]
    assert sorted(m for m in mapping if m >= 0) == list(range(K)) and mapping.count(-1) == 2
    conf = np.load(out / "eval" / "extra-last-trained-probes" / "confusion.npz")["cluster_no_crf"]
    assert conf.shape == (K, K + 2) and conf[:, K:].sum() == 0
    assert rep["no_crf"] == base["no_crf"]


def _random_probes(store: FeatureStore, seed: int) -> tuple[torch.Tensor, dict]:
    from pipeline.training.model import LinearProbe

    gen = torch.Generator().manual_seed(seed)
    return torch.randn(K, store.embed_dim, generator=gen), LinearProbe(store.embed_dim, K, gen).state_dict()


def test_fitted_probes_are_converged_and_recorded(frozen_report):
    from pipeline.evaluation.probes import KMEANS_NITER, KMEANS_NREDO, LINEAR_L2

    info = frozen_report["model"]
    assert frozen_report["probes"] == "refit"  # the baseline always fits its probes
    assert info["fit_code"] == "frozen features"
    assert info["kmeans_niter"] == KMEANS_NITER and info["kmeans_nredo"] == KMEANS_NREDO
    # the linear probe ran L-BFGS to its gradient tolerance, on every training patch
    assert info["linear_converged"] is True, info
    assert info["linear_l2"] == LINEAR_L2 and info["linear_rows"] == N_TRAIN * (TRAIN_SIDE // PATCH) ** 2


def test_refit_at_init_matches_frozen_baseline(store_dir, frozen_report, frozen_probes):
    """Branch at initialisation with useless trained probes: --probes refit refits them on the
    branch's training code (== the frozen features up to float16) exactly like the baseline."""
    out, _ = store_dir
    store, base_c, base_lin = frozen_probes
    c, lin = _random_probes(store, 11)
    _checkpoint(out / "train" / "fresh" / "last.pt", store, c, lin)
    as_trained = evaluate.run(EvalConfig(out=str(out), trained="fresh", checkpoint="last",
                                         probes="trained", crf=False, n_show=0))
    rep = evaluate.run(EvalConfig(out=str(out), trained="fresh", checkpoint="last", crf=False, n_show=1))
    assert as_trained["probes"] == "trained" and as_trained["name"] == "fresh-last-trained-probes"
    assert as_trained["no_crf"]["linear_acc"] < 80  # the random linear probe is poor
    assert rep["name"] == "fresh-last" and rep["probes"] == "refit"  # refit is the default
    assert rep["model"]["checkpoint"].endswith("fresh/last.pt")
    assert rep["model"]["fit_code"] == "fresh branch code"
    for key in ("kmeans_rows", "linear_rows", "linear_l2"):
        assert rep["model"][key] == frozen_report["model"][key], key
    for key in ("cluster_acc", "cluster_miou", "linear_acc", "linear_miou"):
        assert rep["no_crf"][key] == pytest.approx(frozen_report["no_crf"][key], abs=0.5), key
    dest = out / "eval" / "fresh-last"
    on_disk = json.loads((dest / "metrics.json").read_text())
    assert on_disk["probes"] == "refit" and on_disk["no_crf"] == rep["no_crf"]
    assert json.loads((dest / "config.json").read_text())["probes"] == "refit"
    assert json.loads((out / "eval" / "fresh-last-trained-probes" / "metrics.json").read_text())["probes"] == "trained"
    # the fitted probes themselves agree with the baseline's (same seeds, same data order)
    saved = torch.load(dest / "probes.pt", weights_only=True)
    torch.testing.assert_close(saved["centroids"], base_c, atol=2e-3, rtol=0)
    for k_, v in base_lin.items():
        torch.testing.assert_close(saved["linear_probe"][k_], v, atol=2e-3, rtol=0)


def test_refit_reads_code_from_the_branch(store_dir, frozen_report, frozen_probes):
    """A branch whose code is -frozen features: k-means is sign-symmetric, so the refitted
    centroids are the baseline's negated (they would match it if code came from the backbone)."""
    out, _ = store_dir
    store, base_c, _ = frozen_probes
    c, lin = _random_probes(store, 12)
    _checkpoint(out / "train" / "neg" / "last.pt", store, c, lin, negate_code=True)
    rep = evaluate.run(EvalConfig(out=str(out), trained="neg", checkpoint="last", crf=False, n_show=0))
    saved = torch.load(out / "eval" / "neg-last" / "probes.pt", weights_only=True)
    torch.testing.assert_close(saved["centroids"], -base_c, atol=2e-3, rtol=0)
    for key in ("cluster_acc", "cluster_miou"):
        assert rep["no_crf"][key] == pytest.approx(frozen_report["no_crf"][key], abs=0.5), key
    assert rep["no_crf"]["linear_acc"] > 95  # its own seeded init: close, not sign-symmetric


def test_probes_option_is_validated(store_dir):
    from typer.testing import CliRunner

    from stages import cli

    with pytest.raises(ValueError, match="probes='bogus'.*'refit'"):
        EvalConfig(probes="bogus")
    out, _ = store_dir
    res = CliRunner().invoke(cli.app, ["eval", "--out", str(out), "--trained", "init", "--probes", "bogus"])
    assert isinstance(res.exception, ValueError) and "probes='bogus'" in str(res.exception)
    res = CliRunner().invoke(cli.app, ["eval", "--out", str(out), "--trained", "init", "--checkpoint", "first"])
    assert isinstance(res.exception, ValueError) and "checkpoint='first'" in str(res.exception)
    assert "refit" in CliRunner().invoke(cli.app, ["eval", "--help"]).output


def test_refuses_bad_inputs(store_dir, tmp_path):
    out, _ = store_dir
    with pytest.raises(ValueError, match="ppap-pipe train"):
        evaluate.run(EvalConfig(out=str(out), trained="nope"))
    with pytest.raises(ValueError, match="--trained NAME"):
        evaluate.run(EvalConfig(out=str(out), trained=None))
    with pytest.raises(ValueError, match="ppap-pipe features"):
        evaluate.run(EvalConfig(out=str(tmp_path / "empty"), baseline="frozen"))
    store = FeatureStore(out)
    c = torch.randn(K, store.embed_dim, generator=torch.Generator().manual_seed(0))
    from pipeline.training.model import LinearProbe

    lin = LinearProbe(store.embed_dim, K, torch.Generator().manual_seed(0)).state_dict()
    _checkpoint(out / "train" / "other" / "last.pt", store, c, lin, fingerprint="elsewhere")
    with pytest.raises(ValueError, match="trained on feature cache elsewhere"):
        evaluate.run(EvalConfig(out=str(out), trained="other", checkpoint="last"))
    # a run that never selected falls back from best to last; one that did must have best.pt
    assert evaluate._default_checkpoint(EvalConfig(out=str(out), trained="other")).checkpoint == "last"
    (out / "train" / "other" / "selection.jsonl").write_text("")
    with pytest.raises(ValueError, match="--checkpoint last"):
        evaluate.run(EvalConfig(out=str(out), trained="other"))


def test_unlabelled_store_is_refused(fake_cache, tmp_path):
    make_store(fake_cache, tmp_path, labelled=False)
    with pytest.raises(ValueError, match="without labels"):
        evaluate.run(EvalConfig(out=str(tmp_path), baseline="frozen"))


def test_seed_system_probes_on_frozen_features(store_dir, frozen_report):
    """--probe primaps-em / eigen replace only the cluster probe, fitted on the training code;
    separable classes are recovered; the default output (eval/frozen) is left alone."""
    out, _ = store_dir
    before = (out / "eval" / "frozen" / "metrics.json").read_bytes()
    for probe, kw, name in (("primaps-em", dict(em_steps=60), "frozen-primaps-em"),
                            ("eigen", dict(eigen_steps=150), "frozen-eigen")):
        rep = evaluate.run(EvalConfig(out=str(out), baseline="frozen", probe=probe, crf=False,
                                      n_show=1, **kw))
        assert rep["name"] == name and rep["cluster_probe"] == probe
        assert rep["model"]["cluster_probe"]["method"] == probe
        assert rep["n_clusters"] == K
        assert rep["no_crf"]["cluster_acc"] > 95 and rep["no_crf"]["cluster_miou"] > 90, rep["no_crf"]
        # the linear probe is fitted exactly like the baseline's
        for key in ("linear_acc", "linear_miou"):
            assert rep["no_crf"][key] == frozen_report["no_crf"][key]
        dest = out / "eval" / name
        assert json.loads((dest / "metrics.json").read_text())["no_crf"] == rep["no_crf"]
        saved = torch.load(dest / "probes.pt", weights_only=True)
        assert saved["centroids"].shape[0] == K and saved["cluster_probe"]
    info = json.loads((out / "eval" / "frozen-primaps-em" / "metrics.json").read_text())["model"]
    assert info["cluster_probe"]["steps"] == 60 and info["cluster_probe"]["psi"] == 0.4
    assert (out / "eval" / "frozen" / "metrics.json").read_bytes() == before


def test_seed_probe_on_a_trained_run_keeps_its_linear_probe(store_dir):
    """--probes trained + --probe primaps-em: cluster probe fitted on the branch's training
    code (good), the run's own (random, poor) linear probe kept."""
    out, _ = store_dir
    store = FeatureStore(out)
    c, lin = _random_probes(store, 21)
    _checkpoint(out / "train" / "rand" / "last.pt", store, c, lin)
    kw = dict(out=str(out), trained="rand", checkpoint="last", probes="trained", crf=False, n_show=0)
    plain = evaluate.run(EvalConfig(**kw))
    rep = evaluate.run(EvalConfig(**kw, probe="primaps-em", em_steps=40))
    assert rep["name"] == "rand-last-trained-probes-primaps-em" and rep["probes"] == "trained"
    assert rep["model"]["cluster_probe"]["crops"] == N_TRAIN
    assert rep["no_crf"]["cluster_miou"] > 90 > plain["no_crf"]["cluster_miou"]
    assert rep["no_crf"]["linear_acc"] == plain["no_crf"]["linear_acc"] < 80
    with pytest.raises(ValueError, match="probe='nope'"):
        EvalConfig(probe="nope")


def test_probe_seeds_are_reported_one_by_one_and_as_mean_and_std(store_dir, frozen_report):
    """--seeds N: N k-means fits (seeds seed..seed+N-1), every one reported; the top-level blocks
    are their mean and sample std; a shared linear fit has std 0; seed 0 of a 3-seed report is
    exactly the 1-seed report."""
    out, _ = store_dir
    seeds = frozen_report["seeds"]
    assert frozen_report["n_seeds"] == len(seeds) == 3
    assert [r["seed"] for r in seeds] == [0, 1, 2] == frozen_report["model"]["probe_seeds"]
    for tag in ("no_crf", "crf"):
        vals = [r[tag]["cluster_miou"] for r in seeds]
        assert frozen_report[tag]["cluster_miou"] == pytest.approx(np.mean(vals))
        assert frozen_report[tag]["cluster_miou_std"] == pytest.approx(np.std(vals, ddof=1))
        # one linear fit serves every seed (the whole training split is its subsample)
        assert len({r[tag]["linear_miou"] for r in seeds}) == 1
        assert frozen_report[tag]["linear_miou_std"] == 0.0
        per_class = np.array([r[tag]["per_class_iou"]["cluster"] for r in seeds], dtype=float)
        np.testing.assert_allclose(frozen_report[tag]["per_class_iou"]["cluster"], per_class.mean(0))
    assert frozen_report["model"]["linear_fits"] == 1
    assert len({f["kmeans_rows"] for f in frozen_report["model"]["fits"]}) == 1
    # the same cache, one seed: its blocks are seed 0's, with zero std
    single = _single_seed_report(out)
    assert single["n_seeds"] == 1 and [r["seed"] for r in single["seeds"]] == [0]
    for tag in ("no_crf", "crf"):
        for key in ("cluster_acc", "cluster_miou", "linear_acc", "linear_miou"):
            assert single[tag][key] == pytest.approx(seeds[0][tag][key])
            assert single[tag][f"{key}_std"] == 0.0
    with pytest.raises(ValueError, match="seeds=0"):
        EvalConfig(out=str(out), baseline="frozen", seeds=0)


def _single_seed_report(out: Path) -> dict:
    """The frozen baseline with one probe seed, written to a copy of the run directory."""
    import shutil

    copy = out.parent / f"{out.name}-one-seed"
    if not copy.exists():
        shutil.copytree(out / "features.zarr", copy / "features.zarr")
        for f in out.glob("features_*.json"):
            shutil.copy(f, copy / f.name)
        if (out / "markers").exists():
            shutil.copytree(out / "markers", copy / "markers")
    return evaluate.run(EvalConfig(out=str(copy), baseline="frozen", crf=True, crf_workers=1,
                                   n_show=0, seeds=1))
