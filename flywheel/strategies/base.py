"""The one strategy contract: `query(pool, n, *, rng) -> Selection`.

A strategy is a pure function of arrays. It never sees models, files, servers or Prefect, so it can be
tested with hand-made arrays and reproduced from the numbers logged for a round.
"""

from __future__ import annotations

from collections.abc import Callable
from dataclasses import dataclass, field
from typing import Any

import numpy as np
import numpy.typing as npt

from flywheel.errors import FlywheelError, PoolExhaustedError


@dataclass(frozen=True)
class PoolView:
    """What a strategy may look at. Positions index the rows of `probs` and `embeddings`.

    probs: (N, C) float32, rows sum to 1, or None before any model exists (cold start).
    embeddings: (N, D) float32 or None.
    candidates: (M,) int64 positions that may be selected (unlabelled, not yet sent).
    labelled: (L,) int64 positions that already carry a label.
    labelled_targets: (L,) int class index of each entry of `labelled`, or None when unknown.
    """

    candidates: npt.NDArray[np.integer[Any]]
    labelled: npt.NDArray[np.integer[Any]] = field(default_factory=lambda: np.empty(0, dtype=np.int64))
    probs: npt.NDArray[np.floating[Any]] | None = None
    embeddings: npt.NDArray[np.floating[Any]] | None = None
    labelled_targets: npt.NDArray[np.integer[Any]] | None = None

    def __post_init__(self) -> None:
        if self.probs is not None and self.probs.ndim != 2:
            raise FlywheelError(f"probs must be (N, C), got shape {self.probs.shape}")
        if self.embeddings is not None and self.embeddings.ndim != 2:
            raise FlywheelError(f"embeddings must be (N, D), got shape {self.embeddings.shape}")
        if self.probs is not None and self.embeddings is not None and len(self.probs) != len(self.embeddings):
            raise FlywheelError(f"probs has {len(self.probs)} rows but embeddings has {len(self.embeddings)}")
        for name, rows in (("probs", self.probs), ("embeddings", self.embeddings)):
            for what, positions in (("candidate", self.candidates), ("labelled", self.labelled)):
                if rows is not None and positions.size and positions.max() >= len(rows):
                    raise FlywheelError(f"{what} position {positions.max()} outside {name} of {len(rows)} rows")
        if self.labelled_targets is not None:
            if len(self.labelled_targets) != len(self.labelled):
                raise FlywheelError(
                    f"labelled_targets has {len(self.labelled_targets)} entries but labelled has {len(self.labelled)}"
                )
            if self.labelled_targets.size and self.labelled_targets.min() < 0:
                raise FlywheelError(f"labelled_targets must be class indices >= 0, got {self.labelled_targets.min()}")

    @property
    def n_classes(self) -> int | None:
        """C from probs, else from the labelled targets (max index + 1), else None (unknown)."""
        if self.probs is not None:
            return int(self.probs.shape[1])
        if self.labelled_targets is not None and self.labelled_targets.size:
            return int(self.labelled_targets.max()) + 1
        return None

    def labelled_counts(self) -> npt.NDArray[np.int64] | None:
        """(C,) labels per class from labelled_targets, or None when the targets (or C) are unknown."""
        n_classes = self.n_classes
        if self.labelled_targets is None or n_classes is None:
            return None
        return np.bincount(self.labelled_targets.astype(np.int64), minlength=n_classes)[:n_classes]

    def pick(
        self,
        order: npt.ArrayLike,
        scores: npt.ArrayLike,
        *,
        strategy: str,
        description: str,
    ) -> Selection:
        """The candidates at offsets `order` (into `candidates`), best first, as a strategy's answer."""
        positions = self.candidates[np.asarray(order, dtype=np.int64)].astype(np.int64)
        return Selection(positions, np.asarray(scores, dtype=np.float64), strategy, description)


@dataclass(frozen=True)
class Selection:
    """positions: most informative first; scores: the strategy's score for each (higher = more wanted)."""

    positions: npt.NDArray[np.integer[Any]]
    scores: npt.NDArray[np.floating[Any]]
    strategy: str
    description: str


Strategy = Callable[..., Selection]


def check_request(pool: PoolView, n: int) -> None:
    """Shared input validation: every strategy fails the same way on the same bad request."""
    if n < 1:
        raise FlywheelError(f"n must be at least 1, got {n}")
    if len(pool.candidates) < n:
        raise PoolExhaustedError(available=len(pool.candidates), requested=n)


def require_probs(
    pool: PoolView, strategy: str, instead: str = "'random', or 'typiclust' with embeddings"
) -> npt.NDArray[np.floating[Any]]:
    """pool.probs, or a FlywheelError naming the missing input and what to use instead."""
    return _given(
        pool.probs, f"{strategy} needs model probabilities (PoolView.probs); for the cold start use {instead}"
    )


def require_embeddings(
    pool: PoolView, strategy: str, instead: str = "'margin' or 'random'"
) -> npt.NDArray[np.floating[Any]]:
    """pool.embeddings, or a FlywheelError naming the missing input and what to use instead."""
    return _given(pool.embeddings, f"{strategy} needs embeddings (PoolView.embeddings); without them use {instead}")


def _given(rows: npt.NDArray[np.floating[Any]] | None, error: str) -> npt.NDArray[np.floating[Any]]:
    if rows is None:
        raise FlywheelError(error)
    return rows


def unit_rows(x: npt.NDArray[np.floating[Any]]) -> npt.NDArray[np.float32]:
    """A float32 copy with L2-normalised rows (zero rows stay zero): cosine geometry for every strategy."""
    out = np.array(x, dtype=np.float32, copy=True)
    norms = np.linalg.norm(out, axis=1, keepdims=True)
    np.divide(out, norms, out=out, where=norms > 0)
    return out


def seed_from(rng: np.random.Generator) -> int:
    """A seed for a library (FAISS) that cannot take a Generator; drawn from rng, so still reproducible."""
    return int(rng.integers(0, 2**31 - 1))


def top_k(
    pool: PoolView, scores: npt.NDArray[np.floating[Any]], n: int, *, rng: np.random.Generator
) -> tuple[npt.NDArray[np.int64], npt.NDArray[np.floating[Any]]]:
    """Candidates with the n highest scores; ties broken at random (seeded), so equal scores are fair."""
    order = ranked(scores, rng=rng)[:n]
    return pool.candidates[order].astype(np.int64), scores[order]


def ranked(scores: npt.NDArray[np.floating[Any]], *, rng: np.random.Generator) -> npt.NDArray[np.intp]:
    """Indices of `scores`, highest first, ties broken at random (seeded)."""
    tiebreak = rng.random(len(scores))
    order: npt.NDArray[np.intp] = np.lexsort((tiebreak, -scores))  # numpy types lexsort's result as Any
    return order
