"""`auto`, the default: the strategy the low-budget literature and our measurements say fits this round.

- No model yet, or fewer than LOW_BUDGET_PER_CLASS (8) labels per class: TypiClust. With a handful of
  labels the model's uncertainty is noise, and typical, spread-out examples teach it most (Hacohen et al. 2022).
- From there on: hybrid (the most uncertain candidates by margin, k-means'd in the whitened embeddings,
  the most uncertain of each cluster). With eight labels a class the head's probabilities mean something, and
  the clusters keep the batch from piling onto one confusion.
- When the labelled class counts are very uneven (the largest class has IMBALANCE_RATIO times the labels of
  the smallest), part of the batch (BALANCED_SHARE) goes to margin sampling within predicted classes, dealt
  to bring the label counts towards level (balanced.levelling_quotas: each pick to the class with the fewest
  labels so far), so a rare class is not starved.
TypiClust and hybrid's clusters use the whitened embeddings (geometry.py: top 64 principal components, each
scaled to unit variance); the balanced share keeps the raw ones (its duplicate check is calibrated on them).
The Selection's description says which was used and why, with the numbers.

Every constant here was chosen on held-out seeds of bench/strategies.py's three data sets (digits,
Fashion-MNIST, imbalanced Fashion-MNIST); on seeds 3-8, AULC 83.4 / 73.6 / 68.9 against random's 78.8 /
71.0 / 65.5. docs/selection.md keeps each alternative tried and its figures.
"""

from __future__ import annotations

import math
from typing import Any

import numpy as np
import numpy.typing as npt

from flywheel.strategies.balanced import balanced_picks
from flywheel.strategies.base import PoolView, Selection, check_request
from flywheel.strategies.baseline import random
from flywheel.strategies.diversity import typiclust_picks
from flywheel.strategies.geometry import whitened
from flywheel.strategies.hybrid import HYBRID_SHORTLIST, falcun_picks, hybrid_picks

LOW_BUDGET_PER_CLASS = 8.0  # below this many labels per class: typical picks (TypiClust); hybrid after
IMBALANCE_RATIO = 3.0  # most / fewest labels per class at or above which class balance is mixed in
BALANCED_SHARE = 0.5  # share of the batch dealt to the fewest-labelled classes when the counts are uneven


def _rest(pool: PoolView, taken: npt.NDArray[np.integer[Any]]) -> PoolView:
    """The same pool with the candidates at indices `taken` removed."""
    keep = np.ones(len(pool.candidates), dtype=bool)
    keep[taken] = False
    return PoolView(
        candidates=pool.candidates[keep],
        labelled=pool.labelled,
        probs=pool.probs,
        embeddings=pool.embeddings,
        labelled_targets=pool.labelled_targets,
    )


def auto(pool: PoolView, n: int, *, rng: np.random.Generator) -> Selection:
    """TypiClust at low budgets, hybrid after; the fewest-labelled classes served first when labels are very
    uneven."""
    check_request(pool, n)
    geometry = whitened(pool)  # distances for TypiClust and hybrid; the balanced share keeps the raw embeddings
    n_labels, n_classes = len(pool.labelled), pool.n_classes
    if pool.probs is None:
        why = f"no model yet ({n_labels} labels)"
        return _cold(geometry, n, rng, why)
    assert n_classes is not None  # probs are given, so the class count is known
    per_class = n_labels / n_classes
    budget = f"{n_labels} labels for {n_classes} classes ({per_class:.1f}/class"
    if per_class < LOW_BUDGET_PER_CLASS:
        return _cold(geometry, n, rng, f"{budget} < {LOW_BUDGET_PER_CLASS:g})")

    counts = pool.labelled_counts()
    parts_pos, parts_score, notes = [], [], []
    rest = geometry
    if counts is not None and counts.max() >= IMBALANCE_RATIO * max(counts.min(), 1):  # uneven label counts
        k = min(n, math.ceil(BALANCED_SHARE * n))
        chosen, scores, quota, _ = balanced_picks(pool, k, rng, scorer="margin", name="auto", level=True)
        parts_pos.append(pool.candidates[chosen])
        parts_score.append(scores)
        rest = _rest(geometry, chosen)
        dealt = ", ".join(f"{c}:{q}" for c, q in enumerate(quota) if q)
        notes.append(
            f"labels per class uneven ({counts.min()}..{counts.max()}, ratio >= {IMBALANCE_RATIO:g}): {k} by "
            f"balanced margin, dealt to level the counts (predicted class:picks {dealt})"
        )
    if n - sum(len(p) for p in parts_pos):
        m = n - sum(len(p) for p in parts_pos)
        if rest.embeddings is None:  # hybrid clusters embeddings: uncertainty + diversity on probabilities
            chosen, scores, _ = falcun_picks(rest, m, rng)
            notes.append(f"{m} by falcun (hybrid needs embeddings; none given)")
        else:
            chosen, scores, size = hybrid_picks(rest, m, rng)
            notes.append(
                f"{m} by hybrid (the {size} most uncertain by margin, up to {HYBRID_SHORTLIST}x the picks, "
                f"k-means'd into {m} clusters of the whitened embeddings, the most uncertain of each; margin "
                f"{scores.min():.3f}..{scores.max():.3f})"
            )
        parts_pos.append(rest.candidates[chosen])
        parts_score.append(scores)
    return Selection(
        positions=np.concatenate(parts_pos).astype(np.int64),
        scores=np.concatenate(parts_score),
        strategy="auto",
        description=f"auto: {budget} >= {LOW_BUDGET_PER_CLASS:g}): " + "; ".join(notes),
    )


def _cold(pool: PoolView, n: int, rng: np.random.Generator, why: str) -> Selection:
    """The low-budget regime: TypiClust on embeddings, random when there are none."""
    if pool.embeddings is None:
        picked = random(pool, n, rng=rng)
        return Selection(
            positions=picked.positions,
            scores=picked.scores,
            strategy="auto",
            description=f"auto: {why}: random (typiclust needs embeddings; none given)",
        )
    order, scores, k = typiclust_picks(pool, n, rng)
    description = (
        f"auto: {why}: typiclust (most typical point of each of the {n} largest least-labelled of "
        f"{k} k-means clusters of the whitened embeddings, {pool.embeddings.shape[1]} components)"
    )
    return pool.pick(order, scores, strategy="auto", description=description)
