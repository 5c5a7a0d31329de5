"""Precision audit of mined sets against patch labels (docs/method.md §8, paper Table 6, Fig. 1b).

Pure functions on plain arrays in the export-dict form of one batch: `anchors` (M,) rows of F,
CSR `pos_indptr/pos_indices` and `amb_indptr/amb_indices` over anchors (columns = rows of F),
and `patch_label` (N,) majority label per row, -1 = ignore.

Rules (§8): ignore-labelled anchors are skipped; ignore-labelled candidates are dropped from
every count; the anchor itself is never a candidate; negatives N_i = every other valid row not in
P_i or A_i. A true positive is a positive of the anchor's class; a "false positive in N" is a
same-class row placed among the negatives.

`anchor_stats` turns one batch into per-anchor integer counts (`AnchorStats`); `concat` joins
batches; `audit_summary` and `fig1b_curve` reduce them. Pooled figures are ratios of sums over
all anchors of all batches; per-anchor figures are means over all audited anchors of all batches —
both exact, never means of batch means. Percentages are in [0, 100]; an undefined figure (no
anchor to average over) is None.
"""

from __future__ import annotations

import dataclasses
import itertools
import math
from dataclasses import dataclass, fields
from typing import Any, Iterable, Mapping, Sequence

import numpy as np

# --------------------------------------------------------------------------------------------
# Per-anchor counts
# --------------------------------------------------------------------------------------------


@dataclass(frozen=True)
class AnchorStats:
    """Integer counts per audited anchor (ignore-labelled anchors excluded)."""

    label: np.ndarray  # class of the anchor's patch
    n_pos: np.ndarray  # |P| over labelled candidates
    n_tp: np.ndarray  # positives of the anchor's class
    n_amb: np.ndarray  # |A| over labelled candidates
    n_amb_same: np.ndarray  # ambiguous rows of the anchor's class
    n_neg: np.ndarray  # |N| over labelled candidates
    n_fn: np.ndarray  # same-class rows placed among the negatives ("false positives in N")
    n_same: np.ndarray  # labelled rows of the anchor's class, anchor excluded (recall denominator)
    n_skipped: int = 0  # anchors skipped because their patch is ignore-labelled

    @property
    def n_anchors(self) -> int:
        return int(self.label.shape[0])

    def take(self, idx: np.ndarray) -> "AnchorStats":
        return AnchorStats(**{f.name: getattr(self, f.name)[idx] for f in _ARRAY_FIELDS}, n_skipped=0)


_ARRAY_FIELDS = [f for f in fields(AnchorStats) if f.name != "n_skipped"]


def _row_ids(indptr: np.ndarray, m: int, name: str) -> np.ndarray:
    indptr = np.asarray(indptr, dtype=np.int64)
    if indptr.shape != (m + 1,) or indptr[0] != 0 or np.any(np.diff(indptr) < 0):
        raise ValueError(
            f"{name}_indptr has shape {indptr.shape} (or is not non-decreasing from 0); a CSR over "
            f"{m} anchors needs {m + 1} non-decreasing offsets starting at 0"
        )
    return np.repeat(np.arange(m, dtype=np.int64), np.diff(indptr))


def _set_counts(
    indptr: np.ndarray, indices: np.ndarray, anchors: np.ndarray, anchor_label: np.ndarray,
    patch_label: np.ndarray, name: str,
) -> tuple[np.ndarray, np.ndarray]:
    """(size, same-class count) per anchor of one CSR set, labelled candidates only, self dropped."""
    m = anchors.shape[0]
    rows = _row_ids(indptr, m, name)
    cols = np.asarray(indices, dtype=np.int64)
    if cols.shape[0] != rows.shape[0]:
        raise ValueError(
            f"{name}_indices has {cols.shape[0]} entries but {name}_indptr ends at {rows.shape[0]}"
        )
    if cols.size and (cols.min() < 0 or cols.max() >= patch_label.shape[0]):
        raise ValueError(
            f"{name}_indices span [{cols.min()}, {cols.max()}] but the batch has "
            f"{patch_label.shape[0]} rows; the sets and the labels must come from the same batch"
        )
    lab = patch_label[cols]
    keep = (lab >= 0) & (cols != anchors[rows])
    rows, lab = rows[keep], lab[keep]
    size = np.bincount(rows, minlength=m)
    same = np.bincount(rows[lab == anchor_label[rows]], minlength=m)
    return size.astype(np.int64), same.astype(np.int64)


def anchor_stats(
    anchors: np.ndarray,
    pos_indptr: np.ndarray,
    pos_indices: np.ndarray,
    amb_indptr: np.ndarray,
    amb_indices: np.ndarray,
    patch_label: np.ndarray,
) -> AnchorStats:
    """Per-anchor counts for one batch. P and A must be disjoint (as the miner guarantees)."""
    anchors = np.asarray(anchors, dtype=np.int64).reshape(-1)
    patch_label = np.asarray(patch_label, dtype=np.int64).reshape(-1)
    n = patch_label.shape[0]
    if anchors.size and (anchors.min() < 0 or anchors.max() >= n):
        raise ValueError(
            f"anchors span [{anchors.min()}, {anchors.max()}] but the batch has {n} labelled rows"
        )
    anchor_label = patch_label[anchors]
    n_pos, n_tp = _set_counts(pos_indptr, pos_indices, anchors, anchor_label, patch_label, "pos")
    n_amb, n_amb_same = _set_counts(amb_indptr, amb_indices, anchors, anchor_label, patch_label, "amb")

    valid = patch_label >= 0
    counts = np.bincount(patch_label[valid]) if valid.any() else np.zeros(1, np.int64)
    n_valid = int(valid.sum())
    ok = anchor_label >= 0
    lab = anchor_label[ok]
    n_same = counts[lab] - 1  # the anchor itself is labelled and never a candidate
    n_neg = (n_valid - 1) - n_pos[ok] - n_amb[ok]
    n_fn = n_same - n_tp[ok] - n_amb_same[ok]
    if np.any(n_neg < 0) or np.any(n_fn < 0):
        raise ValueError(
            "positive and ambiguous sets overlap (or hold duplicate columns); "
            "each candidate must be in at most one of P and A"
        )
    return AnchorStats(
        label=lab, n_pos=n_pos[ok], n_tp=n_tp[ok], n_amb=n_amb[ok], n_amb_same=n_amb_same[ok],
        n_neg=n_neg.astype(np.int64), n_fn=n_fn.astype(np.int64), n_same=n_same.astype(np.int64),
        n_skipped=int((~ok).sum()),
    )


def batch_stats(batch: Mapping[str, Any]) -> AnchorStats:
    """`anchor_stats` on an export dict (keys anchors, pos_/amb_indptr/indices, patch_label)."""
    missing = [k for k in ("anchors", "pos_indptr", "pos_indices", "amb_indptr", "amb_indices",
                           "patch_label") if k not in batch]
    if missing:
        raise ValueError(f"batch dict lacks {missing}; pass an export dict of a labelled batch")
    return anchor_stats(batch["anchors"], batch["pos_indptr"], batch["pos_indices"],
                        batch["amb_indptr"], batch["amb_indices"], batch["patch_label"])


def concat(parts: Iterable[AnchorStats]) -> AnchorStats:
    """Join the anchors of several batches (exact aggregation)."""
    parts = list(parts)
    if not parts:
        empty = np.zeros(0, np.int64)
        return AnchorStats(**{f.name: empty for f in _ARRAY_FIELDS})
    return AnchorStats(
        **{f.name: np.concatenate([getattr(p, f.name) for p in parts]) for f in _ARRAY_FIELDS},
        n_skipped=sum(p.n_skipped for p in parts),
    )


# --------------------------------------------------------------------------------------------
# CSR helpers
# --------------------------------------------------------------------------------------------


def csr_row_gather(indptr: np.ndarray, rows: np.ndarray) -> tuple[np.ndarray, np.ndarray]:
    """(indptr, positions into the old indices/data) of the CSR restricted to `rows`, in order."""
    indptr = np.asarray(indptr, dtype=np.int64)
    rows = np.asarray(rows, dtype=np.int64)
    lengths = np.diff(indptr)[rows]
    new_indptr = np.zeros(rows.shape[0] + 1, dtype=np.int64)
    np.cumsum(lengths, out=new_indptr[1:])
    gather = np.repeat(indptr[rows] - new_indptr[:-1], lengths) + np.arange(new_indptr[-1], dtype=np.int64)
    return new_indptr, gather


def select_rows(indptr: np.ndarray, indices: np.ndarray, rows: np.ndarray) -> tuple[np.ndarray, np.ndarray]:
    """The CSR restricted to `rows` (in that order)."""
    new_indptr, gather = csr_row_gather(indptr, rows)
    return new_indptr, np.asarray(indices)[gather]


def subset_batch(batch: Mapping[str, Any], positions: np.ndarray) -> dict[str, Any]:
    """Anchors at `positions` (0..M-1) of an export-style dict, with their CSR rows."""
    out = dict(batch)
    out["anchors"] = np.asarray(batch["anchors"])[positions]
    for s in ("pos", "amb"):
        out[f"{s}_indptr"], out[f"{s}_indices"] = select_rows(
            batch[f"{s}_indptr"], batch[f"{s}_indices"], positions)
    return out


def subset_shard(shard: Any, positions: np.ndarray) -> Any:
    """A pipeline.mining.shards.Shard restricted to the anchors at `positions` (so recovering its
    sets costs only those anchors): anchors, proxy, thresholds and per-anchor CSR rows."""
    positions = np.asarray(positions, np.int64)
    if positions.shape[0] == len(shard.anchors) and np.array_equal(positions, np.arange(len(shard.anchors))):
        return shard
    changes: dict[str, Any] = dict(anchors=shard.anchors[positions], proxy=shard.proxy[positions],
                                   phi=shard.phi[positions], psi=shard.psi[positions])
    if shard.band_indptr is not None:
        changes["band_indptr"], g = csr_row_gather(shard.band_indptr, positions)
        changes["band_indices"], changes["band_class"] = shard.band_indices[g], shard.band_class[g]
    if shard.pos_indptr is not None:
        changes["pos_indptr"], g = csr_row_gather(shard.pos_indptr, positions)
        changes["pos_indices"] = shard.pos_indices[g]
    return dataclasses.replace(shard, **changes)


def sample_positions(m: int, max_anchors: int | None, rng: np.random.Generator) -> np.ndarray:
    """A sorted seeded sample of at most `max_anchors` of `m` anchor positions (all if None)."""
    if max_anchors is None or m <= max_anchors:
        return np.arange(m, dtype=np.int64)
    return np.sort(rng.choice(m, size=max_anchors, replace=False)).astype(np.int64)


# --------------------------------------------------------------------------------------------
# Reductions
# --------------------------------------------------------------------------------------------


def _ratio(num: float, den: float) -> float | None:
    return None if den == 0 else 100.0 * float(num) / float(den)


def _mean_ratio(num: np.ndarray, den: np.ndarray) -> float | None:
    ok = den > 0
    return None if not ok.any() else 100.0 * float(np.mean(num[ok] / den[ok]))


def _mean(x: np.ndarray) -> float | None:
    return None if x.size == 0 else float(np.mean(x))


def audit_summary(
    stats: AnchorStats, num_classes: int | None = None, class_names: Sequence[str] | None = None,
) -> dict[str, Any]:
    """Table 6 figures plus per-class precision/recall (classes by anchor label).

    Keys: n_anchors, n_skipped, n_pos (mean |P|), tp_in_p (% TP in P, mean over anchors with
    |P|>0), tp_in_p_pooled (sum TP / sum |P|), n_neg (mean |N|), fp_in_n (% same-class among
    negatives, mean over anchors with |N|>0), fp_in_n_pooled, n_amb (mean |A|), recall (pooled:
    sum TP / sum same-class candidates), recall_mean (per anchor), no_pos (anchors with |P|=0),
    no_pos_pct, per_class (list).
    """
    s = stats
    out: dict[str, Any] = {
        "n_anchors": s.n_anchors,
        "n_skipped": int(s.n_skipped),
        "n_pos": _mean(s.n_pos),
        "tp_in_p": _mean_ratio(s.n_tp, s.n_pos),
        "tp_in_p_pooled": _ratio(s.n_tp.sum(), s.n_pos.sum()),
        "n_neg": _mean(s.n_neg),
        "fp_in_n": _mean_ratio(s.n_fn, s.n_neg),
        "fp_in_n_pooled": _ratio(s.n_fn.sum(), s.n_neg.sum()),
        "n_amb": _mean(s.n_amb),
        "recall": _ratio(s.n_tp.sum(), s.n_same.sum()),
        "recall_mean": _mean_ratio(s.n_tp, s.n_same),
        "no_pos": int((s.n_pos == 0).sum()),
        "no_pos_pct": _ratio((s.n_pos == 0).sum(), s.n_anchors),
    }
    k = num_classes if num_classes is not None else (int(s.label.max()) + 1 if s.n_anchors else 0)
    if s.n_anchors and int(s.label.max()) >= k:
        raise ValueError(f"anchor label {int(s.label.max())} >= num_classes={k}; pass the right class count")
    per_class = []
    for c in range(k):
        sel = s.label == c
        sub = s.take(sel)
        per_class.append({
            "class": c,
            "name": class_names[c] if class_names is not None and c < len(class_names) else str(c),
            "n_anchors": int(sel.sum()),
            "n_pos": _mean(sub.n_pos),
            "precision": _mean_ratio(sub.n_tp, sub.n_pos),
            "precision_pooled": _ratio(sub.n_tp.sum(), sub.n_pos.sum()),
            "recall": _ratio(sub.n_tp.sum(), sub.n_same.sum()),
            "fp_in_n_pooled": _ratio(sub.n_fn.sum(), sub.n_neg.sum()),
        })
    out["per_class"] = per_class
    return out


DEFAULT_QS = tuple(range(5, 101, 5))


def fig1b_curve(stats: AnchorStats, qs: Sequence[float] = DEFAULT_QS) -> dict[str, list]:
    """Paper Fig. 1b: anchors sorted by |P| ascending (ties by position, stable); for each q%,
    the bottom ceil(q% * M) anchors' mean |P|, precision (mean over those with |P|>0) and
    pooled precision. Percentages in [0, 100]; None where undefined."""
    order = np.argsort(stats.n_pos, kind="stable")
    pos = stats.n_pos[order].astype(np.float64)
    tp = stats.n_tp[order].astype(np.float64)
    m = pos.shape[0]
    has = pos > 0
    prec = np.where(has, tp / np.where(has, pos, 1.0), 0.0)
    c_pos, c_tp = np.cumsum(pos), np.cumsum(tp)
    c_prec, c_has = np.cumsum(prec), np.cumsum(has)
    out: dict[str, list] = {"q": [], "n_anchors": [], "mean_pos": [], "precision": [],
                            "precision_pooled": []}
    for q in qs:
        if not 0 < q <= 100:
            raise ValueError(f"curve quantile q={q} must lie in (0, 100]")
        k = min(m, max(1, math.ceil(q * m / 100 - 1e-9))) if m else 0
        out["q"].append(q)
        out["n_anchors"].append(k)
        if k == 0:
            out["mean_pos"].append(None)
            out["precision"].append(None)
            out["precision_pooled"].append(None)
            continue
        out["mean_pos"].append(float(c_pos[k - 1] / k))
        out["precision"].append(None if c_has[k - 1] == 0 else 100.0 * float(c_prec[k - 1] / c_has[k - 1]))
        out["precision_pooled"].append(_ratio(c_tp[k - 1], c_pos[k - 1]))
    return out


# --------------------------------------------------------------------------------------------
# Sweep specifications
# --------------------------------------------------------------------------------------------

SWEEP_MINE_PARAMS = {"phi0": float, "psi0": float, "prop_iters": int, "sigma_pos": float, "sigma_amb": float}


def _number(text: str, spec: str) -> float:
    try:
        return float(text)
    except ValueError:
        raise ValueError(f"sweep {spec!r}: {text!r} is not a number") from None


def parse_sweep_spec(spec: str, params: Mapping[str, type] | None = None) -> tuple[str, list[float | int]]:
    """'phi0=0.45:0.65:0.05' (inclusive stop) or 'psi0=0.1,0.2' -> (name, values).

    `params` maps the names that may be swept to their type (default: the mining thresholds).
    """
    allowed = SWEEP_MINE_PARAMS if params is None else params
    if "=" not in spec:
        raise ValueError(
            f"sweep {spec!r} lacks '='; write NAME=START:STOP:STEP or NAME=V1,V2,... "
            f"with NAME one of {', '.join(allowed)}"
        )
    name, _, body = spec.partition("=")
    name, body = name.strip(), body.strip()
    if name not in allowed:
        raise ValueError(f"sweep {spec!r}: {name!r} cannot be swept; choose one of {', '.join(allowed)}")
    if not body:
        raise ValueError(f"sweep {spec!r} has no values; write {name}=START:STOP:STEP or {name}=V1,V2")
    if ":" in body:
        parts = body.split(":")
        if len(parts) != 3:
            raise ValueError(
                f"sweep {spec!r}: a range is START:STOP:STEP (three numbers), e.g. {name}=0.45:0.65:0.05"
            )
        start, stop, step = (_number(p.strip(), spec) for p in parts)
        if not step > 0:
            raise ValueError(f"sweep {spec!r}: step={step:g} must be > 0")
        if stop < start:
            raise ValueError(f"sweep {spec!r}: stop={stop:g} is below start={start:g}")
        count = int(math.floor((stop - start) / step + 1e-9)) + 1
        if count > 1000:
            raise ValueError(f"sweep {spec!r} gives {count} values; use a larger step (at most 1000)")
        values: list[float] = [round(start + i * step, 10) for i in range(count)]
    else:
        values = [_number(p.strip(), spec) for p in body.split(",") if p.strip()]
        if not values:
            raise ValueError(f"sweep {spec!r} has no values")
    if allowed[name] is int:
        bad = [v for v in values if v != int(v)]
        if bad:
            raise ValueError(f"sweep {spec!r}: {name} takes integers, not {bad[0]:g}")
        return name, sorted(set(int(v) for v in values))
    return name, sorted(set(float(v) for v in values))


def parse_sweep(specs: Sequence[str], params: Mapping[str, type] | None = None
                ) -> dict[str, list[float | int]]:
    """Several specs -> {name: values}, in the order given; a name may appear once."""
    grid: dict[str, list[float | int]] = {}
    for spec in specs:
        name, values = parse_sweep_spec(spec, params)
        if name in grid:
            raise ValueError(f"sweep names {name!r} twice; give each parameter once")
        grid[name] = values
    return grid


def sweep_points(grid: Mapping[str, Sequence[float | int]]) -> list[dict[str, float | int]]:
    """Cartesian product of the grid, first-named parameter varying slowest."""
    names = list(grid)
    return [dict(zip(names, combo)) for combo in itertools.product(*(grid[n] for n in names))]


# --------------------------------------------------------------------------------------------
# Table
# --------------------------------------------------------------------------------------------

TABLE_COLUMNS = (
    ("mean |P|", "n_pos", "{:.1f}"),
    ("%TP in P", "tp_in_p", "{:.1f}"),
    ("%TP pooled", "tp_in_p_pooled", "{:.1f}"),
    ("mean |N|", "n_neg", "{:.0f}"),
    ("%FP in N", "fp_in_n", "{:.1f}"),
    ("mean |A|", "n_amb", "{:.1f}"),
    ("recall %", "recall", "{:.1f}"),
)


def format_table(rows: Sequence[Mapping[str, Any]], label_key: str = "name") -> str:
    """Rows of `audit_summary` output (plus a label) as a fixed-width text table like Table 6."""
    head = [label_key, "anchors"] + [c[0] for c in TABLE_COLUMNS] + ["no positive"]
    body = []
    for r in rows:
        cells = [str(r.get(label_key, "")), str(r.get("n_anchors", ""))]
        for _, key, fmt in TABLE_COLUMNS:
            v = r.get(key)
            cells.append("-" if v is None else fmt.format(v))
        pct = r.get("no_pos_pct")
        cells.append(f"{r.get('no_pos', 0)} ({'-' if pct is None else f'{pct:.1f}%'})")
        body.append(cells)
    widths = [max(len(x[i]) for x in [head] + body) for i in range(len(head))]

    def line(cells: list[str]) -> str:
        return "  ".join(c.ljust(w) if i == 0 else c.rjust(w) for i, (c, w) in enumerate(zip(cells, widths)))

    return "\n".join([line(head), "  ".join("-" * w for w in widths)] + [line(c) for c in body])
