import numpy as np
import pytest
import torch

from flywheel.errors import FlywheelError
from flywheel.training.head import accuracy, predict_proba, train_head


def _blobs(rng, n=60, d=16, offset=3.0):
    x = np.concatenate([rng.normal(0, 1, (n, d)), rng.normal(offset, 1, (n, d))]).astype(np.float32)
    y = np.repeat([0, 1], n)
    return x * 7 + 40, y  # far from standardised, as raw backbone features are


def test_head_separates_planted_classes_and_folds_in_the_scaling():
    rng = np.random.default_rng(0)
    x, y = _blobs(rng)
    head = train_head(x, y, n_classes=3)
    probs = predict_proba(head, x)
    assert accuracy(probs, y) > 0.95
    np.testing.assert_allclose(probs.sum(1), 1, rtol=1e-5)
    assert probs[:, 2].max() < 0.05  # a class with no labels is never predicted
    direct = torch.softmax(head(torch.as_tensor(x)), 1).detach().numpy()
    np.testing.assert_allclose(direct, probs, rtol=1e-5, atol=1e-6)


def test_a_feature_nearly_constant_in_the_labels_cannot_swing_the_logits():
    rng = np.random.default_rng(2)
    x, y = _blobs(rng)
    x = np.concatenate([x, np.zeros((len(x), 1), np.float32)], axis=1)
    x[0, -1] = 1e-3  # fires, barely, in one labelled image of class 0 (a near-dead backbone feature)
    head = train_head(x, y, n_classes=2)
    assert head.weight.abs().max() < 10
    shifted = x.copy()
    shifted[:, -1] = 0.05  # the same feature a little awake in new images (an augmented crop, the pool)
    assert accuracy(predict_proba(head, shifted), y) > 0.95


def test_head_on_random_labels_does_not_generalise():
    rng = np.random.default_rng(1)
    x, _ = _blobs(rng)
    y = rng.integers(0, 2, len(x))
    head = train_head(x[:80], y[:80], 2)
    assert accuracy(predict_proba(head, x[80:]), y[80:]) < 0.8


def test_head_input_errors_name_the_numbers():
    x = np.zeros((3, 4), dtype=np.float32)
    with pytest.raises(FlywheelError, match="3 rows but targets has 2"):
        train_head(x, np.array([0, 1]), 2)
    with pytest.raises(FlywheelError, match=r"\[0, 2\)"):
        train_head(x, np.array([0, 1, 5]), 2)


def test_accuracy_of_nothing_is_nan_not_zero():
    assert np.isnan(accuracy(np.empty((0, 2)), np.empty(0, dtype=int)))
