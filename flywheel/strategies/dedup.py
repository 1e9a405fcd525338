"""Near-duplicate suppression within one batch: never spend two labels on (almost) the same image.

Walk the candidates best-first and keep one unless its cosine similarity (L2-normalised embeddings) to
an already kept one exceeds a threshold; the better-ranked of two duplicates is the one kept. The pairs
come from a small similarity matrix, or from a FAISS range search when the shortlist is large.
"""

from __future__ import annotations

from dataclasses import dataclass
from typing import Any

import faiss
import numpy as np
import numpy.typing as npt

from flywheel.strategies.base import PoolView, unit_rows

# Cosine similarity above which two pool images count as the same picture (re-encodes, crops, bursts).
# Measured (bench/strategies_dedup.py, Fashion-MNIST 5k, EfficientNet-Lite0): no distinct image's nearest
# neighbour exceeds it (99th percentile 0.952); it catches 70% of brightness-changed copies and 16% of JPEG q90
# re-encodes, but not crops, shifts or JPEG q50 (median 0.87-0.88, like distinct neighbours, 0.86).
DUPLICATE_COSINE = 0.98
# Above this many shortlisted candidates the pairs come from a FAISS range search, not an S x S matrix.
_MATRIX_LIMIT = 2048


@dataclass(frozen=True)
class Distinct:
    """order: indices into the ranking kept (n of them); dropped: how many better-ranked were duplicates."""

    order: npt.NDArray[np.integer[Any]]
    dropped: int

    def note(self) -> str:
        """A clause for a Selection description ('' when nothing was dropped)."""
        if not self.dropped:
            return ""
        return f"; skipped {self.dropped} near-duplicate(s) (cosine > {DUPLICATE_COSINE}) of better-ranked picks"


def _neighbours(x: npt.NDArray[np.float32], threshold: float) -> list[npt.NDArray[np.integer[Any]]]:
    """For each unit row, the other rows whose cosine similarity exceeds threshold."""
    if len(x) <= _MATRIX_LIMIT:
        close = x @ x.T > threshold
        np.fill_diagonal(close, False)
        return [np.flatnonzero(row) for row in close]
    index = faiss.IndexFlatIP(x.shape[1])
    index.add(x)
    lims, _, ids = index.range_search(x, threshold)
    lims = lims.astype(np.int64)
    return [ids[lims[i] : lims[i + 1]][ids[lims[i] : lims[i + 1]] != i] for i in range(len(x))]


def distinct_top(
    pool: PoolView, ranking: npt.NDArray[np.integer[Any]], n: int, *, threshold: float = DUPLICATE_COSINE
) -> Distinct:
    """The first n of `ranking` (indices into pool.candidates, best first) with near-duplicates skipped.

    Without embeddings nothing can be compared, and the first n are returned as they are. If the whole
    ranking holds fewer than n distinct images, the best-ranked duplicates fill the batch.
    """
    if pool.embeddings is None or n < 2:
        return Distinct(order=ranking[:n], dropped=0)
    size = min(len(ranking), 2 * n + 16)
    while True:
        shortlist = ranking[:size]
        x = unit_rows(pool.embeddings[pool.candidates[shortlist]])
        neighbours = _neighbours(x, threshold)
        blocked = np.zeros(size, dtype=bool)
        kept: list[int] = []
        for i in range(size):
            if blocked[i]:
                continue
            kept.append(i)
            if len(kept) == n:
                break
            blocked[neighbours[i]] = True
        if len(kept) == n or size == len(ranking):
            break
        size = min(len(ranking), 2 * size)
    last = kept[-1]
    dropped = int(blocked[: last + 1].sum())
    if len(kept) < n:  # everything left is a duplicate of something kept: fill with the best of those
        fill = [i for i in range(size) if blocked[i]][: n - len(kept)]
        kept = sorted(kept + fill)
        dropped = size - n
    return Distinct(order=shortlist[np.array(kept, dtype=np.int64)], dropped=dropped)
