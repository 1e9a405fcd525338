"""A champion by hand (roll back or forward): promote a registered version and re-embed the pool with its body;
open Label Studio tasks then show its predictions (`refresh_open_tasks`). A fine-tune's win moves the pool the
same way (`switch_body`)."""

from __future__ import annotations

from label_studio_sdk.client import LabelStudio
from mlflow import MlflowClient
from torch import nn

from flywheel import health, labelstudio, locking
from flywheel.catalog import POOL, Catalog
from flywheel.config import Settings
from flywheel.features import embedded
from flywheel.loop.state import (
    load,
    model_body_version,
    model_features_version,
    project_classes,
    refresh_task_predictions,
)
from flywheel.registry import guard, tracking
from flywheel.training.head import predict_proba


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


@locking.locked
def promote(
    settings: Settings, catalog: Catalog, mlflow_client: MlflowClient, version: str, *, progress: bool = True
) -> str:
    """Make a registered version the champion by hand (roll back or forward); returns the body now in use.

    Open Label Studio tasks still show the old champion's predictions until `refresh_open_tasks` runs
    (the CLI and the flows call it next: it needs Label Studio, the promotion does not)."""
    model = tracking.model_version(mlflow_client, settings, version)
    in_use = model.tags.get("backbone") or load(mlflow_client, settings, version).backbone
    tracking.apply_promotion(
        mlflow_client, settings, version, guard.PromotionDecision(True, "promoted by hand (flywheel promote)")
    )
    body_version = model_body_version(model)
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
    features = model_features_version(tracking.model_version(mlflow_client, settings, version))
    classifier = load(mlflow_client, settings, version)
    model_settings = settings.model_copy(update={"backbone": classifier.backbone})
    pool = embedded.split_features(model_settings, catalog, POOL, classifier.body, features, progress=progress)
    probs = predict_proba(classifier.head, pool.vectors)
    with health.unavailable_as(labelstudio.SERVICE, settings.label_studio.url):
        project_id = labelstudio.ensure_project(ls_client, settings, catalog, project_classes(catalog))
        return refresh_task_predictions(
            ls_client, catalog, project_id, pool.ids, probs, list(classifier.classes), version
        )
