"""MLflow: every model is a run plus a registered version; the `champion` alias moves only on a win.

Clients are built here at the edge and passed in; nothing is configured at import time, and nothing global
is left behind: every call names its server (a client, or a tracking URI), so a process that never called
`connect` cannot silently read another store (MLflow's default is a SQLite file in the working directory).
"""

from __future__ import annotations

import importlib
import math
import sys
import tempfile
from collections.abc import Iterator, Mapping, Sequence
from contextlib import AbstractContextManager, contextmanager
from dataclasses import dataclass
from typing import Any

import mlflow
import numpy as np
import numpy.typing as npt
from matplotlib.figure import Figure
from mlflow import MlflowClient
from mlflow.entities.model_registry import ModelVersion
from mlflow.exceptions import MlflowException

from flywheel.config import Settings
from flywheel.errors import DataError, UnknownChoiceError
from flywheel.features.backbones import Classifier
from flywheel.health import require_healthy, unavailable_as
from flywheel.registry.guard import PromotionDecision

SERVICE = "MLflow"


def _registration_unsaid() -> AbstractContextManager[object]:
    """MLflow's own switch (the one its autologging uses) for its event logs while a model is saved and registered:
    it warns on every save that a pickled model runs code when loaded (the classifier is pickled on purpose and
    loaded only from the project's own MLflow server, docs/reliability.md) and prints "Successfully registered",
    "Created version" and "Waiting for model version" lines. The caller reports the version; a failure still
    raises."""
    from mlflow.utils.autologging_utils.logging_and_warnings import MlflowEventsAndWarningsBehaviorGlobally

    quiet: AbstractContextManager[object] = MlflowEventsAndWarningsBehaviorGlobally(  # type: ignore[no-untyped-call]
        disable_event_logs=True, disable_warnings=True, reroute_warnings=False
    )
    return quiet


CHAMPION, CHALLENGER = "champion", "challenger"
Table = dict[str, list[Any]]  # columns, as mlflow.log_table takes them


@dataclass(frozen=True)
class LoggedModel:
    version: str
    run_id: str
    run_url: str


def connect(settings: Settings) -> MlflowClient:
    """A client for the MLflow server in the settings (its runs and its registry), checked first."""
    url = settings.mlflow.url
    require_healthy(SERVICE, url)
    return MlflowClient(tracking_uri=url, registry_uri=url)


@contextmanager
def _fluent_api_on(client: MlflowClient) -> Iterator[None]:
    """MLflow's fluent API (start_run, log_figure, pytorch.log_model) reads process-wide URIs: point them at the
    client's server for one block, then put back what was there."""
    before = mlflow.get_tracking_uri(), mlflow.get_registry_uri()
    mlflow.set_tracking_uri(client.tracking_uri)
    mlflow.set_registry_uri(client.tracking_uri)
    try:
        yield
    finally:
        mlflow.set_tracking_uri(before[0])
        mlflow.set_registry_uri(before[1])


def experiment_id(client: MlflowClient, name: str) -> str:
    """The experiment's id, created on first use."""
    experiment = client.get_experiment_by_name(name)
    return experiment.experiment_id if experiment is not None else client.create_experiment(name)


def log_classifier(
    client: MlflowClient,
    settings: Settings,
    classifier: Classifier,
    *,
    run_name: str,
    params: Mapping[str, object],
    metrics: Mapping[str, float],
    tags: Mapping[str, str],
    history: Sequence[Mapping[str, float]] = (),
    figures: Mapping[str, Figure] | None = None,
    tables: Mapping[str, Table] | None = None,
) -> LoggedModel:
    """One run: params, metrics (and per-epoch `history`), pictures, then the model as a registered version."""
    import mlflow.pytorch

    size = classifier.image_size
    example = np.zeros((1, 3, size, size), dtype=np.float32)
    with (
        _fluent_api_on(client),
        mlflow.start_run(
            experiment_id=experiment_id(client, settings.experiment_name), run_name=run_name, tags=dict(tags)
        ) as run,
    ):
        mlflow.log_params({k: _param(v) for k, v in params.items()})
        mlflow.log_metrics({k: v for k, v in metrics.items() if not math.isnan(v)})
        for step, row in enumerate(history):
            mlflow.log_metrics({k: float(v) for k, v in row.items() if isinstance(v, int | float)}, step=step)
        for name, figure in (figures or {}).items():
            mlflow.log_figure(figure, name)
        for name, table in (tables or {}).items():
            mlflow.log_table(table, name)
        with _registration_unsaid():
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
    return LoggedModel(
        version=version,
        run_id=run.info.run_id,
        run_url=f"{settings.mlflow.url}/#/experiments/{run.info.experiment_id}/runs/{run.info.run_id}",
    )


# Versions registered before the package was split into sub-packages pickled their classes under these names.
_MOVED_MODULES = {"flywheel.backbones": "flywheel.features.backbones"}


def _alias_moved_modules() -> None:
    """Let pickles written by older flywheel versions find the classes at their new home."""
    for old_name, new_name in _MOVED_MODULES.items():
        sys.modules.setdefault(old_name, importlib.import_module(new_name))


def load_classifier(tracking_uri: str, model_name: str, version: str) -> Classifier:
    """A registered version's classifier, read from the server at `tracking_uri`, on the CPU.

    The version's files are located through a client of that server: `models:/` URIs would be resolved
    against MLflow's process-wide registry URI, whatever is passed (mlflow 3.17)."""
    import mlflow.artifacts
    import mlflow.pytorch

    _alias_moved_modules()
    client = MlflowClient(tracking_uri=tracking_uri, registry_uri=tracking_uri)
    with unavailable_as(SERVICE, tracking_uri), tempfile.TemporaryDirectory(prefix="flywheel-model-") as folder:
        source = client.get_model_version_download_uri(model_name, version)
        local = mlflow.artifacts.download_artifacts(artifact_uri=source, dst_path=folder, tracking_uri=tracking_uri)
        classifier = mlflow.pytorch.load_model(local, map_location="cpu")
    if not isinstance(classifier, Classifier):
        raise DataError(f"version {version} of {model_name} at {tracking_uri} is a {type(classifier).__name__}, "
                        "not a flywheel classifier")  # fmt: skip
    return classifier


def model_version(client: MlflowClient, settings: Settings, version: str) -> ModelVersion:
    """A registered version, or an error listing the versions that exist."""
    name = settings.registered_model_name
    try:
        return client.get_model_version(name, version)
    except MlflowException as exc:
        known = sorted((v.version for v in client.search_model_versions(f"name='{name}'")), key=int)
        raise UnknownChoiceError(f"version of {name}", str(version), [str(v) for v in known]) from exc


def champion_version(client: MlflowClient, settings: Settings) -> str | None:
    try:
        return str(client.get_model_version_by_alias(settings.registered_model_name, CHAMPION).version)
    except MlflowException as exc:
        if exc.error_code in ("RESOURCE_DOES_NOT_EXIST", "INVALID_PARAMETER_VALUE"):  # no model, or no alias yet
            return None
        raise  # a server that fails must not read as "no champion" (the guard would then promote anything)


def apply_promotion(client: MlflowClient, settings: Settings, version: str, decision: PromotionDecision) -> None:
    """Move `champion` to the version, or mark it `challenger`; the reason is a tag either way."""
    name = settings.registered_model_name
    client.set_model_version_tag(name, version, "promotion", decision.reason)
    client.set_registered_model_alias(name, CHAMPION if decision.promoted else CHALLENGER, version)


def _param(value: object) -> object:
    return value if isinstance(value, int | float | str | bool) else str(value)


def per_class_table(matrix: npt.NDArray[np.integer[Any]], classes: Sequence[str]) -> Table:
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
