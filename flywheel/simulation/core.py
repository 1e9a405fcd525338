"""Pool-based active learning with an oracle: the loop behind `flywheel simulate` and bench/strategies.

Everything here is a pure function of arrays (features, targets, class names); no files, servers or
models leave this module. Per seed: a stratified 30% test split is held out, the same seeded initial
labels (per class) start every strategy, and then each round the head is trained on the labelled set,
evaluated on the test split, and the strategy picks the next `batch_size` positions, whose labels the
oracle (the known targets) adds.

Index spaces: a seed's PoolView positions index the rows of that seed's training split (`train`), i.e.
`features[train]`; they are converted to dataset rows nowhere else.
"""

from __future__ import annotations

import math
import time
import zlib
from collections.abc import Callable, Iterator, Mapping, Sequence
from contextlib import contextmanager
from dataclasses import dataclass
from typing import Any, TypedDict

import numpy as np
import numpy.typing as npt
import torch

from flywheel.errors import DataError, FlywheelError
from flywheel.strategies import PoolView, Selection, Strategy, get_strategy
from flywheel.training.head import predict_proba, train_head

TEST_FRACTION = 0.3
# (strategy, seed, budget) after each evaluation: lets the CLI drive a progress bar.
StepCallback = Callable[[str, int, int], None]


@dataclass(frozen=True)
class Split:
    """Dataset rows of one seed's training pool and test set, and the initial labelled pool positions."""

    train: npt.NDArray[np.int64]  # (n_train,) dataset rows
    test: npt.NDArray[np.int64]  # (n_test,) dataset rows
    initial: npt.NDArray[np.int64]  # (n_initial,) positions into `train`


class SeedCurve(TypedDict):
    """One strategy on one seed (`run_curve`): test accuracies per budget, and each selection's description."""

    accuracy: list[float]
    balanced_accuracy: list[float]
    descriptions: list[str]


def stratified_split(
    targets: npt.NDArray[np.integer[Any]], *, test_fraction: float, rng: np.random.Generator
) -> tuple[npt.NDArray[np.int64], npt.NDArray[np.int64]]:
    """Per class, round(test_fraction * n_c) rows go to test, but a class always keeps one training row.

    targets: (N,) int. Returns (train rows, test rows), each sorted.
    """
    train, test = [], []
    for c in np.unique(targets):
        rows = rng.permutation(np.flatnonzero(targets == c))
        n_test = min(int(round(test_fraction * len(rows))), len(rows) - 1)
        test.append(rows[:n_test])
        train.append(rows[n_test:])
    return np.sort(np.concatenate(train)).astype(np.int64), np.sort(np.concatenate(test)).astype(np.int64)


def initial_positions(
    train_targets: npt.NDArray[np.integer[Any]], per_class: int, rng: np.random.Generator
) -> npt.NDArray[np.int64]:
    """Up to `per_class` random positions of each class (a class with fewer rows gives all it has)."""
    picks = [
        rng.choice(
            np.flatnonzero(train_targets == c), size=min(per_class, int((train_targets == c).sum())), replace=False
        )
        for c in np.unique(train_targets)
    ]
    return np.sort(np.concatenate(picks)).astype(np.int64)


def make_split(
    targets: npt.NDArray[np.integer[Any]], seed: int, *, initial_per_class: int, test_fraction: float = TEST_FRACTION
) -> Split:
    rng = np.random.default_rng([seed, 0])
    train, test = stratified_split(targets, test_fraction=test_fraction, rng=rng)
    return Split(train=train, test=test, initial=initial_positions(targets[train], initial_per_class, rng))


def budget_schedule(n_initial: int, *, batch_size: int, max_budget: int, n_train: int) -> list[int]:
    """n_initial, then + batch_size per round, up to min(max_budget, n_train) (the last step may be short)."""
    top = min(max_budget, n_train)
    budgets = [n_initial]
    while budgets[-1] < top:
        budgets.append(min(budgets[-1] + batch_size, top))
    return budgets


def balanced_accuracy(probs: npt.NDArray[np.floating[Any]], targets: npt.NDArray[np.integer[Any]]) -> float:
    """Mean per-class recall over the classes present in `targets` (sklearn's balanced accuracy)."""
    predicted = probs.argmax(axis=1)
    return float(np.mean([(predicted[targets == c] == c).mean() for c in np.unique(targets)]))


def labels_to_reach(budgets: Sequence[int], accuracy: Sequence[float], target: float) -> int | None:
    """The first budget whose accuracy reaches `target`, or None."""
    return next((int(b) for b, a in zip(budgets, accuracy, strict=True) if a >= target), None)


def resolve_strategies(strategies: Sequence[str] | Mapping[str, Strategy]) -> dict[str, Strategy]:
    """Names are looked up in the registry (a bad name lists the choices); a mapping is taken as given."""
    if isinstance(strategies, Mapping):
        resolved = dict(strategies)
    else:
        resolved = {name: get_strategy(name) for name in strategies}
    if not resolved:
        raise FlywheelError("no strategies to simulate")
    return resolved


def _check_inputs(
    features: npt.NDArray[np.floating[Any]],
    targets: npt.NDArray[np.integer[Any]],
    classes: Sequence[str],
    initial_per_class: int,
    budget_per_class: int,
    batch_size: int,
) -> None:
    if features.ndim != 2 or len(features) != len(targets):
        raise DataError(f"features must be (N, D) with N = len(targets) = {len(targets)}, got {features.shape}")
    if len(targets) and (targets.min() < 0 or targets.max() >= len(classes)):
        raise DataError(f"targets must lie in [0, {len(classes)}), got {targets.min()}..{targets.max()}")
    if len(np.unique(targets)) < 2:
        raise DataError(f"need at least 2 classes with images, got {len(np.unique(targets))}")
    if initial_per_class < 1:
        raise FlywheelError(f"initial_per_class must be at least 1, got {initial_per_class}")
    if budget_per_class < initial_per_class:
        raise FlywheelError(f"budget_per_class ({budget_per_class}) is below initial_per_class ({initial_per_class})")
    if batch_size < 1:
        raise FlywheelError(f"batch_size must be at least 1, got {batch_size}")


@contextmanager
def single_threaded_torch() -> Iterator[None]:
    """Head fits on a few hundred rows are overhead-bound: one intra-op thread avoids spin contention
    (measured on 2 cores: 0.09 s per 200-label fit with 1 thread, ~1 s with 2 while anything else runs)."""
    before = torch.get_num_threads()
    torch.set_num_threads(1)
    try:
        yield
    finally:
        torch.set_num_threads(before)


def _strategy_rng(seed: int, name: str) -> np.random.Generator:
    return np.random.default_rng([seed, zlib.crc32(name.encode())])


def run_curve(
    strategy: Strategy,
    name: str,
    features: npt.NDArray[np.floating[Any]],
    targets: npt.NDArray[np.integer[Any]],
    split: Split,
    budgets: Sequence[int],
    *,
    n_classes: int,
    seed: int,
    l2: float,
    train_features: npt.NDArray[np.floating[Any]] | None = None,
    on_step: StepCallback | None = None,
) -> SeedCurve:
    """One strategy, one seed: accuracy and balanced accuracy on the test split at each budget.

    `train_features` (= features[split.train]) may be passed so every strategy of a seed shares one array.
    """
    x_train = features[split.train] if train_features is None else train_features
    y_train, x_test, y_test = targets[split.train], features[split.test], targets[split.test]
    labelled = split.initial.copy()
    is_labelled = np.zeros(len(split.train), dtype=bool)
    is_labelled[labelled] = True
    rng = _strategy_rng(seed, name)
    out: SeedCurve = {"accuracy": [], "balanced_accuracy": [], "descriptions": []}
    for step, budget in enumerate(budgets):
        if len(labelled) != budget:  # pragma: no cover - guarded by the selection checks below
            raise FlywheelError(f"{name}: {len(labelled)} labels at a budget of {budget}")
        head = train_head(x_train[labelled], y_train[labelled], n_classes, l2=l2, seed=seed)
        test_probs = predict_proba(head, x_test)
        out["accuracy"].append(float((test_probs.argmax(1) == y_test).mean()))
        out["balanced_accuracy"].append(balanced_accuracy(test_probs, y_test))
        if on_step is not None:
            on_step(name, seed, budget)
        if step + 1 == len(budgets):
            break
        n = budgets[step + 1] - budget
        pool = PoolView(
            candidates=np.flatnonzero(~is_labelled).astype(np.int64),
            labelled=labelled,
            probs=predict_proba(head, x_train),
            embeddings=x_train,
            labelled_targets=y_train[labelled],
        )
        selection: Selection = strategy(pool, n, rng=rng)
        picked = np.asarray(selection.positions, dtype=np.int64)
        if len(picked) != n or len(np.unique(picked)) != n or is_labelled[picked].any():
            raise FlywheelError(
                f"strategy {name} returned {len(picked)} positions ({len(np.unique(picked))} unique, "
                f"{int(is_labelled[picked].sum())} already labelled) when asked for {n} new ones"
            )
        out["descriptions"].append(selection.description)
        is_labelled[picked] = True
        labelled = np.concatenate([labelled, picked])
    return out


def simulate(
    features: npt.NDArray[np.floating[Any]],
    targets: npt.NDArray[np.integer[Any]],
    classes: Sequence[str],
    *,
    strategies: Sequence[str] | Mapping[str, Strategy],
    seeds: int | Sequence[int] = 3,
    initial_per_class: int = 2,
    budget_per_class: int = 20,
    batch_size: int | None = None,
    l2: float = 0.1,
    dataset: str = "custom",
    test_fraction: float = TEST_FRACTION,
    on_step: StepCallback | None = None,
) -> dict[str, Any]:
    """Learning curves of each strategy, mean and std over seeds, as the `flywheel simulate` report.

    features: (N, D) float32 embeddings; targets: (N,) int class index into `classes`.
    seeds: a count (0..n-1) or explicit seeds. batch_size: labels added per round (default: one per class).
    Returns {"dataset", "n_pool", "classes", "full_label_accuracy", "strategies": {name: {...}}} plus extras.
    """
    features = np.ascontiguousarray(features, dtype=np.float32)
    targets = np.asarray(targets, dtype=np.int64)
    n_classes = len(classes)
    batch_size = n_classes if batch_size is None else batch_size
    _check_inputs(features, targets, classes, initial_per_class, budget_per_class, batch_size)
    resolved = resolve_strategies(strategies)
    seed_list = _seed_list(seeds)

    splits = {
        seed: make_split(targets, seed, initial_per_class=initial_per_class, test_fraction=test_fraction)
        for seed in seed_list
    }
    first = splits[seed_list[0]]
    if len(first.test) == 0:
        raise DataError(f"{len(targets)} images leave no test images at a {test_fraction:.0%} split; add images")
    budgets = budget_schedule(
        len(first.initial), batch_size=batch_size, max_budget=n_classes * budget_per_class, n_train=len(first.train)
    )
    runs = _run_seeds(
        resolved, features, targets, seed_list, splits, budgets, n_classes=n_classes, l2=l2, on_step=on_step
    )
    full_accuracy = float(np.mean(runs.full))
    return {
        "dataset": dataset,
        "n_pool": int(len(targets)),
        "classes": list(classes),
        "full_label_accuracy": full_accuracy,
        "n_train": int(len(first.train)),
        "n_test": int(len(first.test)),
        "seeds": seed_list,
        "initial_per_class": initial_per_class,
        "budget_per_class": budget_per_class,
        "batch_size": batch_size,
        "class_counts": np.bincount(targets, minlength=n_classes).tolist(),
        "strategies": {
            name: summarize(runs.curves[name], budgets, full_accuracy, runs.seconds[name]) for name in resolved
        },
    }


def _seed_list(seeds: int | Sequence[int]) -> list[int]:
    """A count n means seeds 0..n-1; explicit seeds are taken in order."""
    seed_list = list(range(seeds)) if isinstance(seeds, int) else [int(s) for s in seeds]
    if not seed_list:
        raise FlywheelError("need at least one seed")
    return seed_list


@dataclass(frozen=True)
class SeedRuns:
    """Every strategy on every seed, before the mean over seeds."""

    full: list[float]  # per seed: test accuracy of a head trained on all its training labels
    curves: dict[str, list[SeedCurve]]  # strategy -> one curve per seed
    seconds: dict[str, float]  # strategy -> time spent in its curves


def _run_seeds(
    strategies: Mapping[str, Strategy],
    features: npt.NDArray[np.floating[Any]],
    targets: npt.NDArray[np.integer[Any]],
    seeds: Sequence[int],
    splits: Mapping[int, Split],
    budgets: Sequence[int],
    *,
    n_classes: int,
    l2: float,
    on_step: StepCallback | None,
) -> SeedRuns:
    """Per seed (in order), the all-label reference accuracy and then each strategy's curve on its split."""
    full: list[float] = []
    curves: dict[str, list[SeedCurve]] = {name: [] for name in strategies}
    seconds = dict.fromkeys(strategies, 0.0)
    with single_threaded_torch():
        for seed in seeds:
            split = splits[seed]
            x_train = features[split.train]
            head = train_head(x_train, targets[split.train], n_classes, l2=l2, seed=seed)
            full.append(float((predict_proba(head, features[split.test]).argmax(1) == targets[split.test]).mean()))
            for name, strategy in strategies.items():
                began = time.perf_counter()
                curves[name].append(
                    run_curve(
                        strategy,
                        name,
                        features,
                        targets,
                        split,
                        budgets,
                        n_classes=n_classes,
                        seed=seed,
                        l2=l2,
                        train_features=x_train,
                        on_step=on_step,
                    )
                )
                seconds[name] += time.perf_counter() - began
    return SeedRuns(full=full, curves=curves, seconds=seconds)


def summarize(
    runs: Sequence[SeedCurve], budgets: Sequence[int], full_accuracy: float, seconds: float = 0.0
) -> dict[str, Any]:
    """Mean/std over seeds of per-seed curves, AULC (mean over budget points) and labels to 95% of full."""
    acc = np.array([r["accuracy"] for r in runs], dtype=np.float64)
    bal = np.array([r["balanced_accuracy"] for r in runs], dtype=np.float64)
    acc_mean, bal_mean = acc.mean(axis=0), bal.mean(axis=0)
    return {
        "budgets": [int(b) for b in budgets],
        "accuracy_mean": acc_mean.tolist(),
        "accuracy_std": acc.std(axis=0).tolist(),
        "balanced_accuracy_mean": bal_mean.tolist(),
        "aulc": float(acc_mean.mean()),
        "balanced_aulc": float(bal_mean.mean()),
        "labels_to_95pct_of_full": labels_to_reach(budgets, acc_mean.tolist(), 0.95 * full_accuracy)
        if not math.isnan(full_accuracy)
        else None,
        "accuracy_per_seed": acc.tolist(),
        "seconds": round(seconds, 2),
        "descriptions": list(runs[0]["descriptions"]),
    }
