"""`flywheel export`: the ImageFolder export imports back into a fresh workspace with the same labels, the COCO
file validates against the COCO schema (classification: image-level annotations), and the filters hold."""

from __future__ import annotations

import csv
import json
from pathlib import Path

import jsonschema  # type: ignore[import-untyped]  # no stubs in the lock; installed by prefect and the LS SDK
import numpy as np
import pytest
from PIL import Image

from flywheel.catalog import Catalog
from flywheel.errors import DataError
from flywheel.insight.export import label_rows, write_export
from flywheel.sources.importing import import_source
from tests.conftest import settings_for

CLASSES = ("circle", "square", "triangle")
# COCO's data format (cocodataset.org/#format-data), as much as a classification file uses.
COCO_SCHEMA = {
    "type": "object",
    "required": ["info", "images", "annotations", "categories"],
    "properties": {
        "images": {
            "type": "array",
            "items": {
                "type": "object",
                "required": ["id", "file_name", "width", "height"],
                "properties": {
                    "id": {"type": "integer"},
                    "file_name": {"type": "string"},
                    "width": {"type": "integer", "minimum": 1},
                    "height": {"type": "integer", "minimum": 1},
                },
            },
        },
        "annotations": {
            "type": "array",
            "items": {
                "type": "object",
                "required": ["id", "image_id", "category_id"],
                "properties": {k: {"type": "integer"} for k in ("id", "image_id", "category_id")},
            },
        },
        "categories": {
            "type": "array",
            "items": {
                "type": "object",
                "required": ["id", "name"],
                "properties": {"id": {"type": "integer"}, "name": {"type": "string"}},
            },
        },
    },
}


def _folder(root: Path, per_class: int = 4) -> Path:
    rng = np.random.default_rng(0)
    for name in CLASSES:
        (root / name).mkdir(parents=True)
        for k in range(per_class):
            pixels = rng.integers(0, 255, (12 + k, 10, 3), dtype=np.uint8)
            Image.fromarray(pixels).save(root / name / f"{name}-{k}.png")
    return root


def _labels_by_hash(catalog: Catalog) -> dict[str, str]:
    return {r.content_hash: r.label for r in label_rows(catalog, mode="single")}


def test_an_imagefolder_export_imports_back_with_the_same_labels(tmp_path: Path) -> None:
    settings = settings_for(tmp_path / "ws")
    catalog = Catalog(settings.catalog_url)
    import_source(catalog, settings, str(_folder(tmp_path / "photos")), trust_labels=True)
    rows = label_rows(catalog, mode="single")
    assert len(rows) == 12 and {r.label_origin for r in rows} == {"import"}
    written = write_export(rows, tmp_path / "out", "imagefolder")
    assert sorted(p.name for p in (written / "pool").iterdir()) == list(CLASSES)

    fresh_settings = settings_for(tmp_path / "fresh")
    fresh = Catalog(fresh_settings.catalog_url)
    import_source(fresh, fresh_settings, str(written / "pool"), trust_labels=True)
    assert _labels_by_hash(fresh) == _labels_by_hash(catalog)
    with (written / "labels.csv").open() as f:
        table = list(csv.DictReader(f))
    assert [int(r["sample_id"]) for r in table] == [r.sample_id for r in rows]
    assert {"split", "annotators", "agreement", "label_origin", "round_id", "review_status"} <= set(table[0])


def test_coco_validates_and_the_filters_hold(tmp_path: Path) -> None:
    settings = settings_for(tmp_path / "ws")
    catalog = Catalog(settings.catalog_url)
    import_source(catalog, settings, str(_folder(tmp_path / "photos", per_class=2)), trust_labels=True)
    rows = label_rows(catalog, mode="single")
    document = json.loads(write_export(rows, tmp_path / "out", "coco").read_text())
    jsonschema.validate(document, COCO_SCHEMA)
    names = {c["id"]: c["name"] for c in document["categories"]}
    by_image = {a["image_id"]: names[a["category_id"]] for a in document["annotations"]}
    assert [by_image[i["id"]] for i in document["images"]] == [r.label for r in rows]
    lines = (write_export(rows, tmp_path / "out", "jsonl")).read_text().splitlines()
    assert [json.loads(line)["label"] for line in lines] == [r.label for r in rows]
    # One annotator each (imported labels): no agreement to speak of, and nothing reviewed.
    assert label_rows(catalog, mode="single", min_agreement=0.5) == []
    assert label_rows(catalog, mode="single", only_reviewed=True) == []
    with pytest.raises(DataError, match="--format 'parquet'"):
        write_export(rows, tmp_path / "out", "parquet")  # type: ignore[arg-type]  # what a caller might pass


def test_a_hugging_face_export_loads_back_with_its_images_and_labels(tmp_path: Path) -> None:
    import datasets

    settings = settings_for(tmp_path / "ws")
    catalog = Catalog(settings.catalog_url)
    photos = _folder(tmp_path / "photos", per_class=2)
    import_source(catalog, settings, str(photos), trust_labels=True)
    rows = label_rows(catalog, mode="single")
    loaded = datasets.load_from_disk(str(write_export(rows, tmp_path / "out", "hf")))
    assert isinstance(loaded, datasets.DatasetDict) and list(loaded) == ["pool"]
    pool = loaded["pool"]
    names = pool.features["label"].names
    assert names == list(CLASSES) and [names[k] for k in pool["label"]] == [r.label for r in rows]
    assert pool["sample_id"] == [r.sample_id for r in rows] and pool["label_origin"] == ["import"] * len(rows)
    first = pool[0]  # the image itself travels (decoded by the Image feature), not a path to this machine
    source = Path(rows[0].uri.removeprefix("file://"))
    assert np.array_equal(np.asarray(first["image"]), np.asarray(Image.open(source)))
