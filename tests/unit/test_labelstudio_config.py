"""label_config and image_url: pure functions, no server."""

from __future__ import annotations

import xml.etree.ElementTree as ET
from pathlib import Path

import pytest

from flywheel.config import load_settings
from flywheel.errors import ConfigError, DataError
from flywheel.labelstudio import config_classes, image_url, label_config


def test_label_config_has_one_choice_per_class_in_order() -> None:
    root = ET.fromstring(label_config(["cat", "dog", "bird"]))
    image = root.find("Image")
    assert image is not None and image.get("name") == "image" and image.get("value") == "$image"
    choices = root.find("Choices")
    assert choices is not None
    assert (choices.get("name"), choices.get("toName"), choices.get("choice")) == ("label", "image", "single")
    assert [c.get("value") for c in choices.findall("Choice")] == ["cat", "dog", "bird"]


def test_label_config_escapes_xml_specials() -> None:
    nasty = ["a<b", "fish & chips", 'say "hi"', "it's", "ok>"]
    config = label_config(nasty)
    assert "fish & chips" not in config  # a raw & would not be XML
    root = ET.fromstring(config)
    assert [c.get("value") for c in root.iter("Choice")] == nasty
    assert config_classes(config) == nasty


def test_label_config_without_classes_is_a_config_error() -> None:
    with pytest.raises(ConfigError, match="without classes"):
        label_config([])


def test_config_classes_of_foreign_config_is_empty() -> None:
    assert config_classes("<View><Text name='t' value='$t'/></View>") == []
    assert config_classes("not xml <") == []


def test_image_url_is_relative_to_document_root_and_quoted(tmp_path: Path) -> None:
    settings = load_settings(workspace=tmp_path, label_studio={"document_root": str(tmp_path)})
    path = tmp_path / "my images" / "a&b#1?.png"
    assert image_url(str(path), settings) == "/data/local-files/?d=my%20images/a%26b%231%3F.png"


def test_image_url_with_default_root_keeps_the_absolute_path(tmp_path: Path) -> None:
    settings = load_settings(workspace=tmp_path)
    assert image_url("/data/x/y.png", settings) == "/data/local-files/?d=data/x/y.png"
    assert image_url("/data/x/../z.png", settings) == "/data/local-files/?d=data/z.png"


def test_image_url_outside_document_root_names_both(tmp_path: Path) -> None:
    root = tmp_path / "root"
    settings = load_settings(workspace=tmp_path, label_studio={"document_root": str(root)})
    outside = tmp_path / "elsewhere" / "x.png"
    with pytest.raises(ConfigError) as info:
        image_url(str(outside), settings)
    assert str(outside) in str(info.value) and str(root) in str(info.value)
    # a path that escapes the root with .. is outside too
    with pytest.raises(ConfigError):
        image_url(str(root / ".." / "x.png"), settings)
    # the root itself is no file below it
    with pytest.raises(ConfigError):
        image_url(str(root), settings)


def test_image_url_relative_path_is_a_data_error(tmp_path: Path) -> None:
    settings = load_settings(workspace=tmp_path)
    with pytest.raises(DataError, match="not an absolute path"):
        image_url("images/x.png", settings)
