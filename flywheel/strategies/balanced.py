"""Class-balanced uncertainty: spread the batch evenly over the predicted classes.

Plain uncertainty sampling follows the model's confusions, which on a long-tailed pool means the head
classes; a rare class can go rounds without a label. Here each predicted class gets an equal share of the
batch (counts within one of each other while every class has candidates), the odd picks go to the classes
with the fewest labels, and inside each class the most uncertain candidates are taken.
"""

from __future__ import annotations

from typing import Any

import numpy as np
import numpy.typing as npt

from flywheel.strategies.base import PoolView, Selection, check_request, ranked, require_probs
from flywheel.strategies.dedup import distinct_top
from flywheel.strategies.uncertainty import SCORERS


def class_quotas(
    available: npt.NDArray[np.integer[Any]], order: npt.NDArray[np.integer[Any]], n: int
) -> npt.NDArray[np.int64]:
    """Deal n picks one at a time over classes in `order` (round-robin), skipping a class once it has no
    candidates left. available: (C,) candidates per class. Returns (C,) picks per class, summing to n."""
    quota = np.zeros(len(available), dtype=np.int64)
    while quota.sum() < n:
        dealt = False
        for c in order:
            if quota.sum() == n:
                break
            if quota[c] < available[c]:
                quota[c] += 1
                dealt = True
        if not dealt:  # pragma: no cover - n <= candidates, checked by check_request
            break
    return quota


def levelling_quotas(
    labelled: npt.NDArray[np.integer[Any]],
    available: npt.NDArray[np.integer[Any]],
    n: int,
    tie: npt.NDArray[np.floating[Any]],
) -> npt.NDArray[np.int64]:
    """Deal n picks one at a time, each to the class with the fewest labels counting the picks dealt so far
    (ties by `tie`), skipping a class once it has no candidates left: the counts move towards level instead
    of each class getting the same share. labelled, available, tie: (C,). Returns (C,) picks per class."""
    quota = np.zeros(len(available), dtype=np.int64)
    for _ in range(n):
        level = np.where(quota < available, labelled + quota, np.iinfo(np.int64).max)
        quota[np.lexsort((tie, level))[0]] += 1
    return quota


def balanced_picks(
    pool: PoolView,
    n: int,
    rng: np.random.Generator,
    *,
    scorer: str = "margin",
    name: str = "balanced_margin",
    level: bool = False,
) -> tuple[npt.NDArray[np.int64], npt.NDArray[np.floating[Any]], npt.NDArray[np.int64], int]:
    """(indices into candidates in round-robin order, scores, picks per class, near-duplicates skipped).
    level: quotas from `levelling_quotas` (the fewest-labelled classes get more) instead of equal shares."""
    probs = require_probs(pool, name)
    p = probs[pool.candidates].astype(np.float64)
    scores = SCORERS[scorer](p)
    predicted = p.argmax(axis=1)
    n_classes = p.shape[1]
    counts = pool.labelled_counts()
    labelled = np.zeros(n_classes, dtype=np.int64) if counts is None else counts[:n_classes]
    labelled = np.pad(labelled, (0, n_classes - len(labelled)))
    tie = rng.random(n_classes)
    order = np.lexsort((tie, labelled))  # fewest labels first, ties at random
    available = np.bincount(predicted, minlength=n_classes)
    quota = levelling_quotas(labelled, available, n, tie) if level else class_quotas(available, order, n)
    per_class: list[npt.NDArray[np.integer[Any]]] = []
    dropped = 0
    for c in order:
        members = np.flatnonzero(predicted == c)
        if quota[c] == 0:
            per_class.append(members[:0])
            continue
        distinct = distinct_top(pool, members[ranked(scores[members], rng=rng)], int(quota[c]))
        per_class.append(distinct.order)
        dropped += distinct.dropped
    rounds = max(len(picks) for picks in per_class)
    chosen = np.array([picks[r] for r in range(rounds) for picks in per_class if r < len(picks)], dtype=np.int64)
    return chosen, scores[chosen], quota, dropped


def _balanced(name: str, scorer: str, pool: PoolView, n: int, rng: np.random.Generator) -> Selection:
    check_request(pool, n)
    chosen, scores, quota, dropped = balanced_picks(pool, n, rng, scorer=scorer, name=name)
    share = ", ".join(f"{c}:{q}" for c, q in enumerate(quota) if q)
    known = "labelled_targets" if pool.labelled_targets is not None else "no labelled_targets (all treated as 0)"
    note = f"; skipped {dropped} near-duplicate(s)" if dropped else ""
    description = (
        f"{name}: {n} picks spread over predicted classes (class:picks {share}), odd picks to the "
        f"classes with fewest labels ({known}); most uncertain by {scorer} within each class{note}"
    )
    return pool.pick(chosen, scores, strategy=name, description=description)


def balanced_margin(pool: PoolView, n: int, *, rng: np.random.Generator) -> Selection:
    """Equal share of the batch per predicted class; smallest margin first within each class."""
    return _balanced("balanced_margin", "margin", pool, n, rng)


def balanced_entropy(pool: PoolView, n: int, *, rng: np.random.Generator) -> Selection:
    """Equal share of the batch per predicted class; highest entropy first within each class."""
    return _balanced("balanced_entropy", "entropy", pool, n, rng)
