"""Diversity strategies on embeddings (cosine geometry): k-center greedy, TypiClust, ProbCover.

They need no model, so they also serve the cold start. k-center covers the space (and so likes outliers);
TypiClust and ProbCover pick typical, dense-region points, which is what helps at a handful of labels per
class (Hacohen et al. 2022, Yehuda et al. 2022).
"""

from __future__ import annotations

from typing import Any

import faiss
import numpy as np
import numpy.typing as npt
from scipy import sparse

from flywheel.strategies.base import (
    PoolView,
    Selection,
    check_request,
    require_embeddings,
    unit_rows,
)

# ------------------------------------------------------------------------------------------ shared helpers

_CHUNK = 65536  # rows per block when streaming distances over a large pool (65536 x 512 float32 = 128 MB)


def _sq_dists(
    x: npt.NDArray[np.float32], x_sq: npt.NDArray[np.float32], c: npt.NDArray[np.float32]
) -> npt.NDArray[np.float32]:
    """Squared Euclidean distances (N, K) between rows of x (with |x|^2 given) and rows of c."""
    d2: npt.NDArray[np.float32] = np.maximum(x_sq[:, None] - 2.0 * (x @ c.T) + (c * c).sum(axis=1)[None, :], 0.0)
    return d2


def kmeans(
    x: npt.NDArray[np.floating[Any]],
    k: int,
    *,
    rng: np.random.Generator,
    restarts: int = 3,
    niter: int = 20,
    per_centroid: int = 256,
) -> tuple[npt.NDArray[np.float32], npt.NDArray[np.int64]]:
    """k-means, best of `restarts` (k-means++ seeding, then Lloyd): x (N, D) -> (centroids (k, D) float32,
    assignment (N,) int64). k is capped at N. Trained on at most `per_centroid` * k rows drawn with rng;
    every row is assigned. Plain numpy: the matrix products go to BLAS, faster than FAISS's k-means here.
    """
    x = np.asarray(x, dtype=np.float32)
    k = max(1, min(k, len(x)))
    train = x if len(x) <= per_centroid * k else x[np.sort(rng.choice(len(x), per_centroid * k, replace=False))]
    runs = [_lloyd(train, k, rng, niter) for _ in range(max(1, restarts))]
    centroids = min(runs, key=lambda run: run[1])[0]
    x_sq = (x * x).sum(axis=1)
    assignment = np.concatenate(
        [_sq_dists(x[s : s + 8192], x_sq[s : s + 8192], centroids).argmin(axis=1) for s in range(0, len(x), 8192)]
    )
    return centroids, assignment.astype(np.int64)


def _lloyd(
    train: npt.NDArray[np.float32], k: int, rng: np.random.Generator, niter: int
) -> tuple[npt.NDArray[np.float32], float]:
    """One k-means run: (centroids, sum of squared distances to them)."""
    train_sq = (train * train).sum(axis=1)
    centroids = np.empty((k, train.shape[1]), dtype=np.float32)
    centroids[0] = train[int(rng.integers(len(train)))]
    nearest = _sq_dists(train, train_sq, centroids[:1])[:, 0]
    for j in range(1, k):  # k-means++: next centre drawn in proportion to squared distance
        total = nearest.sum()
        pick = int(rng.choice(len(train), p=nearest / total)) if total > 0 else int(rng.integers(len(train)))
        centroids[j] = train[pick]
        np.minimum(nearest, _sq_dists(train, train_sq, centroids[j : j + 1])[:, 0], out=nearest)
    for _ in range(niter):
        d = _sq_dists(train, train_sq, centroids)
        assignment = d.argmin(axis=1)
        counts = np.bincount(assignment, minlength=k)
        onehot = sparse.csr_matrix(
            (np.ones(len(train), dtype=np.float32), (assignment, np.arange(len(train)))), shape=(k, len(train))
        )
        sums = onehot @ train
        moved = centroids.copy()
        filled = counts > 0
        moved[filled] = (sums[filled] / counts[filled, None]).astype(np.float32)
        if not filled.all():  # an empty cluster restarts at the points worst served
            worst = np.argsort(-d[np.arange(len(train)), assignment])[: int((~filled).sum())]
            moved[~filled] = train[worst]
        if np.allclose(moved, centroids, atol=1e-6):
            break
        centroids = moved
    inertia = float(_sq_dists(train, train_sq, centroids).min(axis=1).sum())
    return centroids, inertia


def _rows(
    embeddings: npt.NDArray[np.floating[Any]], positions: npt.NDArray[np.integer[Any]], start: int, stop: int
) -> npt.NDArray[np.float32]:
    """embeddings[positions[start:stop]] as float32, without a copy when the positions are a plain range."""
    block = positions[start:stop]
    if len(block) and block[-1] - block[0] == len(block) - 1 and (np.diff(block) == 1).all():
        return np.asarray(embeddings[block[0] : block[-1] + 1], dtype=np.float32)
    return np.asarray(embeddings[block], dtype=np.float32)


def _update_nearest(
    embeddings: npt.NDArray[np.floating[Any]],
    positions: npt.NDArray[np.integer[Any]],
    inv_norms: npt.NDArray[np.float32],
    centers: npt.NDArray[np.float32],
    best: npt.NDArray[np.float32],
) -> None:
    """best[i] = max(best[i], cosine(row i, any of centers)); centers are unit rows. Streams in blocks."""
    for start in range(0, len(positions), _CHUNK):
        stop = min(start + _CHUNK, len(positions))
        sims = _rows(embeddings, positions, start, stop) @ centers.T
        np.maximum(best[start:stop], sims.max(axis=1) * inv_norms[start:stop], out=best[start:stop])


def _chord(similarity: npt.NDArray[np.floating[Any]] | float) -> npt.NDArray[np.float64]:
    """Euclidean distance between unit vectors from their cosine similarity."""
    chord: npt.NDArray[np.float64] = np.sqrt(np.maximum(0.0, 2.0 - 2.0 * np.asarray(similarity, dtype=np.float64)))
    return chord


# ------------------------------------------------------------------------------------------------ k-center


def _inverse_norms(
    embeddings: npt.NDArray[np.floating[Any]], positions: npt.NDArray[np.integer[Any]]
) -> npt.NDArray[np.float32]:
    """1 / |row| of embeddings[positions] (float32), streamed in blocks: turns row products into cosines."""
    m = len(positions)
    inv_norms = np.empty(m, dtype=np.float32)
    for start in range(0, m, _CHUNK):
        norms = np.linalg.norm(_rows(embeddings, positions, start, min(start + _CHUNK, m)), axis=1)
        inv_norms[start : start + len(norms)] = 1.0 / np.maximum(norms, 1e-12)
    return inv_norms


def _most_central(
    embeddings: npt.NDArray[np.floating[Any]],
    positions: npt.NDArray[np.integer[Any]],
    *,
    inv_norms: npt.NDArray[np.float32],
) -> int:
    """Index into positions of the row nearest the mean direction of them all: the most central point,
    where k-center starts when nothing is labelled (its farthest-first rule would start at an outlier)."""
    m = len(positions)
    mean = np.zeros(embeddings.shape[1], dtype=np.float64)
    for start in range(0, m, _CHUNK):
        stop = min(start + _CHUNK, m)
        mean += (_rows(embeddings, positions, start, stop) * inv_norms[start:stop, None]).sum(axis=0)
    toward_mean = np.full(m, -np.inf, dtype=np.float32)
    _update_nearest(embeddings, positions, inv_norms, unit_rows(mean[None, :].astype(np.float32)), toward_mean)
    return int(np.argmax(toward_mean))


def kcenter_greedy(
    embeddings: npt.NDArray[np.floating[Any]],
    candidates: npt.NDArray[np.integer[Any]],
    labelled: npt.NDArray[np.integer[Any]],
    n: int,
    *,
    shortlist: int = 8192,
) -> tuple[npt.NDArray[np.int64], npt.NDArray[np.float64]]:
    """Greedy k-center (core-set) in cosine geometry: (indices into candidates, max-min distance at pick).

    Each pick is the candidate farthest from its nearest centre (labelled points and earlier picks).
    With no labelled set the first pick is the candidate nearest the mean direction of all candidates
    (the most central point, not an outlier), scored 2.0, the largest chord on the unit sphere.

    Exact, yet it scans a large pool only a few times: distances only shrink as centres are added, so
    while the farthest of the `shortlist` farthest candidates is still at least as far as the
    shortlist's cut-off, it is the farthest of all. Picks are made inside the shortlist until that bound
    fails, then the whole pool is updated once with all of them (one matrix product, streamed in blocks).
    """
    m = len(candidates)
    inv_norms = _inverse_norms(embeddings, candidates)
    best = np.full(m, -np.inf, dtype=np.float32)  # cosine similarity to the nearest centre
    for start in range(0, len(labelled), 4096):
        _update_nearest(embeddings, candidates, inv_norms, unit_rows(embeddings[labelled[start : start + 4096]]), best)

    picks: list[int] = []
    scores: list[float] = []
    if not len(labelled):
        picks.append(_most_central(embeddings, candidates, inv_norms=inv_norms))
        scores.append(2.0)
    pending = list(picks)
    while len(picks) < n:
        if pending:
            _update_nearest(embeddings, candidates, inv_norms, unit_rows(embeddings[candidates[pending]]), best)
            pending = []
        size = min(m, max(shortlist, 4 * (n - len(picks))))
        if size < m:
            part = np.argpartition(best, size)
            short, cutoff = part[:size], best[part[size]]  # everyone outside is at least this similar
        else:
            short, cutoff = np.arange(m), np.inf
        local = best[short].copy()
        local[np.isin(short, picks)] = np.inf
        x_short = unit_rows(_rows(embeddings, candidates[short], 0, size))
        while len(picks) < n:
            j = int(np.argmin(local))
            if local[j] > cutoff:  # someone outside the shortlist may now be farther: rescan the pool
                break
            picks.append(int(short[j]))
            scores.append(float(_chord(local[j])))
            pending.append(int(short[j]))
            np.maximum(local, x_short @ x_short[j], out=local)
            local[j] = np.inf
    return np.array(picks, dtype=np.int64), np.array(scores)


def kcenter(pool: PoolView, n: int, *, rng: np.random.Generator) -> Selection:
    """Greedy k-center over the embeddings: each pick is the candidate farthest from everything chosen."""
    check_request(pool, n)
    embeddings = require_embeddings(pool, "kcenter", instead="'random' (no embeddings) or 'margin' (probabilities)")
    order, scores = kcenter_greedy(embeddings, pool.candidates, pool.labelled, n)
    start = "the candidate nearest the mean direction" if not len(pool.labelled) else f"{len(pool.labelled)} labelled"
    description = (
        f"greedy k-center: {n} of {len(pool.candidates)} candidates, each farthest (cosine chord) from "
        f"the chosen so far, starting from {start}; max-min distance {scores[-1]:.3f} at the last pick"
    )
    return pool.pick(order, scores, strategy="kcenter", description=description)


# ------------------------------------------------------------------------------------------------ TypiClust

TYPICLUST_NEIGHBOURS = 5  # typicality = 1 / mean distance to this many nearest neighbours in the cluster
# (5, as scikit-activeml; 20 before: digits 5 seeds typiclust +3.0 over random with 20 and the old cluster
# order, +3.3 with 5 and uncovered clusters first; within the noise, but not worse)
TYPICLUST_MAX_CLUSTERS = 500  # as in the paper: more clusters than this buys nothing on large pools
TYPICLUST_MIN_CLUSTER = 5  # once all clusters hold a label, ones smaller than this are used only when nothing
# else is left


def typicality(x: npt.NDArray[np.floating[Any]], k: int = TYPICLUST_NEIGHBOURS) -> npt.NDArray[np.floating[Any]]:
    """1 / mean Euclidean distance to the k nearest other rows of x (N, D); a lone row gets 1."""
    if len(x) < 2:
        return np.ones(len(x))
    k = min(k, len(x) - 1)
    index = faiss.IndexFlatL2(x.shape[1])
    index.add(np.ascontiguousarray(x, dtype=np.float32))
    squared, _ = index.search(np.ascontiguousarray(x, dtype=np.float32), k + 1)  # first hit is the row itself
    mean_distance: npt.NDArray[np.float32] = np.sqrt(np.maximum(squared[:, 1:], 0.0)).mean(axis=1)
    return 1.0 / (mean_distance + 1e-8)


def typiclust_picks(
    pool: PoolView, n: int, rng: np.random.Generator
) -> tuple[npt.NDArray[np.int64], npt.NDArray[np.float64], int]:
    """(indices into candidates, typicality of each, number of clusters). See `typiclust`."""
    embeddings = require_embeddings(pool, "typiclust", instead="'random'")
    positions = np.union1d(pool.candidates, pool.labelled).astype(np.int64)
    x = unit_rows(embeddings[positions])
    k = min(len(pool.labelled) + n, TYPICLUST_MAX_CLUSTERS, len(positions))
    _, assignment = kmeans(x, k, rng=rng)
    size = np.bincount(assignment, minlength=k)
    is_labelled = np.isin(positions, pool.labelled)
    covered = np.bincount(assignment[is_labelled], minlength=k)
    candidate_at = {int(p): i for i, p in enumerate(pool.candidates)}
    members = [np.flatnonzero(assignment == c) for c in range(k)]
    typical: dict[int, npt.NDArray[np.floating[Any]]] = {}
    available = np.array([(~is_labelled[mem]).sum() for mem in members])
    tiebreak = rng.random(k)
    picks, scores = [], []
    for _ in range(n):
        # clusters without a label first, biggest first, whatever their size (as in the paper and
        # scikit-activeml); once every cluster holds a label: fewest labels, then biggest, tiny clusters last
        uncovered = (available > 0) & (covered == 0)
        if uncovered.any():
            c = int(np.lexsort((tiebreak, -size, ~uncovered))[0])
        else:
            usable = (available > 0) & (size >= TYPICLUST_MIN_CLUSTER)
            if not usable.any():
                usable = available > 0
            c = int(np.lexsort((tiebreak, -size, covered, ~usable))[0])
        mem = members[c]
        if c not in typical:
            typical[c] = typicality(x[mem])
        t = np.where(is_labelled[mem], -np.inf, typical[c])
        j = int(np.argmax(t))
        picks.append(candidate_at[int(positions[mem[j]])])
        scores.append(float(t[j]))
        is_labelled[mem[j]] = True  # taken: not again
        typical[c][j] = -np.inf
        available[c] -= 1
        covered[c] += 1
    return np.array(picks, dtype=np.int64), np.array(scores), k


def typiclust(pool: PoolView, n: int, *, rng: np.random.Generator) -> Selection:
    """TypiClust: k-means into (labelled + n) clusters; from the largest clusters holding no label (then the fewest),
    the most typical point (densest neighbourhood). Pure representativeness: the low-budget choice."""
    check_request(pool, n)
    order, scores, k = typiclust_picks(pool, n, rng)
    description = (
        f"typiclust: {k} k-means clusters over {len(pool.candidates) + len(pool.labelled)} points; "
        f"the most typical point ({TYPICLUST_NEIGHBOURS}-NN density) of each of the {n} largest least-labelled "
        "clusters"
    )
    return pool.pick(order, scores, strategy="typiclust", description=description)


# ------------------------------------------------------------------------------------------------ ProbCover

PROBCOVER_PURITY = 0.95  # the ball radius is the largest at which this share of balls stay in one k-means cluster
PROBCOVER_DEFAULT_CLUSTERS = 10  # k-means clusters for the purity test when the number of classes is unknown
_PURITY_SAMPLE = 2000  # points whose nearest other-cluster distance sets the radius


def probcover_radius(x: npt.NDArray[np.float32], n_clusters: int, rng: np.random.Generator) -> float:
    """Largest ball radius delta at which >= PROBCOVER_PURITY of balls hold points of one k-means cluster only.

    A ball around point i is pure while delta < r_i, its distance to the nearest point of another cluster,
    so the radius is the (1 - purity) quantile of r_i, estimated on a sample of points.
    """
    _, assignment = kmeans(x, n_clusters, rng=rng)
    if len(np.unique(assignment)) < 2:
        return float(np.sqrt(2.0))
    sample = rng.choice(len(x), size=min(len(x), _PURITY_SAMPLE), replace=False)
    nearest_other = np.empty(len(sample))
    for start in range(0, len(sample), 512):
        rows = sample[start : start + 512]
        sims = x[rows] @ x.T
        sims[assignment[rows][:, None] == assignment[None, :]] = -np.inf
        nearest_other[start : start + len(rows)] = _chord(sims.max(axis=1))
    return float(np.quantile(nearest_other, 1.0 - PROBCOVER_PURITY))


def probcover(pool: PoolView, n: int, *, rng: np.random.Generator) -> Selection:
    """ProbCover: pick the candidates whose radius-delta balls cover the most points not yet covered by a
    labelled point or an earlier pick (greedy max coverage). Delta comes from a cluster-purity test."""
    check_request(pool, n)
    embeddings = require_embeddings(pool, "probcover", instead="'random'")
    positions = np.union1d(pool.candidates, pool.labelled).astype(np.int64)
    x = unit_rows(embeddings[positions])
    n_clusters = pool.n_classes or PROBCOVER_DEFAULT_CLUSTERS
    delta = probcover_radius(x, n_clusters, rng)
    index = faiss.IndexFlatIP(x.shape[1])
    index.add(x)
    lims, _, ids = index.range_search(x, float(1.0 - delta**2 / 2.0) - 1e-6)  # chord <= delta <=> cos >= 1-d^2/2
    lims = lims.astype(np.int64)
    rows = np.repeat(np.arange(len(x)), np.diff(lims))
    ball = sparse.csr_matrix((np.ones(len(ids), dtype=np.float32), (rows, ids)), shape=(len(x), len(x)))
    row_of = np.searchsorted(positions, pool.candidates)
    uncovered = np.ones(len(x), dtype=np.float32)
    labelled_rows = np.searchsorted(positions, pool.labelled)
    if len(labelled_rows):
        uncovered[np.asarray(ball[labelled_rows].sum(axis=0)).ravel() > 0] = 0.0
    taken = np.zeros(len(pool.candidates), dtype=bool)
    picks, scores, fallback = [], [], 0
    cand_ball = ball[row_of]
    for _ in range(n):
        gain = np.asarray(cand_ball @ uncovered).ravel()
        gain[taken] = -1.0
        if gain.max() <= 0:  # everything is covered: the rest of the batch at random
            fallback += 1
            j = int(rng.choice(np.flatnonzero(~taken)))
        else:
            best = np.flatnonzero(gain == gain.max())
            j = int(best[0] if len(best) == 1 else rng.choice(best))
        picks.append(j)
        scores.append(max(float(gain[j]), 0.0))
        taken[j] = True
        uncovered[cand_ball[j].indices] = 0.0
    note = f"; pool fully covered, {fallback} pick(s) at random" if fallback else ""
    description = (
        f"probcover: radius {delta:.3f} (cosine chord; {PROBCOVER_PURITY:.0%} of balls pure over "
        f"{n_clusters} k-means clusters); greedy max coverage, picks cover {int(sum(scores))} new points, "
        f"{int(uncovered.sum())} of {len(x)} still uncovered{note}"
    )
    return pool.pick(picks, scores, strategy="probcover", description=description)
