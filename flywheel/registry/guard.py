"""The champion guard: a challenger replaces the champion only when the held-out labels show it beyond noise.

With ~100 held-out labels one image moves an accuracy by a point, so comparing two accuracies flips both ways.
Both models answer the *same* held-out labels, so the comparison is paired: only the images where exactly one
of them is right carry information, and a bootstrap of those pairs gives an interval of the accuracy
difference. The rule (README, "Promotion"):

- a model on a new body (a fine-tune) is promoted when the 95% interval of its accuracy minus the champion's
  lies above `promotion_margin`, and likewise against a head trained on the same labels (else it is negative
  transfer);
- a head retrained on more labels of the champion's body (whichever stage it reads) is promoted unless it is
  worse beyond noise: the interval's upper end must reach `promotion_margin`.
"""

from __future__ import annotations

from dataclasses import dataclass
from typing import Literal

import numpy as np
import numpy.typing as npt

LEVEL = 0.95
BOOTSTRAP_DRAWS = 4000
Rule = Literal["better", "not_worse"]


@dataclass(frozen=True)
class PairedDifference:
    """Accuracy of a challenger minus another model's on the same labels, with its bootstrap interval."""

    challenger: float
    other: float
    low: float
    high: float
    n: int

    @property
    def difference(self) -> float:
        return self.challenger - self.other

    def describe(self, other_name: str) -> str:
        return (
            f"held-out accuracy {self.challenger:.3f} vs {self.other:.3f} of {other_name} on the same {self.n} "
            f"labels: difference {self.difference:+.3f}, {LEVEL:.0%} interval [{self.low:+.3f}, {self.high:+.3f}]"
        )


@dataclass(frozen=True)
class PromotionDecision:
    promoted: bool
    reason: str


def paired_difference(
    challenger_correct: npt.ArrayLike, other_correct: npt.ArrayLike, *, seed: int = 0
) -> PairedDifference:
    """Bootstrap the accuracy difference over the held-out images (resampled in pairs).

    Each image contributes +1 (only the challenger right), -1 (only the other) or 0, so a resample is a
    multinomial draw of those three counts: exact, and cheap for any number of labels."""
    mine, theirs = np.asarray(challenger_correct, dtype=bool), np.asarray(other_correct, dtype=bool)
    if mine.shape != theirs.shape or mine.ndim != 1:
        raise ValueError(f"paired scores need two equal 1-d arrays, got {mine.shape} and {theirs.shape}")
    n = len(mine)
    if n == 0:
        nan = float("nan")
        return PairedDifference(nan, nan, nan, nan, 0)
    wins, losses = int((mine & ~theirs).sum()), int((~mine & theirs).sum())
    counts = np.random.default_rng(seed).multinomial(
        n, [wins / n, losses / n, 1 - (wins + losses) / n], BOOTSTRAP_DRAWS
    )
    differences = (counts[:, 0] - counts[:, 1]) / n
    tail = (1 - LEVEL) / 2
    low, high = np.quantile(differences, [tail, 1 - tail])
    return PairedDifference(float(mine.mean()), float(theirs.mean()), float(low), float(high), n)


def decide_promotion(
    vs_champion: PairedDifference | None,
    *,
    n_holdout: int,
    margin: float,
    rule: Rule,
    vs_baseline: PairedDifference | None = None,
) -> PromotionDecision:
    """Apply the rule to the challenger's paired differences (None: there is no champion to beat)."""
    if n_holdout == 0:
        return PromotionDecision(False, "no held-out labels to compare on; champion kept")
    if vs_baseline is not None and not vs_baseline.low > margin:
        return PromotionDecision(
            False,
            f"does not beat a head-only model beyond noise (negative transfer guard): "
            f"{vs_baseline.describe('a head on the same labels')}, needs its lower end above {margin:.3f}",
        )
    if vs_champion is None:
        return PromotionDecision(True, "no champion yet")
    if rule == "better" and vs_champion.low > margin:
        return PromotionDecision(True, f"beats the champion beyond noise: {vs_champion.describe('the champion')}")
    if rule == "not_worse" and vs_champion.high >= margin:
        return PromotionDecision(
            True, f"more labels, and not worse than the champion beyond noise: {vs_champion.describe('the champion')}"
        )
    needs = "its lower end above" if rule == "better" else "its upper end at"
    return PromotionDecision(
        False, f"does not beat the champion: {vs_champion.describe('the champion')}, needs {needs} {margin:.3f}"
    )


def metrics(difference: PairedDifference | None, name: str) -> dict[str, float]:
    """The comparison as MLflow metrics (`<name>_difference`, `_low`, `_high`), so runs compare in the UI."""
    if difference is None or difference.n == 0:
        return {}
    return {f"{name}_difference": difference.difference, f"{name}_low": difference.low, f"{name}_high": difference.high}
