"""Results over several seeds: which seeds, mean ± std, and when a difference beats the noise.

Every number the project reports over seeds goes through here (docs/method.md §11):

  seed_list(seed, n)      the seeds seed, seed+1, ..., seed+n-1
  spread(values)          mean, sample standard deviation (ddof = 1; 0 for a single value) and
                          every value, in seed order
  mean_block(blocks)      the mean of metric blocks (dicts of numbers and lists of numbers, e.g.
                          metrics.json's `no_crf`), with `<key>_std` beside every number and a
                          `_std` twin of every list
  compare(a, b)           b - a with the standard deviation of that difference,
                          sqrt(std_a² + std_b²), and whether |b - a| exceeds `k` (2) of them

The standard deviation is the spread of single runs, not the standard error of the mean: a
difference "larger than 2 std" means a user repeating either recipe once with a new seed would
rarely see the order flip.
"""

from __future__ import annotations

import math
from dataclasses import dataclass
from typing import Any, Iterable, Mapping, Sequence


def seed_list(seed: int, n: int) -> list[int]:
    """The `n` consecutive seeds starting at `seed`."""
    if int(n) != n or n < 1:
        raise ValueError(f"seeds={n} must be a positive integer (1 = the single seed {seed})")
    return [int(seed) + i for i in range(int(n))]


@dataclass(frozen=True)
class Spread:
    """Mean and sample standard deviation of values over seeds (None where undefined)."""

    mean: float | None
    std: float | None
    values: tuple[float | None, ...]

    @property
    def n(self) -> int:
        return len(self.values)

    def format(self, spec: str = ".1f") -> str:
        """'25.3 ± 1.2' ('-' when undefined; no '±' for a single value)."""
        return format_mean_std(self.mean, self.std, self.n, spec)

    def as_dict(self) -> dict[str, Any]:
        return {"mean": self.mean, "std": self.std, "values": list(self.values)}


def format_mean_std(mean: float | None, std: float | None, n: int, spec: str = ".1f") -> str:
    """'25.3 ± 1.2' for n >= 2 values, '25.3' for one, '-' when undefined."""
    if mean is None:
        return "-"
    if n < 2 or std is None:
        return format(mean, spec)
    return f"{mean:{spec}} ± {std:{spec}}"


def _defined(v: Any) -> bool:
    return v is not None and not (isinstance(v, float) and math.isnan(v))


def spread(values: Iterable[float | None]) -> Spread:
    """Mean and std (ddof = 1) of the defined values; undefined ones (None, NaN) are skipped."""
    vals = tuple(None if not _defined(v) else float(v) for v in values)
    xs = [v for v in vals if v is not None]
    if not xs:
        return Spread(None, None, vals)
    if min(xs) == max(xs):  # identical seeds: exactly that value, exactly no spread
        return Spread(xs[0], 0.0, vals)
    mean = sum(xs) / len(xs)
    std = math.sqrt(sum((x - mean) ** 2 for x in xs) / (len(xs) - 1)) if len(xs) > 1 else 0.0
    return Spread(mean, std, vals)


def mean_block(blocks: Sequence[Mapping[str, Any]]) -> dict[str, Any]:
    """Element-wise mean of metric blocks with the same keys, `<key>_std` beside each number.

    Numbers average to a number; lists of numbers (per-class IoU) average per position, with a
    `<key>_std` list; nested dicts recurse (their std twin is `<key>_std`); None stays None.
    """
    if not blocks:
        raise ValueError("mean_block needs at least one block")
    first = blocks[0]
    out: dict[str, Any] = {}
    stds: dict[str, Any] = {}
    for key, v in first.items():
        vals = [b.get(key) for b in blocks]
        if isinstance(v, Mapping):
            sub = mean_block([x for x in vals if x is not None])
            out[key] = {k: x for k, x in sub.items() if not k.endswith("_std")}
            stds[f"{key}_std"] = {k[:-4]: x for k, x in sub.items() if k.endswith("_std")}
        elif isinstance(v, (list, tuple)):
            cols = [spread(b[i] for b in vals) for i in range(len(v))]
            out[key] = [c.mean for c in cols]
            stds[f"{key}_std"] = [c.std for c in cols]
        elif isinstance(v, (int, float)) and not isinstance(v, bool) or v is None:
            s = spread(vals)
            out[key] = s.mean
            stds[f"{key}_std"] = s.std
        else:
            out[key] = v
    return {**out, **stds}


@dataclass(frozen=True)
class Difference:
    """b - a over seeds: `delta`, its std sqrt(std_a² + std_b²), and `exceeds` (> k std)."""

    delta: float | None
    std: float | None
    k: float

    @property
    def exceeds(self) -> bool:
        return (self.delta is not None and self.std is not None
                and abs(self.delta) > self.k * self.std)

    def format(self, spec: str = "+.1f") -> str:
        if self.delta is None:
            return "-"
        mark = f" (> {self.k:g} std)" if self.exceeds else ""
        return f"{self.delta:{spec}} ± {self.std:.1f}{mark}"


def compare(a: Spread, b: Spread, k: float = 2.0) -> Difference:
    """How b differs from a, measured in standard deviations of single runs."""
    if a.mean is None or b.mean is None:
        return Difference(None, None, k)
    return Difference(b.mean - a.mean, math.sqrt((a.std or 0.0) ** 2 + (b.std or 0.0) ** 2), k)
