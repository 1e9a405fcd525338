"""MLflow: every model is a run plus a registered version; the `champion` alias moves only on a win.

Clients are built here at the edge and passed in; nothing is configured at import time.
"""

from __future__ import annotations

import math
from collections.abc import Mapping, Sequence
from dataclasses import dataclass

import mlflow
import numpy as np
from matplotlib.figure import Figure
from mlflow import MlflowClient
from mlflow.entities.model_registry import ModelVersion
from mlflow.exceptions import MlflowException

from flywheel.config import Settings
from flywheel.errors import UnknownChoiceError
from flywheel.health import require_healthy

CHAMPION, CHALLENGER = "champion", "challenger"


@dataclass(frozen=True)
class LoggedModel:
    version: str
    run_id: str
    run_url: str


@dataclass(frozen=True)
class PromotionDecision:
    promoted: bool
    reason: str


def connect(settings: Settings) -> MlflowClient:
    """Point mlflow at the server from the settings (checked first) and select the project's experiment."""
    url = settings.mlflow.url
    require_healthy("MLflow", url)
    mlflow.set_tracking_uri(url)
    mlflow.set_registry_uri(url)
    mlflow.set_experiment(settings.experiment_name)
    return MlflowClient(tracking_uri=url, registry_uri=url)


def log_classifier(
    client: MlflowClient,
    settings: Settings,
    classifier: object,
    *,
    run_name: str,
    params: Mapping[str, object],
    metrics: Mapping[str, float],
    tags: Mapping[str, str],
    history: Sequence[Mapping[str, float]] = (),
    figures: Mapping[str, Figure] | None = None,
    tables: Mapping[str, dict[str, list]] | None = None,
) -> LoggedModel:
    """One run: params, metrics (and per-epoch `history`), pictures, then the model as a registered version."""
    import mlflow.pytorch

    image_size = int(params.get("image_size", settings.image_size))
    example = np.zeros((1, 3, image_size, image_size), dtype=np.float32)
    with mlflow.start_run(run_name=run_name, tags=dict(tags)) as run:
        mlflow.log_params({k: _param(v) for k, v in params.items()})
        mlflow.log_metrics({k: v for k, v in metrics.items() if not math.isnan(v)})
        for step, row in enumerate(history):
            mlflow.log_metrics({k: float(v) for k, v in row.items() if isinstance(v, int | float)}, step=step)
        for name, figure in (figures or {}).items():
            mlflow.log_figure(figure, name)
        for name, table in (tables or {}).items():
            mlflow.log_table(table, name)
        info = mlflow.pytorch.log_model(
            classifier,
            name="model",
            serialization_format="pickle",
            registered_model_name=settings.registered_model_name,
            input_example=example,
            pip_requirements=["torch", "torchvision", "efficientnet-lite-pytorch"],
        )
    version = str(info.registered_model_version)
    for key, value in tags.items():
        client.set_model_version_tag(settings.registered_model_name, version, key, value)
    experiment_id = run.info.experiment_id
    return LoggedModel(
        version=version,
        run_id=run.info.run_id,
        run_url=f"{settings.mlflow.url}/#/experiments/{experiment_id}/runs/{run.info.run_id}",
    )


def load_classifier(settings: Settings, version: str) -> object:
    import mlflow.pytorch

    return mlflow.pytorch.load_model(f"models:/{settings.registered_model_name}/{version}", map_location="cpu")


def model_version(client: MlflowClient, settings: Settings, version: str) -> ModelVersion:
    """A registered version, or an error listing the versions that exist."""
    name = settings.registered_model_name
    try:
        return client.get_model_version(name, version)
    except MlflowException:
        known = sorted((v.version for v in client.search_model_versions(f"name='{name}'")), key=int)
        raise UnknownChoiceError(f"version of {name}", str(version), [str(v) for v in known]) from None


def champion_version(client: MlflowClient, settings: Settings) -> str | None:
    try:
        return str(client.get_model_version_by_alias(settings.registered_model_name, CHAMPION).version)
    except MlflowException as exc:
        if exc.error_code in ("RESOURCE_DOES_NOT_EXIST", "INVALID_PARAMETER_VALUE"):  # no model, or no alias yet
            return None
        raise  # a server that fails must not read as "no champion" (the guard would then promote anything)


def decide_promotion(
    challenger: float, champion: float | None, *, margin: float, baseline: float | None = None
) -> PromotionDecision:
    """The guard: a new model must beat the champion on the same held-out labels by `margin`.

    `baseline` is the simpler model trained on the same labels (a head on the current body): a fine-tune
    that does not beat it is negative transfer, whatever it scores against an older champion.
    """
    if math.isnan(challenger):
        return PromotionDecision(False, "no held-out labels to compare on; champion kept")
    if baseline is not None and not challenger > baseline + margin:
        return PromotionDecision(
            False,
            f"held-out accuracy {challenger:.3f} does not beat {baseline:.3f} of a head-only model on the same "
            f"labels by more than {margin:.3f} (negative transfer guard)",
        )
    if champion is None:
        return PromotionDecision(True, f"no champion yet; challenger held-out accuracy {challenger:.3f}")
    if challenger > champion + margin:
        return PromotionDecision(
            True, f"held-out accuracy {challenger:.3f} beats champion {champion:.3f} by more than {margin:.3f}"
        )
    return PromotionDecision(
        False, f"held-out accuracy {challenger:.3f} does not beat champion {champion:.3f} by more than {margin:.3f}"
    )


def apply_promotion(client: MlflowClient, settings: Settings, version: str, decision: PromotionDecision) -> None:
    """Move `champion` to the version, or mark it `challenger`; the reason is a tag either way."""
    name = settings.registered_model_name
    client.set_model_version_tag(name, version, "promotion", decision.reason)
    client.set_registered_model_alias(name, CHAMPION if decision.promoted else CHALLENGER, version)


def _param(value: object) -> object:
    return value if isinstance(value, int | float | str | bool) else str(value)


def per_class_table(matrix: np.ndarray, classes: Sequence[str]) -> dict[str, list]:
    """Precision, recall, F1 and support per class from a (C, C) confusion matrix (rows true, cols predicted).

    A column for mlflow.log_table; a class never predicted (or never present) gets 0.0, not NaN.
    """
    matrix = np.asarray(matrix, dtype=np.float64)
    tp = np.diag(matrix)
    predicted, support = matrix.sum(0), matrix.sum(1)
    precision = np.divide(tp, predicted, out=np.zeros_like(tp), where=predicted > 0)
    recall = np.divide(tp, support, out=np.zeros_like(tp), where=support > 0)
    denom = precision + recall
    f1 = np.divide(2 * precision * recall, denom, out=np.zeros_like(tp), where=denom > 0)
    return {
        "class": list(classes),
        "precision": [round(float(v), 4) for v in precision],
        "recall": [round(float(v), 4) for v in recall],
        "f1": [round(float(v), 4) for v in f1],
        "support": [int(v) for v in support],
    }
