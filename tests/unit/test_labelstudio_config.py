"""label_config and image_url: pure functions, no server."""

from __future__ import annotations

import xml.etree.ElementTree as ET
from datetime import UTC, datetime
from pathlib import Path

import pytest

from flywheel.config import load_settings
from flywheel.errors import ConfigError, DataError
from flywheel.labelstudio import config_classes, config_mode, image_url, label_config, prediction_score, presign_s3


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


def test_multi_label_config_and_instructions() -> None:
    config = label_config(["cat", "dog"], mode="multi", instructions='Pick every animal you see, "even" small ones')
    root = ET.fromstring(config)
    choices, header = root.find("Choices"), root.find("Header")
    assert choices is not None and choices.get("choice") == "multiple"
    assert header is not None and header.get("value") == 'Pick every animal you see, "even" small ones'
    assert config_mode(config) == "multi" and config_mode(label_config(["a"])) == "single"
    assert ET.fromstring(label_config(["a"])).find("Header") is None
    with pytest.raises(ConfigError, match="label_mode"):
        label_config(["a"], mode="many")  # type: ignore[arg-type]  # the wrong value is the test


def test_http_images_pass_through_and_unknown_schemes_are_refused(tmp_path: Path) -> None:
    settings = load_settings(workspace=tmp_path)
    assert image_url("https://example.org/a b.png", settings) == "https://example.org/a b.png"
    assert image_url(f"file://{tmp_path}/x%20y.png", settings).endswith("/x%20y.png")
    with pytest.raises(DataError, match="'ftp'"):
        image_url("ftp://host/x.png", settings)


# AWS's published example for presigned GET URLs (Signature Version 4, query parameters).
AWS_EXAMPLE_SECRET = "wJalrXUtnFEMI/K7MDENG/bPxRfiCYEXAMPLEKEY"
AWS_EXAMPLE = {
    "endpoint": "https://s3.amazonaws.com",
    "addressing": "virtual",
    "region": "us-east-1",
    "access_key": "AKIAIOSFODNN7EXAMPLE",
    "secret_key": AWS_EXAMPLE_SECRET,
    "presign_expiry_s": 86400,
}


def test_s3_presign_matches_the_aws_example(tmp_path: Path) -> None:
    settings = load_settings(workspace=tmp_path, storage=AWS_EXAMPLE)
    url = image_url("s3://examplebucket/test.txt", settings, now=datetime(2013, 5, 24, tzinfo=UTC))
    assert url.startswith("https://examplebucket.s3.amazonaws.com/test.txt?X-Amz-Algorithm=AWS4-HMAC-SHA256&")
    assert "X-Amz-Credential=AKIAIOSFODNN7EXAMPLE%2F20130524%2Fus-east-1%2Fs3%2Faws4_request" in url
    assert url.endswith("X-Amz-Signature=aeeed9bbccd4d02ee5c0109b86d86835f995330da4c265957d157751f604d404")


def test_s3_presign_path_style_for_an_s3_compatible_server(tmp_path: Path) -> None:
    storage = {**AWS_EXAMPLE, "endpoint": "http://127.0.0.1:9000", "addressing": "path"}
    settings = load_settings(workspace=tmp_path, storage=storage)
    url = presign_s3("s3://bucket/dir/a b.png", settings.storage, now=datetime(2030, 1, 1, tzinfo=UTC))
    assert url.startswith("http://127.0.0.1:9000/bucket/dir/a%20b.png?") and "X-Amz-Expires=86400" in url
    assert AWS_EXAMPLE_SECRET not in url


@pytest.mark.parametrize(
    ("uri", "storage", "message"),
    [
        ("s3://bucket", AWS_EXAMPLE, "needs a bucket and a key"),
        ("s3://bucket/k.png", {}, "FLYWHEEL_STORAGE__ACCESS_KEY"),
        ("s3://bucket/k.png", {**AWS_EXAMPLE, "endpoint": "127.0.0.1:9000"}, "storage.endpoint"),
    ],
)
def test_s3_presign_errors_name_the_setting(tmp_path: Path, uri: str, storage: dict, message: str) -> None:
    settings = load_settings(workspace=tmp_path, storage=storage)
    with pytest.raises((ConfigError, DataError), match=message):
        image_url(uri, settings)


def test_prediction_score_keeps_the_selection_order_inside_label_studios_range() -> None:
    selection = [0.0, 0.05, 0.5, 1.0, 1.9, 2.0, 7.5, 450.0]  # margins, k-center distances, coverage counts
    stored = [prediction_score(s) for s in selection]
    assert all(0.0 <= v < 1.0 for v in stored)  # Label Studio's bulk import drops predictions scored above 1
    assert stored == sorted(stored) and len(set(stored)) == len(stored)  # same order, no ties introduced
    assert prediction_score(1.0) == pytest.approx(0.5)
    assert prediction_score(float("nan")) == 0.0 and prediction_score(-0.3) == 0.0
