"""Uncertainty sampling: label what the current model is least sure about.

Each strategy is a scorer (higher = less sure) plus a selector: the top n candidates, with near-duplicates
within the batch skipped when embeddings are present (uncertain images come in look-alike bunches).
"""

from __future__ import annotations

from typing import Any

import numpy as np
import numpy.typing as npt

from flywheel.strategies.base import PoolView, Selection, check_request, ranked, require_probs
from flywheel.strategies.dedup import distinct_top


def least_confidence_scores(probs: npt.NDArray[np.floating[Any]]) -> npt.NDArray[np.floating[Any]]:
    """1 - max_c p(c) per row. probs: (N, C), rows sum to 1."""
    top: npt.NDArray[np.floating[Any]] = probs.max(axis=1)
    return 1.0 - top


def margin_scores(probs: npt.NDArray[np.floating[Any]]) -> npt.NDArray[np.floating[Any]]:
    """1 - (p(top class) - p(runner-up)) per row: 1 at a tie, 0 when certain. probs: (N, C), C >= 2."""
    if probs.shape[1] < 2:
        return np.zeros(len(probs))
    top2 = -np.partition(-probs, 1, axis=1)[:, :2]
    return 1.0 - (top2[:, 0] - top2[:, 1])


def entropy_scores(probs: npt.NDArray[np.floating[Any]]) -> npt.NDArray[np.floating[Any]]:
    """Shannon entropy per row (nats). probs: (N, C), rows sum to 1."""
    clipped = np.clip(probs, 1e-12, 1.0)
    plogp: npt.NDArray[np.floating[Any]] = (probs * np.log(clipped)).sum(axis=1)
    return -plogp


SCORERS = {"least_confidence": least_confidence_scores, "margin": margin_scores, "entropy": entropy_scores}
_WHAT = {
    "least_confidence": "1 - max probability",
    "margin": "1 - (top-1 minus top-2 probability)",
    "entropy": "predictive entropy (nats)",
}


def _uncertainty(name: str, pool: PoolView, n: int, rng: np.random.Generator) -> Selection:
    check_request(pool, n)
    probs = require_probs(pool, name)
    scores = SCORERS[name](probs[pool.candidates].astype(np.float64))
    distinct = distinct_top(pool, ranked(scores, rng=rng), n)
    picked = scores[distinct.order]
    return pool.pick(
        distinct.order,
        picked,
        strategy=name,
        description=f"top {n} of {len(pool.candidates)} candidates by {_WHAT[name]} "
        f"(picked {picked.min():.3f}..{picked.max():.3f}){distinct.note()}",
    )


def least_confidence(pool: PoolView, n: int, *, rng: np.random.Generator) -> Selection:
    """The n candidates whose most likely class has the lowest probability."""
    return _uncertainty("least_confidence", pool, n, rng)


def margin(pool: PoolView, n: int, *, rng: np.random.Generator) -> Selection:
    """The n candidates with the smallest gap between the two most likely classes."""
    return _uncertainty("margin", pool, n, rng)


def entropy(pool: PoolView, n: int, *, rng: np.random.Generator) -> Selection:
    """The n candidates whose predicted class distribution has the highest entropy."""
    return _uncertainty("entropy", pool, n, rng)
