"""Faults a user meets (issue 9): no silently wrong results, clear errors instead of tracebacks.

Each test reproduces one fault on a tiny real pipeline (folder dataset, random-weight tiny ViT:
features -> mine -> train -> eval) and checks that the stage refuses with a message naming the
file and the command that repairs it, or repairs it itself, without changing finished results.
"""

from __future__ import annotations

import errno
import json
import os
import re
import shutil
import signal
import subprocess
import sys
from pathlib import Path

import numpy as np
import pytest
import torch
import zarr
from _fixtures import make_folder

from pipeline.artifacts.chunks import chunk_records, marker_path
from pipeline.artifacts.features import STORE_NAME, FeatureStore
from pipeline.cache import build as features
from pipeline.cache.integrity import (
    CorruptArtifact,
    DiskFull,
    NonFinite,
    RunLock,
    RunLocked,
)
from pipeline.config.schema import EvalConfig, FeaturesConfig, MineConfig, TrainConfig
from pipeline.evaluation import evaluate
from pipeline.executor import StageInterrupted
from pipeline.mining import mine, shards
from pipeline.training import train

REPO = Path(__file__).resolve().parents[1]
PY = sys.executable


# ------------------------------------------------------------------------------- the pipeline


def fcfg(data: Path, out: Path, **kw) -> FeaturesConfig:
    base = dict(out=str(out), dataset="folder", data_root=str(data), backbone="vit_tiny_random",
                train_size=48, eval_size=48, chunk_size=2, batch_size=8)
    return FeaturesConfig(**{**base, **kw})


THRESH: dict[str, float] = {}


def mcfg(out: Path, **kw) -> MineConfig:
    base = dict(out=str(out), phi0=THRESH["phi0"], psi0=THRESH["psi0"], prop_iters=2,
                sigma_pos=3.0, sigma_amb=3.0, batch_size=8, anchors_per_image="1/4", plans=1,
                seed=3, backend="torch")
    return MineConfig(**{**base, **kw})


def tcfg(out: Path, **kw) -> TrainConfig:
    base = dict(out=str(out), mined="ppap", epochs=1, tau=0.5, lr=3e-3, ckpt_every=2, seed=7)
    return TrainConfig(**{**base, **kw})


def ecfg(out: Path, **kw) -> EvalConfig:
    return EvalConfig(**{**dict(out=str(out), trained="ppap", crf=False, n_show=0), **kw})


@pytest.fixture(scope="module")
def data(tmp_path_factory) -> Path:
    return make_folder(tmp_path_factory.mktemp("data"), n=6, size=(64, 80))


@pytest.fixture(scope="module")
def cache(data, tmp_path_factory) -> Path:
    """A complete feature cache (30 train crops in 3 chunks, 3 val images in 2 chunks)."""
    out = tmp_path_factory.mktemp("cache")
    features.run(fcfg(data, out))
    F = FeatureStore(out).mining_features(np.arange(8))
    s = F[::7] @ F.T
    THRESH.update(phi0=float(np.round(np.quantile(s, 0.85), 2)),
                  psi0=float(np.round(np.quantile(s, 0.5), 2)))
    return out


@pytest.fixture(scope="module")
def trained(cache, tmp_path_factory) -> Path:
    """The cache plus mined sets `ppap`, a finished training run `ppap` and its evaluation."""
    out = tmp_path_factory.mktemp("trained")
    shutil.copytree(cache, out, dirs_exist_ok=True)
    mine.run(mcfg(out))
    train.run(tcfg(out))
    evaluate.run(ecfg(out))
    return out


def copy(src: Path, tmp_path: Path) -> Path:
    dst = tmp_path / "run"
    shutil.copytree(src, dst)
    return dst


def cli(capsys, *args) -> tuple[int, str]:
    """Run `ppap-pipe ARGS` in this process; (exit code, stderr)."""
    from stages.cli import main

    old = sys.argv
    sys.argv = ["ppap-pipe", *map(str, args)]
    try:
        with pytest.raises(SystemExit) as exc:
            main()
    finally:
        sys.argv = old
    return exc.value.code, capsys.readouterr().err


def zarr_arrays(out: Path) -> dict[str, np.ndarray]:
    g = zarr.open_group(str(out / STORE_NAME), mode="r")
    return {f"{s}/{k}": g[s][k][:] for s in ("train", "val") for k in g[s].array_keys()}


def chunk_file(out: Path, split: str, array: str, chunk: int) -> Path:
    ndim = len(zarr.open_group(str(out / STORE_NAME), mode="r")[split][array].shape)
    return out / STORE_NAME / split / array / "c" / str(chunk) / Path(*["0"] * (ndim - 1))


def write_region(out: Path, split: str, array: str, crop: int, value, rechecksum=True) -> None:
    """Overwrite one crop of a cached array, as a writer would (marker checksums updated):
    the same bytes a features run that computed these values would have left."""
    g = zarr.open_group(str(out / STORE_NAME), mode="r+")
    arr = g[split][array]
    row = np.asarray(arr[crop])
    row[...] = value
    arr[crop] = row
    if rechecksum:
        chunk = crop // arr.chunks[0]
        key = f"{split}-{chunk:05d}"
        m = json.loads(marker_path(out, key).read_text())
        m["chunks"] = chunk_records(out, split, chunk)
        marker_path(out, key).write_text(json.dumps(m))


def legacy_markers(out: Path) -> None:
    """Markers as the previous version wrote them (no chunk checksums)."""
    for p in (out / "markers" / "features").glob("*.done"):
        m = json.loads(p.read_text())
        m.pop("chunks", None)
        p.write_text(json.dumps(m))


def flip_byte(path: Path, at: int | None = None) -> None:
    data = bytearray(path.read_bytes())
    i = len(data) // 2 if at is None else at
    data[i] ^= 0x40
    path.write_bytes(bytes(data))


# ------------------------------------------------------------------ 1. incomplete upstream


def test_mine_and_train_refuse_an_unfinished_feature_cache(data, cache, tmp_path, monkeypatch, capsys):
    out = tmp_path / "partial"
    real = features.process_unit
    calls = []

    def killed_after_one(unit, cfg):
        calls.append(unit.key)
        if len(calls) == 2:
            raise KeyboardInterrupt
        return real(unit, cfg)

    monkeypatch.setattr(features, "process_unit", killed_after_one)
    with pytest.raises(StageInterrupted):
        features.run(fcfg(data, out))
    monkeypatch.setattr(features, "process_unit", real)

    with pytest.raises(ValueError, match=r"incomplete: split 'train' has 1 of 3 chunks done") as exc:
        mine.run(mcfg(out))
    assert f"ppap-pipe features --out {out}" in str(exc.value)
    assert not (out / "mine").exists(), "nothing may be mined from a partial cache"
    code, err = cli(capsys, "mine", "--out", out, "--phi0", 0.9, "--psi0", 0.5)
    assert code == 2 and "error: the feature cache" in err and "Traceback" not in err
    with pytest.raises(ValueError, match="incomplete"):
        train.run(tcfg(out))
    with pytest.raises(ValueError, match="incomplete"):
        evaluate.run(ecfg(out, baseline="frozen"))

    # the command named in the message finishes the cache; then mining equals a complete run
    cmd = re.search(r"`(ppap-pipe features [^`]*)`", str(exc.value)).group(1).split()[1:]
    assert cmd[:3] == ["features", "--out", str(out)] and cmd[3] == "--config"
    code, err = cli(capsys, *cmd)
    assert code == 0, err
    mine.run(mcfg(out))
    ref = copy(cache, tmp_path)
    mine.run(mcfg(ref))
    for p in sorted((ref / "mine" / "ppap" / "shards").rglob("*.npz")):
        q = out / p.relative_to(ref)
        assert q.read_bytes() == p.read_bytes(), q


def test_mined_sets_of_other_crops_are_refused_and_old_ones_remined(cache, tmp_path):
    out = copy(cache, tmp_path)
    mine.run(mcfg(out, plans=2))
    mdir = out / "mine" / "ppap"
    man = json.loads((mdir / "manifest.json").read_text())
    assert man["items"]["n"] == 30 and man["plans"] == 2
    originals = {p: p.read_bytes() for p in (mdir / "shards").rglob("*.npz")}

    # shards planned over other crops (e.g. mined while the cache was unfinished) are refused
    man["items"] = {"n": 20, "sha256": "0" * 64}
    (mdir / "manifest.json").write_text(json.dumps(man))
    with pytest.raises(ValueError, match="mined on 20 training crops.*now has 30"):
        mine.run(mcfg(out, plans=2))

    # a directory of the previous version (no crop record, no shard checksums) is re-mined
    man.pop("items")
    man.pop("plans")
    (mdir / "manifest.json").write_text(json.dumps(man))
    for p in originals:
        m = json.loads(shards.done_path(p).read_text())
        m.pop("sha256")
        shards.done_path(p).write_text(json.dumps(m))
        p.write_bytes(b"shard of an older version")
    with pytest.raises(ValueError, match="older ppap-pipe and has no checksum.*rerun `ppap-pipe mine"):
        train.run(tcfg(out))
    mine.run(mcfg(out, plans=2))
    for p, data in originals.items():
        assert p.read_bytes() == data
        assert shards.shard_state(p) == ("ok", "")
    assert json.loads((mdir / "manifest.json").read_text())["items"]["n"] == 30
    train.run(tcfg(out, max_steps=1))


def test_manifest_follows_extended_epochs(cache, tmp_path):
    out = copy(cache, tmp_path)
    mine.run(mcfg(out, plans=1))
    mine.run(mcfg(out, plans=3))
    man = json.loads((out / "mine" / "ppap" / "manifest.json").read_text())
    assert man["config"]["plans"] == 3 and man["plans"] == 3
    assert json.loads((out / "mine" / "ppap" / "config.json").read_text())["plans"] == 3


# ------------------------------------------------------------------ 2. NaN / Inf


def test_nan_in_cached_feats_stops_mining(cache, tmp_path):
    out = copy(cache, tmp_path)
    write_region(out, "train", "feats", 13, np.nan)  # crop 13 lies in chunk train-00001
    with pytest.raises(NonFinite, match=r"train/feats holds NaN/Inf values for crop\(s\) 13 "
                                        r"\(feature chunk\(s\) train-00001\)") as exc:
        mine.run(mcfg(out, plans=2))
    assert "train-00001.done" in str(exc.value) and "ppap-pipe features" in str(exc.value)
    for p in (out / "mine" / "ppap" / "shards").rglob("*.npz"):  # shards without crop 13 only
        sh = shards.read_shard(p)
        assert 13 not in sh.images and np.isfinite(sh.phi).all() and np.isfinite(sh.psi).all()


def test_nan_in_cached_tokens_stops_training_before_a_step(trained, tmp_path):
    out = copy(trained, tmp_path)
    shutil.rmtree(out / "train")
    first = shards.read_shard(shards.shard_path(out / "mine" / "ppap", 0, 0)).images
    write_region(out, "train", "tokens", int(first[3]), np.inf)
    with pytest.raises(NonFinite, match=rf"train/tokens holds NaN/Inf values for crop\(s\) {first[3]}"):
        train.run(tcfg(out))
    assert not (out / "train" / "ppap" / "last.pt").exists()
    assert (out / "train" / "ppap" / "metrics.jsonl").read_text() == "" if (
        out / "train" / "ppap" / "metrics.jsonl").exists() else True


def test_first_nonfinite_loss_stops_training_with_step_and_shard(cache, tmp_path, monkeypatch):
    out = copy(cache, tmp_path)
    mine.run(mcfg(out))
    real = train.ppap_loss
    calls = {"n": 0}

    def diverging(*a, **kw):
        calls["n"] += 1
        loss, stats = real(*a, **kw)
        return (loss * float("nan") if calls["n"] == 3 else loss), stats

    monkeypatch.setattr(train, "ppap_loss", diverging)
    path = shards.shard_path(out / "mine" / "ppap", 0, 2)
    with pytest.raises(NonFinite, match=rf"stopped at step 3 \(epoch 0, batch 2, shard {re.escape(str(path))}\)"
                                        r": non-finite loss \(contrastive nan") as exc:
        train.run(tcfg(out, ckpt_every=1))
    assert "checkpoint" in str(exc.value) and "at step 2" in str(exc.value)
    run_dir = out / "train" / "ppap"
    rows = [json.loads(x) for x in (run_dir / "metrics.jsonl").read_text().splitlines()]
    assert [r["step"] for r in rows] == [1, 2] and all(np.isfinite(r["loss"]) for r in rows)
    ck = torch.load(run_dir / "last.pt", weights_only=True)
    assert ck["step"] == 2
    assert all(torch.isfinite(t).all() for t in ck["branch"].values())


def test_nan_from_the_backbone_is_not_cached(data, tmp_path, monkeypatch):
    from pipeline.data import backbones

    real = backbones.forward_tokens

    def broken(model, x):
        mid, feat = real(model, x)
        return mid, feat * float("nan")

    monkeypatch.setattr(backbones, "forward_tokens", broken)
    out = tmp_path / "run"
    with pytest.raises(NonFinite, match=r"produced NaN/Inf feats for image\(s\) im00, im01"):
        features.run(fcfg(data, out))
    assert not list((out / "markers" / "features").glob("*.done"))


def test_eval_refuses_nan_inputs_and_diverged_checkpoints(trained, tmp_path):
    out = copy(trained, tmp_path)
    before = (out / "eval" / "ppap-last" / "metrics.json").read_bytes()
    write_region(out, "val", "tokens", 1, np.nan)
    with pytest.raises(NonFinite, match=r"val/tokens holds NaN/Inf values for crop\(s\) 1 "):
        evaluate.run(ecfg(out))
    assert (out / "eval" / "ppap-last" / "metrics.json").read_bytes() == before

    out2 = copy(trained, tmp_path / "b")
    ckpt = out2 / "train" / "ppap" / "last.pt"
    ck = torch.load(ckpt, weights_only=True)
    ck["branch"]["head.weight"][0, 0] = float("nan")
    torch.save(ck, ckpt)
    (out2 / "train" / "ppap" / "last.pt.sha256").unlink()  # as an older version left it
    with pytest.raises(NonFinite, match=r"last.pt holds NaN/Inf weights \(branch.head.weight\)"):
        evaluate.run(ecfg(out2))


# ------------------------------------------------------------------ 3. missing / damaged chunks


def test_deleted_chunk_is_refused_then_repaired_by_features(data, cache, tmp_path, capsys):
    out = copy(cache, tmp_path)
    reference = zarr_arrays(cache)
    victim = chunk_file(out, "train", "feats", 1)
    victim.unlink()  # would read back as zeros (the fill value)
    with pytest.raises(CorruptArtifact, match=r"train-00001: chunk file train/feats/c/1/0/0 is missing"):
        mine.run(mcfg(out))
    code, err = cli(capsys, "train", "--out", out)
    assert code == 2 and "is damaged" in err and "Traceback" not in err
    report = features.run(fcfg(data, out))  # the command named in the message
    assert report["chunks_computed"] == 1
    assert victim.exists()
    for k, v in zarr_arrays(out).items():
        np.testing.assert_array_equal(v, reference[k], err_msg=k)
    mine.run(mcfg(out))


def test_damaged_chunk_bytes_are_caught_on_read_and_named(data, cache, tmp_path):
    out = copy(cache, tmp_path)
    victim = chunk_file(out, "train", "tokens", 2)
    flip_byte(victim)  # same size: passes the cheap check, fails the checksum on first read
    store = FeatureStore(out)
    with pytest.raises(CorruptArtifact, match=r"chunk c/2/0/0 of array train/tokens .* does not "
                                              r"match its checksum .*; rerun `ppap-pipe features"):
        store.split("train")["tokens"][25]
    store.split("train")["tokens"][5]  # other chunks read fine
    features.run(fcfg(data, out))
    np.testing.assert_array_equal(zarr_arrays(out)["train/tokens"], zarr_arrays(cache)["train/tokens"])


def test_truncated_chunks_name_array_and_chunk(data, cache, tmp_path, capsys):
    out = copy(cache, tmp_path)
    rgb = chunk_file(out, "train", "rgb", 0)  # blosc-compressed
    rgb.write_bytes(rgb.read_bytes()[:-100])
    with pytest.raises(CorruptArtifact, match=r"train-00000: chunk file train/rgb/c/0/0/0/0 has "
                                              r"\d+ bytes, \d+ were written"):
        FeatureStore(out).split("train")
    # a cache of the previous version (no checksums): the blosc header / raw size give it away
    legacy_markers(out)
    with pytest.raises(CorruptArtifact, match=r"train/rgb/c/0/0/0/0 has \d+ bytes, its blosc header says"):
        FeatureStore(out).split("train")
    features.run(fcfg(data, out))
    assert "chunks" in json.loads(marker_path(out, "train-00001").read_text()), "markers upgraded"
    np.testing.assert_array_equal(zarr_arrays(out)["train/rgb"], zarr_arrays(cache)["train/rgb"])
    tok = chunk_file(out, "val", "tokens", 1)  # uncompressed
    legacy_markers(out)
    tok.write_bytes(tok.read_bytes()[:1000])
    code, err = cli(capsys, "eval", "--out", out, "--baseline", "frozen", "--no-crf")
    assert code == 2 and "val/tokens/c/1/0/0 has 1000 bytes, an uncompressed chunk has" in err


def test_legacy_cache_works_unchanged_and_gains_checksums(data, cache, tmp_path):
    out = copy(cache, tmp_path)
    legacy_markers(out)
    mine.run(mcfg(out))
    train.run(tcfg(out, max_steps=2))
    report = features.run(fcfg(data, out))
    assert report["chunks_computed"] == 0
    m = json.loads(marker_path(out, "val-00001").read_text())
    assert set(m["chunks"]) == {"tokens", "feats", "rgb", "labels", "patch_labels", "image_index",
                                "crop_box", "valid"}
    assert m["chunks"]["tokens"]["sha256"] == json.loads(
        marker_path(cache, "val-00001").read_text())["chunks"]["tokens"]["sha256"]


def test_empty_or_cut_markers_are_named_and_redone(data, cache, tmp_path, capsys):
    out = copy(cache, tmp_path)
    marker_path(out, "train-00002").write_text("")
    code, err = cli(capsys, "mine", "--out", out, "--phi0", 0.9, "--psi0", 0.5)
    assert code == 2 and f"its marker {marker_path(out, 'train-00002')} is empty" in err
    assert features.run(fcfg(data, out))["chunks_computed"] == 1
    mine.run(mcfg(out))
    # an empty shard marker
    sp = shards.shard_path(out / "mine" / "ppap", 0, 1)
    shards.done_path(sp).write_text("")
    with pytest.raises(CorruptArtifact, match=re.escape(str(shards.done_path(sp))) + " is empty"):
        train.run(tcfg(out))
    mine.run(mcfg(out))
    assert shards.shard_state(sp) == ("ok", "")


# ------------------------------------------------------------------ 4. checksums of artifacts


def test_checkpoint_bit_flip_is_refused_and_eval_results_kept(trained, tmp_path, capsys):
    out = copy(trained, tmp_path)
    ckpt = out / "train" / "ppap" / "last.pt"
    metrics = out / "eval" / "ppap-last" / "metrics.json"
    before = metrics.read_bytes()
    flip_byte(ckpt, at=len(ckpt.read_bytes()) * 3 // 4)  # inside tensor data: still loads
    torch.load(ckpt, weights_only=True)
    code, err = cli(capsys, "eval", "--out", out, "--trained", "ppap", "--no-crf")
    assert code == 2 and f"checkpoint {ckpt} does not match its checksum" in err
    assert metrics.read_bytes() == before, "eval results were overwritten"
    with pytest.raises(CorruptArtifact, match=rf"delete {re.escape(str(ckpt))} and last.pt.sha256"):
        train.run(tcfg(out))  # a rerun of the finished run reads its checkpoint


def test_truncated_checkpoint_in_train(trained, tmp_path):
    out = copy(trained, tmp_path)
    ckpt = out / "train" / "ppap" / "last.pt"
    ckpt.write_bytes(ckpt.read_bytes()[:5000])
    with pytest.raises(CorruptArtifact, match=r"does not match its checksum \(5000 bytes"):
        train.run(tcfg(out))
    (out / "train" / "ppap" / "last.pt.sha256").unlink()  # a checkpoint of an older version
    with pytest.raises(CorruptArtifact, match=r"last.pt is not a readable checkpoint .*5000 bytes"):
        train.run(tcfg(out))


def test_checkpoint_killed_between_file_and_checksum_still_resumes(trained, tmp_path, monkeypatch):
    out = copy(trained, tmp_path)
    train.run(tcfg(out, name="k", max_steps=2))  # checkpoint at step 2
    from pipeline.cache import integrity as store_module  # write_checked's own binding

    real = store_module.atomic_write_bytes

    def die_on_checkpoint(path, data):
        if Path(path).name == "last.pt":
            raise KeyboardInterrupt  # the sidecar (new digest) is written, the file is not
        return real(path, data)

    monkeypatch.setattr(store_module, "atomic_write_bytes", die_on_checkpoint)
    with pytest.raises(StageInterrupted):
        train.run(tcfg(out, name="k"))
    monkeypatch.setattr(store_module, "atomic_write_bytes", real)
    side = json.loads((out / "train" / "k" / "last.pt.sha256").read_text())
    assert side["previous"] and side["sha256"] != side["previous"]
    summary = train.run(tcfg(out, name="k"))  # the old file still verifies (as `previous`)
    assert summary["finished"]
    ref = train.run(tcfg(out, name="k2"))
    assert summary["final_loss"] == ref["final_loss"]


def test_corrupt_shard_is_named_and_remined(trained, tmp_path, capsys):
    out = copy(trained, tmp_path)
    shutil.rmtree(out / "train")
    sp = shards.shard_path(out / "mine" / "ppap", 0, 2)
    good = sp.read_bytes()
    flip_byte(sp)
    with pytest.raises(CorruptArtifact, match=rf"{re.escape(str(sp))} does not match the checksum "
                                              r".*rerun `ppap-pipe mine --out"):
        train.run(tcfg(out))
    sp.write_bytes(b"PK\x03\x04 not really a zip")  # used to raise BadZipFile without a path
    with pytest.raises(CorruptArtifact, match=rf"{re.escape(str(sp))} is not a readable mining shard "
                                              r"\(BadZipFile"):
        shards.read_shard(sp, verify=False)
    code, err = cli(capsys, "export", "--out", out, "--mined", "ppap", "--batch", 2, "--to",
                    tmp_path / "x.npz")
    assert code == 2 and str(sp) in err
    summary = mine.run(mcfg(out))  # the named command re-mines exactly that shard
    assert sp.read_bytes() == good
    assert summary["shards"] == 4
    train.run(tcfg(out))


# ------------------------------------------------------------------ 5. one writer per directory


def test_second_writer_is_refused_with_pid(trained, tmp_path):
    out = copy(trained, tmp_path)
    run_dir = out / "train" / "other"
    holder = subprocess.Popen(
        [PY, "-c", "import sys, time; from pipeline.cache.integrity import RunLock; "
                   f"lock = RunLock({str(run_dir)!r}).acquire(); print('locked', flush=True); time.sleep(120)"],
        cwd=REPO, stdout=subprocess.PIPE, text=True)
    try:
        assert holder.stdout.readline().strip() == "locked"
        with pytest.raises(RunLocked, match=rf"{re.escape(str(run_dir))} is being written by another "
                                            rf"ppap-pipe process \(pid {holder.pid}\)"):
            train.run(tcfg(out, name="other"))
        assert not (run_dir / "metrics.jsonl").exists()
    finally:
        holder.send_signal(signal.SIGKILL)  # a crash releases the lock
        holder.wait()
    assert train.run(tcfg(out, name="other", max_steps=1))["steps"] == 1

    # every writing stage takes its directory's lock; readers (eval of a run) need none
    with RunLock(out / "mine" / "ppap"):
        with pytest.raises(RunLocked, match="being written by another ppap-pipe process"):
            mine.run(mcfg(out, plans=2))
    with RunLock(out, name=".features.lock"):
        with pytest.raises(RunLocked):
            features.run(fcfg(Path(json.loads((out / "features_config.json").read_text())["data_root"]), out))
    with RunLock(out / "eval" / "ppap-last"):
        with pytest.raises(RunLocked):
            evaluate.run(ecfg(out))
    with RunLock(out / "train" / "ppap"):
        evaluate.run(ecfg(out, trained="ppap", probes="refit"))  # reads train/ppap: no lock needed


def test_concurrent_train_processes_do_not_duplicate_metrics(trained, tmp_path):
    out = copy(trained, tmp_path)
    shutil.rmtree(out / "train")
    cmd = [PY, "-m", "stages.cli", "train", "--out", str(out), "--epochs", "2", "--tau", "0.5",
           "--lr", "0.003", "--seed", "7"]
    procs = [subprocess.Popen(cmd, cwd=REPO, stdout=subprocess.DEVNULL, stderr=subprocess.PIPE,
                              text=True) for _ in range(2)]
    errs = [p.communicate(timeout=300)[1] for p in procs]
    codes = sorted(p.returncode for p in procs)
    rows = [json.loads(x) for x in (out / "train" / "ppap" / "metrics.jsonl").read_text().splitlines()]
    assert [r["step"] for r in rows] == list(range(1, len(rows) + 1)), "duplicated metrics"
    if codes == [0, 2]:  # they overlapped: one was refused with a clear message
        refused = next(e for p, e in zip(procs, errs) if p.returncode == 2)
        assert "is being written by another ppap-pipe process (pid" in refused
    else:  # one finished before the other started: the second was a no-op
        assert codes == [0, 0]


# ------------------------------------------------------------------ clear errors


def test_disk_full_names_path_and_free_space(cache, data, tmp_path, monkeypatch, capsys):
    out = copy(cache, tmp_path)
    from pipeline.cache import store as store_module

    def full(fd):
        raise OSError(errno.ENOSPC, "No space left on device")

    monkeypatch.setattr(store_module.os, "fsync", full)
    with pytest.raises(DiskFull, match=r"no space left on the device while writing .*mine/ppap/"
                                       r".* free on the filesystem of"):
        mine.run(mcfg(out))
    code, err = cli(capsys, "mine", "--out", out, "--phi0", THRESH["phi0"], "--psi0", THRESH["psi0"],
                    "--batch-size", 8, "--backend", "torch")
    assert code == 2 and err.startswith("error: no space left on the device while writing")
    assert len(err.strip().splitlines()) == 1
    monkeypatch.undo()
    assert not [p for p in out.rglob("*") if p.name.endswith(".tmp")]

    # Zarr chunk writes of the features stage
    from zarr.storage import _local

    real_put = _local._put
    n = {"calls": 0}

    def put_until_full(path, value, exclusive=False):
        if "train" in str(path) and "/c/" in str(path):
            n["calls"] += 1
            if n["calls"] > 12:
                raise OSError(errno.ENOSPC, "No space left on device")
        return real_put(path, value, exclusive=exclusive)

    monkeypatch.setattr(_local, "_put", put_until_full)
    out2 = tmp_path / "f"
    with pytest.raises(DiskFull, match=r"while writing .*features.zarr/train"):
        features.run(fcfg(data, out2))
    monkeypatch.undo()
    features.run(fcfg(data, out2))  # space freed: the same command finishes the cache
    for k, v in zarr_arrays(out2).items():
        np.testing.assert_array_equal(v, zarr_arrays(cache)[k], err_msg=k)


def test_config_file_errors(cache, tmp_path, capsys):
    out = copy(cache, tmp_path)
    cases = {
        'phi0 = "high"\n': r"config file '.*bad.toml': phi0='high' \(str\) is not a valid value "
                           r"for MineConfig.phi0: expected a number",
        "plans = 2.7\n": r"plans=2.7 \(float\) is not a valid value for MineConfig.plans: "
                          "expected an integer",
        "[mien]\nphi0 = 0.9\n": r"unknown table\(s\) \['\[mien\]'\]",
        "[mine]\nphio = 0.9\n": r"\[mine\] has unknown option\(s\) \['phio'\]",
        "phi0 = 0.9\npsi0 = [\n": r"config file '.*bad.toml' is not valid TOML",
    }
    for text, want in cases.items():
        (tmp_path / "bad.toml").write_text(text)
        code, err = cli(capsys, "mine", "--out", out, "--config", tmp_path / "bad.toml")
        assert code == 2 and re.search(want, err), (text, err)
        assert "Traceback" not in err
    assert not (out / "mine").exists(), "a half-made folder was left"
    (tmp_path / "bad.toml").write_text("epochs = 2.7\n")
    code, err = cli(capsys, "train", "--out", out, "--config", tmp_path / "bad.toml")
    assert code == 2 and "TrainConfig.epochs" in err and not (out / "train").exists()
    (tmp_path / "bad.json").write_text('{"epochs": 2,}')
    code, err = cli(capsys, "train", "--out", out, "--config", tmp_path / "bad.json")
    assert code == 2 and "is not valid JSON" in err


# ------------------------------------------------------------------ the rest


def test_orphan_temporary_files_are_removed_on_resume(data, trained, tmp_path):
    out = copy(trained, tmp_path)
    orphans = [out / "train" / "ppap" / ".last.pt.k2j3.tmp",
               out / "mine" / "ppap" / "shards" / "e000" / ".b00001.npz.x8.tmp",
               out / STORE_NAME / "train" / "tokens" / "c" / "1" / "0" / "0.9f1c.partial",
               out / "markers" / "features" / ".train-00001.done.a1.tmp",
               out / "eval" / "ppap-last" / ".metrics.json.zz.tmp"]
    for p in orphans:
        p.write_bytes(b"left by a killed writer")
    train.run(tcfg(out))
    mine.run(mcfg(out))
    features.run(fcfg(data, out))
    evaluate.run(ecfg(out))
    assert [p for p in orphans if p.exists()] == []


def test_interrupt_message_names_a_real_resume_point(cache, tmp_path, monkeypatch):
    out = copy(cache, tmp_path)
    mine.run(mcfg(out))
    real = train.train_step
    calls = {"n": 0, "at": 1}

    def interrupted(*a, **kw):
        calls["n"] += 1
        if calls["n"] == calls["at"]:
            raise KeyboardInterrupt
        return real(*a, **kw)

    monkeypatch.setattr(train, "train_step", interrupted)
    with pytest.raises(StageInterrupted) as exc:
        train.run(tcfg(out))
    msg = str(exc.value)
    assert "no checkpoint was written yet" in msg and "starts at step 0" in msg
    assert not (out / "train" / "ppap" / "last.pt").exists()
    calls.update(n=0, at=4)
    with pytest.raises(StageInterrupted, match=r"resumes from the checkpoint .*last.pt at step 2"):
        train.run(tcfg(out))


@pytest.mark.skipif(torch.cuda.is_available(), reason="needs a machine without CUDA")
def test_cuda_without_cuda_leaves_no_folder(data, trained, tmp_path):
    out = copy(trained, tmp_path)
    for run, where in ((lambda: mine.run(mcfg(out, name="gpu", device="cuda")), out / "mine" / "gpu"),
                       (lambda: train.run(tcfg(out, name="gpu", device="cuda")), out / "train" / "gpu"),
                       (lambda: evaluate.run(ecfg(out, trained="ppap", probes="trained", device="cuda")),
                        out / "eval" / "ppap-last-trained-probes"),
                       (lambda: features.run(fcfg(data, tmp_path / "f", device="cuda")), tmp_path / "f")):
        with pytest.raises(ValueError, match="CUDA is not available"):
            run()
        assert not where.exists(), where


def _log_lines_ok(text: str) -> None:
    assert "\r" not in text, "carriage returns in a log file"
    assert "faiss" not in text.lower(), "the faiss SIMD probe was logged"
    stamp = re.compile(r"^\d\d:\d\d:\d\d [\w.]+ (DEBUG|INFO|WARNING|ERROR) ")
    for line in text.splitlines():
        is_log = bool(stamp.match(line))
        is_bar = "%|" in line
        assert is_log != is_bar, f"log line glued to a progress bar (or neither): {line!r}"


def test_log_files_have_whole_lines_and_no_empty_bars(trained, tmp_path):
    out = copy(trained, tmp_path)
    shutil.rmtree(out / "train")
    env = {**os.environ, "OMP_NUM_THREADS": "1"}
    log = tmp_path / "train.log"
    with open(log, "w") as fh:  # a log file, not a terminal
        subprocess.run([PY, "-m", "stages.cli", "train", "--out", str(out), "--epochs", "2",
                        "--tau", "0.5", "--lr", "0.003", "--seed", "7"], cwd=REPO, env=env,
                       stderr=fh, stdout=subprocess.DEVNULL, check=True)
    text = log.read_text()
    _log_lines_ok(text)
    assert "ppap.train INFO train: epoch 0 done" in text and "train: 100%|" in text
    # nothing left to do: no (empty) progress bar at all
    with open(log, "w") as fh:
        subprocess.run([PY, "-m", "stages.cli", "mine", "--out", str(out), "--config",
                        str(out / "mine" / "ppap" / "config.json")], cwd=REPO, env=env,
                       stderr=fh, stdout=subprocess.DEVNULL, check=True)
    text = log.read_text()
    _log_lines_ok(text)
    assert "already done" in text and "%|" not in text and "0it" not in text


def test_faiss_simd_probe_is_not_logged():
    code = ("import logging, sys; from stages.cli import _setup_logging; _setup_logging(False); "
            "import faiss; logging.getLogger('ppap.test').info('after faiss')")
    res = subprocess.run([PY, "-c", code], cwd=REPO, capture_output=True, text=True, check=True)
    assert "after faiss" in res.stderr and "faiss.loader" not in res.stderr, res.stderr
