"""Figures of held-out selection records: one run's training curve, a sweep's runs side by side.

Both read selection records (`<run>/selection.jsonl`, pipeline.training.selection) and return PNG bytes;
every figure's title names what it shows (run or sweep, mined sets, settings).

  curve_png(records, title, rank_floor)   three panels against the step: held-out cluster mIoU
                                          (mean over k-means seeds, ± std band), held-out linear
                                          mIoU, effective rank / frozen; step 0 (the frozen
                                          features) as a dashed reference line
  sweep_png(groups, title)                the same first and third panels, one line per grid
                                          point: the mean over its seeds with a ± std band
"""

from __future__ import annotations

import io
from typing import Any, Mapping, Sequence

import numpy as np

from pipeline.evaluation.seeds import spread


def _figure(width: float, height: float):
    from matplotlib.backends.backend_agg import FigureCanvasAgg
    from matplotlib.figure import Figure

    fig = Figure(figsize=(width, height), dpi=100, layout="constrained")
    FigureCanvasAgg(fig)
    return fig


def _png(fig) -> bytes:
    buf = io.BytesIO()
    fig.savefig(buf, format="png")
    return buf.getvalue()


def _values(records: Sequence[Mapping[str, Any]], key: str) -> np.ndarray:
    return np.array([np.nan if r.get(key) is None else float(r[key]) for r in records])


def curve_png(records: Sequence[Mapping[str, Any]], title: str, rank_floor: float | None = None) -> bytes:
    """One run's held-out curve (see the module docstring)."""
    fig = _figure(14, 4.2)
    axes = fig.subplots(1, 3)
    steps = np.array([r["step"] for r in records])
    panels = (("cluster_miou", "held-out cluster mIoU (patch level)"),
              ("linear_miou", "held-out linear mIoU (2-fold cross-fit)"),
              ("erank_ratio", "held-out effective rank / frozen"))
    for ax, (key, label) in zip(axes, panels):
        y = _values(records, key)
        ax.set_xlabel("step")
        ax.set_ylabel(label)
        if np.isnan(y).all():
            ax.text(0.5, 0.5, "not recorded (no labels)", ha="center", va="center",
                    transform=ax.transAxes)
            continue
        ax.plot(steps, y, marker=".", color="C0", label="trained")
        std = _values(records, f"{key}_std")
        if not np.isnan(std).all():
            ax.fill_between(steps, y - std, y + std, color="C0", alpha=0.2,
                            label="± std over k-means seeds")
        ax.axhline(y[0], color="0.4", ls="--", lw=1, label="frozen (step 0)")
        if key == "erank_ratio" and rank_floor is not None:
            ax.axhline(rank_floor, color="C3", ls=":", lw=1, label=f"rank floor {rank_floor:g}")
        ax.legend(fontsize=7)
    fig.suptitle(title, fontsize=10)
    return _png(fig)


def sweep_png(groups: Sequence[tuple[str, Sequence[Sequence[Mapping[str, Any]]]]], title: str) -> bytes:
    """A sweep: for each (label, [records of each seed's run]) the mean over seeds against the
    step (± std band when there are several seeds), held-out cluster mIoU and rank ratio; the
    frozen features' held-out score as a dashed line."""
    fig = _figure(13, 4.8)
    ax1, ax2 = fig.subplots(1, 2)
    frozen = None
    for i, (label, runs) in enumerate(groups):
        runs = [r for r in runs if r]
        if not runs:
            continue
        key = "cluster_miou" if "cluster_miou" in runs[0][0] else "erank"
        frozen = frozen if frozen is not None else runs[0][0].get(key)
        steps = sorted({r["step"] for rec in runs for r in rec})
        for ax, k in ((ax1, key), (ax2, "erank_ratio")):
            by_step = [spread(next((r.get(k) for r in rec if r["step"] == s), None) for rec in runs)
                       for s in steps]
            mean = np.array([np.nan if b.mean is None else b.mean for b in by_step])
            std = np.array([np.nan if b.std is None else b.std for b in by_step])
            n = f" ({len(runs)} seeds)" if len(runs) > 1 else ""
            ax.plot(steps, mean, marker=".", color=f"C{i % 10}", label=f"{label}{n}")
            if len(runs) > 1:
                ax.fill_between(steps, mean - std, mean + std, color=f"C{i % 10}", alpha=0.15)
    if frozen is not None:
        ax1.axhline(frozen, color="0.3", ls="--", lw=1, label="frozen (step 0)")
    ax2.axhline(1.0, color="0.3", ls="--", lw=1, label="frozen")
    ax1.set_xlabel("step")
    ax1.set_ylabel("held-out cluster mIoU (patch level)")
    ax2.set_xlabel("step")
    ax2.set_ylabel("held-out effective rank / frozen")
    for ax in (ax1, ax2):
        ax.legend(fontsize=7, ncol=2)
    fig.suptitle(title, fontsize=10)
    return _png(fig)
