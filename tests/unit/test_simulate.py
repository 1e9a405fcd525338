"""flywheel simulate: the oracle loop on synthetic features (no images), its report, and the CLI end to end."""

from __future__ import annotations

import gzip
import json
from pathlib import Path

import numpy as np
import pytest
from typer.testing import CliRunner

from flywheel.errors import DataError, FlywheelError, UnknownChoiceError
from flywheel.simulation import budget_schedule, labels_to_reach, make_split, simulate, summarize
from flywheel.simulation.core import balanced_accuracy, stratified_split
from flywheel.simulation.datasets import (
    Dataset,
    file_list_digest,
    imbalanced_sizes,
    load_dataset,
    materialize_builtin,
)
from flywheel.strategies import PoolView, Selection

REPORT_KEYS = {"dataset", "n_pool", "classes", "full_label_accuracy", "strategies"}
CURVE_KEYS = {"budgets", "accuracy_mean", "accuracy_std", "balanced_accuracy_mean", "aulc", "labels_to_95pct_of_full"}


def blobs(n_per_class=(60, 60, 60), d=8, spread=1.0, seed=0):
    """Gaussian blobs, one per class, centres 4 apart in random directions; (features, targets, classes)."""
    rng = np.random.default_rng(seed)
    centres = rng.normal(0, 1, (len(n_per_class), d))
    centres *= 4 / np.linalg.norm(centres, axis=1, keepdims=True)
    y = np.repeat(np.arange(len(n_per_class)), n_per_class)
    x = centres[y] + rng.normal(0, spread, (len(y), d))
    return x.astype(np.float32), y, [f"c{i}" for i in range(len(n_per_class))]


def _strip_timing(report: dict) -> dict:
    return {**report, "strategies": {k: {**v, "seconds": 0} for k, v in report["strategies"].items()}}


def test_report_has_the_documented_keys_and_shapes():
    x, y, classes = blobs()
    report = simulate(
        x, y, classes, strategies=["random", "entropy"], seeds=2, initial_per_class=1, budget_per_class=4, dataset="b"
    )
    assert set(report) >= REPORT_KEYS
    assert (report["dataset"], report["n_pool"], report["classes"]) == ("b", 180, classes)
    assert 0.9 <= report["full_label_accuracy"] <= 1.0
    assert set(report["strategies"]) == {"random", "entropy"}
    for curve in report["strategies"].values():
        assert set(curve) >= CURVE_KEYS
        assert curve["budgets"] == [3, 6, 9, 12]  # 3 classes x 1, + 3 per round, up to 3 x 4
        for key in ("accuracy_mean", "accuracy_std", "balanced_accuracy_mean"):
            assert len(curve[key]) == 4 and all(0 <= v <= 1 for v in curve[key])
        assert curve["aulc"] == pytest.approx(np.mean(curve["accuracy_mean"]))
        assert len(curve["descriptions"]) == 3  # one per query round (seed 0)
    json.dumps(report)  # plain JSON types only


def test_budget_schedule_steps_by_batch_and_stops_at_the_cap():
    assert budget_schedule(20, batch_size=10, max_budget=200, n_train=3500) == list(range(20, 201, 10))
    assert budget_schedule(4, batch_size=5, max_budget=12, n_train=100) == [4, 9, 12]  # short last step
    assert budget_schedule(4, batch_size=5, max_budget=50, n_train=11) == [4, 9, 11]  # pool runs out
    assert budget_schedule(6, batch_size=3, max_budget=6, n_train=100) == [6]


def test_accuracy_rises_with_labels_on_overlapping_blobs():
    x, y, classes = blobs(n_per_class=(80,) * 5, d=10, spread=2.2, seed=3)
    report = simulate(x, y, classes, strategies=["random"], seeds=3, initial_per_class=1, budget_per_class=16)
    acc = report["strategies"]["random"]["accuracy_mean"]
    assert acc[-1] > acc[0] + 0.1
    assert np.corrcoef(np.arange(len(acc)), acc)[0, 1] > 0.8


def test_same_seed_same_report_and_another_seed_another_split():
    x, y, classes = blobs(spread=2.0)
    kwargs = dict(strategies=["random", "entropy"], initial_per_class=2, budget_per_class=6)
    first = simulate(x, y, classes, seeds=[4], **kwargs)
    assert _strip_timing(first) == _strip_timing(simulate(x, y, classes, seeds=[4], **kwargs))
    assert not np.array_equal(make_split(y, 4, initial_per_class=2).test, make_split(y, 5, initial_per_class=2).test)


def test_split_is_stratified_and_initial_labels_are_per_class():
    y = np.repeat([0, 1, 2], [100, 10, 2])
    split = make_split(y, 0, initial_per_class=3)
    assert np.bincount(y[split.test]).tolist() == [30, 3, 1]
    assert np.intersect1d(split.train, split.test).size == 0 and len(split.train) + len(split.test) == len(y)
    assert np.bincount(y[split.train][split.initial]).tolist() == [3, 3, 1]  # the 2-image class gives its 1


def test_a_class_with_fewer_images_than_initial_per_class_is_handled():
    x, y, classes = blobs(n_per_class=(40, 40, 2))
    report = simulate(x, y, classes, strategies=["random", "entropy"], seeds=2, initial_per_class=3, budget_per_class=5)
    assert report["strategies"]["random"]["budgets"] == [7, 10, 13, 15]  # 3 + 3 + 1 initial, cap 15
    x1, y1, classes1 = blobs(n_per_class=(30, 30, 1))  # a single image: training only, absent from test
    assert make_split(y1, 0, initial_per_class=2).test.size == 18
    simulate(x1, y1, classes1, strategies=["random"], seeds=1, initial_per_class=2, budget_per_class=4)


def test_uncertainty_beats_random_on_planted_boundary_points():
    """Class 0 is a big cluster far away plus 30 points in a small cluster right beside class 1: a model
    from random labels rarely sees that cluster; uncertainty sampling goes straight to it."""
    rng = np.random.default_rng(0)
    axes = np.eye(8)
    far0 = 6 * axes[0] + rng.normal(0, 0.5, (170, 8))
    near0 = 6 * axes[1] + 3 * axes[2] + rng.normal(0, 0.5, (30, 8))
    class1 = 6 * axes[1] + rng.normal(0, 0.5, (200, 8))
    x = np.concatenate([far0, near0, class1]).astype(np.float32)
    y = np.repeat([0, 1], [200, 200])
    report = simulate(
        x, y, ["a", "b"], strategies=["random", "entropy"], seeds=3, initial_per_class=2, budget_per_class=8
    )
    curves = report["strategies"]
    assert curves["entropy"]["aulc"] > curves["random"]["aulc"] + 0.02
    assert curves["entropy"]["accuracy_mean"][-1] > 0.98 > curves["random"]["accuracy_mean"][-1]


def test_aulc_and_labels_to_95pct_by_hand():
    runs = [
        {"accuracy": [0.5, 0.7, 0.9], "balanced_accuracy": [0.4, 0.6, 0.8], "descriptions": ["a", "b"]},
        {"accuracy": [0.7, 0.7, 0.9], "balanced_accuracy": [0.6, 0.6, 0.8], "descriptions": ["c", "d"]},
    ]
    curve = summarize(runs, [10, 20, 30], full_accuracy=0.8)
    assert curve["accuracy_mean"] == pytest.approx([0.6, 0.7, 0.9])
    assert curve["accuracy_std"] == pytest.approx([0.1, 0.0, 0.0])
    assert curve["aulc"] == pytest.approx((0.6 + 0.7 + 0.9) / 3)
    assert curve["balanced_aulc"] == pytest.approx((0.5 + 0.6 + 0.8) / 3)
    assert curve["labels_to_95pct_of_full"] == 30  # 0.95 * 0.8 = 0.76: first reached at 30
    assert summarize(runs, [10, 20, 30], full_accuracy=0.7)["labels_to_95pct_of_full"] == 20  # 0.665
    assert summarize(runs, [10, 20, 30], full_accuracy=1.0)["labels_to_95pct_of_full"] is None
    assert labels_to_reach([5, 6], [0.95, 0.96], 0.95) == 5  # reaching counts


def test_balanced_accuracy_is_mean_recall_over_present_classes():
    probs = np.eye(3)[[0, 0, 0, 1, 2]]  # predicts 0,0,0,1,2
    targets = np.array([0, 0, 0, 0, 1])  # class 0: 3/4, class 1: 0/1, class 2 absent
    assert balanced_accuracy(probs, targets) == pytest.approx((0.75 + 0.0) / 2)


def test_unknown_strategy_lists_the_choices():
    x, y, classes = blobs()
    with pytest.raises(UnknownChoiceError, match=r"unknown strategy 'nope'; choose one of: .*entropy.*random"):
        simulate(x, y, classes, strategies=["random", "nope"], seeds=1)


def _bad_strategy(pool: PoolView, n: int, *, rng: np.random.Generator) -> Selection:
    return Selection(positions=pool.labelled[:n], scores=np.zeros(n), strategy="bad", description="")


def test_input_errors_name_the_problem():
    x, y, classes = blobs()
    with pytest.raises(FlywheelError, match=r"strategy bad returned 3 positions .*3 already labelled"):
        simulate(x, y, classes, strategies={"bad": _bad_strategy}, seeds=1, initial_per_class=2)
    cases = [
        (dict(features=x[:5]), DataError, "features must be"),
        (dict(targets=np.full(len(y), 7)), DataError, r"targets must lie in \[0, 3\)"),
        (dict(targets=np.zeros(len(y), int)), DataError, "at least 2 classes"),
        (dict(initial_per_class=0), FlywheelError, "initial_per_class must be at least 1"),
        (dict(budget_per_class=1, initial_per_class=2), FlywheelError, "below initial_per_class"),
        (dict(batch_size=0), FlywheelError, "batch_size must be at least 1"),
        (dict(seeds=[]), FlywheelError, "at least one seed"),
        (dict(strategies={}), FlywheelError, "no strategies"),
    ]
    for overrides, error, message in cases:
        kwargs = dict(features=x, targets=y, classes=classes, strategies=["random"], seeds=1) | overrides
        with pytest.raises(error, match=message):
            simulate(kwargs.pop("features"), kwargs.pop("targets"), kwargs.pop("classes"), **kwargs)
    x2, y2, classes2 = blobs(n_per_class=(1, 1))
    with pytest.raises(DataError, match="leave no test images"):
        simulate(x2, y2, classes2, strategies=["random"], seeds=1, initial_per_class=1)


def test_stratified_split_keeps_one_training_row_per_class():
    train, test = stratified_split(np.array([0, 1, 1, 1]), test_fraction=0.9, rng=np.random.default_rng(0))
    assert sorted(np.array([0, 1, 1, 1])[train].tolist()) == [0, 1]


# --------------------------------------------------------------------------------------------- data sources


def test_imbalanced_sizes_are_a_geometric_long_tail():
    sizes = imbalanced_sizes(10)
    assert sizes[0] == 1000 and sizes[-1] == 20
    assert all(a > b for a, b in zip(sizes, sizes[1:], strict=False))
    assert sizes[4] == pytest.approx(1000 * (0.02 ** (4 / 9)), abs=1)


def _fake_idx(folder: Path, n: int) -> None:
    """A miniature Fashion-MNIST in its gzipped IDX format: n images, labels cycling 0..9."""
    folder.mkdir(parents=True)
    images = (np.arange(n * 28 * 28) % 251).astype(np.uint8)
    with gzip.open(folder / "train-images-idx3-ubyte.gz", "wb") as fh:
        fh.write(b"\0" * 16 + images.tobytes())
    with gzip.open(folder / "train-labels-idx1-ubyte.gz", "wb") as fh:
        fh.write(b"\0" * 8 + (np.arange(n) % 10).astype(np.uint8).tobytes())


def test_fashion_mnist_subset_is_written_as_an_image_folder(tmp_path):
    _fake_idx(tmp_path / "src", 100)
    root = materialize_builtin("fashion-mnist", tmp_path / "out", pool_size=30, source_dir=tmp_path / "src")
    assert len(list(root.rglob("*.png"))) == 30 and (root / ".complete").exists()
    assert materialize_builtin("fashion-mnist", tmp_path / "out", pool_size=30, source_dir=tmp_path / "src") == root
    with pytest.raises(DataError, match="unknown built-in source 'mnist'"):
        materialize_builtin("mnist", tmp_path / "out")


def test_load_dataset_errors_and_file_digest(tmp_path):
    from flywheel.config import load_settings

    with pytest.raises(DataError, match="not a folder and not one of the built-in sources: fashion-mnist"):
        load_dataset(str(tmp_path / "absent"), load_settings(workspace=tmp_path))
    a, b = tmp_path / "a.png", tmp_path / "b.png"
    a.write_bytes(b"1")
    b.write_bytes(b"22")
    assert file_list_digest([str(a), str(b)]) != file_list_digest([str(b), str(a)])
    assert Dataset("x", [], np.empty(0), []).features is None


# ---------------------------------------------------------------------------------------------------- CLI


def _tiny_image_folder(root: Path, per_class: int = 12) -> None:
    from PIL import Image

    rng = np.random.default_rng(0)
    for c, (name, colour) in enumerate({"red": (220, 30, 30), "green": (30, 200, 40), "blue": (30, 40, 220)}.items()):
        (root / name).mkdir(parents=True)
        for i in range(per_class):
            pixels = np.clip(np.array(colour) + rng.normal(0, 25, (16, 16, 3)), 0, 255).astype(np.uint8)
            pixels[:, : 4 + c * 4] //= 2  # a shape cue as well as colour
            Image.fromarray(pixels).save(root / name / f"{i:02d}.png")


def test_cli_simulate_writes_report_and_plot(tmp_path, monkeypatch):
    from flywheel.app.cli import app

    _tiny_image_folder(tmp_path / "images")
    monkeypatch.chdir(tmp_path)
    monkeypatch.setenv("FLYWHEEL_WORKSPACE", str(tmp_path / "ws"))
    args = [
        "simulate", "--data", str(tmp_path / "images"), "--strategies", "random,entropy", "--seeds", "2",
        "--initial-per-class", "1", "--budget-per-class", "4", "--no-mlflow",
        "--out", str(tmp_path / "r.json"), "--plot", str(tmp_path / "c.png"),
    ]  # fmt: skip
    result = CliRunner().invoke(app, args)
    assert result.exit_code == 0, result.output
    report = json.loads((tmp_path / "r.json").read_text())
    assert report["classes"] == ["blue", "green", "red"] and report["n_pool"] == 36
    assert report["strategies"]["entropy"]["budgets"] == [3, 6, 9, 12]
    assert (tmp_path / "c.png").read_bytes()[:8] == b"\x89PNG\r\n\x1a\n"
    cached = list((tmp_path / "ws" / "embeddings" / "simulate").iterdir())
    assert len(cached) == 1 and "efficientnet_lite0" in cached[0].name  # a second run embeds nothing
    assert CliRunner().invoke(app, args).exit_code == 0

    bad = CliRunner().invoke(app, ["simulate", "--data", str(tmp_path / "images"), "--strategies", "random,nope"])
    assert bad.exit_code == 1 and "choose one of" in bad.output and "kcenter" in bad.output


def test_cli_simulate_loop_replays_heads_finetunes_and_the_guard(tmp_path, monkeypatch):
    from flywheel.app.cli import app

    _tiny_image_folder(tmp_path / "images", per_class=12)
    monkeypatch.chdir(tmp_path)
    monkeypatch.setenv("FLYWHEEL_WORKSPACE", str(tmp_path / "ws"))
    monkeypatch.setenv("FLYWHEEL_IMAGE_SIZE", "32")
    for key, value in {
        "MIN_LABELS": "6",
        "EVERY_NEW_LABELS": "6",
        "DEPTH": "all",
        "EPOCHS": "2",
        "MIN_BODY_STEPS": "0",
    }.items():
        monkeypatch.setenv(f"FLYWHEEL_FINETUNE__{key}", value)  # a fine-tune at 6 and 12 labels, two epochs each
    args = [
        "simulate", "--loop", "--data", str(tmp_path / "images"), "--seeds", "1", "--initial-per-class", "1",
        "--budget-per-class", "4", "--no-mlflow", "--out", str(tmp_path / "r.json"), "--plot", str(tmp_path / "c.png"),
    ]  # fmt: skip
    result = CliRunner().invoke(app, args)
    assert result.exit_code == 0, result.output
    report = json.loads((tmp_path / "r.json").read_text())
    assert report["mode"] == "loop" and report["strategy"] == "auto"
    curves = report["strategies"]
    assert set(curves) == {"heads-only", "loop"}
    assert curves["loop"]["budgets"] == curves["heads-only"]["budgets"] == [3, 6, 9, 12]
    assert len(curves["loop"]["accuracy_mean"]) == 4 and all(0 <= a <= 1 for a in curves["loop"]["accuracy_mean"])
    assert [f["labels"] for f in report["finetunes"]] == [6, 12]
    for f in report["finetunes"]:
        assert f["depth"] == "all" and isinstance(f["promoted"], bool) and f["decision"]
    assert "fine-tune at 6 labels, all" in result.output
    assert (tmp_path / "c.png").read_bytes()[:8] == b"\x89PNG\r\n\x1a\n"
    two = CliRunner().invoke(app, [*args[:2], "--strategies", "random,entropy", *args[2:]])
    assert two.exit_code == 1 and "--loop replays one strategy" in two.output
