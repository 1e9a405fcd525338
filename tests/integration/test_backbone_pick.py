"""Backbone choice by transferability, against the real MLflow server: before the first fine-tune the
candidates are scored on the labels, the table is logged, the fine-tune starts from the best one, and a
promotion moves the project (embeddings, index, later heads) to it; promoting an older model moves it back."""

from __future__ import annotations

import json

import pytest

from flywheel import loop
from flywheel.features import embedded
from flywheel.registry import tracking
from tests.integration.catalog_support import labelled_catalog

pytestmark = pytest.mark.integration

CONFIGURED, OTHER = "efficientnet_lite0", "efficientnet_lite1"


def test_first_finetune_starts_from_the_best_backbone_and_promotion_moves_the_project(settings, tmp_path):
    settings = settings.model_copy(
        update={
            "image_size": 32,
            "backbone": CONFIGURED,
            "finetune": settings.finetune.model_copy(
                update={"epochs": 1, "head_epochs": 1, "depth": "head", "patience": 0, "backbones": [CONFIGURED, OTHER]}
            ),
        }
    )
    catalog = labelled_catalog(settings)
    client = tracking.connect(settings)
    first = loop.run_round(settings, catalog, None, client, select=False, progress=False)
    assert client.get_model_version(settings.registered_model_name, first.model_version).tags["backbone"] == CONFIGURED

    report = loop.run_finetune(settings, catalog, client, progress=False)

    table = report.backbone_scores
    assert table is not None and table["backbone"] == [OTHER, CONFIGURED]  # best first
    scores = dict(zip(table["backbone"], table["logme"], strict=True))
    assert scores[OTHER] - scores[CONFIGURED] >= settings.finetune.backbone_margin  # lite1 reads 32 px better
    assert report.backbone == OTHER and "fine-tune starts from it" in report.backbone_choice
    version = client.get_model_version(settings.registered_model_name, report.model_version)
    run = client.get_run(version.run_id)
    assert version.tags["backbone"] == run.data.params["backbone"] == OTHER
    assert run.data.params["backbone_choice"] == report.backbone_choice
    assert "backbone_scores.json" in {a.path for a in client.list_artifacts(version.run_id)}

    # promote the fine-tune by hand (the guard may or may not have): the project now runs on the picked body
    loop.promote(settings, catalog, client, report.model_version, progress=False)
    active = embedded.active_settings(settings, catalog)
    assert active.backbone == OTHER and embedded.body_version(active, catalog) == report.model_version
    assert embedded.index_path(active, report.model_version).exists()
    later = loop.run_round(settings, catalog, None, client, select=False, progress=False)
    assert client.get_model_version(settings.registered_model_name, later.model_version).tags["backbone"] == OTHER

    # rolling back to the first head moves the project back to the configured backbone's ImageNet body
    loop.promote(settings, catalog, client, first.model_version, progress=False)
    assert embedded.active_settings(settings, catalog).backbone == CONFIGURED
    assert embedded.body_version(settings, catalog) == embedded.IMAGENET
    assert json.loads(catalog.get_meta(embedded.BACKBONE_KEY))["in_use"] == CONFIGURED
