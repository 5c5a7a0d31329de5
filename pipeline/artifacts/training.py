"""The training-run artifact: `<out>/train/<name>/` and its checkpoints.

    manifest.json      identity: the settings that change the weights + fingerprints of the
                       feature cache and of the mined sets (a rerun must match it)
    config.json        the resolved TrainConfig
    last.pt            the newest state (resume point); best.pt, labelfree.pt: selected states
                       (docs/method.md §10); each with its sha256 in `<file>.sha256`
    metrics.jsonl      one line per step
    selection.jsonl    one line per selection point on the held-out training images
    selection.json     best / label-free / frozen points of the finished run
    curve.png          held-out cluster / linear mIoU and effective rank against the step,
                       redrawn at every selection point (pipeline.evaluation.plots.curve_png)
and `<out>/train/.frozen-holdout/<key>.json`: step-0 held-out scores shared by every run on the
same cache, holdout and seed (a pure cache; delete it freely).

Checkpoint keys (format "ppap-train/1"; modules rebuilt by `pipeline.training.model.modules_from_checkpoint`):
    format              "ppap-train/1"
    branch              FineTunedBranch.state_dict()  (block.*, norm.*, head.*)
    linear_probe        LinearProbe.state_dict(), or None when the cache has no labels
    cluster_probe       ClusterProbe.state_dict()
    opt_net, opt_linear, opt_cluster   optimiser state dicts (opt_linear None without labels)
    step                optimiser steps taken so far
    epoch, batch        position of the NEXT batch to train on (epoch index, batch within it)
    finished            True once every epoch (or max_steps) has been trained
    config              resolved TrainConfig as a dict
    model               {backbone, weights, backbone_seed, weights_fingerprint, patch_size,
                         embed_dim, grid [h, w], num_classes, n_clusters, has_labels, class_names}
    features_fingerprint, mined_fingerprint, code_version, selection (record of a selected state)
`Checkpoint.read` verifies the checksum and refuses non-finite weights and foreign formats.
"""

from __future__ import annotations

import io
import json
import logging
from pathlib import Path
from typing import Any

import torch

from pipeline.artifacts.features import FeatureStore
from pipeline.artifacts.layout import NamedRunDir
from pipeline.cache.integrity import (
    CorruptArtifact,
    NonFinite,
    clean_orphans,
    disk_guard,
    hold_lock,
    read_checked,
    write_checked,
)
from pipeline.cache.store import (
    atomic_write_bytes,
    atomic_write_json,
    check_or_write_manifest,
    in_run,
    portable_config,
    read_json,
)
from pipeline.config.options import CHECKPOINTS
from pipeline.training.model import CKPT_FORMAT, TrainedModel, modules_from_checkpoint

log = logging.getLogger("ppap.train")


class Checkpoint:
    """One checkpoint file (`<run>/<kind>.pt`) and its checksum sidecar."""

    def __init__(self, path: str | Path):
        self.path = Path(path)

    def __repr__(self) -> str:
        return f"Checkpoint({str(self.path)!r})"

    def exists(self) -> bool:
        return self.path.is_file()

    def write(self, state: dict[str, Any]) -> None:
        """torch.save atomically, with the file's sha256 in `<path>.sha256`."""
        buf = io.BytesIO()
        torch.save(state, buf)
        write_checked(self.path, buf.getvalue())

    def read(self, map_location: Any = "cpu", fix: str | None = None) -> dict[str, Any]:
        """The checkpoint dict after verifying its checksum; clear errors for bad files.

        A checkpoint without a `.sha256` sidecar (older ppap-pipe) is loaded with a warning.
        Any NaN/Inf among its weights is refused (a run that diverged), as is another format.
        """
        fix = fix or "retrain (rerun `ppap-pipe train`, into a new --name if needed)"
        if not self.path.is_file():
            raise ValueError(f"no checkpoint at {self.path}; run `ppap-pipe train` first")
        data = read_checked(self.path, what="checkpoint", fix=fix)
        try:
            ckpt = torch.load(io.BytesIO(data), map_location=map_location, weights_only=True)
        except Exception as exc:  # noqa: BLE001 - any unreadable file gets the same advice
            raise CorruptArtifact(f"{self.path} is not a readable checkpoint ({type(exc).__name__}: "
                                  f"{str(exc)[:120]}; {len(data)} bytes, cut off?); {fix}") from None
        found = ckpt.get("format") if isinstance(ckpt, dict) else None
        if found != CKPT_FORMAT:
            raise ValueError(f"{self.path} is not a {CKPT_FORMAT} checkpoint (format={found!r}); "
                             f"{fix}")
        for key in ("branch", "linear_probe", "cluster_probe"):
            for name, t in (ckpt.get(key) or {}).items():
                if torch.is_tensor(t) and t.is_floating_point() and not bool(torch.isfinite(t).all()):
                    raise NonFinite(f"{self.path} holds NaN/Inf weights ({key}.{name}): the run "
                                    f"diverged or the file is damaged; {fix}")
        return ckpt

    def load_model(self, device: str = "cpu") -> TrainedModel:
        """(branch, linear_probe or None, cluster_probe, cfg) in eval mode (see
        pipeline.training.model.modules_from_checkpoint)."""
        ckpt = self.read("cpu", fix="retrain it (rerun `ppap-pipe train` with the same settings "
                                    "after deleting it, or into a new --name)")
        return modules_from_checkpoint(ckpt, device)

    def resume_point(self) -> str:
        """Where a rerun resumes: this checkpoint's step, or step 0 when there is none."""
        if not self.path.is_file():
            return (f"no checkpoint was written yet ({self.path} does not exist), so it starts at "
                    "step 0")
        try:
            step = torch.load(self.path, map_location="cpu", weights_only=True)["step"]
            return f"it resumes from the checkpoint {self.path} at step {step}"
        except Exception:  # noqa: BLE001 - only for the message
            return f"it resumes from the last checkpoint {self.path}"


def load_trained(path: str | Path, device: str = "cpu") -> TrainedModel:
    """The trained modules of one checkpoint file (Checkpoint(path).load_model)."""
    return Checkpoint(path).load_model(device)


def _read_jsonl(path: Path) -> list[dict[str, Any]]:
    if not path.exists():
        return []
    return [json.loads(line) for line in path.read_text().splitlines() if line.strip()]


class TrainRun(NamedRunDir):
    """`<out>/train/<name>/`: the training stage writes it (`begin`, checkpoints, records),
    evaluation and sweeps read it (`checkpoint_for_eval`, `selection_records`)."""

    SUBDIR = "train"

    @property
    def metrics_path(self) -> Path:
        return self.dir / "metrics.jsonl"

    @property
    def selection_records_path(self) -> Path:
        return self.dir / "selection.jsonl"

    @property
    def selection_path(self) -> Path:
        return self.dir / "selection.json"

    @property
    def curve_path(self) -> Path:
        return self.dir / "curve.png"

    def write_curve(self, png: bytes) -> None:
        atomic_write_bytes(self.curve_path, png)

    def checkpoint(self, kind: str = "last") -> Checkpoint:
        if kind not in CHECKPOINTS:
            raise ValueError(f"checkpoint={kind!r}: choose one of {', '.join(CHECKPOINTS)}")
        return Checkpoint(self.dir / f"{kind}.pt")

    # ---------------------------------------------------------------- writing (train stage)
    def begin(self, identity: dict[str, Any], config: dict[str, Any]) -> None:
        """Lock the run, remove temporary files, check or write the manifest (other settings
        under the same name are refused), save the config."""
        hold_lock(self.dir, "training run")
        clean_orphans(self.dir)
        check_or_write_manifest(self.manifest_path, identity, what="training run")
        atomic_write_json(self.config_path, portable_config(config, self.config_path, self.out))

    def truncate_records(self, step: int) -> None:
        """Drop metric and selection lines past `step` (the checkpoint a run resumes from):
        they are recomputed after the resume."""
        for path in (self.metrics_path, self.selection_records_path):
            if not path.exists():
                continue
            keep = []
            for line in path.read_text().splitlines():
                try:
                    if json.loads(line)["step"] <= step:
                        keep.append(line)
                except (json.JSONDecodeError, KeyError, TypeError):
                    break  # a torn last line
            path.write_text("".join(k + "\n" for k in keep))

    def append_metric(self, rec: dict[str, Any]) -> None:
        self._append(self.metrics_path, rec)

    def append_selection(self, rec: dict[str, Any]) -> None:
        self._append(self.selection_records_path, rec)

    @staticmethod
    def _append(path: Path, rec: dict[str, Any]) -> None:
        with disk_guard(path), open(path, "a") as fh:
            fh.write(json.dumps(rec) + "\n")

    def write_selection(self, summary: dict[str, Any]) -> None:
        atomic_write_json(self.selection_path, summary)

    def frozen_scores(self, key: str) -> dict[str, Any] | None:
        """Cached step-0 held-out scores under `key` (None when absent or unreadable)."""
        path = self.layout.frozen_holdout / f"{key}.json"
        if path.is_file():
            try:
                return read_json(path)
            except (OSError, ValueError):
                return None  # an unreadable cache entry: scored again and overwritten
        return None

    def save_frozen_scores(self, key: str, scores: dict[str, Any]) -> None:
        atomic_write_json(self.layout.frozen_holdout / f"{key}.json", scores)

    # ---------------------------------------------------------------- reading
    def metrics(self) -> list[dict[str, Any]]:
        return _read_jsonl(self.metrics_path)

    def selection_records(self) -> list[dict[str, Any]]:
        return _read_jsonl(self.selection_records_path)

    def selection(self) -> dict[str, Any]:
        """selection.json (best / label-free / frozen points) of a run that selected."""
        if not self.selection_path.is_file():
            raise ValueError(f"{self.dir} has no selection.json: it was trained without held-out "
                             "images or has not finished; rerun `ppap-pipe train` for it")
        return read_json(self.selection_path)

    def last_metric(self, key: str) -> Any:
        lines = self.metrics_path.read_text().splitlines() if self.metrics_path.exists() else []
        return json.loads(lines[-1]).get(key) if lines else None

    def checkpoint_for_eval(self, kind: str) -> tuple[str, Checkpoint]:
        """(kind, checkpoint) to evaluate: `best` of a run that never selected (no held-out
        images, or --select-every 0) falls back to `last`, saying so; an explicit choice of a
        run that did select is never changed. Missing files get advice."""
        if (kind == "best" and not self.checkpoint("best").exists()
                and not self.selection_records_path.is_file() and self.checkpoint("last").exists()):
            log.warning("eval: %s was trained without selection points (no held-out images or "
                        "--select-every 0), so it has no best.pt; evaluating last.pt", self.dir)
            kind = "last"
        ckpt = self.checkpoint(kind)
        if ckpt.exists():
            return kind, ckpt
        if not self.checkpoint("last").exists():
            raise ValueError(
                f"no checkpoint at {ckpt.path}; run `ppap-pipe train --out {self.out} --name "
                f"{self.name}` first, or pass --trained NAME of an existing run (or --baseline "
                "frozen)")
        raise ValueError(
            f"{self.dir} has no {kind}.pt: it was trained without held-out images to select on "
            f"(mine with --holdout > 0 and --select-every > 0 in train), or it is still at its "
            f"first selection point; evaluate --checkpoint last instead")

    def load_for_eval(self, kind: str, store: FeatureStore,
                      device: str = "cpu") -> tuple[TrainedModel, dict[str, Any]]:
        """The modules of checkpoint `kind` (with the `best` fallback of `checkpoint_for_eval`)
        and a description of it; refuses a run trained on another feature cache."""
        kind, ckpt = self.checkpoint_for_eval(kind)
        model = ckpt.load_model(device)
        tcfg = model.config
        if tcfg.get("features_fingerprint") != store.fingerprint:
            raise ValueError(
                f"{ckpt.path} was trained on feature cache {tcfg.get('features_fingerprint')} but "
                f"{store.path} is {store.fingerprint}; evaluate with the --out it was trained in")
        info = {"checkpoint": in_run(ckpt.path, self.out), "checkpoint_kind": kind,
                "step": tcfg.get("step"),
                "epoch": tcfg.get("epoch"), "mined_fingerprint": tcfg.get("mined_fingerprint"),
                "selection": tcfg.get("selection")}
        return model, info
