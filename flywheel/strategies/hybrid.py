"""Uncertainty and diversity together: `hybrid` (uncertainty shortlist, then clusters) and `falcun`.

Pure uncertainty fills a batch with near-identical confusions; pure diversity spends labels on what the
model already knows. Both strategies here take the uncertain part of the pool and spread the batch over it.
"""

from __future__ import annotations

from typing import Any

import numpy as np
import numpy.typing as npt

from flywheel.strategies.base import (
    PoolView,
    Selection,
    check_request,
    ranked,
    require_embeddings,
    require_probs,
    unit_rows,
)
from flywheel.strategies.diversity import kmeans
from flywheel.strategies.uncertainty import margin_scores

# ---------------------------------------------------------------------------------------------------- hybrid

HYBRID_SHORTLIST = 10  # the shortlist holds this many times n of the most uncertain (margin) candidates


def hybrid_picks(
    pool: PoolView, n: int, rng: np.random.Generator, *, shortlist: int = HYBRID_SHORTLIST
) -> tuple[npt.NDArray[np.intp], npt.NDArray[np.floating[Any]], int]:
    """(indices into candidates, margin score of each, shortlist size). See `hybrid`."""
    probs = require_probs(pool, "hybrid")
    embeddings = require_embeddings(pool, "hybrid", instead="'margin' or 'falcun' (probabilities only)")
    unc = margin_scores(probs[pool.candidates].astype(np.float64))
    order = ranked(unc, rng=rng)
    size = min(len(order), shortlist * n)
    short = order[:size]
    _, assignment = kmeans(unit_rows(embeddings[pool.candidates[short]]), n, rng=rng, restarts=1)
    # from each cluster its most uncertain member (the shortlist is sorted, so the first one seen)
    _, first_in_cluster = np.unique(assignment, return_index=True)
    chosen = short[np.sort(first_in_cluster)]
    if len(chosen) < n:  # fewer non-empty clusters than n (duplicates): the next most uncertain fill up
        rest = order[~np.isin(order, chosen)]
        chosen = np.concatenate([chosen, rest[: n - len(chosen)]])
    chosen = chosen[ranked(unc[chosen], rng=rng)]
    return chosen, unc[chosen], size


def hybrid(pool: PoolView, n: int, *, rng: np.random.Generator) -> Selection:
    """The HYBRID_SHORTLIST x n most uncertain candidates (margin), k-means'd into n clusters on the
    embeddings; the most uncertain member of each cluster is picked."""
    check_request(pool, n)
    chosen, scores, size = hybrid_picks(pool, n, rng)
    description = (
        f"hybrid: shortlist of the {size} most uncertain (margin) of {len(pool.candidates)} "
        f"candidates, k-means into {n} clusters on embeddings, the most uncertain of each "
        f"(margin {scores.min():.3f}..{scores.max():.3f})"
    )
    return pool.pick(chosen, scores, strategy="hybrid", description=description)


# ---------------------------------------------------------------------------------------------------- falcun

FALCUN_GAMMA = 10.0  # relevance = (uncertainty + distance) ** gamma: large gamma = nearly greedy
FALCUN_SHORTLIST = 20000  # on larger pools only this many most-uncertain candidates are considered


def falcun_picks(
    pool: PoolView,
    n: int,
    rng: np.random.Generator,
    *,
    gamma: float = FALCUN_GAMMA,
    shortlist: int = FALCUN_SHORTLIST,
) -> tuple[npt.NDArray[np.intp], npt.NDArray[np.float64], int]:
    """(indices into candidates, relevance (u + d) at pick time, candidates considered). See `falcun`."""
    probs = require_probs(pool, "falcun")
    p = probs[pool.candidates].astype(np.float64)
    unc = margin_scores(p)
    considered: npt.NDArray[np.intp] = np.arange(len(p))
    if len(p) > max(shortlist, n):
        considered = ranked(unc, rng=rng)[: max(shortlist, n)]
    p, u = p[considered], unc[considered]
    nearest = np.full(len(p), np.inf)  # L1 distance in probability space to the nearest pick
    dist: npt.NDArray[np.float64] = np.zeros(len(p))
    taken = np.zeros(len(p), dtype=bool)
    picks: list[int] = []
    scores: list[float] = []
    for _ in range(n):
        if picks:
            nearest = np.minimum(nearest, np.abs(p - p[picks[-1]]).sum(axis=1))
            span = nearest[~taken].max() - nearest[~taken].min()
            dist = (nearest - nearest[~taken].min()) / span if span > 0 else np.zeros(len(p))
        relevance = np.where(taken, 0.0, (u + dist) ** gamma)
        total = relevance.sum()
        weight = relevance / total if total > 0 else (~taken) / (~taken).sum()
        j = int(rng.choice(len(p), p=weight))
        picks.append(j)
        scores.append(float(u[j] + dist[j]))
        taken[j] = True
    return considered[np.array(picks, dtype=np.int64)], np.array(scores), len(p)


def falcun(pool: PoolView, n: int, *, rng: np.random.Generator) -> Selection:
    """FALCUN (Gilhuber et al. 2023), our implementation: picks drawn one at a time with probability
    proportional to (margin uncertainty + distance to the nearest pick so far, both in [0, 1]) ** gamma,
    the distance measured between predicted class distributions (L1), rescaled to [0, 1] each step."""
    check_request(pool, n)
    chosen, scores, considered = falcun_picks(pool, n, rng)
    scope = f"the {considered} most uncertain of " if considered < len(pool.candidates) else ""
    description = (
        f"falcun: {n} drawn from {scope}{len(pool.candidates)} candidates with probability ~ "
        f"(margin uncertainty + probability-space distance to earlier picks) ** {FALCUN_GAMMA:g}"
    )
    return pool.pick(chosen, scores, strategy="falcun", description=description)
