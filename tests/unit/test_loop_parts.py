import numpy as np
import pytest

from flywheel.features.embedded import SplitFeatures
from flywheel.loop import split_labels
from flywheel.registry.guard import PairedDifference, decide_promotion, paired_difference


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


def _pair(n: int, wins: int, losses: int, both: int) -> PairedDifference:
    """A challenger and another model on n held-out images: `wins` only the challenger gets right, `losses`
    only the other, `both` both of them."""
    mine, theirs = np.zeros(n, dtype=bool), np.zeros(n, dtype=bool)
    mine[:wins] = True
    theirs[wins : wins + losses] = True
    mine[wins + losses : wins + losses + both] = theirs[wins + losses : wins + losses + both] = True
    return paired_difference(mine, theirs)


def test_the_paired_interval_covers_the_difference_and_narrows_with_more_labels():
    small, large = _pair(100, 6, 3, 70), _pair(1000, 60, 30, 700)
    assert small.difference == pytest.approx(0.03) and large.difference == pytest.approx(0.03)
    assert small.low < 0.03 < small.high and large.low < 0.03 < large.high
    assert large.high - large.low < (small.high - small.low) / 2  # ~1/sqrt(10) as wide
    assert large.low > 0 > small.low  # the same 3 points: noise on 100 labels, real on 1,000
    assert _pair(50, 0, 0, 40).low == _pair(50, 0, 0, 40).high == 0.0  # identical answers: no difference


def test_a_model_better_by_noise_only_is_not_promoted_and_a_clearly_better_one_is():
    noise = decide_promotion(_pair(100, 6, 3, 70), n_holdout=100, margin=0.0, rule="better")
    assert not noise.promoted and "does not beat the champion" in noise.reason and "interval" in noise.reason
    clear = decide_promotion(_pair(100, 15, 2, 70), n_holdout=100, margin=0.0, rule="better")
    assert clear.promoted and "beyond noise" in clear.reason
    assert not decide_promotion(_pair(100, 15, 2, 70), n_holdout=100, margin=0.2, rule="better").promoted


def test_a_head_on_more_labels_is_promoted_unless_worse_beyond_noise():
    assert decide_promotion(_pair(100, 3, 6, 70), n_holdout=100, margin=0.0, rule="not_worse").promoted
    assert decide_promotion(_pair(100, 0, 0, 70), n_holdout=100, margin=0.0, rule="not_worse").promoted  # a tie
    worse = decide_promotion(_pair(100, 2, 15, 70), n_holdout=100, margin=0.0, rule="not_worse")
    assert not worse.promoted and "upper end" in worse.reason
    assert not decide_promotion(_pair(100, 30, 0, 70), n_holdout=100, margin=1.0, rule="not_worse").promoted


def test_no_champion_or_no_held_out_labels():
    assert decide_promotion(None, n_holdout=10, margin=0.0, rule="not_worse").promoted
    kept = decide_promotion(None, n_holdout=0, margin=0.0, rule="not_worse")
    assert not kept.promoted and "no held-out labels" in kept.reason


def test_negative_transfer_guard_compares_with_the_head_on_the_same_labels():
    # beats an old champion clearly, but a head-only model on the same labels only by noise
    kept = decide_promotion(
        _pair(100, 20, 0, 60), n_holdout=100, margin=0.0, rule="better", vs_baseline=_pair(100, 5, 3, 70)
    )
    assert not kept.promoted and "negative transfer" in kept.reason
    promoted = decide_promotion(
        _pair(100, 20, 0, 60), n_holdout=100, margin=0.0, rule="better", vs_baseline=_pair(100, 15, 1, 70)
    )
    assert promoted.promoted
    first = decide_promotion(None, n_holdout=100, margin=0.0, rule="better", vs_baseline=_pair(100, 15, 1, 70))
    assert first.promoted
