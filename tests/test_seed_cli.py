"""The primaps and eigen criteria end to end through the command line (in-process typer runner):
mine -> rerun (nothing redone) -> export -> audit next to kmeans -> show -> train -> eval with the
matching cluster probe, on a tiny synthetic cache with three separable classes."""

from __future__ import annotations

import json

import numpy as np
import pytest
import torch
import zarr
from test_eval import BACKBONE_SEED, N_TRAIN, K, make_store
from typer.testing import CliRunner

from pipeline.mining.shards import read_shard
from stages import cli


def invoke(*argv: str) -> str:
    res = CliRunner().invoke(cli.app, [str(a) for a in argv])
    assert res.exit_code == 0, (argv, res.output, res.exception)
    return res.output


@pytest.fixture(scope="module")
def cache(fake_cache, tmp_path_factory):
    out = tmp_path_factory.mktemp("seedcli")
    make_store(fake_cache, out)
    root = zarr.open_group(str(out / "features.zarr"), mode="r+")
    root.attrs["manifest"] = {**root.attrs["manifest"], "seed": BACKBONE_SEED}  # train reloads it
    # --holdout 0: all 40 crops mined (with the default 0.1 the smaller seeded sample sends the
    # one-run k-means of these tiny, 3-class crops into a local minimum that splits one class and merges two)
    common = ("--batch-size", 8, "--anchors-per-image", "1/4", "--epochs", 2, "--seed", 0,
              "--holdout", 0)
    invoke("mine", "--out", out, "--criterion", "kmeans", *common)
    return out, common


@pytest.mark.parametrize("criterion,probe,probe_args", [
    ("primaps", "primaps-em", ("--em-steps", 40)),
    ("eigen", "eigen", ("--eigen-steps", 120)),
])
def test_criterion_through_every_stage(cache, tmp_path, criterion, probe, probe_args):
    out, common = cache
    extra = ("--eigen-steps", 120) if criterion == "eigen" else ()
    mine_cmd = ("mine", "--out", out, "--criterion", criterion, *common, *extra)
    invoke(*mine_cmd)
    d = out / "mine" / criterion
    shards = sorted((d / "shards").rglob("*.npz"))
    assert len(shards) == 2 * -(-N_TRAIN // 8)
    before = {p: p.read_bytes() for p in shards}
    invoke(*mine_cmd)  # finished: nothing redone, nothing changed
    assert {p: p.read_bytes() for p in sorted((d / "shards").rglob("*.npz"))} == before

    # export: positives = rows with the anchor's label, negatives = the rest (all rows labelled)
    dest = tmp_path / "b0.npz"
    invoke("export", "--out", out, "--mined", criterion, "--epoch", 1, "--batch", 2, "--to", dest)
    z = dict(np.load(dest))
    n = len(z["features"])
    assert len(z["anchors"]) == n // 4
    labels = read_shard(d / "shards" / "e001" / "b00002.npz").cluster_of
    assert labels.shape == (n,) and (labels >= 0).all()
    for i, a in enumerate(z["anchors"]):
        pos = z["pos_indices"][z["pos_indptr"][i]:z["pos_indptr"][i + 1]]
        assert set(pos.tolist()) == set(np.flatnonzero(labels == labels[a]).tolist()) - {int(a)}

    # audit on the same batches as kmeans: separable classes -> near-perfect sets for both
    report = tmp_path / "audit.json"
    printed = invoke("audit", "--out", out, "--mined", "kmeans", "--mined", criterion,
                     "--batches", 2, "--json", report, "--plot", tmp_path / "fig.png")
    assert criterion in printed
    runs = {r["name"]: r for r in json.loads(report.read_text())["runs"]}
    assert runs[criterion]["criterion"] == criterion
    assert runs[criterion]["tp_in_p"] > 95 and runs[criterion]["recall"] > 90, {n: (r["tp_in_p"], r["recall"]) for n, r in runs.items()}
    assert (tmp_path / "fig.png").stat().st_size > 1000

    shown = invoke("show", "--out", out, "--mined", criterion, "--random", 2, "--dest", tmp_path / "show")
    pngs = sorted((tmp_path / "show").glob("*.png"))
    assert len(pngs) == 2 and all(str(p) in shown for p in pngs)

    invoke("train", "--out", out, "--mined", criterion, "--epochs", 2, "--lr", 1e-3, "--seed", 1)
    rows = [json.loads(x) for x in (out / "train" / criterion / "metrics.jsonl").read_text().splitlines()]
    assert len(rows) == len(shards) and all(np.isfinite(r["loss"]) and r["mean_pos"] > 0 for r in rows)
    assert torch.load(out / "train" / criterion / "last.pt", weights_only=False)["finished"]

    invoke("eval", "--out", out, "--trained", criterion, "--checkpoint", "last", "--probe", probe,
           *probe_args, "--no-crf", "--n-show", 1)
    m = json.loads((out / "eval" / f"{criterion}-last-{probe}" / "metrics.json").read_text())
    assert m["cluster_probe"] == probe and m["model"]["cluster_probe"]["method"] == probe
    assert m["n_clusters"] == K and 0 <= m["no_crf"]["cluster_miou"] <= 100
