"""The one strategy contract: `query(pool, n, *, rng) -> Selection`.

A strategy is a pure function of arrays. It never sees models, files, servers or Prefect, so it can be
tested with hand-made arrays and reproduced from the numbers logged for a round.
"""

from __future__ import annotations

from collections.abc import Callable
from dataclasses import dataclass, field

import numpy as np

from flywheel.errors import FlywheelError, PoolExhaustedError


@dataclass(frozen=True)
class PoolView:
    """What a strategy may look at. Positions index the rows of `probs` and `embeddings`.

    probs: (N, C) float32, rows sum to 1, or None before any model exists (cold start).
    embeddings: (N, D) float32 or None.
    candidates: (M,) int64 positions that may be selected (unlabelled, not yet sent).
    labelled: (L,) int64 positions that already carry a label.
    """

    candidates: np.ndarray
    labelled: np.ndarray = field(default_factory=lambda: np.empty(0, dtype=np.int64))
    probs: np.ndarray | None = None
    embeddings: np.ndarray | None = None

    def __post_init__(self) -> None:
        if self.probs is not None and self.probs.ndim != 2:
            raise FlywheelError(f"probs must be (N, C), got shape {self.probs.shape}")
        if self.candidates.size and self.probs is not None and self.candidates.max() >= len(self.probs):
            raise FlywheelError(
                f"candidate position {self.candidates.max()} outside probs of {len(self.probs)} rows"
            )


@dataclass(frozen=True)
class Selection:
    """positions: most informative first; scores: the strategy's score for each (higher = more wanted)."""

    positions: np.ndarray
    scores: np.ndarray
    strategy: str
    description: str


Strategy = Callable[..., Selection]


def check_request(pool: PoolView, n: int) -> None:
    """Shared input validation: every strategy fails the same way on the same bad request."""
    if n < 1:
        raise FlywheelError(f"n must be at least 1, got {n}")
    if len(pool.candidates) < n:
        raise PoolExhaustedError(available=len(pool.candidates), requested=n)


def top_k(
    pool: PoolView, scores: np.ndarray, n: int, *, rng: np.random.Generator
) -> tuple[np.ndarray, np.ndarray]:
    """Candidates with the n highest scores; ties broken at random (seeded), so equal scores are fair."""
    tiebreak = rng.random(len(scores))
    order = np.lexsort((tiebreak, -scores))[:n]
    return pool.candidates[order].astype(np.int64), scores[order]
