"""What every step reads: the project's classes, the body embedding the pool, the pool's features and the labels
split by their stable fold into training and held-out; and the helpers more than one step shares (a head on
those features, a registered model and the body it reads, the champion's answers on today's held-out labels)."""

from __future__ import annotations

from dataclasses import dataclass

import numpy as np
import numpy.typing as npt
from label_studio_sdk.client import LabelStudio
from mlflow import MlflowClient
from mlflow.entities.model_registry import ModelVersion
from torch import nn

from flywheel import labelstudio
from flywheel.catalog import POOL, Catalog
from flywheel.config import Settings
from flywheel.errors import DataError
from flywheel.features import embedded
from flywheel.features.backbones import Classifier
from flywheel.registry import tracking
from flywheel.training.finetune import predict_proba as finetune_predict_proba
from flywheel.training.head import train_head

VALIDATION_FOLDS = 15  # share (of 100 folds) of the training labels kept for early stopping in fine-tunes


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
    features: str = "last"  # the stage `body` returns and `pool` holds (loop.features: the far-domain cell)
    last_stage_pool: embedded.SplitFeatures | None = None  # when `features` is another stage: the index's vectors

    @property
    def features_version(self) -> str:
        """The cache key of what `pool` holds (embedded.features_version)."""
        return embedded.features_version(self.body_version, self.features)


def current_state(settings: Settings, catalog: Catalog, *, progress: bool) -> State:
    """Classes, the body embedding the pool (version and module), the pool's features, labels and their split."""
    classes = project_classes(catalog)
    version = embedded.body_version(settings, catalog)
    body = embedded.load_body(settings, version)
    pool = embedded.split_features(settings, catalog, POOL, body, version, progress=progress)
    labels = catalog.labels()
    return State(classes, version, body, pool, labels, split_labels(pool, labels, classes, settings.holdout_fraction))


@dataclass(frozen=True)
class ChampionHoldout:
    """The champion's answers on today's held-out labels (right or wrong per image), and what its head reads."""

    version: str
    body_version: str
    features_version: str
    correct: npt.NDArray[np.bool_]

    @property
    def accuracy(self) -> float:
        return float(self.correct.mean()) if len(self.correct) else float("nan")


def champion_holdout(
    settings: Settings,
    mlflow_client: MlflowClient,
    pool: embedded.SplitFeatures,
    split: LabelledSplit,
    classes: list[str],
) -> ChampionHoldout | None:
    """The champion scored on today's held-out labels, so both models face exactly the same test (image by
    image, for the guard's paired comparison); None without a champion that answers these classes."""
    version = tracking.champion_version(mlflow_client, settings)
    if version is None:
        return None
    champion = load(mlflow_client, settings, version)
    if list(champion.classes) != classes:
        return None  # the class list grew: the old champion cannot answer the new question
    targets = split.targets[split.holdout]
    correct = np.zeros(0, dtype=bool)
    if len(targets):
        correct = finetune_predict_proba(champion, [pool.paths[i] for i in split.holdout]).argmax(1) == targets
    model = tracking.model_version(mlflow_client, settings, version)
    return ChampionHoldout(version, model_body_version(model), model_features_version(model), correct)


def model_features_version(model: ModelVersion) -> str:
    """What a registered model's head reads: its body's version, plus the stage when not the last."""
    return embedded.features_version(model_body_version(model), model.tags.get("features", "last"))


def model_body_version(model: ModelVersion) -> str:
    """The body version whose embeddings a registered model's head reads: its own for a fine-tune."""
    if model.tags.get("kind") == "finetune":
        return str(model.version)
    return model.tags.get("body_version", embedded.IMAGENET)


def refresh_task_predictions(
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


def load(mlflow_client: MlflowClient, settings: Settings, version: str) -> Classifier:
    """A registered version of the project's model, from the client's server."""
    return tracking.load_classifier(mlflow_client.tracking_uri, settings.registered_model_name, version)


def fit_head(
    settings: Settings,
    pool: embedded.SplitFeatures,
    rows: npt.NDArray[np.intp],
    targets: npt.NDArray[np.int64],
    n_classes: int,
) -> nn.Linear:
    return train_head(pool.vectors[rows], targets[rows], n_classes, l2=settings.head_l2, seed=settings.seed)


def project_classes(catalog: Catalog) -> list[str]:
    classes = catalog.classes()
    if not classes:
        raise DataError("the catalog has no classes yet: run `flywheel import` first")
    return classes


def truth_targets(truths: list[str | None], classes: list[str]) -> npt.NDArray[np.int64]:
    position = {c: i for i, c in enumerate(classes)}
    return np.array([position.get(t, -1) if t is not None else -1 for t in truths], dtype=np.int64)
