"""A round: train the head on the labels so far, register it (promoted only when it beats the champion on the
same held-out labels), score the pool, select the next batch and push it to Label Studio with the champion's
predictions, so annotators never see a model that lost."""

from __future__ import annotations

from dataclasses import asdict, dataclass, field
from typing import Any

import numpy as np
import numpy.typing as npt
from label_studio_sdk.client import LabelStudio
from mlflow import MlflowClient

from flywheel import faults, health, labelstudio, locking
from flywheel.catalog import POOL, TEST, Catalog
from flywheel.config import Settings
from flywheel.features import embedded
from flywheel.features.backbones import Classifier
from flywheel.insight import after_round, provenance
from flywheel.insight.reports import confusion_figure, confusion_matrix, per_class_counts
from flywheel.labelstudio.tasks import reconcile_tasks
from flywheel.loop import schedule
from flywheel.loop.features import head_features
from flywheel.loop.state import (
    LabelledSplit,
    State,
    champion_holdout,
    current_state,
    fit_head,
    load,
    model_features_version,
    refresh_task_predictions,
    truth_targets,
)
from flywheel.registry import guard, tracking
from flywheel.sources import quarantine
from flywheel.strategies import MODEL_FREE, PoolView, get_strategy
from flywheel.training.head import accuracy, predict_proba


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
    features: str = "last"  # the body stage the head read (loop.features: the far-domain cell)
    features_reason: str = ""
    features_probe: dict[str, float] = field(default_factory=dict)  # stage -> cross-validated probe accuracy


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
    current, choice = head_features(
        settings, catalog, current_state(settings, catalog, progress=progress), progress=progress
    )
    classes, labels, pool, split = current.classes, current.labels, current.pool, current.split
    round_id = catalog.start_round(strategy=settings.strategy, n_labels=len(labels))
    report = RoundReport(
        round_id=round_id, n_labels=len(labels), n_train=len(split.train), n_holdout=len(split.holdout),
        labels_per_class=per_class_counts(list(labels.values()), classes),
        features=choice.stage, features_reason=choice.reason, features_probe=choice.probe,
    )  # fmt: skip
    probs = None  # the newest model's view of the pool: selection reads it
    state, previous = schedule.label_state(labels), schedule.last_round_model(catalog)
    new_labels = schedule.labels_at_last_round(catalog) != state
    report.model_note = _why_no_model(
        classes, split, state=state, previous=previous, body_version=current.features_version
    )
    if not report.model_note:
        with health.unavailable_as("MLflow", settings.mlflow.url):  # a server gone mid-round is named as such
            probs = _train_and_register(settings, catalog, mlflow_client, current, report, progress=progress)
        assert report.model_version is not None and report.run_id is not None  # _train_and_register registered it
        schedule.record_round_model(
            catalog, state, current.features_version, report.model_version, now=schedule.utc_now()
        )
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
            champion = _champion_view(
                settings, catalog, mlflow_client, pool, current.features_version, classes, report, probs
            )
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
    head = fit_head(settings, pool, split.train, split.targets, len(classes))
    probs = predict_proba(head, pool.vectors)
    faults.point("round:after_train")
    report.holdout_accuracy = accuracy(probs[split.holdout], split.targets[split.holdout])
    figures, test_metrics = {}, {}
    test = embedded.split_features(settings, catalog, TEST, current.body, current.features_version, progress=progress)
    test_targets = truth_targets(test.truths, classes)
    if len(test_targets):
        test_probs = predict_proba(head, test.vectors[test_targets >= 0])
        report.test_accuracy = accuracy(test_probs, test_targets[test_targets >= 0])
        test_metrics["test_accuracy"] = report.test_accuracy
        matrix = confusion_matrix(test_targets[test_targets >= 0], test_probs.argmax(1), len(classes))
        figures["confusion_test.png"] = confusion_figure(matrix, classes, f"round {report.round_id}, test split")
    classifier = Classifier(settings.backbone, current.body, head, classes, settings.image_size)
    vs_champion, rule = _against_champion(settings, mlflow_client, current, probs)
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
            **guard.metrics(vs_champion, "vs_champion"),
        },
        tags={
            "kind": "head", "round": str(report.round_id), "body_version": current.body_version,
            "backbone": settings.backbone, "features": current.features,
        },
        figures=figures,
        tables={"labels_per_class.json": {"class": classes, "labels": [report.labels_per_class[c] for c in classes]}},
    )  # fmt: skip
    decision = guard.decide_promotion(
        vs_champion, n_holdout=len(split.holdout), margin=settings.promotion_margin, rule=rule
    )
    tracking.apply_promotion(mlflow_client, settings, logged.version, decision)
    faults.point("round:after_register")
    report.model_version, report.run_url, report.run_id = logged.version, logged.run_url, logged.run_id
    report.promoted, report.promotion_reason = decision.promoted, decision.reason
    return probs


def _against_champion(
    settings: Settings, mlflow_client: MlflowClient, current: State, probs: npt.NDArray[np.float32]
) -> tuple[guard.PairedDifference | None, guard.Rule]:
    """The head against the champion on the same held-out labels, and the rule that applies: a head retrained
    on more labels of the champion's body (whichever stage it reads) need only not be worse beyond noise; on
    another body, better."""
    split = current.split
    champion = champion_holdout(settings, mlflow_client, current.pool, split, current.classes)
    if champion is None:
        return None, "better"
    right = probs[split.holdout].argmax(1) == split.targets[split.holdout]
    rule: guard.Rule = "not_worse" if champion.body_version == current.body_version else "better"
    return guard.paired_difference(right, champion.correct), rule


def _head_params(settings: Settings, report: RoundReport, *, body_version: str) -> dict[str, object]:
    """A round's head run params: what it was trained on and with which settings, so runs compare."""
    return {
        "kind": "head",
        "round": report.round_id,
        "backbone": settings.backbone,
        "body_version": body_version,
        "features": report.features,
        "features_reason": report.features_reason,
        **{f"stage_probe_{stage}": round(acc, 4) for stage, acc in report.features_probe.items()},
        "image_size": settings.image_size,
        "strategy": settings.strategy,
        "k_per_round": settings.k_per_round,
        "n_labels": report.n_labels,
        "n_train": report.n_train,
        "n_holdout": report.n_holdout,
        "seed": settings.seed,
        "trainable": "head",
    }


@dataclass(frozen=True)
class ChampionView:
    """The champion's predictions on the pool: what annotators see as pre-annotations."""

    version: str
    probs: npt.NDArray[np.float32]


def _champion_view(
    settings: Settings,
    catalog: Catalog,
    mlflow_client: MlflowClient,
    pool: embedded.SplitFeatures,
    features_version: str,
    classes: list[str],
    report: RoundReport,
    probs: npt.NDArray[np.float32] | None,
) -> ChampionView | None:
    """The champion's predictions on the pool (this round's model when it was just promoted); None when there
    is no champion, or its head cannot read this pool (another class list). A champion that reads other
    features (another stage) is given them: annotators see the champion, whatever this round reads."""
    if report.promoted and probs is not None and report.model_version is not None:
        return ChampionView(report.model_version, probs)
    version = tracking.champion_version(mlflow_client, settings)
    if version is None:
        return None
    classifier = load(mlflow_client, settings, version)
    if list(classifier.classes) != classes:
        return None
    vectors = pool.vectors
    theirs = model_features_version(tracking.model_version(mlflow_client, settings, version))
    if theirs != features_version:
        model_settings = settings.model_copy(update={"backbone": classifier.backbone})
        other = embedded.split_features(model_settings, catalog, POOL, classifier.body, theirs, progress=False)
        if not np.array_equal(other.ids, pool.ids):
            return None
        vectors = other.vectors
    return ChampionView(version, predict_proba(classifier.head, vectors))


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
            refresh_task_predictions(
                ls_client, catalog, project_id, pool.ids, champion.probs, classes, champion.version
            )
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
    indexed = current.last_stage_pool or pool  # the near-duplicate index holds the last stage's vectors
    keep, report.near_duplicates = quarantine.drop_near_duplicates(
        settings, catalog, indexed, selection.positions, known
    )
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


def _no_model_yet(classes: list[str], trained: list[int], n_train: int) -> str:
    """Why a round trains no model: a classifier needs training labels of two classes at least."""
    have = ", ".join(classes[c] for c in trained) or "none"
    if len(classes) < 2:
        return f"no model: the project has one class ({have}); a classifier needs at least 2 (import another)"
    return f"no model yet: {n_train} training labels cover {len(trained)} class(es) ({have}); a model needs 2"
