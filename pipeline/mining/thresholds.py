"""Are the mining thresholds right for this backbone? A label-free check and calibration.

The paper's Φ0 = 0.55 / Ψ0 = 0.15 are calibrated for DINO v1; DINOv2 patch features share a
large common component (CamVid: median pairwise cosine 0.47), so the same thresholds make
almost half of a batch "positive" for every anchor (docs/method.md §9). Both functions read
the cosines between a seeded sample of rows and every row of one mined batch:

  threshold_check(s, phi0, psi0)   the mean share of the batch above Φ0 (the initial positive
                                   set P⁰ of a typical anchor) and below Ψ0, with quantiles of s
  calibrate(s, q_pos, q_amb)       Φ0 = the q_pos quantile of s, Ψ0 = the q_amb quantile,
                                   rounded to 0.01; no labels used

`mine` refuses (without --force) thresholds whose P⁰ holds more than REFUSE_SHARE of the
batch and warns above WARN_SHARE. On CamVid with DINOv2 ViT-S/14, the audit-swept 0.95 / 0.70
are the 0.99 / 0.73 quantiles of s; the default calibration quantiles 0.99 / 0.75 follow
(docs/method.md §9.4).
"""

from __future__ import annotations

from dataclasses import dataclass

import numpy as np

WARN_SHARE = 0.10  # P⁰ above 10% of the batch: warn (PPAP's own presets: 1-4%)
REFUSE_SHARE = 0.25  # above 25%: refuse without --force (DINO v1 thresholds on DINOv2: 44%)
SAMPLE_ROWS = 512
CALIBRATE_POS_Q = 0.99
CALIBRATE_AMB_Q = 0.75


def similarity_sample(F: np.ndarray, seed: int, rows: int = SAMPLE_ROWS) -> np.ndarray:
    """Cosines (rows, N) float32 of a seeded sample of rows of unit features F (N, D) with all
    of F."""
    F = np.asarray(F, dtype=np.float32)
    rng = np.random.default_rng([seed, 0x7448])  # its own stream
    pick = np.sort(rng.choice(len(F), size=min(rows, len(F)), replace=False))
    return F[pick] @ F.T


@dataclass(frozen=True)
class ThresholdCheck:
    phi0: float
    psi0: float
    positive_share: float  # mean over sampled anchors of |{j : s_ij > Φ0}| / N
    negative_share: float  # mean share below Ψ0
    median: float  # median cosine of the sample
    q90: float

    @property
    def verdict(self) -> str:
        """'ok', 'warn' or 'refuse' (see WARN_SHARE, REFUSE_SHARE)."""
        if self.positive_share > REFUSE_SHARE:
            return "refuse"
        return "warn" if self.positive_share > WARN_SHARE else "ok"

    def message(self, backbone: str) -> str:
        return (f"phi0={self.phi0:g} puts {100 * self.positive_share:.0f}% of a mined batch among "
                f"the initial positives of a typical anchor (psi0={self.psi0:g}: "
                f"{100 * self.negative_share:.0f}% below it; cosines of {backbone} features here: "
                f"median {self.median:.2f}, 90th percentile {self.q90:.2f}). PPAP's presets keep "
                "it near 1-4%: these thresholds look made for another backbone (the paper's "
                "0.55/0.15 are for DINO v1)")


def threshold_check(s: np.ndarray, phi0: float, psi0: float) -> ThresholdCheck:
    s = np.asarray(s)
    q50, q90 = np.quantile(s, [0.5, 0.9])
    return ThresholdCheck(float(phi0), float(psi0), float((s > phi0).mean()),
                          float((s < psi0).mean()), float(q50), float(q90))


def calibrate(s: np.ndarray, q_pos: float = CALIBRATE_POS_Q,
              q_amb: float = CALIBRATE_AMB_Q) -> tuple[float, float]:
    """(Φ0, Ψ0): the q_pos and q_amb quantiles of the cosines `s`, rounded to 0.01."""
    if not 0.0 < q_amb < q_pos < 1.0:
        raise ValueError(f"calibration quantiles must satisfy 0 < amb ({q_amb}) < pos ({q_pos}) < 1")
    hi, lo = np.quantile(np.asarray(s, dtype=np.float64), [q_pos, q_amb])
    phi0, psi0 = round(float(hi), 2), round(float(lo), 2)
    if psi0 >= phi0:  # a degenerate sample (all rows alike)
        raise ValueError(f"the batch's cosines are too uniform to calibrate (quantiles {q_amb}: "
                         f"{lo:.3f}, {q_pos}: {hi:.3f}); give --phi0/--psi0")
    return phi0, psi0
