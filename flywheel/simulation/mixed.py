"""`flywheel simulate --loop`: the mixed approach replayed with an oracle, as the product runs it.

Per seed, on the same split, initial labels and budgets as the strategy simulation (core.py), two
configurations label the same pool:
- `heads-only`: a head on the frozen body's last stage every round, always used (core.run_curve);
- `loop`: what the flywheel does. When the labels cross the fine-tune thresholds (`policy.should_finetune`,
  as the sync does before a round) the body is fine-tuned with the product's policy, recipe and guard
  (`policy.choose_depth`, `training.finetune.finetune`, `registry.guard`: better beyond noise than the
  champion and than a head on the same labels); then every round a head reads the stage `policy.
  choose_features` picks (the far-domain cell), the paired guard decides whether it becomes champion, and
  the strategy selects by it. Its curve is the champion's test accuracy after every round.
Labels are split into training and held-out ones by a fixed fold per image, as the catalog does. Fine-tunes
train on images; every body's features (all candidate stages) are computed once per body.
"""

from __future__ import annotations

import copy
import time
from collections.abc import Callable, Sequence
from dataclasses import dataclass, field
from typing import Any

import numpy as np
import numpy.typing as npt
from torch import nn

from flywheel.config import FinetuneSettings
from flywheel.features.backbones import Classifier, build_body, layer_groups
from flywheel.registry import guard
from flywheel.simulation.core import (
    SeedCurve,
    Split,
    balanced_accuracy,
    budget_schedule,
    make_split,
    run_curve,
    single_threaded_torch,
    summarize,
)
from flywheel.strategies import PoolView, get_strategy
from flywheel.training import policy, transfer
from flywheel.training.finetune import finetune
from flywheel.training.head import predict_proba, train_head

VALIDATION_SHARE = 15  # of 100 folds: the fine-tune's validation part of the training labels, as in the product


@dataclass(frozen=True)
class LoopPlan:
    """The mixed approach's settings for a simulated run (the project's, or the CLI's overrides)."""

    strategy: str
    backbone: str
    image_size: int
    finetune: FinetuneSettings
    holdout_fraction: float = 0.2
    l2: float = 0.1
    promotion_margin: float = 0.0
    seeds: int = 3
    initial_per_class: int = 2
    budget_per_class: int = 50
    batch_size: int | None = None


@dataclass
class _Body:
    """A body and its features of every image, for the last stage and each candidate stage."""

    version: str
    module: nn.Module
    features: dict[str, npt.NDArray[np.float32]]


@dataclass(frozen=True)
class _Model:
    """A head on one body's stage: what the guard compares and the champion is."""

    body: _Body
    stage: str
    head: nn.Linear
    kind: str  # "head" | "finetune"

    def predict(self, rows: npt.NDArray[np.int64]) -> npt.NDArray[np.float32]:
        return predict_proba(self.head, self.body.features[self.stage][rows])


@dataclass
class _SeedState:
    """One seed's run: its body, champion and what the fine-tunes did."""

    body: _Body
    champion: _Model | None = None
    labels_at_last_finetune: int = 0
    finetunes: list[dict[str, Any]] = field(default_factory=list)


def embed_body(module: nn.Module, version: str, paths: Sequence[str], plan: LoopPlan, device: str) -> _Body:
    """Every image's pooled features from the last stage and each candidate stage, in one pass."""
    stages = transfer.candidate_stages(module, plan.backbone)
    features = transfer.stage_features(module, plan.backbone, paths, plan.image_size, stages, device=device)
    return _Body(version, module, {name: np.ascontiguousarray(x, np.float32) for name, x in features.items()})


def simulate_loop(
    paths: Sequence[str],
    targets: npt.NDArray[np.integer[Any]],
    classes: Sequence[str],
    plan: LoopPlan,
    *,
    dataset: str = "custom",
    device: str = "cpu",
    on_step: Callable[[str, int, int], None] | None = None,
) -> dict[str, Any]:
    """Learning curves of `heads-only` and `loop` (mean over seeds) and the fine-tunes that ran, in the
    `flywheel simulate` report's shape."""
    y = np.asarray(targets, dtype=np.int64)
    n_classes = len(classes)
    began = time.perf_counter()
    imagenet = embed_body(build_body(plan.backbone, pretrained=True), "imagenet", paths, plan, device)
    runs = _Runs(seconds={"heads-only": 0.0, "loop": time.perf_counter() - began})
    split = make_split(y, 0, initial_per_class=plan.initial_per_class)
    budgets = budget_schedule(len(split.initial), batch_size=plan.batch_size or n_classes,
                              max_budget=n_classes * plan.budget_per_class, n_train=len(split.train))  # fmt: skip
    for seed in range(plan.seeds):
        _run_seed(paths, y, n_classes, budgets, plan, seed, imagenet, runs, device, on_step)
    full_accuracy = float(np.mean(runs.full))
    return {
        "dataset": dataset, "mode": "loop", "n_pool": len(y), "classes": list(classes),
        "full_label_accuracy": full_accuracy, "n_train": len(split.train), "n_test": len(split.test),
        "seeds": list(range(plan.seeds)), "initial_per_class": plan.initial_per_class,
        "budget_per_class": plan.budget_per_class, "batch_size": plan.batch_size or n_classes,
        "strategy": plan.strategy,
        "finetune_thresholds": [plan.finetune.min_labels, plan.finetune.every_new_labels],
        "finetunes": runs.finetunes,
        "strategies": {n: summarize(c, budgets, full_accuracy, runs.seconds[n]) for n, c in runs.curves.items()},
    }  # fmt: skip


@dataclass
class _Runs:
    """Every seed's curves of both configurations, the all-label reference and the fine-tunes."""

    seconds: dict[str, float]
    curves: dict[str, list[SeedCurve]] = field(default_factory=lambda: {"heads-only": [], "loop": []})
    full: list[float] = field(default_factory=list)
    finetunes: list[dict[str, Any]] = field(default_factory=list)


def _run_seed(
    paths: Sequence[str],
    targets: npt.NDArray[np.int64],
    n_classes: int,
    budgets: Sequence[int],
    plan: LoopPlan,
    seed: int,
    imagenet: _Body,
    runs: _Runs,
    device: str,
    on_step: Callable[[str, int, int], None] | None,
) -> None:
    """Both configurations on one seed's split, and the frozen last-stage head with every training label."""
    split = make_split(targets, seed, initial_per_class=plan.initial_per_class)
    last = imagenet.features["last"]
    t0 = time.perf_counter()
    with single_threaded_torch():
        head = train_head(last[split.train], targets[split.train], n_classes, l2=plan.l2, seed=seed)
        runs.full.append(float((predict_proba(head, last[split.test]).argmax(1) == targets[split.test]).mean()))
        runs.curves["heads-only"].append(
            run_curve(
                get_strategy(plan.strategy),
                "heads-only",
                last,
                targets,
                split,
                budgets,
                n_classes=n_classes,
                seed=seed,
                l2=plan.l2,
                on_step=on_step,
            )  # fmt: skip
        )
    runs.seconds["heads-only"] += time.perf_counter() - t0
    t0 = time.perf_counter()
    state = _SeedState(imagenet)
    runs.curves["loop"].append(_run_loop(paths, targets, n_classes, split, budgets, plan, seed, state, device, on_step))
    runs.seconds["loop"] += time.perf_counter() - t0
    runs.finetunes += [{"seed": seed, **f} for f in state.finetunes]


def _run_loop(
    paths: Sequence[str],
    targets: npt.NDArray[np.int64],
    n_classes: int,
    split: Split,
    budgets: Sequence[int],
    plan: LoopPlan,
    seed: int,
    state: _SeedState,
    device: str,
    on_step: Callable[[str, int, int], None] | None,
) -> SeedCurve:
    """One seed of the loop: per budget, a fine-tune when due, the round's head and guard, the champion's
    test accuracy, then the strategy's picks by the round's head."""
    folds = np.random.default_rng([seed, 1]).integers(0, 100, len(split.train))
    held_out = folds < round(100 * plan.holdout_fraction)
    labelled = split.initial.copy()
    rng = np.random.default_rng([seed, 2])
    out: SeedCurve = {"accuracy": [], "balanced_accuracy": [], "descriptions": []}
    for step, budget in enumerate(budgets):
        train_pos, holdout_pos = labelled[~held_out[labelled]], labelled[held_out[labelled]]
        if policy.should_finetune(budget, state.labels_at_last_finetune, min_labels=plan.finetune.min_labels,
                                  every_new_labels=plan.finetune.every_new_labels):  # fmt: skip
            state.labels_at_last_finetune = budget
            _finetune(paths, targets, n_classes, split, train_pos, holdout_pos, folds, plan, seed, state, device)
        model, note = _round_head(targets, n_classes, split, train_pos, holdout_pos, plan, seed, state)
        champion = state.champion or model
        probs = champion.predict(split.test)
        out["accuracy"].append(float((probs.argmax(1) == targets[split.test]).mean()))
        out["balanced_accuracy"].append(balanced_accuracy(probs, targets[split.test]))
        if on_step is not None:
            on_step("loop", seed, budget)
        if step + 1 == len(budgets):
            break
        candidates = np.setdiff1d(np.arange(len(split.train)), labelled)
        view = PoolView(candidates=candidates, labelled=labelled, probs=model.predict(split.train),
                        embeddings=model.body.features[model.stage][split.train],
                        labelled_targets=targets[split.train[labelled]])  # fmt: skip
        picked = get_strategy(plan.strategy)(view, budgets[step + 1] - budget, rng=rng).positions
        out["descriptions"].append(note)
        labelled = np.concatenate([labelled, np.asarray(picked, dtype=np.int64)])
    return out


def _round_head(
    targets: npt.NDArray[np.int64],
    n_classes: int,
    split: Split,
    train_pos: npt.NDArray[np.int64],
    holdout_pos: npt.NDArray[np.int64],
    plan: LoopPlan,
    seed: int,
    state: _SeedState,
) -> tuple[_Model, str]:
    """The round's head on the stage the far-domain cell picks, guarded against the champion."""
    body, rows = state.body, split.train[train_pos]
    labels_per_class = len(train_pos) / n_classes
    probe = None
    if policy.wants_stage_probe(labels_per_class, plan.finetune.domain):
        probe = transfer.probe_features({s: x[rows] for s, x in body.features.items()}, targets[rows], n_classes,
                                        l2=plan.l2, seed=seed)  # fmt: skip
    choice = policy.choose_features(labels_per_class, probe, domain=plan.finetune.domain)
    with single_threaded_torch():
        head = train_head(body.features[choice.stage][rows], targets[rows], n_classes, l2=plan.l2, seed=seed)
    model = _Model(body, choice.stage, head, "head")
    decision = _decide(model, state.champion, targets, split.train[holdout_pos], plan, baseline=None)
    if decision.promoted:
        state.champion = model
    return model, f"head on {body.version}/{choice.stage}: {'champion' if decision.promoted else 'kept out'}"


def _decide(
    model: _Model,
    champion: _Model | None,
    targets: npt.NDArray[np.int64],
    holdout: npt.NDArray[np.int64],
    plan: LoopPlan,
    *,
    baseline: _Model | None,
) -> guard.PromotionDecision:
    """The product's guard on these held-out rows: paired against the champion (and the baseline head)."""
    truth = targets[holdout]

    def right(m: _Model) -> npt.NDArray[np.bool_]:
        return np.asarray(m.predict(holdout).argmax(1) == truth, dtype=bool)

    same = champion is not None and champion.body.version == model.body.version  # any stage of the same body
    rule: guard.Rule = "not_worse" if model.kind == "head" and same else "better"
    return guard.decide_promotion(
        None if champion is None else guard.paired_difference(right(model), right(champion)),
        n_holdout=len(holdout), margin=plan.promotion_margin, rule=rule,
        vs_baseline=None if baseline is None else guard.paired_difference(right(model), right(baseline)),
    )  # fmt: skip


def _finetune(
    paths: Sequence[str],
    targets: npt.NDArray[np.int64],
    n_classes: int,
    split: Split,
    train_pos: npt.NDArray[np.int64],
    holdout_pos: npt.NDArray[np.int64],
    folds: npt.NDArray[np.int64],
    plan: LoopPlan,
    seed: int,
    state: _SeedState,
    device: str,
) -> None:
    """A fine-tune as run_finetune does it: the depth policy (domain probed on the training labels), LP head,
    the recipe, the guard; a promoted body replaces the pool's features."""
    body, rows = state.body, split.train[train_pos]
    labels_per_class = len(train_pos) / n_classes
    probe = transfer.probe_features({s: x[rows] for s, x in body.features.items()}, targets[rows], n_classes,
                                    l2=plan.l2, seed=seed)  # fmt: skip
    middle = transfer.middle_stage(body.module, plan.backbone)
    far = probe is not None and middle in probe and probe[middle] >= probe["last"]
    groups = len(layer_groups(body.module, plan.backbone))
    depth = policy.choose_depth(labels_per_class, groups, override=plan.finetune.depth, far_domain=far)
    record: dict[str, Any] = {"labels": len(train_pos) + len(holdout_pos), "depth": depth.label, "why": depth.reason}
    state.finetunes.append(record)
    if depth.trainable_groups == 0:
        record.update(promoted=False, decision="head-only depth: the round's head is that model")
        return
    is_val = folds[train_pos] < round(100 * plan.holdout_fraction) + VALIDATION_SHARE
    fit, val = split.train[train_pos[~is_val]], split.train[train_pos[is_val]]
    with single_threaded_torch():
        lp_head = train_head(body.features["last"][fit], targets[fit], n_classes, l2=plan.l2, seed=seed)
        baseline = _Model(body, "last", train_head(body.features["last"][rows], targets[rows], n_classes,
                                                   l2=plan.l2, seed=seed), "head")  # fmt: skip
    classes = [str(c) for c in range(n_classes)]
    start = Classifier(plan.backbone, copy.deepcopy(body.module), lp_head, classes, plan.image_size)
    result = finetune(start, [paths[i] for i in fit], targets[fit], [paths[i] for i in val], targets[val],
                      decision=depth, settings=plan.finetune, seed=seed, progress=False)  # fmt: skip
    tuned = embed_body(result.classifier.body, f"finetune@{record['labels']}", paths, plan, device)
    model = _Model(tuned, "last", result.classifier.head, "finetune")
    decision = _decide(model, state.champion, targets, split.train[holdout_pos], plan, baseline=baseline)
    test = split.test
    record.update(promoted=decision.promoted, decision=decision.reason, seconds=round(result.seconds, 1),
                  test_accuracy=float((model.predict(test).argmax(1) == targets[test]).mean()),
                  schedule=result.notes[0] if result.notes else "")  # fmt: skip
    if decision.promoted:
        state.body, state.champion = tuned, model
