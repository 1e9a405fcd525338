"""Cross-validation of the linear head on the labelled set: a learning curve and out-of-fold probabilities.

One pass serves two readers. The forecast (flywheel.insight.forecast) fits a learning curve to the accuracy of heads
trained on growing subsets of the training folds; the label review (flywheel.insight.review) needs probabilities from
models that never saw the label they judge, which the largest size (all other folds) gives for every label.
"""

from __future__ import annotations

from dataclasses import dataclass
from typing import Any

import numpy as np
import numpy.typing as npt

from flywheel.errors import DataError
from flywheel.simulation.core import single_threaded_torch
from flywheel.training.head import predict_proba, train_head


@dataclass(frozen=True)
class CrossValidation:
    """sizes: (S,) training labels per fit, ascending; accuracy: (S, K) held-out-fold accuracy per size and fold;
    probs: (N, C) float32 out-of-fold probabilities of every labelled row from the largest size."""

    sizes: npt.NDArray[np.int64]
    accuracy: npt.NDArray[np.float64]
    probs: npt.NDArray[np.float32]


def stratified_folds(targets: npt.NDArray[np.integer[Any]], k: int, rng: np.random.Generator) -> npt.NDArray[np.int64]:
    """(N,) fold index in [0, k): each class's rows shuffled and dealt round-robin, so folds share classes evenly."""
    folds = np.empty(len(targets), dtype=np.int64)
    offset = 0
    for c in np.unique(targets):
        rows = rng.permutation(np.flatnonzero(targets == c))
        folds[rows] = (np.arange(len(rows)) + offset) % k
        offset += len(rows)  # the next class starts where this one stopped: fold sizes stay within one
    return folds


def curve_sizes(n_full: int, *, n_sizes: int, smallest: int) -> npt.NDArray[np.int64]:
    """Up to n_sizes training-set sizes, geometrically spaced from `smallest` to n_full (both included)."""
    smallest = max(1, min(smallest, n_full))
    if n_sizes <= 1:
        return np.array([n_full], dtype=np.int64)
    return np.unique(np.round(np.geomspace(smallest, n_full, n_sizes)).astype(np.int64))


def cross_validate(
    features: npt.NDArray[np.floating[Any]],
    targets: npt.NDArray[np.integer[Any]],
    n_classes: int,
    *,
    folds: int = 5,
    n_sizes: int = 6,
    l2: float,
    seed: int,
) -> CrossValidation:
    """K-fold CV of the head at n_sizes training sizes (the smallest: one label per class, at least 8).

    features: (N, D) float32 of labelled rows; targets: (N,) class indices. A subset of a given size is drawn
    (seeded) from the other folds; the largest size is all of them, whose predictions become `probs`.
    """
    n = len(targets)
    if len(features) != n:
        raise DataError(f"features has {len(features)} rows but targets has {n}")
    if folds < 2:
        raise DataError(f"cross-validation needs at least 2 folds, got {folds}")
    if n < 2 * folds:
        raise DataError(f"{n} labels are too few for {folds}-fold cross-validation (need at least {2 * folds})")
    rng = np.random.default_rng([seed, n])
    fold_of = stratified_folds(targets, folds, rng)
    n_full = int(min(np.sum(fold_of != k) for k in range(folds)))
    sizes = curve_sizes(n_full, n_sizes=n_sizes, smallest=max(n_classes, 8))
    accuracy = np.zeros((len(sizes), folds))
    probs = np.zeros((n, n_classes), dtype=np.float32)
    with single_threaded_torch():
        for k in range(folds):
            train, test = np.flatnonzero(fold_of != k), np.flatnonzero(fold_of == k)
            order = rng.permutation(train)  # nested subsets: each size adds to the previous one
            for s, size in enumerate(sizes):
                rows = train if s == len(sizes) - 1 else order[:size]
                head = train_head(features[rows], targets[rows], n_classes, l2=l2, seed=seed)
                p = predict_proba(head, features[test])
                accuracy[s, k] = float((p.argmax(1) == targets[test]).mean())
                if s == len(sizes) - 1:
                    probs[test] = p
    return CrossValidation(sizes=sizes, accuracy=accuracy, probs=probs)
