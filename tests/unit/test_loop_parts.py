import numpy as np

from flywheel.features.embedded import SplitFeatures
from flywheel.loop import split_labels
from flywheel.registry.tracking import decide_promotion


def _pool(folds):
    n = len(folds)
    return SplitFeatures(
        ids=np.arange(1, n + 1),
        paths=[f"/p/{i}" for i in range(n)],
        truths=[None] * n,
        folds=np.array(folds),
        vectors=np.zeros((n, 2), dtype=np.float32),
    )


def test_split_labels_keeps_low_folds_out_of_training():
    pool = _pool([5, 50, 10, 90, 30])
    labels = {1: "a", 2: "b", 3: "a", 4: "zzz"}  # sample 4 carries a label outside the class list
    split = split_labels(pool, labels, ["a", "b"], holdout_fraction=0.2)
    assert split.holdout.tolist() == [0, 2]
    assert split.train.tolist() == [1]
    assert split.targets.tolist() == [0, 1, 0, -1, -1]


def test_promotion_guard():
    assert decide_promotion(0.7, None, margin=0.0).promoted
    assert decide_promotion(0.71, 0.70, margin=0.0).promoted
    kept = decide_promotion(0.70, 0.70, margin=0.0)
    assert not kept.promoted and "does not beat" in kept.reason
    assert not decide_promotion(0.72, 0.70, margin=0.05).promoted
    assert not decide_promotion(float("nan"), 0.5, margin=0.0).promoted


def test_negative_transfer_guard_compares_with_the_head_on_the_same_labels():
    # beats an old champion trained on fewer labels, but not the head-only model on the same labels
    kept = decide_promotion(0.60, 0.50, margin=0.0, baseline=0.62)
    assert not kept.promoted and "negative transfer" in kept.reason
    assert decide_promotion(0.65, 0.50, margin=0.0, baseline=0.62).promoted
    assert decide_promotion(0.65, None, margin=0.0, baseline=0.62).promoted
