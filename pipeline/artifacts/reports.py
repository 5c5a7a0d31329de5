"""The evaluation-report artifact: `<out>/eval/<name>/`.

    config.json        the resolved EvalConfig (+ the report name)
    probes.pt          fitted probes (k-means centroids, linear probe, cluster probe, fit record)
    confusion.npz      raw confusion matrices `<probe>_<crf|no_crf>`
    confusion.png      row-normalised matrices (cluster after Hungarian matching, linear)
    predictions.png    image / ground truth / predictions of a few evaluation images
    metrics.json       the report (`no_crf` and `crf` blocks, per-class IoU, probe record),
                       written last: a report is complete when it exists

The evaluation stage writes a report with `EvalReport.write` (one writer per directory, lock
`<dir>/.lock`); scripts and tests read it with `metrics()` / `probes()`.
"""

from __future__ import annotations

import io
from pathlib import Path
from typing import Any

import numpy as np

from pipeline.artifacts.layout import NamedRunDir
from pipeline.cache.integrity import clean_orphans, hold_lock
from pipeline.cache.store import (
    atomic_write_bytes,
    atomic_write_json,
    portable_config,
    read_json,
)


class EvalReport(NamedRunDir):
    """`<out>/eval/<name>/` ('frozen', '<run>-<checkpoint>', ... see stages/evaluate.py)."""

    SUBDIR = "eval"

    @property
    def metrics_path(self) -> Path:
        return self.dir / "metrics.json"

    @property
    def probes_path(self) -> Path:
        return self.dir / "probes.pt"

    def exists(self) -> bool:
        return self.metrics_path.is_file()

    def write(self, *, config: dict[str, Any], metrics: dict[str, Any],
              confusions: dict[str, np.ndarray], confusion_png: bytes,
              predictions_png: bytes | None, probes: dict[str, Any] | None) -> Path:
        """Write every file of the report, metrics.json last; files of an earlier report that
        this one does not have (predictions.png, probes.pt) are removed, never left stale."""
        import torch

        hold_lock(self.dir, "evaluation")  # the run it reads needs no lock
        clean_orphans(self.dir)
        atomic_write_json(self.config_path, portable_config(config, self.config_path, self.out))
        if probes is not None:
            buf = io.BytesIO()
            torch.save(probes, buf)
            atomic_write_bytes(self.probes_path, buf.getvalue())
        else:
            self.probes_path.unlink(missing_ok=True)
        buf = io.BytesIO()
        np.savez_compressed(buf, **confusions)
        atomic_write_bytes(self.dir / "confusion.npz", buf.getvalue())
        atomic_write_bytes(self.dir / "confusion.png", confusion_png)
        if predictions_png is not None:
            atomic_write_bytes(self.dir / "predictions.png", predictions_png)
        else:
            (self.dir / "predictions.png").unlink(missing_ok=True)
        atomic_write_json(self.metrics_path, metrics)
        return self.metrics_path

    def metrics(self) -> dict[str, Any]:
        if not self.exists():
            raise ValueError(f"no evaluation report at {self.dir} (no metrics.json); run "
                             f"`ppap-pipe eval --out {self.out} ...` for it first")
        return read_json(self.metrics_path)

    def probes(self) -> dict[str, Any]:
        """The fitted probes saved with the report (tensors on the CPU)."""
        import torch

        if not self.probes_path.is_file():
            raise ValueError(f"{self.dir} has no probes.pt (only fitted probes are saved)")
        return torch.load(self.probes_path, weights_only=True)

    def fitted_probes(self) -> dict[str, Any]:
        """The first probe seed's fitted probes for reuse (`predict`): `centroids`,
        `cluster_probe`, `linear_probe` and `cluster_mapping` ({no_crf, crf}: cluster id ->
        class id, -1 unmatched). Reports of earlier versions (no `fits`) take the mapping from
        metrics.json."""
        saved = self.probes()
        fits = saved.get("fits")
        if fits:
            return fits[0]
        return {**{k: saved[k] for k in ("centroids", "cluster_probe", "linear_probe")},
                "cluster_mapping": self.metrics()["cluster_mapping"]}

    def confusions(self) -> dict[str, np.ndarray]:
        with np.load(self.dir / "confusion.npz") as z:
            return {k: z[k] for k in z.files}
