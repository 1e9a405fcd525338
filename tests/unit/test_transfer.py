"""Domain probe, LogME, kNN and backbone choice: planted signal, hand-checked rules, error branches."""

from __future__ import annotations

import math

import numpy as np
import pytest
import torch
from torchvision.io import write_png

from flywheel.errors import DataError, UnknownChoiceError
from flywheel.features.backbones import build_body
from flywheel.training.transfer import (
    DomainProbe,
    available_backbones,
    knn_accuracy,
    logme,
    middle_stage,
    probe_domain,
    resolve_domain,
    score_backbones,
    scores_table,
    stage_features,
    stratified_folds,
)


def _planted(n=120, d=16, classes=3, signal=3.0, seed=0):
    rng = np.random.default_rng(seed)
    y = np.arange(n) % classes
    x = rng.normal(size=(n, d))
    x[:, :classes] += signal * np.eye(classes)[y]
    return x.astype(np.float32), y


def test_logme_ranks_informative_features_above_noise():
    x, y = _planted()
    noise = np.random.default_rng(1).normal(size=x.shape).astype(np.float32)
    assert logme(x, y) > logme(noise, y)
    assert logme(x, y) > logme(*_planted(signal=1.0))  # more signal, more evidence


def test_knn_accuracy_on_planted_clusters_and_tiny_input():
    x, y = _planted(signal=6.0)
    assert knn_accuracy(x, y) > 0.95
    noise = np.random.default_rng(1).normal(size=x.shape)
    assert knn_accuracy(noise, y) < 0.6
    assert math.isnan(knn_accuracy(x[:1], y[:1]))


def test_stratified_folds_spread_every_class():
    y = np.array([0] * 6 + [1] * 3 + [2] * 1)
    fold = stratified_folds(y, 3, seed=0)
    assert sorted(np.bincount(fold[y == 0]).tolist()) == [2, 2, 2]
    assert sorted(np.bincount(fold[y == 1], minlength=3).tolist()) == [1, 1, 1]
    assert sorted(np.bincount(fold).tolist()) == [3, 3, 4]


def test_resolve_domain_override_probe_and_default():
    probe = DomainProbe("stage4", 0.8, 0.7, 0.6, True, "stage4 0.800 >= last 0.700", 30, 3)
    assert resolve_domain("auto", probe) == (True, probe.reason)
    assert resolve_domain("near", probe)[0] is False and "forced" in resolve_domain("near", probe)[1]
    assert resolve_domain("far", None)[0] is True
    assert resolve_domain("auto", None) == (False, "no domain probe: assuming a near domain")
    with pytest.raises(UnknownChoiceError, match="medium"):
        resolve_domain("medium", None)
    assert probe.as_params()["domain_probe_middle_acc"] == 0.8


@pytest.fixture(scope="module")
def body():
    return build_body("efficientnet_lite0", pretrained=True)


@pytest.fixture(scope="module")
def images(tmp_path_factory):
    """Two classes: bright squares vs dark squares on noise; 12 each."""
    root = tmp_path_factory.mktemp("probe")
    rng = np.random.default_rng(0)
    paths, targets = [], []
    for i in range(24):
        target = i % 2
        img = rng.integers(0, 60, size=(3, 32, 32)).astype(np.uint8)
        img[:, 8:24, 8:24] = 230 if target else 100
        paths.append(str(root / f"{i}.png"))
        write_png(torch.from_numpy(img), paths[-1])
        targets.append(target)
    return paths, np.array(targets)


def test_stage_features_shapes(body, images):
    feats = stage_features(body, "efficientnet_lite0", images[0][:5], 32, ["stage4", "stage7"])
    assert feats["stage4"].shape == (5, 80) and feats["stage7"].shape == (5, 320) and feats["last"].shape == (5, 1280)
    with pytest.raises(UnknownChoiceError, match="stage99"):
        stage_features(body, "efficientnet_lite0", images[0][:1], 32, ["stage99"])


def test_probe_domain_reports_both_stages_and_applies_the_rule(body, images):
    paths, y = images
    probe = probe_domain(body, "efficientnet_lite0", paths, y, 2, 32, folds=3)
    assert probe.middle_stage == middle_stage(body, "efficientnet_lite0") == "stage4"
    assert 0 <= probe.middle_acc <= 1 and 0 <= probe.last_acc <= 1 and probe.folds == 3 and probe.n_images == 24
    assert probe.far is (probe.middle_acc >= probe.last_acc)
    assert f"{probe.middle_acc:.3f}" in probe.reason and f"{probe.last_acc:.3f}" in probe.reason
    assert probe.last_acc > 0.8  # the planted brightness cue is linearly readable
    # a huge tolerance turns any result into "far", a negative one into "near"
    assert probe_domain(body, "efficientnet_lite0", paths, y, 2, 32, tolerance=2.0).far
    assert not probe_domain(body, "efficientnet_lite0", paths, y, 2, 32, tolerance=-2.0).far


def test_probe_domain_with_too_few_labels_says_so(body, images):
    paths, y = images
    probe = probe_domain(body, "efficientnet_lite0", paths[:3], np.array([0, 0, 1]), 2, 32)
    assert not probe.far and math.isnan(probe.middle_acc) and "too few labels" in probe.reason
    with pytest.raises(DataError, match="3 paths but 2 targets"):
        probe_domain(body, "efficientnet_lite0", paths[:3], np.array([0, 1]), 2, 32)


def test_available_backbones_never_downloads(monkeypatch, tmp_path):
    monkeypatch.setenv("TORCH_HOME", str(tmp_path))  # an empty hub cache: only the shipped weights count
    assert available_backbones() == ["efficientnet_lite0", "efficientnet_lite1", "efficientnet_lite2"]
    assert available_backbones(["resnet18"]) == []
    with pytest.raises(UnknownChoiceError):
        available_backbones(["alexnet"])


def test_score_backbones_table_and_errors(body, images):
    paths, y = images
    scores = score_backbones(["efficientnet_lite0"], paths, y, 32, bodies={"efficientnet_lite0": body})
    assert len(scores) == 1 and scores[0].knn_accuracy > 0.8 and np.isfinite(scores[0].logme)
    table = scores_table(scores)
    assert table["backbone"] == ["efficientnet_lite0"] and set(table) >= {"logme", "knn_accuracy"}
    with pytest.raises(UnknownChoiceError, match="transferability"):
        score_backbones(["efficientnet_lite0"], paths, y, 32, metric="auc")
    with pytest.raises(DataError, match="at least 2 classes"):
        score_backbones(["efficientnet_lite0"], paths, np.zeros(len(paths), int), 32)
