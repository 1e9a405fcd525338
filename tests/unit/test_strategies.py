import numpy as np
import pytest
from hypothesis import given, settings
from hypothesis import strategies as st

from flywheel.errors import FlywheelError, PoolExhaustedError, UnknownChoiceError
from flywheel.strategies import STRATEGIES, PoolView, get_strategy
from flywheel.strategies.uncertainty import entropy_scores


def _pool(probs: np.ndarray, candidates: list[int]) -> PoolView:
    return PoolView(candidates=np.array(candidates, dtype=np.int64), probs=probs.astype(np.float32))


def test_entropy_picks_the_most_uncertain_rows_first():
    probs = np.array([[1.0, 0.0], [0.5, 0.5], [0.9, 0.1], [0.6, 0.4]])
    selection = get_strategy("entropy")(_pool(probs, [0, 1, 2, 3]), 2, rng=np.random.default_rng(0))
    assert selection.positions.tolist() == [1, 3]
    assert selection.scores[0] == pytest.approx(np.log(2))
    assert selection.strategy == "entropy"


def test_entropy_only_picks_candidates():
    probs = np.array([[0.5, 0.5], [0.9, 0.1], [0.8, 0.2]])
    selection = get_strategy("entropy")(_pool(probs, [1, 2]), 1, rng=np.random.default_rng(0))
    assert selection.positions.tolist() == [2]


def test_entropy_scores_hand_computed():
    assert entropy_scores(np.array([[0.25, 0.25, 0.25, 0.25]]))[0] == pytest.approx(np.log(4))
    assert entropy_scores(np.array([[1.0, 0.0]]))[0] == pytest.approx(0.0)


def test_entropy_without_a_model_says_what_to_do():
    with pytest.raises(FlywheelError, match="cold start"):
        get_strategy("entropy")(PoolView(candidates=np.arange(3)), 1, rng=np.random.default_rng(0))


def test_asking_for_more_than_the_pool_names_both_numbers():
    with pytest.raises(PoolExhaustedError, match="3 candidates available / 10 requested"):
        get_strategy("random")(PoolView(candidates=np.arange(3)), 10, rng=np.random.default_rng(0))


def test_unknown_strategy_lists_the_choices():
    with pytest.raises(UnknownChoiceError, match="entropy, random"):
        get_strategy("magic")


@settings(max_examples=40, deadline=None)
@given(
    n_pool=st.integers(2, 60),
    n_classes=st.integers(2, 6),
    data=st.data(),
)
def test_every_strategy_returns_k_unique_candidates_deterministically(n_pool, n_classes, data):
    seed = data.draw(st.integers(0, 2**16))
    candidates = sorted(data.draw(st.sets(st.integers(0, n_pool - 1), min_size=1)))
    k = data.draw(st.integers(1, len(candidates)))
    probs = np.random.default_rng(seed).dirichlet(np.ones(n_classes), size=n_pool)
    pool = _pool(probs, candidates)
    for name, strategy in STRATEGIES.items():
        first = strategy(pool, k, rng=np.random.default_rng(seed))
        again = strategy(pool, k, rng=np.random.default_rng(seed))
        assert len(first.positions) == k, name
        assert len(set(first.positions.tolist())) == k, name
        assert set(first.positions.tolist()) <= set(candidates), name
        assert first.positions.tolist() == again.positions.tolist(), name
        assert len(first.scores) == k, name
