"""A fine-tune: once enough labels are in, train deeper than the head as the policy says (domain probe, depth,
backbone pick), register the model and promote it only on a held-out win, then re-embed the pool with its body."""

from __future__ import annotations

import copy
from dataclasses import dataclass

import numpy as np
import numpy.typing as npt
import torch
from matplotlib.figure import Figure
from mlflow import MlflowClient
from torch import nn

from flywheel import locking
from flywheel.catalog import POOL, TEST, Catalog
from flywheel.config import Settings
from flywheel.errors import DataError
from flywheel.features import embedded
from flywheel.features.backbones import Classifier, layer_groups
from flywheel.features.store import resolve_device
from flywheel.insight import after_round, provenance
from flywheel.insight.reports import confusion_figure, confusion_matrix
from flywheel.loop import schedule
from flywheel.loop.promote import switch_body
from flywheel.loop.state import (
    VALIDATION_FOLDS,
    LabelledSplit,
    State,
    champion_holdout,
    current_state,
    fit_head,
    split_labels,
    truth_targets,
)
from flywheel.registry import guard, tracking
from flywheel.training import transfer
from flywheel.training.finetune import FinetuneResult, finetune
from flywheel.training.finetune import predict_proba as finetune_predict_proba
from flywheel.training.head import accuracy, predict_proba
from flywheel.training.policy import DepthDecision, choose_depth


@dataclass(frozen=True)
class FinetuneReport:
    model_version: str
    run_url: str
    depth: str
    depth_reason: str
    lr_by_group: dict[str, float]
    labels_per_class: float
    holdout_accuracy: float
    champion_holdout_accuracy: float | None
    baseline_holdout_accuracy: float
    test_accuracy: float
    promoted: bool
    promotion_reason: str
    seconds: float
    far_domain: bool = False
    domain_reason: str = ""
    domain_probe: transfer.DomainProbe | None = None
    backbone_scores: tracking.Table | None = None  # the transferability table, when candidates were scored
    backbone: str = ""  # the backbone fine-tuned
    backbone_choice: str = ""  # why that one, when candidates were scored
    best_epoch: int = 0
    stopped_early: bool = False
    resumed_from: int | None = None
    predictions_refreshed: int | None = None  # open Label Studio tasks given its predictions (flows, if promoted)


@locking.locked
def run_finetune(
    settings: Settings, catalog: Catalog, mlflow_client: MlflowClient, *, progress: bool = True
) -> FinetuneReport:
    """LP-FT from the current body: head on frozen features first, then unfreeze as deep as the policy says.

    Before training it measures instead of guessing: a stage probe on the labels decides whether the domain
    is far from the pretraining data (transfer.probe_domain), and, when more than one backbone's weights are
    available offline, the candidates are scored by transferability, the table is logged and the fine-tune
    starts from the best (settings.finetune.pick_backbone, backbone_margin); a promotion moves the project
    to that backbone (embedded.active_settings). The probe, the policy's choice and its inputs, a holdout
    confusion matrix and a per-class report go to the MLflow run.
    """
    configured = embedded.configured_backbone(settings, catalog)
    settings = embedded.active_settings(settings, catalog)
    current = current_state(settings, catalog, progress=progress)
    if len(np.unique(current.split.targets[current.split.train])) < 2:
        raise DataError(f"fine-tuning needs labels of at least 2 classes; the catalog has {len(current.labels)} labels")
    state = schedule.label_state(current.labels)
    schedule.start_finetune(catalog, state, now=schedule.utc_now())  # refused when these labels had one
    baseline = _baseline_correct(settings, current)
    device = resolve_device(settings.finetune.device)
    start = _starting_point(settings, catalog, current, device=device, progress=progress)
    settings, current = start.settings, start.state
    tuned = _tune(settings, current, device=device, progress=progress)
    classifier = tuned.result.classifier
    holdout = _score_holdout(
        classifier,
        current,
        device=settings.finetune.device,
        title=f"fine-tune ({tuned.decision.label}), held-out labels",
    )
    compared = _compare(settings, mlflow_client, current, holdout, baseline)
    logged = _log_finetune(mlflow_client, start, tuned, holdout=holdout, compared=compared)
    promotion = guard.decide_promotion(
        compared.vs_champion, n_holdout=len(current.split.holdout), margin=settings.promotion_margin,
        rule="better", vs_baseline=compared.vs_baseline,
    )  # fmt: skip
    tracking.apply_promotion(mlflow_client, settings, logged.version, promotion)
    provenance.log_training_set(
        mlflow_client, catalog, run_id=logged.run_id, model_name=settings.registered_model_name,
        version=logged.version, labels=current.labels,
        roles=after_round.roles(current.pool.ids, tuned.train, current.split.holdout, tuned.val),
    )  # fmt: skip
    test_acc = _test_accuracy(
        settings, catalog, classifier, body_version=logged.version, classes=current.classes, progress=progress
    )
    if not np.isnan(test_acc):  # nan: no test truth known
        mlflow_client.log_metric(logged.run_id, "test_accuracy", test_acc)
    if promotion.promoted:
        switch_body(settings, catalog, logged.version, classifier.body, progress=progress)
        embedded.record_backbone(catalog, configured=configured, in_use=settings.backbone)
    schedule.finish_finetune(catalog, state, logged.version, now=schedule.utc_now())
    return _finetune_report(
        start, tuned, logged, promotion, holdout_acc=holdout.accuracy, champion_acc=compared.champion_accuracy,
        baseline_acc=compared.vs_baseline.other, test_acc=test_acc,
    )  # fmt: skip


@dataclass(frozen=True)
class _Compared:
    """The fine-tune against a head on the same labels and against the champion, image by image."""

    vs_baseline: guard.PairedDifference
    vs_champion: guard.PairedDifference | None
    champion_accuracy: float | None


def _compare(
    settings: Settings, mlflow_client: MlflowClient, current: State, holdout: _HoldoutScore, baseline: dict[int, bool]
) -> _Compared:
    champion = champion_holdout(settings, mlflow_client, current.pool, current.split, current.classes)
    baseline_correct = [baseline[int(i)] for i in current.pool.ids[current.split.holdout]]
    return _Compared(
        guard.paired_difference(holdout.correct, baseline_correct),
        None if champion is None else guard.paired_difference(holdout.correct, champion.correct),
        None if champion is None else champion.accuracy,
    )


def _baseline_correct(settings: Settings, current: State) -> dict[int, bool]:
    """The guard's baseline: a head alone on the features the project uses now; held-out sample id -> whether
    it is right (by id: a fine-tune that switches backbone scores the same samples from another pool)."""
    split = current.split
    baseline = fit_head(settings, current.pool, split.train, split.targets, len(current.classes))
    predicted = predict_proba(baseline, current.pool.vectors[split.holdout]).argmax(1)
    right = predicted == split.targets[split.holdout]
    return {int(i): bool(r) for i, r in zip(current.pool.ids[split.holdout], right, strict=True)}


@dataclass(frozen=True)
class _Start:
    """Where a fine-tune starts: its backbone's settings and the state that body embeds; when candidate
    backbones were scored, their table and the choice, for the MLflow run."""

    settings: Settings
    state: State
    tables: dict[str, tracking.Table]
    params: dict[str, object]


def _starting_point(
    settings: Settings, catalog: Catalog, current: State, *, device: torch.device, progress: bool
) -> _Start:
    """The current body, or a candidate backbone's pretrained one when it transfers better (_pick_backbone)."""
    tables: dict[str, tracking.Table] = {}
    params: dict[str, object] = {}
    picked = _pick_backbone(settings, catalog, current.pool, current.split, current.body, device, tables, params)
    if picked == settings.backbone:
        return _Start(settings, current, tables, params)
    # Start from the candidate's pretrained body, on its own embeddings; the same labels, split on its rows.
    settings = settings.model_copy(update={"backbone": picked})
    version = embedded.IMAGENET
    body = embedded.load_body(settings, version)
    pool = embedded.split_features(settings, catalog, POOL, body, version, progress=progress)
    split = split_labels(pool, current.labels, current.classes, settings.holdout_fraction)
    return _Start(settings, State(current.classes, version, body, pool, current.labels, split), tables, params)


@dataclass(frozen=True)
class _Tuned:
    """A fine-tune's result and what decided it (the domain read, the policy's depth), with the training rows
    it learnt from and those it stopped early on."""

    result: FinetuneResult
    decision: DepthDecision
    n_groups: int
    far_domain: bool
    domain_reason: str
    probe: transfer.DomainProbe | None
    labels_per_class: float
    train: npt.NDArray[np.intp]
    val: npt.NDArray[np.intp]


def _tune(settings: Settings, current: State, *, device: torch.device, progress: bool) -> _Tuned:
    """Keep a validation share of the training labels for early stopping, read the domain, let the policy
    choose the depth, then fine-tune a copy of the body under a head fitted on the rest."""
    ft, pool, split, classes = settings.finetune, current.pool, current.split, current.classes
    holdout_folds = round(settings.holdout_fraction * 100)
    is_val = pool.folds[split.train] < holdout_folds + VALIDATION_FOLDS
    train, val = split.train[~is_val], split.train[is_val]
    head = fit_head(settings, pool, train, split.targets, len(classes))
    classifier = Classifier(settings.backbone, copy.deepcopy(current.body), head, classes, settings.image_size)
    labels_per_class = len(split.train) / len(classes)
    labelled_paths = [pool.paths[i] for i in split.train]

    probe = None
    if ft.domain == "auto":
        probe = transfer.probe_domain(
            classifier.body, settings.backbone, labelled_paths, split.targets[split.train], len(classes),
            settings.image_size, l2=settings.head_l2, seed=settings.seed, device=device,
        )  # fmt: skip
        classifier.body.to("cpu")
    far_domain, domain_reason = transfer.resolve_domain(ft.domain, probe)
    n_groups = len(layer_groups(classifier.body, settings.backbone))
    decision = choose_depth(labels_per_class, n_groups, override=ft.depth, far_domain=far_domain)
    result = finetune(
        classifier,
        [pool.paths[i] for i in train],
        split.targets[train],
        [pool.paths[i] for i in val],
        split.targets[val],
        decision=decision,
        settings=ft,
        seed=settings.seed,
        progress=progress,
        checkpoint_dir=settings.dirs.checkpoints,
        resume=ft.resume,
    )
    return _Tuned(result, decision, n_groups, far_domain, domain_reason, probe, labels_per_class, train, val)


@dataclass(frozen=True)
class _HoldoutScore:
    """A fine-tuned model on the held-out labels: its accuracy and, when there are any, its confusion matrix
    (a figure) and per-class report (a table) for the MLflow run."""

    accuracy: float
    correct: npt.NDArray[np.bool_]  # per held-out image, for the guard's paired comparison
    figures: dict[str, Figure]
    tables: dict[str, tracking.Table]


def _score_holdout(classifier: Classifier, current: State, *, device: str, title: str) -> _HoldoutScore:
    """Score the fine-tuned model on the held-out images themselves: its body is not the one that embedded
    the pool."""
    split, classes = current.split, current.classes
    holdout_paths, holdout_targets = [current.pool.paths[i] for i in split.holdout], split.targets[split.holdout]
    holdout_probs = finetune_predict_proba(classifier, holdout_paths, device=device)
    holdout_acc = accuracy(holdout_probs, holdout_targets)
    figures: dict[str, Figure] = {}
    tables: dict[str, tracking.Table] = {}
    if len(holdout_targets):
        matrix = confusion_matrix(holdout_targets, holdout_probs.argmax(1), len(classes))
        figures["confusion_holdout.png"] = confusion_figure(matrix, classes, title)
        tables["per_class_holdout.json"] = tracking.per_class_table(matrix, classes)
    return _HoldoutScore(holdout_acc, holdout_probs.argmax(1) == holdout_targets, figures, tables)


def _log_finetune(
    mlflow_client: MlflowClient,
    start: _Start,
    tuned: _Tuned,
    *,
    holdout: _HoldoutScore,
    compared: _Compared,
) -> tracking.LoggedModel:
    """Register the fine-tuned model under a run that explains it: the params, the guard's accuracies, the
    epochs, the holdout confusion matrix and per-class report, the backbone scores."""
    settings, current, decision = start.settings, start.state, tuned.decision
    return tracking.log_classifier(
        mlflow_client,
        settings,
        tuned.result.classifier,
        run_name=f"finetune-{decision.label}-{len(current.labels)}-labels",
        params=_finetune_params(start, tuned),
        metrics={
            "holdout_accuracy": holdout.accuracy,
            "baseline_holdout_accuracy": compared.vs_baseline.other,
            **guard.metrics(compared.vs_baseline, "vs_baseline"),
            **guard.metrics(compared.vs_champion, "vs_champion"),
            "labels": float(len(current.labels)),
            "seconds": tuned.result.seconds,
            **_probe_metrics(tuned.probe),
        },
        tags={
            "kind": "finetune",
            "depth": decision.label,
            "body_version": current.body_version,
            "backbone": settings.backbone,
        },
        history=[{k: v for k, v in row.items() if k != "phase"} for row in tuned.result.history],
        figures=holdout.figures,
        tables={**start.tables, **holdout.tables},
    )


def _finetune_params(start: _Start, tuned: _Tuned) -> dict[str, object]:
    """The fine-tune run's params: the settings it ran with, the policy's choice and its inputs (depth,
    domain, probe), the augmentation, how training went and each group's learning rate."""
    settings, ft, result, decision = start.settings, start.settings.finetune, tuned.result, tuned.decision
    probe, aug = tuned.probe, result.augmentation
    return {
        "kind": "finetune",
        "backbone": settings.backbone,
        "body_version": start.state.body_version,
        "image_size": settings.image_size,
        "strategy": settings.strategy,
        "depth": decision.label,
        "depth_setting": ft.depth,
        "trainable_groups": decision.trainable_groups,
        "body_groups": tuned.n_groups,
        "depth_reason": decision.reason,
        "domain_setting": ft.domain,
        "far_domain": tuned.far_domain,
        "domain_reason": tuned.domain_reason,
        **(probe.as_params() if probe is not None else {}),
        "labels_per_class": round(tuned.labels_per_class, 2),
        "n_labels": len(start.state.labels),
        "n_train": len(tuned.train),
        "n_val": len(tuned.val),
        "n_holdout": len(start.state.split.holdout),
        "epochs": ft.epochs,
        "head_epochs": ft.head_epochs,
        "gradual_unfreeze": ft.gradual_unfreeze,
        "patience": ft.patience,
        "head_lr": ft.head_lr,
        "weight_decay": ft.weight_decay,
        "batch_size": ft.batch_size,
        **(aug.as_params() if aug is not None else {}),
        "augment_reason": aug.reason if aug is not None else "",
        "best_epoch": result.best_epoch,
        "epochs_run": len(result.history),
        "stopped_early": result.stopped_early,
        "resumed_from_epoch": result.resumed_from if result.resumed_from is not None else "",
        "device": result.device,
        "compile": ft.compile,
        "seed": settings.seed,
        **start.params,
        **{f"lr_{name}": lr for name, lr in result.lr_by_group.items()},
    }


def _probe_metrics(probe: transfer.DomainProbe | None) -> dict[str, float]:
    """The domain probe's accuracies and time as run metrics; none without a probe."""
    if probe is None:
        return {}
    return {
        "domain_probe_middle_acc": probe.middle_acc,
        "domain_probe_last_acc": probe.last_acc,
        "domain_probe_knn_acc": probe.knn_acc,
        "domain_probe_seconds": probe.seconds,
    }


def _test_accuracy(
    settings: Settings,
    catalog: Catalog,
    classifier: Classifier,
    *,
    body_version: str,
    classes: list[str],
    progress: bool,
) -> float:
    """The fine-tuned model on the test split, embedded by its own body; nan when no test truth is known."""
    test = embedded.split_features(settings, catalog, TEST, classifier.body, body_version, progress=progress)
    test_targets = truth_targets(test.truths, classes)
    known = test_targets >= 0
    if not known.any():
        return float("nan")
    return accuracy(predict_proba(classifier.head, test.vectors[known]), test_targets[known])


def _finetune_report(
    start: _Start,
    tuned: _Tuned,
    logged: tracking.LoggedModel,
    promotion: guard.PromotionDecision,
    *,
    holdout_acc: float,
    champion_acc: float | None,
    baseline_acc: float,
    test_acc: float,
) -> FinetuneReport:
    """What the fine-tune did and decided, for the CLI, the flows and their artifacts."""
    result, decision = tuned.result, tuned.decision
    return FinetuneReport(
        model_version=logged.version,
        run_url=logged.run_url,
        depth=decision.label,
        depth_reason=decision.reason,
        lr_by_group=result.lr_by_group,
        labels_per_class=tuned.labels_per_class,
        holdout_accuracy=holdout_acc,
        champion_holdout_accuracy=champion_acc,
        baseline_holdout_accuracy=baseline_acc,
        test_accuracy=test_acc,
        promoted=promotion.promoted,
        promotion_reason=promotion.reason,
        seconds=result.seconds,
        far_domain=tuned.far_domain,
        domain_reason=tuned.domain_reason,
        domain_probe=tuned.probe,
        backbone_scores=start.tables.get("backbone_scores.json"),
        backbone=start.settings.backbone,
        backbone_choice=str(start.params.get("backbone_choice", "")),
        best_epoch=result.best_epoch,
        stopped_early=result.stopped_early,
        resumed_from=result.resumed_from,
    )


def _pick_backbone(
    settings: Settings,
    catalog: Catalog,
    pool: embedded.SplitFeatures,
    split: LabelledSplit,
    body: nn.Module,
    device: torch.device,
    tables: dict[str, tracking.Table],
    params: dict[str, object],
) -> str:
    """Before the first fine-tune, score the candidates on the labelled images and log the table (into
    `tables`, `params`); the best one when picking is on and it beats the current backbone by the margin."""
    ft = settings.finetune
    if int(catalog.get_meta(schedule.LABELS_AT_LAST_FINETUNE) or 0):
        return settings.backbone
    candidates = transfer.available_backbones(ft.backbones)
    if settings.backbone not in candidates:
        candidates.append(settings.backbone)  # its body is at hand even when its weights file is not
    if len(candidates) < 2:
        return settings.backbone
    scores = transfer.score_backbones(
        candidates, [pool.paths[i] for i in split.train], split.targets[split.train], settings.image_size,
        metric=ft.transferability, seed=settings.seed, device=device, bodies={settings.backbone: body},
    )  # fmt: skip
    tables["backbone_scores.json"] = transfer.scores_table(scores)
    by_name = {s.backbone: s.value(ft.transferability) for s in scores}
    best = scores[0].backbone
    lead = by_name[best] - by_name[settings.backbone]
    params["backbone_best"] = best
    if best == settings.backbone:
        params["backbone_choice"] = f"{best} transfers best by {ft.transferability}: kept"
        return best
    picking = ft.pick_backbone and lead >= ft.backbone_margin
    params["backbone_choice"] = (
        f"{best} beats {settings.backbone} by {lead:.4f} {ft.transferability} "
        f"(margin {ft.backbone_margin:g}, pick_backbone={ft.pick_backbone}): "
        + ("fine-tune starts from it" if picking else f"kept {settings.backbone}")
    )
    return best if picking else settings.backbone
