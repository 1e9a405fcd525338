"""What a round leaves behind once its model is registered: the training set with its provenance on the model,
the label-budget forecast, and the label review.

run_round calls `after_training` and keeps what it returns; each part is its own module (provenance, forecast,
review) and this one only feeds them the round's arrays and writes their results to MLflow, the catalog and
Label Studio.
"""

from __future__ import annotations

import json
import math
from dataclasses import dataclass
from typing import Any

import numpy as np
import numpy.typing as npt
from label_studio_sdk import LabelStudio
from mlflow import MlflowClient
from sqlalchemy import select

from flywheel.catalog import Catalog, ForecastRecord
from flywheel.config import Settings
from flywheel.errors import DataError
from flywheel.features.embedded import SplitFeatures
from flywheel.insight import forecast, provenance, review
from flywheel.training.crossval import cross_validate

FORECAST_ARTIFACT, FORECAST_PLOT = "forecast.json", "forecast.png"


@dataclass(frozen=True)
class AfterTraining:
    """What a round's insight steps found: the forecast (or why none yet) and the labels sent for review."""

    forecast: forecast.Forecast | None
    forecast_note: str
    reviews_sent: int = 0  # labels flagged as likely wrong and sent to Label Studio for review
    review_note: str = ""

    def markdown(self) -> str:
        """The round report's forecast and review sections (markdown, each starting with a blank line)."""
        sections = []
        if self.forecast is not None:
            sections.append(forecast.markdown(self.forecast) + f"- {self.forecast_note}\n")
        elif self.forecast_note:
            sections.append(f"## Label-budget forecast\n\n- {self.forecast_note}\n")
        if self.review_note:
            sections.append(f"## Label review\n\n- {self.review_note}\n")
        return "".join("\n" + section for section in sections)


@dataclass(frozen=True)
class TrainedRound:
    """The round whose model was just registered, as the insight steps need it."""

    round_id: int
    run_id: str
    model_version: str
    n_labels: int
    test_accuracy: float
    holdout_accuracy: float


def after_training(
    settings: Settings,
    catalog: Catalog,
    ls_client: LabelStudio | None,
    mlflow_client: MlflowClient,
    trained: TrainedRound,
    *,
    pool: SplitFeatures,
    targets: npt.NDArray[np.integer[Any]],
    roles: dict[int, str],
    labels: dict[int, str],
    classes: list[str],
) -> AfterTraining:
    """Training set on the registered model, forecast on its run and in the catalog, label review in Label
    Studio (when a client is given and settings.review.enabled). `targets` are class indices per pool row
    (-1: unlabelled), `roles` each labelled sample's part (train, validation, holdout)."""
    provenance.log_training_set(
        mlflow_client, catalog, run_id=trained.run_id, model_name=settings.registered_model_name,
        version=trained.model_version, labels=labels, roles=roles,
    )  # fmt: skip
    fc, fc_note = round_forecast(
        settings, catalog, round_id=trained.round_id, n_labels=trained.n_labels, test=trained.test_accuracy,
        holdout=trained.holdout_accuracy,
    )  # fmt: skip
    if fc is not None:
        publish_forecast(mlflow_client, catalog, trained.run_id, trained.round_id, fc, fc_note)
    if ls_client is None or not settings.review.enabled:
        return AfterTraining(fc, fc_note)
    labelled = np.flatnonzero(targets >= 0)
    sent, note = label_review(
        settings, catalog, ls_client, features=pool.vectors[labelled], sample_ids=pool.ids[labelled],
        targets=targets[labelled], classes=classes, round_id=trained.round_id, model_version=trained.model_version,
    )  # fmt: skip
    return AfterTraining(fc, fc_note, sent, note)


def roles(
    sample_ids: npt.NDArray[np.integer[Any]],
    train: npt.NDArray[np.integer[Any]],
    holdout: npt.NDArray[np.integer[Any]],
    validation: npt.NDArray[np.integer[Any]] | None = None,
) -> dict[int, str]:
    """sample id -> train | validation | holdout, from positions into `sample_ids`."""
    out = {int(sample_ids[i]): "train" for i in train}
    out.update({int(sample_ids[i]): "validation" for i in (validation if validation is not None else [])})
    out.update({int(sample_ids[i]): "holdout" for i in holdout})
    return out


def learning_points(
    catalog: Catalog, *, round_id: int, n_labels: int, test: float, holdout: float
) -> tuple[list[int], list[float], str]:
    """(labels, accuracy) of every round with a model, this one included: test accuracy when every such round
    has it (the same test split throughout), else held-out accuracy. Returns (labels, accuracy, which)."""
    rounds = [
        r
        for r in catalog.rounds()
        if r.id != round_id and r.model_version is not None and r.holdout_accuracy is not None
    ]
    use_test = not math.isnan(test) and all(r.test_accuracy is not None for r in rounds)
    labels = [r.n_labels for r in rounds] + [n_labels]
    accuracy = [r.test_accuracy if use_test else r.holdout_accuracy for r in rounds] + [test if use_test else holdout]
    points = [(n, a) for n, a in zip(labels, accuracy, strict=True) if a is not None and not math.isnan(a) and n > 0]
    return [n for n, _ in points], [a for _, a in points], "test" if use_test else "held-out"


def round_forecast(
    settings: Settings, catalog: Catalog, *, round_id: int, n_labels: int, test: float, holdout: float
) -> tuple[forecast.Forecast | None, str]:
    """The forecast from the rounds so far, or None and why not (too few rounds with a model)."""
    labels, accuracy, which = learning_points(catalog, round_id=round_id, n_labels=n_labels, test=test, holdout=holdout)
    fc = settings.forecast
    try:
        result = forecast.make_forecast(
            labels, accuracy, current_labels=n_labels, target=fc.target_accuracy, batch=settings.k_per_round,
            window=fc.stop_window, stop_threshold=fc.stop_threshold, n_boot=fc.bootstrap,
            rng=np.random.default_rng([settings.seed, round_id]),
        )  # fmt: skip
    except DataError as exc:
        return None, f"no forecast yet: {exc} ({len(labels)} rounds with a model and {which} accuracy)"
    return result, f"fitted to the {which} accuracy of {len(labels)} rounds"


def publish_forecast(
    client: MlflowClient, catalog: Catalog, run_id: str, round_id: int, result: forecast.Forecast, note: str
) -> None:
    """The plot (curve, band, target), the numbers and the summary on the run; the record in the catalog."""
    client.log_figure(run_id, forecast.figure(result, f"round {round_id}: {note}"), FORECAST_PLOT)
    client.log_text(run_id, json.dumps(result.to_dict(), indent=1), FORECAST_ARTIFACT)
    metrics = {
        "forecast_next_batch_gain": result.batch_gain,
        "forecast_plateau": result.fit.a,
        "forecast_window_gain": result.window_gain,
    }
    if result.labels_to_target is not None:
        metrics["forecast_labels_to_target"] = float(result.labels_to_target)
    for key, value in metrics.items():
        client.log_metric(run_id, key, value)
    client.set_tag(run_id, "forecast", " | ".join(forecast.summary_lines(result))[:5000])
    with catalog.transaction() as s:
        s.merge(ForecastRecord(round_id=round_id, forecast=json.dumps(result.to_dict())))


def latest_forecast(catalog: Catalog) -> tuple[int, forecast.Forecast] | None:
    """(round id, forecast) of the most recent round that made one."""
    with catalog.transaction() as s:
        row = s.scalars(select(ForecastRecord).order_by(ForecastRecord.round_id.desc()).limit(1)).first()
        return None if row is None else (row.round_id, forecast.Forecast.from_dict(json.loads(row.forecast)))


def label_review(
    settings: Settings,
    catalog: Catalog,
    ls_client: LabelStudio,
    *,
    features: npt.NDArray[np.floating[Any]],
    sample_ids: npt.NDArray[np.integer[Any]],
    targets: npt.NDArray[np.integer[Any]],
    classes: list[str],
    round_id: int,
    model_version: str,
) -> tuple[int, str]:
    """Cross-validate the head on every label, flag the likely wrong ones and send them for review."""
    rv = settings.review
    if len(targets) < rv.min_labels:
        return 0, f"label review starts at {rv.min_labels} labels ({len(targets)} so far)"
    cv = cross_validate(
        features, targets, len(classes), folds=rv.folds, n_sizes=1, l2=settings.head_l2, seed=settings.seed
    )
    suspects = review.find_suspects(
        sample_ids, targets, cv.probs, classes, review.annotator_votes(catalog),
        exclude=review.reviewed_sample_ids(catalog), max_self_confidence=rv.max_self_confidence,
    )  # fmt: skip
    sent = review.push_reviews(
        ls_client, settings, catalog, suspects[: rv.max_per_round], model_version=f"{model_version}-cv",
        round_id=round_id,
    )  # fmt: skip
    counts = review.review_counts(catalog)
    return sent, (
        f"{len(suspects)} labels flagged ({sent} sent to review, at most {rv.max_per_round} a round); "
        f"reviews so far: {counts.corrected} corrected, {counts.confirmed} confirmed, {counts.open} open"
    )
