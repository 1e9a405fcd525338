"""A tiny real fine-tune: two visually distinct classes, EfficientNet-Lite0 at 32 px on CPU."""

from __future__ import annotations

import copy

import numpy as np
import pytest
import torch
from torchvision.io import write_png

from flywheel.backbones import layer_groups, new_classifier
from flywheel.config import FinetuneSettings
from flywheel.errors import DataError
from flywheel.finetune import evaluate, finetune, predict_proba
from flywheel.policy import DepthDecision

SIZE = 32


def _stripes(horizontal: bool, rng: np.random.Generator) -> torch.Tensor:
    """Stripes with a random period, phase and colour, plus noise: orientation is the only class cue."""
    period = int(rng.integers(4, 9))
    phase = int(rng.integers(0, period))
    line = ((np.arange(48) + phase) % period < period // 2).astype(np.float32)
    img = np.tile(line[:, None], (1, 48)) if horizontal else np.tile(line[None, :], (48, 1))
    colour = rng.uniform(0.4, 1.0, size=3)
    pixels = img[None] * colour[:, None, None] * 255 + rng.normal(0, 12, size=(3, 48, 48))
    return torch.from_numpy(np.clip(pixels, 0, 255).astype(np.uint8))


@pytest.fixture(scope="module")
def stripes(tmp_path_factory):
    root = tmp_path_factory.mktemp("stripes")
    rng = np.random.default_rng(0)
    paths, targets = [], []
    for i in range(64):
        target = i % 2
        paths.append(str(root / f"{i}.png"))
        write_png(_stripes(target == 1, rng), paths[-1])
        targets.append(target)
    targets = np.array(targets)
    return paths[:40], targets[:40], paths[40:], targets[40:]


@pytest.fixture(scope="module")
def classifier():
    return new_classifier("efficientnet_lite0", ["vertical", "horizontal"], SIZE, seed=1)


SETTINGS = FinetuneSettings(epochs=4, head_epochs=1, batch_size=16, head_lr=1e-2, device="cpu")
LAST = DepthDecision(2, "last", "test: last two groups")


@pytest.fixture(scope="module")
def result(classifier, stripes):
    train_p, train_y, val_p, val_y = stripes
    return finetune(
        classifier, train_p, train_y, val_p, val_y, decision=LAST, settings=SETTINGS, seed=7, progress=False
    )


def test_finetune_beats_chance_and_the_untrained_head(result, classifier, stripes):
    _, _, val_p, val_y = stripes
    before = evaluate(classifier, val_p, val_y, device="cpu")
    after = evaluate(result.classifier, val_p, val_y, device="cpu")
    assert after >= 0.85 and after > before
    assert after == pytest.approx(max(h["val_accuracy"] for h in result.history))  # best epoch returned


def test_history_phases_and_rates(result):
    assert [h["phase"] for h in result.history] == ["head", "body", "body", "body"]
    assert [h["epoch"] for h in result.history] == [1, 2, 3, 4]
    assert all(np.isfinite(h["train_loss"]) for h in result.history)
    assert result.lr_by_group == {"head": 1e-2, "head_conv": 1e-3, "stage7": 1e-4}
    assert result.device == "cpu" and result.seconds > 0
    assert 1 <= result.best_epoch <= 4


def test_frozen_groups_and_the_input_model_are_untouched(result, classifier):
    tuned = dict(layer_groups(result.classifier.body, "efficientnet_lite0"))
    original = dict(layer_groups(classifier.body, "efficientnet_lite0"))
    for name in ("stem", "stage1", "stage6"):
        assert all(torch.equal(a, b) for a, b in zip(tuned[name], original[name], strict=True)), name
    assert not all(torch.equal(a, b) for a, b in zip(tuned["stage7"], original["stage7"], strict=True))
    # BatchNorm statistics stay frozen below depth "all"
    assert torch.equal(result.classifier.body._bn1.running_mean, classifier.body._bn1.running_mean)
    assert all(p.requires_grad for p in classifier.parameters())


def test_same_seed_gives_identical_weights(result, classifier, stripes):
    train_p, train_y, val_p, val_y = stripes
    again = finetune(
        classifier, train_p, train_y, val_p, val_y, decision=LAST, settings=SETTINGS, seed=7, progress=False
    )
    a, b = result.classifier.state_dict(), again.classifier.state_dict()
    assert all(torch.equal(a[k], b[k]) for k in a)
    assert [h["train_loss"] for h in again.history] == [h["train_loss"] for h in result.history]


def test_head_only_decision_trains_only_the_head(classifier, stripes):
    train_p, train_y, val_p, val_y = stripes
    settings = FinetuneSettings(epochs=2, head_epochs=1, batch_size=16, device="cpu")
    res = finetune(
        classifier,
        train_p[:16],
        train_y[:16],
        [],
        np.array([], dtype=np.int64),
        decision=DepthDecision(0, "head", "test"),
        settings=settings,
        seed=0,
        progress=False,
    )
    assert [h["phase"] for h in res.history] == ["head", "head"]
    assert all(h["val_accuracy"] is None for h in res.history) and res.notes
    before, after = classifier.body.state_dict(), res.classifier.body.state_dict()
    assert all(torch.equal(before[k], after[k]) for k in before)
    assert not torch.equal(res.classifier.head.weight, classifier.head.weight)


def test_predict_proba_rows_sum_to_one(result, stripes):
    probs = predict_proba(result.classifier, stripes[2][:5], device="cpu")
    assert probs.shape == (5, 2) and probs.dtype == np.float32
    np.testing.assert_allclose(probs.sum(1), 1.0, atol=1e-5)


def test_bad_targets_are_data_errors(classifier, stripes):
    train_p, train_y, val_p, val_y = stripes
    with pytest.raises(DataError, match=r"\[0, 2\)"):
        finetune(
            classifier, train_p, train_y + 1, val_p, val_y, decision=LAST, settings=SETTINGS, seed=0, progress=False
        )
    with pytest.raises(DataError, match="at least one training image"):
        finetune(
            classifier,
            [],
            np.array([], dtype=np.int64),
            val_p,
            val_y,
            decision=LAST,
            settings=SETTINGS,
            seed=0,
            progress=False,
        )
    with pytest.raises(DataError, match="40 paths but 3 targets"):
        evaluate(copy.deepcopy(classifier), train_p, train_y[:3], device="cpu")
