"""The loop's first step: embed the pool (and the test split), index it and create the Label Studio project, so
that a round has features to train on, an index to search and somewhere to send its picks."""

from __future__ import annotations

from dataclasses import dataclass

from label_studio_sdk.client import LabelStudio

from flywheel import labelstudio, locking
from flywheel.catalog import POOL, TEST, Catalog
from flywheel.config import Settings
from flywheel.features import embedded
from flywheel.loop.state import project_classes


@dataclass(frozen=True)
class BootstrapReport:
    n_pool: int
    n_test: int
    embedding_dim: int
    index_path: str
    project_id: int


@locking.locked
def bootstrap(
    settings: Settings, catalog: Catalog, ls_client: LabelStudio, *, progress: bool = True
) -> BootstrapReport:
    classes = project_classes(catalog)
    settings = embedded.active_settings(settings, catalog)
    version = embedded.body_version(settings, catalog)
    body = embedded.load_body(settings, version)
    pool = embedded.split_features(settings, catalog, POOL, body, version, progress=progress)
    test = embedded.split_features(settings, catalog, TEST, body, version, progress=progress)
    path = embedded.rebuild_index(settings, pool, version)
    project_id = labelstudio.ensure_project(ls_client, settings, catalog, classes)
    return BootstrapReport(len(pool.ids), len(test.ids), int(pool.vectors.shape[1]), str(path), project_id)
