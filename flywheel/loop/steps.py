"""One turn of the flywheel, as plain functions the Prefect flows and the CLI call.

bootstrap: embed the pool (and test split), index it, create the Label Studio project.
run_round: train the head on the labels so far, register it, score the pool, select, push to Label Studio.
run_sync:  pull annotations into the catalog and say whether a deeper fine-tune is due.
run_finetune: fine-tune deeper per the policy, register, promote only on a held-out win, re-embed.
promote, refresh_open_tasks: a champion by hand; open Label Studio tasks then show its predictions.
"""

from __future__ import annotations

import copy
from dataclasses import asdict, dataclass, field
from typing import Any

import numpy as np
import numpy.typing as npt
import torch
from label_studio_sdk.client import LabelStudio
from matplotlib.figure import Figure
from mlflow import MlflowClient
from mlflow.entities.model_registry import ModelVersion
from torch import nn

from flywheel import faults, health, labelstudio, locking
from flywheel.catalog import POOL, TEST, Catalog
from flywheel.config import Settings
from flywheel.errors import DataError
from flywheel.features import embedded
from flywheel.features.backbones import Classifier, layer_groups
from flywheel.features.store import resolve_device
from flywheel.insight import after_round, provenance, review
from flywheel.insight.reports import confusion_figure, confusion_matrix, per_class_counts
from flywheel.labelstudio.tasks import reconcile_tasks
from flywheel.loop import schedule
from flywheel.registry import tracking
from flywheel.sources import quarantine
from flywheel.strategies import MODEL_FREE, PoolView, get_strategy
from flywheel.training import transfer
from flywheel.training.finetune import FinetuneResult, evaluate, finetune
from flywheel.training.finetune import predict_proba as finetune_predict_proba
from flywheel.training.head import accuracy, predict_proba, train_head
from flywheel.training.policy import DepthDecision, choose_depth

VALIDATION_FOLDS = 15  # share (of 100 folds) of the training labels kept for early stopping in fine-tunes


@dataclass(frozen=True)
class BootstrapReport:
    n_pool: int
    n_test: int
    embedding_dim: int
    index_path: str
    project_id: int


@dataclass
class RoundReport:
    round_id: int
    n_labels: int
    n_train: int
    n_holdout: int
    labels_per_class: dict[str, int]
    strategy: str = "none"  # the strategy that selected this round's batch; none when nothing was selected
    description: str = ""
    model_note: str = ""  # why no model was trained this round, when none was
    model_version: str | None = None
    run_url: str | None = None
    holdout_accuracy: float = float("nan")
    test_accuracy: float = float("nan")
    promoted: bool = False
    promotion_reason: str = ""
    selected: list[dict[str, Any]] = field(default_factory=list)  # sample_id, score, predicted, confidence
    quarantine: dict[str, Any] = field(default_factory=dict)  # quarantine.QuarantineSummary: total, by_reason, report
    near_duplicates: list[dict[str, int | float]] = field(default_factory=list)  # picks quarantined as such
    run_id: str | None = None
    after_training: after_round.AfterTraining | None = None  # forecast and label review, once a model is registered


@dataclass(frozen=True)
class SyncOutcome:
    report: labelstudio.SyncReport
    n_labels: int
    finetune_due: bool
    labels_at_last_finetune: int = 0  # 0: none yet; with n_labels, the counts the policy decided on
    reviews: review.ReviewCounts | None = None  # label reviews (flywheel.insight.review) after this sync
    finetune_reason: str = ""  # why a fine-tune is or is not due (flywheel.loop.schedule)


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


@dataclass(frozen=True)
class LabelledSplit:
    """Positions (into a SplitFeatures) of labelled samples, split by their stable fold."""

    train: npt.NDArray[np.intp]
    holdout: npt.NDArray[np.intp]
    targets: npt.NDArray[np.int64]  # (N,) class index per pool row, -1 when unlabelled


def split_labels(
    pool: embedded.SplitFeatures, labels: dict[int, str], classes: list[str], holdout_fraction: float
) -> LabelledSplit:
    position = {c: i for i, c in enumerate(classes)}
    targets = np.array([position.get(labels.get(int(i), ""), -1) for i in pool.ids], dtype=np.int64)
    labelled = targets >= 0
    holdout = labelled & (pool.folds < round(holdout_fraction * 100))
    return LabelledSplit(train=np.flatnonzero(labelled & ~holdout), holdout=np.flatnonzero(holdout), targets=targets)


@locking.locked
def bootstrap(
    settings: Settings, catalog: Catalog, ls_client: LabelStudio, *, progress: bool = True
) -> BootstrapReport:
    classes = _classes(catalog)
    settings = embedded.active_settings(settings, catalog)
    version = embedded.body_version(settings, catalog)
    body = embedded.load_body(settings, version)
    pool = embedded.split_features(settings, catalog, POOL, body, version, progress=progress)
    test = embedded.split_features(settings, catalog, TEST, body, version, progress=progress)
    path = embedded.rebuild_index(settings, pool, version)
    project_id = labelstudio.ensure_project(ls_client, settings, catalog, classes)
    return BootstrapReport(len(pool.ids), len(test.ids), int(pool.vectors.shape[1]), str(path), project_id)


@dataclass(frozen=True)
class State:
    """What a round or a fine-tune starts from: the classes, the body embedding the pool (its version and
    module), the pool's features, the labels and their split."""

    classes: list[str]
    body_version: str
    body: nn.Module
    pool: embedded.SplitFeatures
    labels: dict[int, str]
    split: LabelledSplit


def _current_state(settings: Settings, catalog: Catalog, *, progress: bool) -> State:
    """Classes, the body embedding the pool (version and module), the pool's features, labels and their split."""
    classes = _classes(catalog)
    version = embedded.body_version(settings, catalog)
    body = embedded.load_body(settings, version)
    pool = embedded.split_features(settings, catalog, POOL, body, version, progress=progress)
    labels = catalog.labels()
    return State(classes, version, body, pool, labels, split_labels(pool, labels, classes, settings.holdout_fraction))


@locking.locked
def run_round(
    settings: Settings,
    catalog: Catalog,
    ls_client: LabelStudio | None,
    mlflow_client: MlflowClient,
    *,
    select: bool = True,
    progress: bool = True,
) -> RoundReport:
    """Train, register and guard the head on the labels so far; then select and push the next batch.

    A round that a crash (or a server going away) left unfinished is resumed by the next call under the same
    round id: tasks its push left in Label Studio are recorded, and only the rest of its batch is selected.
    """
    settings = embedded.active_settings(settings, catalog)
    current = _current_state(settings, catalog, progress=progress)
    classes, labels, pool, split = current.classes, current.labels, current.pool, current.split
    round_id = catalog.start_round(strategy=settings.strategy, n_labels=len(labels))
    report = RoundReport(
        round_id=round_id,
        n_labels=len(labels),
        n_train=len(split.train),
        n_holdout=len(split.holdout),
        labels_per_class=per_class_counts(list(labels.values()), classes),
    )
    probs = None  # the newest model's view of the pool: selection reads it
    state, previous = schedule.label_state(labels), schedule.last_round_model(catalog)
    new_labels = schedule.labels_at_last_round(catalog) != state
    report.model_note = _why_no_model(classes, split, state=state, previous=previous, body_version=current.body_version)
    if not report.model_note:
        with health.unavailable_as("MLflow", settings.mlflow.url):  # a server gone mid-round is named as such
            probs = _train_and_register(settings, catalog, mlflow_client, current, report, progress=progress)
        assert report.model_version is not None and report.run_id is not None  # _train_and_register registered it
        schedule.record_round_model(catalog, state, current.body_version, report.model_version, now=schedule.utc_now())
        trained = after_round.TrainedRound(
            round_id, report.run_id, report.model_version, report.n_labels, report.test_accuracy,
            report.holdout_accuracy,
        )  # fmt: skip
        report.after_training = after_round.after_training(
            settings, catalog, ls_client, mlflow_client, trained, pool=pool, targets=split.targets,
            roles=after_round.roles(pool.ids, split.train, split.holdout), labels=labels, classes=classes,
        )  # fmt: skip
    if select:
        with health.unavailable_as("MLflow", settings.mlflow.url):
            champion = _champion_view(settings, mlflow_client, pool, current.body_version, classes, report, probs)
        with health.unavailable_as(labelstudio.SERVICE, settings.label_studio.url):
            _select_and_push(settings, catalog, ls_client, current, probs, champion, report, new_labels)
    report.quarantine = asdict(quarantine.write_report(settings, catalog))
    faults.point("round:before_finish")
    schedule.record_round_labels(catalog, state)
    _finish_round(catalog, report)
    return report


def _why_no_model(
    classes: list[str],
    split: LabelledSplit,
    *,
    state: schedule.LabelState,
    previous: schedule.Mark | None,
    body_version: str,
) -> str:
    """Why this round trains no model, "" when it does: a classifier needs training labels of two classes, and
    a head on the labels and body the last round's model was trained on would only register it again."""
    trained_classes = np.unique(split.targets[split.train])
    if len(trained_classes) < 2:
        return _no_model_yet(classes, [int(c) for c in trained_classes], len(split.train))
    if previous is not None and (previous.digest, previous.body) == (state.digest, body_version):
        return (
            f"no new labels since version {previous.version} ({state.n_labels} labels, same body): "
            "nothing trained or registered"
        )
    return ""


def _finish_round(catalog: Catalog, report: RoundReport) -> None:
    """Mark the round finished in the catalog; an accuracy no model measured (nan) is stored as none."""
    catalog.finish_round(
        report.round_id,
        strategy=report.strategy,
        n_selected=len(report.selected),
        model_version=report.model_version,
        holdout_accuracy=None if np.isnan(report.holdout_accuracy) else report.holdout_accuracy,
        test_accuracy=None if np.isnan(report.test_accuracy) else report.test_accuracy,
    )


def _train_and_register(
    settings: Settings,
    catalog: Catalog,
    mlflow_client: MlflowClient,
    current: State,
    report: RoundReport,
    *,
    progress: bool,
) -> npt.NDArray[np.float32]:
    """Fit the head, score it (held-out labels, test split), register it and promote it when it beats the
    champion on the same held-out labels; returns its view of the pool."""
    pool, split, classes = current.pool, current.split, current.classes
    head = _fit_head(settings, pool, split.train, split.targets, len(classes))
    probs = predict_proba(head, pool.vectors)
    faults.point("round:after_train")
    report.holdout_accuracy = accuracy(probs[split.holdout], split.targets[split.holdout])
    figures, test_metrics = {}, {}
    test = embedded.split_features(settings, catalog, TEST, current.body, current.body_version, progress=progress)
    test_targets = _targets(test.truths, classes)
    if len(test_targets):
        test_probs = predict_proba(head, test.vectors[test_targets >= 0])
        report.test_accuracy = accuracy(test_probs, test_targets[test_targets >= 0])
        test_metrics["test_accuracy"] = report.test_accuracy
        matrix = confusion_matrix(test_targets[test_targets >= 0], test_probs.argmax(1), len(classes))
        figures["confusion_test.png"] = confusion_figure(matrix, classes, f"round {report.round_id}, test split")
    classifier = Classifier(settings.backbone, current.body, head, classes, settings.image_size)
    champion_acc = _champion_holdout_accuracy(settings, mlflow_client, pool, split, classes)
    logged = tracking.log_classifier(
        mlflow_client,
        settings,
        classifier,
        run_name=f"round-{report.round_id}-head",
        params=_head_params(settings, report, body_version=current.body_version),
        metrics={
            "holdout_accuracy": report.holdout_accuracy,
            "labels": float(report.n_labels),
            **test_metrics,
        },
        tags={
            "kind": "head",
            "round": str(report.round_id),
            "body_version": current.body_version,
            "backbone": settings.backbone,
        },
        figures=figures,
        tables={
            "labels_per_class.json": {
                "class": classes,
                "labels": [report.labels_per_class[c] for c in classes],
            }
        },
    )
    decision = tracking.decide_promotion(report.holdout_accuracy, champion_acc, margin=settings.promotion_margin)
    tracking.apply_promotion(mlflow_client, settings, logged.version, decision)
    faults.point("round:after_register")
    report.model_version, report.run_url, report.run_id = logged.version, logged.run_url, logged.run_id
    report.promoted, report.promotion_reason = decision.promoted, decision.reason
    return probs


def _head_params(settings: Settings, report: RoundReport, *, body_version: str) -> dict[str, object]:
    """A round's head run params: what it was trained on and with which settings, so runs compare."""
    return {
        "kind": "head",
        "round": report.round_id,
        "backbone": settings.backbone,
        "body_version": body_version,
        "image_size": settings.image_size,
        "strategy": settings.strategy,
        "k_per_round": settings.k_per_round,
        "n_labels": report.n_labels,
        "n_train": report.n_train,
        "n_holdout": report.n_holdout,
        "seed": settings.seed,
        "trainable": "head",
    }


def _champion_holdout_accuracy(
    settings: Settings,
    mlflow_client: MlflowClient,
    pool: embedded.SplitFeatures,
    split: LabelledSplit,
    classes: list[str],
) -> float | None:
    """The champion scored on today's held-out labels, so both models face exactly the same test."""
    version = tracking.champion_version(mlflow_client, settings)
    if version is None:
        return None
    champion = _load(mlflow_client, settings, version)
    if list(champion.classes) != classes:
        return None  # the class list grew: the old champion cannot answer the new question
    return evaluate(champion, [pool.paths[i] for i in split.holdout], split.targets[split.holdout])


@dataclass(frozen=True)
class ChampionView:
    """The champion's predictions on the pool: what annotators see as pre-annotations."""

    version: str
    probs: npt.NDArray[np.float32]


def _champion_view(
    settings: Settings,
    mlflow_client: MlflowClient,
    pool: embedded.SplitFeatures,
    body_version: str,
    classes: list[str],
    report: RoundReport,
    probs: npt.NDArray[np.float32] | None,
) -> ChampionView | None:
    """The champion's predictions on the pool (this round's model when it was just promoted); None when there
    is no champion, or its head cannot read these embeddings (another body, another class list)."""
    if report.promoted and probs is not None and report.model_version is not None:
        return ChampionView(report.model_version, probs)
    version = tracking.champion_version(mlflow_client, settings)
    if version is None or _body_version(tracking.model_version(mlflow_client, settings, version)) != body_version:
        return None
    classifier = _load(mlflow_client, settings, version)
    if list(classifier.classes) != classes:
        return None
    return ChampionView(version, predict_proba(classifier.head, pool.vectors))


def _room_for_tasks(settings: Settings, catalog: Catalog, report: RoundReport, new_labels: bool) -> int:
    """How many tasks this round may still push: its batch, less what a crashed attempt of it sent, and no
    more than keeps the tasks waiting for an annotation under label_studio.max_open_tasks; none while nothing
    was labelled since the last round and its tasks still wait."""
    cap = settings.label_studio.max_open_tasks or 3 * settings.k_per_round
    waiting = catalog.open_task_count()
    if waiting and not new_labels:
        report.description = f"not pushed: no new labels since the last round, and {waiting} of its tasks still wait"
        return 0
    if waiting >= cap:
        report.description = (
            f"not pushed: {waiting} tasks wait for an annotation in Label Studio "
            f"(label_studio.max_open_tasks: {cap}); new ones go out once they are answered"
        )
    return min(settings.k_per_round - catalog.round_task_count(report.round_id), cap - waiting)


def _select_and_push(
    settings: Settings,
    catalog: Catalog,
    ls_client: LabelStudio | None,
    current: State,
    probs: npt.NDArray[np.float32] | None,
    champion: ChampionView | None,
    report: RoundReport,
    new_labels: bool,
) -> None:
    """Select by the newest model (else the champion, else without a model) and push with the champion's
    predictions, so annotators never see a model that lost."""
    pool, classes = current.pool, current.classes
    if ls_client is not None:  # tasks a crashed push left in Label Studio are recorded first: never sent twice
        project_id = labelstudio.ensure_project(ls_client, settings, catalog, classes)
        reconcile_tasks(ls_client, catalog, project_id, round_id=report.round_id)
        if report.promoted and champion is not None:  # a new champion: open tasks show its predictions
            _refresh_open_tasks(ls_client, catalog, project_id, pool.ids, champion.probs, classes, champion.version)
    batch = _select_batch(
        settings, catalog, current=current, report=report, probs=probs, champion=champion, new_labels=new_labels
    )
    if batch is None or ls_client is None:
        return
    pushed = labelstudio.push_tasks(
        ls_client, catalog, settings, project_id, batch.tasks, model_version=batch.shown_version,
        round_id=report.round_id,
    )  # fmt: skip
    provenance.record_selection(
        catalog,
        round_id=report.round_id,
        strategy=report.strategy,
        params={
            "description": report.description,
            "k_per_round": settings.k_per_round,
            "seed": settings.seed,
            "rng": [settings.seed, report.round_id],
            "candidates": batch.n_candidates,
            "labelled": batch.n_labelled,
        },
        model_version=batch.scorer,
        picks=[(t.sample_id, t.score) for t in batch.tasks if t.sample_id in pushed],
    )


@dataclass(frozen=True)
class _Batch:
    """A round's selected tasks, with what the push and the selection's provenance record about them."""

    tasks: list[labelstudio.TaskToPush]
    shown_version: str | None  # the model whose predictions the tasks show; None: no model yet
    scorer: str | None  # the model whose predictions the strategy read; None: selected without one
    n_candidates: int
    n_labelled: int


def _select_batch(
    settings: Settings,
    catalog: Catalog,
    *,
    current: State,
    report: RoundReport,
    probs: npt.NDArray[np.float32] | None,
    champion: ChampionView | None,
    new_labels: bool,
) -> _Batch | None:
    """Pick as many unlabelled, never-sent samples as there is room for, by the newest model's predictions
    (else the champion's, else a model-free strategy), and list them in the report; None when none fit."""
    pool, split = current.pool, current.split
    scorer = report.model_version if probs is not None else None
    if probs is None and champion is not None:
        probs, scorer = champion.probs, champion.version
    sent = catalog.sent_sample_ids()
    candidates = np.array(
        [i for i, sid in enumerate(pool.ids) if split.targets[i] < 0 and int(sid) not in sent], dtype=np.int64
    )
    n = min(_room_for_tasks(settings, catalog, report, new_labels), len(candidates))
    if n <= 0:
        report.description = report.description or "nothing left to select"
        return None
    name = settings.strategy if probs is not None or settings.strategy in MODEL_FREE else "random"
    labelled = np.flatnonzero(split.targets >= 0)
    view = PoolView(
        candidates=candidates, labelled=labelled, labelled_targets=split.targets[labelled], probs=probs,
        embeddings=pool.vectors,
    )  # fmt: skip
    selection = get_strategy(name)(view, n, rng=np.random.default_rng([settings.seed, report.round_id]))
    known = {int(pool.ids[i]) for i in labelled} | sent
    keep, report.near_duplicates = quarantine.drop_near_duplicates(settings, catalog, pool, selection.positions, known)
    faults.point("round:after_select")
    report.strategy = name
    report.description = selection.description + ("" if probs is not None else " (cold start: no model yet)")
    shown = champion or (ChampionView(scorer, probs) if scorer is not None and probs is not None else None)
    tasks = [
        _task(pool, int(position), float(score), shown, current.classes)
        for position, score in zip(selection.positions[keep], selection.scores[keep], strict=True)
    ]
    report.selected = [
        {"sample_id": t.sample_id, "score": t.score, "predicted": t.predicted, "confidence": t.confidence}
        for t in tasks
    ]
    return _Batch(tasks, shown.version if shown else None, scorer, len(candidates), len(labelled))


def _task(
    pool: embedded.SplitFeatures, position: int, score: float, shown: ChampionView | None, classes: list[str]
) -> labelstudio.TaskToPush:
    """One selected sample as a Label Studio task, pre-annotated by the model annotators are shown."""
    predicted, confidence = "", 0.0
    if shown is not None:
        predicted, confidence = classes[int(shown.probs[position].argmax())], float(shown.probs[position].max())
    return labelstudio.TaskToPush(
        sample_id=int(pool.ids[position]), path=pool.paths[position], predicted=predicted, confidence=confidence,
        score=score,
    )  # fmt: skip


@locking.locked
def run_sync(settings: Settings, catalog: Catalog, ls_client: LabelStudio) -> SyncOutcome:
    project_id = labelstudio.ensure_project(ls_client, settings, catalog, _classes(catalog))
    ls = settings.label_studio
    reviews = review.sync_reviews(ls_client, catalog, project_id)  # verdicts first: this sync then sees them
    sync = labelstudio.sync_annotations(
        ls_client, catalog, project_id, mode=ls.label_mode, export_above=ls.export_above
    )
    provenance.record_annotations(ls_client, catalog, project_id)
    state, now = schedule.label_state(catalog.labels()), schedule.utc_now()
    due = schedule.finetune_due(catalog, state, settings.finetune, now=now)
    if due.due:  # recorded now, under the lock: a second sync or event on these labels is not due again
        schedule.request_finetune(catalog, state, now=now)
    return SyncOutcome(
        report=sync,
        n_labels=state.n_labels,
        finetune_due=due.due,
        labels_at_last_finetune=due.counted_from,
        reviews=reviews,
        finetune_reason=due.reason,
    )


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
    current = _current_state(settings, catalog, progress=progress)
    if len(np.unique(current.split.targets[current.split.train])) < 2:
        raise DataError(f"fine-tuning needs labels of at least 2 classes; the catalog has {len(current.labels)} labels")
    state = schedule.label_state(current.labels)
    schedule.start_finetune(catalog, state, now=schedule.utc_now())  # refused when these labels had one
    baseline_acc = _baseline_accuracy(settings, current)
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
    champion_acc = _champion_holdout_accuracy(settings, mlflow_client, current.pool, current.split, current.classes)
    logged = _log_finetune(mlflow_client, start, tuned, holdout=holdout, baseline_acc=baseline_acc)
    promotion = tracking.decide_promotion(
        holdout.accuracy, champion_acc, margin=settings.promotion_margin, baseline=baseline_acc
    )
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
        start, tuned, logged, promotion, holdout_acc=holdout.accuracy, champion_acc=champion_acc,
        baseline_acc=baseline_acc, test_acc=test_acc,
    )  # fmt: skip


def _baseline_accuracy(settings: Settings, current: State) -> float:
    """The guard's baseline: a head alone on the features the project uses now, on the held-out labels."""
    split = current.split
    baseline = _fit_head(settings, current.pool, split.train, split.targets, len(current.classes))
    return accuracy(predict_proba(baseline, current.pool.vectors[split.holdout]), split.targets[split.holdout])


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
    head = _fit_head(settings, pool, train, split.targets, len(classes))
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
        checkpoint_dir=settings.checkpoints_dir,
        resume=ft.resume,
    )
    return _Tuned(result, decision, n_groups, far_domain, domain_reason, probe, labels_per_class, train, val)


@dataclass(frozen=True)
class _HoldoutScore:
    """A fine-tuned model on the held-out labels: its accuracy and, when there are any, its confusion matrix
    (a figure) and per-class report (a table) for the MLflow run."""

    accuracy: float
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
    return _HoldoutScore(holdout_acc, figures, tables)


def _log_finetune(
    mlflow_client: MlflowClient, start: _Start, tuned: _Tuned, *, holdout: _HoldoutScore, baseline_acc: float
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
            "baseline_holdout_accuracy": baseline_acc,
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
    test_targets = _targets(test.truths, classes)
    known = test_targets >= 0
    if not known.any():
        return float("nan")
    return accuracy(predict_proba(classifier.head, test.vectors[known]), test_targets[known])


def _finetune_report(
    start: _Start,
    tuned: _Tuned,
    logged: tracking.LoggedModel,
    promotion: tracking.PromotionDecision,
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


def switch_body(settings: Settings, catalog: Catalog, version: str, body: nn.Module, *, progress: bool = True) -> bool:
    """Re-embed the pool with `body` and rebuild the index, then point the catalog at them.

    Until the pointer moves, rounds keep using the previous embeddings and index, so a crash half-way
    leaves a working (old) state. Returns False when `version` already embeds the pool.
    """
    if embedded.body_version(settings, catalog) == version:
        return False
    pool = embedded.split_features(settings, catalog, POOL, body, version, progress=progress)
    embedded.rebuild_index(settings, pool, version)
    embedded.set_body_version(settings, catalog, version)
    return True


def _body_version(model: ModelVersion) -> str:
    """The body version whose embeddings a registered model's head reads: its own for a fine-tune."""
    if model.tags.get("kind") == "finetune":
        return str(model.version)
    return model.tags.get("body_version", embedded.IMAGENET)


@locking.locked
def promote(
    settings: Settings, catalog: Catalog, mlflow_client: MlflowClient, version: str, *, progress: bool = True
) -> str:
    """Make a registered version the champion by hand (roll back or forward); returns the body now in use.

    Open Label Studio tasks still show the old champion's predictions until `refresh_open_tasks` runs
    (the CLI and the flows call it next: it needs Label Studio, the promotion does not)."""
    model = tracking.model_version(mlflow_client, settings, version)
    in_use = model.tags.get("backbone") or _load(mlflow_client, settings, version).backbone
    tracking.apply_promotion(
        mlflow_client, settings, version, tracking.PromotionDecision(True, "promoted by hand (flywheel promote)")
    )
    body_version = _body_version(model)
    model_settings = settings.model_copy(update={"backbone": in_use})
    body = embedded.load_body(model_settings, body_version)
    switch_body(model_settings, catalog, body_version, body, progress=progress)
    embedded.record_backbone(catalog, configured=embedded.configured_backbone(settings, catalog), in_use=in_use)
    return body_version


@locking.locked
def refresh_open_tasks(
    settings: Settings,
    catalog: Catalog,
    ls_client: LabelStudio,
    mlflow_client: MlflowClient,
    version: str | None = None,
    *,
    progress: bool = True,
) -> int:
    """Show every still-open task the prediction of registered `version` (default: the champion) instead
    of the one it was pushed with; returns how many tasks changed. Run after a promotion outside a round (a
    fine-tune's, `flywheel promote`); safe to rerun, it creates no task."""
    version = version or tracking.champion_version(mlflow_client, settings)
    if version is None:
        return 0
    body_version = _body_version(tracking.model_version(mlflow_client, settings, version))
    classifier = _load(mlflow_client, settings, version)
    model_settings = settings.model_copy(update={"backbone": classifier.backbone})
    pool = embedded.split_features(model_settings, catalog, POOL, classifier.body, body_version, progress=progress)
    probs = predict_proba(classifier.head, pool.vectors)
    with health.unavailable_as(labelstudio.SERVICE, settings.label_studio.url):
        project_id = labelstudio.ensure_project(ls_client, settings, catalog, _classes(catalog))
        return _refresh_open_tasks(ls_client, catalog, project_id, pool.ids, probs, list(classifier.classes), version)


def _refresh_open_tasks(
    ls_client: LabelStudio,
    catalog: Catalog,
    project_id: int,
    sample_ids: npt.NDArray[np.int64],
    probs: npt.NDArray[np.float32],
    classes: list[str],
    version: str,
) -> int:
    predicted = {int(sid): classes[int(row.argmax())] for sid, row in zip(sample_ids, probs, strict=True)}
    return labelstudio.refresh_predictions(ls_client, catalog, project_id, predicted, model_version=version)


def _load(mlflow_client: MlflowClient, settings: Settings, version: str) -> Classifier:
    """A registered version of the project's model, from the client's server."""
    return tracking.load_classifier(mlflow_client.tracking_uri, settings.registered_model_name, version)


def _fit_head(
    settings: Settings,
    pool: embedded.SplitFeatures,
    rows: npt.NDArray[np.intp],
    targets: npt.NDArray[np.int64],
    n_classes: int,
) -> nn.Linear:
    return train_head(pool.vectors[rows], targets[rows], n_classes, l2=settings.head_l2, seed=settings.seed)


def _no_model_yet(classes: list[str], trained: list[int], n_train: int) -> str:
    """Why a round trains no model: a classifier needs training labels of two classes at least."""
    have = ", ".join(classes[c] for c in trained) or "none"
    if len(classes) < 2:
        return f"no model: the project has one class ({have}); a classifier needs at least 2 (import another)"
    return f"no model yet: {n_train} training labels cover {len(trained)} class(es) ({have}); a model needs 2"


def _classes(catalog: Catalog) -> list[str]:
    classes = catalog.classes()
    if not classes:
        raise DataError("the catalog has no classes yet: run `flywheel import` first")
    return classes


def _targets(truths: list[str | None], classes: list[str]) -> npt.NDArray[np.int64]:
    position = {c: i for i, c in enumerate(classes)}
    return np.array([position.get(t, -1) if t is not None else -1 for t in truths], dtype=np.int64)
