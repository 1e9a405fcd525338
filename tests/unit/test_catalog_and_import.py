import json

import numpy as np
import pytest
import torch
from PIL import Image
from torchvision.io import encode_png

from flywheel.catalog import POOL, TEST, Catalog
from flywheel.config import load_settings
from flywheel.errors import DataError
from flywheel.sources.importing import FASHION_MNIST_CLASSES, import_source, materialize_fashion_mnist
from flywheel.sources.manifest import read_manifest


def _png(path, value):
    path.parent.mkdir(parents=True, exist_ok=True)
    image = torch.full((1, 8, 8), value, dtype=torch.uint8)
    path.write_bytes(encode_png(image).numpy().tobytes())


@pytest.fixture
def tree(tmp_path):
    root = tmp_path / "images"
    for i, cls in enumerate(["cat", "dog"]):
        for j in range(3):
            _png(root / cls / f"{j}.png", 40 * i + j)
    return root


@pytest.fixture
def env(tmp_path):
    settings = load_settings(workspace=tmp_path / "ws")
    return settings, Catalog(settings.catalog_url)


def test_image_folder_import_takes_classes_from_folders_and_is_idempotent(tree, env):
    settings, catalog = env
    first = import_source(catalog, settings, str(tree))[POOL]
    second = import_source(catalog, settings, str(tree))[POOL]
    assert (first.added, first.skipped) == (6, 0)
    assert (second.added, second.skipped) == (0, 6)
    assert catalog.classes() == ["cat", "dog"]
    assert catalog.count_labels() == 0  # folder names are ground truth, not labels, unless trusted
    rows = catalog.samples()
    assert len({r.uri for r in rows}) == 6 and all(0 <= r.fold < 100 for r in rows)


def test_trusted_labels_become_labels(tree, env):
    settings, catalog = env
    result = import_source(catalog, settings, str(tree), trust_labels=True)[POOL]
    assert result.labelled == 6
    assert sorted(catalog.labels().values()) == ["cat"] * 3 + ["dog"] * 3


def test_csv_and_jsonl_manifests(tree, tmp_path, env):
    settings, catalog = env
    csv_file = tmp_path / "m.csv"
    csv_file.write_text(f"path,label\nimages/cat/0.png,cat\n{tree / 'dog' / '0.png'},dog\n")
    jsonl = tmp_path / "m.jsonl"
    jsonl.write_text(json.dumps({"uri": f"file://{tree / 'cat' / '1.png'}"}) + "\n")
    import_source(catalog, settings, str(csv_file))
    import_source(catalog, settings, str(jsonl))
    truths = sorted((r.truth or "-") for r in catalog.samples())
    assert truths == ["-", "cat", "dog"]


@pytest.mark.parametrize(
    ("content", "suffix", "message"),
    [
        ("path,label\nnowhere.png,cat\n", ".csv", r"m\.csv:2:1: field 'path': image .*nowhere\.png does not exist"),
        ("name,label\nx.png,cat\n", ".csv", r"m\.csv:1:1: the CSV header needs a 'path' or 'uri' column"),
        ('{"path": "a.png"}\n{not json\n', ".jsonl", r"m\.jsonl:2:2: invalid JSON"),
        ('{"label": "cat"}\n', ".jsonl", r"m\.jsonl:1: needs a 'path' or 'uri' field"),
        ('{"uri": "s3://bucket/a.png"}\n', ".jsonl", r"unsupported URI scheme 's3'"),
    ],
)
def test_bad_manifests_name_file_and_line(tmp_path, content, suffix, message):
    manifest = tmp_path / f"m{suffix}"
    manifest.write_text(content)
    with pytest.raises(DataError, match=message):
        read_manifest(manifest, tmp_path / "cache")


def test_missing_data_path_is_named_and_catalog_untouched(env, tmp_path):
    settings, catalog = env
    with pytest.raises(DataError, match=str(tmp_path / "absent")):
        import_source(catalog, settings, str(tmp_path / "absent"))
    assert catalog.count_samples() == 0


def test_unknown_class_fails_the_whole_import_and_names_it(tree, tmp_path):
    settings = load_settings(workspace=tmp_path / "ws2", classes=["cat"])
    catalog = Catalog(settings.catalog_url)
    with pytest.raises(DataError, match="unknown class 'dog'.*allow: cat"):
        import_source(catalog, settings, str(tree))
    assert catalog.count_samples() == 0
    assert catalog.classes() == []


def test_fashion_mnist_subset_is_stratified_enough_and_imports_both_splits(env):
    settings, catalog = env
    results = import_source(catalog, settings, "fashion-mnist", pool_size=300, test_size=200)
    assert (results[POOL].added, results[TEST].added) == (300, 200)
    assert catalog.classes() == list(FASHION_MNIST_CLASSES)
    pool_truth = [r.truth for r in catalog.samples(POOL)]
    assert len(set(pool_truth)) == 10
    again = materialize_fashion_mnist(settings.dirs.sources / "fashion-mnist", pool_size=300, test_size=200, seed=0)
    assert all((root / ".complete").exists() for root in again)
    counts = np.unique(pool_truth, return_counts=True)[1]
    assert counts.min() >= 10  # a random 300 of a balanced set has every class well represented


def test_labels_are_trimmed_and_names_differing_in_case_are_refused_with_where_each_came_from(tmp_path):
    from flywheel.sources.importing import tidy_labels
    from flywheel.sources.manifest import Record

    records = [Record("/a.png", "circle "), Record("/b.png", " square"), Record("/c.png", "  "), Record("/d.png", None)]
    tidy, classes = tidy_labels(records, ["square", "circle"], [], source="shapes")
    assert [r.label for r in tidy] == ["circle", "square", None, None]
    assert classes == ["square", "circle"]  # the given order kept
    with pytest.raises(DataError, match=r"shapes: classes 'circle' \(/a\.png\) and 'Circle' \(/e\.png\) differ only"):
        tidy_labels([*records, Record("/e.png", "Circle")], [], [], source="shapes")
    with pytest.raises(DataError, match=r"classes 'Square' \(the project's classes\) and 'square' \(/b\.png\)"):
        tidy_labels(records, [], ["Square"], source="shapes")


def test_an_image_folder_with_case_variants_of_a_class_is_refused_before_anything_is_stored(tmp_path):
    root = tmp_path / "shapes"
    for name in ("circle", "Circle", "square"):
        (root / name).mkdir(parents=True)
        Image.new("RGB", (8, 8), (len(name) * 20, 0, 0)).save(root / name / f"{name}.png")
    settings = load_settings(workspace=tmp_path / "ws")
    catalog = Catalog(settings.catalog_url)
    with pytest.raises(DataError, match=r"classes 'Circle' \(.*class list\) and 'circle' \(.*\) differ only in case"):
        import_source(catalog, settings, str(root))
    assert catalog.count_samples() == 0 and catalog.classes() == []
