"""Uncertainty sampling: label what the current model is least sure about."""

from __future__ import annotations

import numpy as np

from flywheel.errors import FlywheelError
from flywheel.strategies.base import PoolView, Selection, check_request, top_k


def entropy_scores(probs: np.ndarray) -> np.ndarray:
    """Shannon entropy per row (nats). probs: (N, C), rows sum to 1."""
    clipped = np.clip(probs, 1e-12, 1.0)
    return -(probs * np.log(clipped)).sum(axis=1)


def entropy(pool: PoolView, n: int, *, rng: np.random.Generator) -> Selection:
    """The n candidates whose predicted class distribution has the highest entropy."""
    check_request(pool, n)
    if pool.probs is None:
        raise FlywheelError("entropy needs model probabilities; use 'random' for the cold start")
    scores = entropy_scores(pool.probs[pool.candidates])
    positions, picked = top_k(pool, scores, n, rng=rng)
    return Selection(
        positions=positions,
        scores=picked,
        strategy="entropy",
        description=f"top {n} of {len(pool.candidates)} candidates by predictive entropy "
        f"(picked {picked.min():.3f}..{picked.max():.3f} nats)",
    )
