"""A project keeps its backbone wherever a command runs from: a default never moves it, a setting does, with
a warning (flywheel.features.embedded.active_settings)."""

from __future__ import annotations

import json
import logging

import pytest

from flywheel.catalog import Catalog
from flywheel.config import load_settings
from flywheel.features import embedded

LITE0, LITE1, LITE2 = "efficientnet_lite0", "efficientnet_lite1", "efficientnet_lite2"


@pytest.fixture
def catalog(tmp_path):
    return Catalog(f"sqlite:///{tmp_path / 'catalog.db'}")


def test_the_first_use_fixes_the_backbone_and_a_default_elsewhere_keeps_it(tmp_path, catalog, caplog):
    bootstrapped = load_settings(workspace=tmp_path, backbone=LITE1)  # e.g. from a flywheel.toml
    assert embedded.active_settings(bootstrapped, catalog).backbone == LITE1
    elsewhere = load_settings(workspace=tmp_path)  # another folder: no flywheel.toml, the default lite0
    with caplog.at_level(logging.WARNING):
        assert embedded.active_settings(elsewhere, catalog).backbone == LITE1
    assert not caplog.records
    assert embedded.configured_backbone(elsewhere, catalog) == LITE1


def test_a_backbone_the_settings_name_moves_the_project_with_a_warning(tmp_path, catalog, caplog):
    embedded.active_settings(load_settings(workspace=tmp_path, backbone=LITE1), catalog)
    with caplog.at_level(logging.WARNING):
        moved = embedded.active_settings(load_settings(workspace=tmp_path, backbone=LITE2), catalog)
    assert moved.backbone == LITE2
    assert "moves it from efficientnet_lite1 to efficientnet_lite2" in caplog.text
    assert json.loads(catalog.get_meta(embedded.BACKBONE_KEY)) == {"configured": LITE2, "in_use": LITE2}
    assert embedded.active_settings(load_settings(workspace=tmp_path), catalog).backbone == LITE2


def test_a_promoted_backbone_holds_while_the_configuration_is_unchanged(tmp_path, catalog):
    embedded.record_backbone(catalog, configured=LITE0, in_use=LITE1)  # a fine-tune picked lite1
    assert embedded.active_settings(load_settings(workspace=tmp_path, backbone=LITE0), catalog).backbone == LITE1
    assert embedded.active_settings(load_settings(workspace=tmp_path), catalog).backbone == LITE1
