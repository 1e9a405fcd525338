"""Strategy tests: a contract suite over the whole registry, hand-computed picks, planted signal."""

import numpy as np
import pytest
from hypothesis import given, settings
from hypothesis import strategies as st

from flywheel.errors import FlywheelError, PoolExhaustedError, UnknownChoiceError
from flywheel.strategies import STRATEGIES, PoolView, get_strategy
from flywheel.strategies.auto import IMBALANCE_RATIO, LOW_BUDGET_PER_CLASS
from flywheel.strategies.balanced import class_quotas
from flywheel.strategies.dedup import DUPLICATE_COSINE, distinct_top
from flywheel.strategies.diversity import kcenter_greedy
from flywheel.strategies.geometry import whitened
from flywheel.strategies.uncertainty import entropy_scores, least_confidence_scores, margin_scores

NEEDS_PROBS = {"least_confidence", "margin", "entropy", "badge", "falcun", "hybrid", "balanced_margin",
               "balanced_entropy"}  # fmt: skip
NEEDS_EMBEDDINGS = {"kcenter", "typiclust", "probcover", "badge", "hybrid"}


def _rng(seed: int = 0) -> np.random.Generator:
    return np.random.default_rng(seed)


def _pool(probs: np.ndarray, candidates: list[int], **kwargs) -> PoolView:
    return PoolView(candidates=np.array(candidates, dtype=np.int64), probs=probs.astype(np.float32), **kwargs)


def _blobs(n_per: int, n_classes: int, dim: int, seed: int, spread: float = 0.3) -> tuple[np.ndarray, np.ndarray]:
    """Clustered embeddings and their cluster ids: well separated unit-ish blobs."""
    rng = _rng(seed)
    centres = rng.normal(size=(n_classes, dim))
    y = np.repeat(np.arange(n_classes), n_per)
    return (centres[y] + spread * rng.normal(size=(len(y), dim))).astype(np.float32), y


# --------------------------------------------------------------------------------------- contract suite


@settings(max_examples=25, deadline=None)
@given(n_pool=st.integers(3, 50), n_classes=st.integers(2, 5), dim=st.integers(2, 8), data=st.data())
def test_every_strategy_returns_k_unique_candidates_deterministically(n_pool, n_classes, dim, data):
    seed = data.draw(st.integers(0, 2**16))
    rng = _rng(seed)
    labelled = sorted(data.draw(st.sets(st.integers(0, n_pool - 1), max_size=n_pool - 1)))
    rest = [i for i in range(n_pool) if i not in labelled]
    candidates = sorted(data.draw(st.sets(st.sampled_from(rest), min_size=1)))
    k = data.draw(st.integers(1, len(candidates)))
    pool = PoolView(
        candidates=np.array(candidates, dtype=np.int64),
        labelled=np.array(labelled, dtype=np.int64),
        probs=rng.dirichlet(np.ones(n_classes), size=n_pool).astype(np.float32),
        embeddings=rng.normal(size=(n_pool, dim)).astype(np.float32),
        labelled_targets=rng.integers(0, n_classes, size=len(labelled)),
    )
    for name, strategy in STRATEGIES.items():
        first = strategy(pool, k, rng=_rng(seed))
        again = strategy(pool, k, rng=_rng(seed))
        picked = first.positions.tolist()
        assert first.positions.dtype == np.int64, name
        assert len(picked) == k and len(set(picked)) == k, name
        assert set(picked) <= set(candidates), name
        assert not set(picked) & set(labelled), name
        assert picked == again.positions.tolist(), name
        assert len(first.scores) == k and np.isfinite(first.scores).all(), name
        assert first.strategy == name and first.description, name


@pytest.mark.parametrize("name", sorted(STRATEGIES))
def test_asking_for_more_than_the_candidates_names_both_numbers(name):
    x, _ = _blobs(2, 2, 3, seed=0)
    pool = _pool(np.full((4, 2), 0.5), [0, 1, 2], embeddings=x)
    with pytest.raises(PoolExhaustedError, match="3 candidates available / 10 requested"):
        get_strategy(name)(pool, 10, rng=_rng())


@pytest.mark.parametrize("name", sorted(STRATEGIES))
def test_zero_picks_is_refused(name):
    with pytest.raises(FlywheelError, match="n must be at least 1"):
        get_strategy(name)(PoolView(candidates=np.arange(3)), 0, rng=_rng())


@pytest.mark.parametrize("name", sorted(NEEDS_PROBS))
def test_missing_probabilities_are_named_with_an_alternative(name):
    x, _ = _blobs(3, 2, 4, seed=0)
    with pytest.raises(FlywheelError, match=r"needs model probabilities \(PoolView.probs\).*use 'random'"):
        get_strategy(name)(PoolView(candidates=np.arange(6), embeddings=x), 2, rng=_rng())


@pytest.mark.parametrize("name", sorted(NEEDS_EMBEDDINGS))
def test_missing_embeddings_are_named_with_an_alternative(name):
    pool = _pool(np.full((6, 2), 0.5), list(range(6)))
    with pytest.raises(FlywheelError, match=r"needs embeddings \(PoolView.embeddings\); without them use '"):
        get_strategy(name)(pool, 2, rng=_rng())


def test_strategies_without_a_hard_need_run_on_bare_candidates():
    for name in sorted(set(STRATEGIES) - NEEDS_PROBS - NEEDS_EMBEDDINGS):
        selection = get_strategy(name)(PoolView(candidates=np.arange(5)), 2, rng=_rng())
        assert len(selection.positions) == 2, name


def test_unknown_strategy_lists_the_choices():
    with pytest.raises(UnknownChoiceError, match="auto, badge, balanced_entropy"):
        get_strategy("magic")


def test_the_registry_holds_exactly_the_agreed_names():
    assert set(STRATEGIES) == {
        "random", "least_confidence", "margin", "entropy", "kcenter", "typiclust", "probcover", "badge",
        "falcun", "hybrid", "balanced_margin", "balanced_entropy", "auto",
    }  # fmt: skip


# ---------------------------------------------------------------------------------------------- PoolView


def test_labelled_targets_must_match_labelled():
    with pytest.raises(FlywheelError, match="labelled_targets has 1 entries but labelled has 2"):
        PoolView(candidates=np.arange(2), labelled=np.array([2, 3]), labelled_targets=np.array([0]))


def test_labelled_targets_must_be_class_indices():
    with pytest.raises(FlywheelError, match="class indices >= 0"):
        PoolView(candidates=np.arange(2), labelled=np.array([2]), labelled_targets=np.array([-1]))


def test_pool_view_rejects_bad_shapes_and_positions():
    with pytest.raises(FlywheelError, match=r"probs must be \(N, C\)"):
        PoolView(candidates=np.arange(2), probs=np.ones(3))
    with pytest.raises(FlywheelError, match=r"embeddings must be \(N, D\)"):
        PoolView(candidates=np.arange(2), embeddings=np.ones(3))
    with pytest.raises(FlywheelError, match="probs has 3 rows but embeddings has 4"):
        PoolView(candidates=np.arange(2), probs=np.ones((3, 2)), embeddings=np.ones((4, 2)))
    with pytest.raises(FlywheelError, match="candidate position 5 outside probs of 3 rows"):
        PoolView(candidates=np.array([0, 5]), probs=np.ones((3, 2)) / 2)
    with pytest.raises(FlywheelError, match="labelled position 7 outside embeddings of 3 rows"):
        PoolView(candidates=np.array([0]), labelled=np.array([7]), embeddings=np.ones((3, 2)))


def test_labelled_counts_come_from_targets():
    pool = PoolView(
        candidates=np.arange(2), labelled=np.array([2, 3, 4]), labelled_targets=np.array([0, 2, 2]),
        probs=np.full((5, 4), 0.25),
    )  # fmt: skip
    assert pool.labelled_counts().tolist() == [1, 0, 2, 0]
    assert PoolView(candidates=np.arange(2)).labelled_counts() is None


# ------------------------------------------------------------------------------- uncertainty, by hand

PROBS = np.array(
    [
        [0.50, 0.30, 0.20],  # LC 0.50, margin 1-0.20=0.80, H=1.0297
        [0.40, 0.40, 0.20],  # LC 0.60, margin 1.00,        H=1.0549
        [0.90, 0.05, 0.05],  # LC 0.10, margin 0.15,        H=0.3944
        [0.45, 0.10, 0.45],  # LC 0.55, margin 1.00,        H=0.9433
        [0.34, 0.33, 0.33],  # LC 0.66, margin 0.99,        H=1.0985
    ]
)


def test_scores_hand_computed():
    assert least_confidence_scores(PROBS) == pytest.approx([0.5, 0.6, 0.1, 0.55, 0.66])
    assert margin_scores(PROBS) == pytest.approx([0.8, 1.0, 0.15, 1.0, 0.99])
    assert entropy_scores(np.array([[0.25, 0.25, 0.25, 0.25]]))[0] == pytest.approx(np.log(4))
    assert entropy_scores(np.array([[1.0, 0.0]]))[0] == pytest.approx(0.0)
    assert entropy_scores(PROBS[:1])[0] == pytest.approx(-(0.5 * np.log(0.5) + 0.3 * np.log(0.3) + 0.2 * np.log(0.2)))


@pytest.mark.parametrize(
    ("name", "expected"),
    [("least_confidence", [4, 1, 3]), ("entropy", [4, 1, 0]), ("margin", [1, 3, 4])],
)
def test_uncertainty_picks_hand_computed(name, expected):
    selection = get_strategy(name)(_pool(PROBS, [0, 1, 2, 3, 4]), 3, rng=_rng())
    order = selection.positions.tolist()
    if name == "margin":  # 1 and 3 tie at 1.0: either order, then 4
        assert sorted(order[:2]) == [1, 3] and order[2] == 4
    else:
        assert order == expected
    assert list(selection.scores) == sorted(selection.scores, reverse=True)


def test_uncertainty_only_picks_candidates():
    selection = get_strategy("entropy")(_pool(PROBS, [0, 2, 3]), 1, rng=_rng())
    assert selection.positions.tolist() == [0]


def test_margin_ties_are_broken_by_the_seed_not_by_position():
    probs = np.full((20, 2), 0.5)
    firsts = {get_strategy("margin")(_pool(probs, list(range(20))), 1, rng=_rng(s)).positions[0] for s in range(10)}
    assert len(firsts) > 1


# ---------------------------------------------------------------------------------- near-duplicates


def test_a_planted_near_duplicate_is_dropped_and_said():
    x, _ = _blobs(5, 4, 16, seed=1, spread=1.0)
    x[7] = x[3] * 1.01 + 1e-3  # row 7 is row 3 again: cosine ~ 1
    probs = np.full((20, 2), 0.5)
    probs[:, 0] = np.linspace(0.5, 0.99, 20)  # most uncertain first: 0, 1, 2, ...
    probs[:, 1] = 1 - probs[:, 0]
    probs[7] = [0.505, 0.495]  # the duplicate ranks second, just behind 0 ... and ahead of 3
    probs[3] = [0.51, 0.49]
    pool = _pool(probs, list(range(20)), embeddings=x)
    selection = get_strategy("margin")(pool, 4, rng=_rng())
    assert 7 in selection.positions and 3 not in selection.positions
    assert "skipped 1 near-duplicate" in selection.description
    plain = get_strategy("margin")(_pool(probs, list(range(20))), 4, rng=_rng())
    assert {3, 7} <= set(plain.positions.tolist())  # without embeddings nothing can be compared


def test_distinct_top_uses_faiss_range_search_on_large_shortlists():
    rng = _rng(3)
    x = rng.normal(size=(3000, 8)).astype(np.float32)
    x[1] = x[0]  # duplicate of the best-ranked
    pool = PoolView(candidates=np.arange(3000), embeddings=x)
    distinct = distinct_top(pool, np.arange(3000), 1500)  # shortlist of 3016 > the matrix limit
    assert 0 in distinct.order and 1 not in distinct.order and len(distinct.order) == 1500
    assert distinct.dropped >= 1


def test_all_duplicates_still_fill_the_batch():
    x = np.ones((4, 3), dtype=np.float32)
    distinct = distinct_top(PoolView(candidates=np.arange(4), embeddings=x), np.arange(4), 3)
    assert distinct.order.tolist() == [0, 1, 2] and distinct.dropped == 1
    assert DUPLICATE_COSINE < 1.0


# ------------------------------------------------------------------------------------------- k-center


def test_kcenter_first_pick_is_the_candidate_farthest_from_the_labelled_set():
    x = np.array([[1, 0], [0.9, 0.1], [0, 1], [-1, 0.05], [0.7, 0.7]], dtype=np.float32)
    pool = PoolView(candidates=np.array([1, 2, 3, 4]), labelled=np.array([0]), embeddings=x)
    selection = get_strategy("kcenter")(pool, 2, rng=_rng())
    assert selection.positions[0] == 3  # opposite the labelled point
    assert selection.positions[1] == 2  # then the one farthest from {0, 3}
    assert selection.scores[0] > selection.scores[1]


def test_kcenter_without_labels_starts_at_the_most_central_candidate():
    x = np.array([[1, 0], [0.8, 0.6], [0.6, 0.8], [0, 1], [0.71, 0.70]], dtype=np.float32)
    selection = get_strategy("kcenter")(PoolView(candidates=np.arange(5), embeddings=x), 2, rng=_rng())
    assert selection.positions[0] == 4  # nearest the mean direction (45 degrees)
    assert selection.positions[1] in (0, 3)  # then an extreme
    assert selection.scores[0] == 2.0


@settings(max_examples=20, deadline=None)
@given(seed=st.integers(0, 1000), n=st.integers(1, 40), n_labelled=st.integers(0, 5))
def test_kcenter_shortlisted_greedy_equals_plain_greedy(seed, n, n_labelled):
    rng = _rng(seed)
    x = rng.normal(size=(120, 6)).astype(np.float32)
    labelled, candidates = np.arange(n_labelled), np.arange(n_labelled, 120)
    fast, fast_scores = kcenter_greedy(x, candidates, labelled, n, shortlist=8)  # forces many rescans
    plain, plain_scores = kcenter_greedy(x, candidates, labelled, n, shortlist=10**6)
    assert fast.tolist() == plain.tolist()
    assert fast_scores == pytest.approx(plain_scores, abs=1e-5)


# ------------------------------------------------------------------------------ typiclust, probcover


def test_typiclust_picks_from_the_densest_part_of_a_planted_cluster():
    rng = _rng(0)
    core = rng.normal(scale=0.02, size=(30, 8)) + np.r_[1.0, np.zeros(7)]  # tight core
    halo = rng.normal(scale=0.3, size=(30, 8)) + np.r_[1.0, np.zeros(7)]  # same cluster, sparse rim
    x = np.vstack([core, halo]).astype(np.float32)
    selection = get_strategy("typiclust")(PoolView(candidates=np.arange(60), embeddings=x), 1, rng=_rng())
    assert selection.positions[0] < 30


def test_typiclust_covers_each_cluster_before_any_twice():
    x, y = _blobs(20, 4, 8, seed=2, spread=0.05)
    selection = get_strategy("typiclust")(PoolView(candidates=np.arange(80), embeddings=x), 4, rng=_rng())
    assert sorted(y[selection.positions].tolist()) == [0, 1, 2, 3]
    labelled_in_0 = PoolView(candidates=np.arange(1, 80), labelled=np.array([0]), embeddings=x)
    selection = get_strategy("typiclust")(labelled_in_0, 3, rng=_rng())
    assert sorted(y[selection.positions].tolist()) == [1, 2, 3]  # cluster 0 already has a label


def test_probcover_covers_every_blob_once():
    x, y = _blobs(25, 4, 8, seed=4, spread=0.05)
    probs = np.full((100, 4), 0.25)  # 4 classes: the purity test clusters into 4
    selection = get_strategy("probcover")(_pool(probs, list(range(100)), embeddings=x), 4, rng=_rng())
    assert sorted(y[selection.positions].tolist()) == [0, 1, 2, 3]
    assert selection.scores[0] >= 20  # a whole blob covered by the first ball
    assert "over 4 k-means clusters" in selection.description


def test_probcover_says_when_the_pool_is_already_covered():
    x, _ = _blobs(10, 2, 4, seed=5, spread=0.01)
    pool = _pool(np.full((20, 2), 0.5), list(range(1, 10)) + list(range(11, 20)), embeddings=x,
                 labelled=np.array([0, 10]))  # fmt: skip
    selection = get_strategy("probcover")(pool, 2, rng=_rng())
    assert "pool fully covered, 2 pick(s) at random" in selection.description


# ------------------------------------------------------------------------------------ badge, hybrid


def test_badge_starts_with_the_largest_gradient_and_spreads():
    x, y = _blobs(10, 3, 6, seed=6, spread=0.05)
    probs = np.full((30, 3), 0.05)
    probs[np.arange(30), y] = 0.9
    probs[12] = [0.34, 0.33, 0.33]  # most uncertain in blob 1
    selection = get_strategy("badge")(_pool(probs, list(range(30)), embeddings=x), 3, rng=_rng())
    assert selection.positions[0] == 12


def test_hybrid_spreads_a_batch_over_clusters_of_uncertain_points():
    x, y = _blobs(20, 3, 8, seed=7, spread=0.05)
    probs = np.full((60, 2), 0.5)  # all equally uncertain: the clusters decide
    selection = get_strategy("hybrid")(_pool(probs, list(range(60)), embeddings=x), 3, rng=_rng())
    assert sorted(y[selection.positions].tolist()) == [0, 1, 2]


def test_falcun_spreads_over_predicted_distributions():
    probs = np.repeat(np.array([[0.5, 0.5, 0.0], [0.0, 0.5, 0.5], [0.5, 0.0, 0.5]]), 10, axis=0)
    selection = get_strategy("falcun")(_pool(probs, list(range(30))), 3, rng=_rng())
    assert sorted((selection.positions // 10).tolist()) == [0, 1, 2]


# ------------------------------------------------------------------------------------ class balance


def test_class_quotas_deal_round_robin_and_skip_exhausted_classes():
    assert class_quotas(np.array([5, 5, 5]), np.array([2, 0, 1]), 4).tolist() == [1, 1, 2]
    assert class_quotas(np.array([0, 1, 9]), np.array([0, 1, 2]), 5).tolist() == [0, 1, 4]


@settings(max_examples=30, deadline=None)
@given(seed=st.integers(0, 10_000), n_classes=st.integers(2, 6), n=st.integers(1, 30))
def test_balanced_keeps_per_class_counts_within_one(seed, n_classes, n):
    rng = _rng(seed)
    probs = rng.dirichlet(np.ones(n_classes) * 0.3, size=400)
    pool = _pool(probs, list(range(400)))
    available = np.bincount(probs.argmax(axis=1), minlength=n_classes)
    for name in ("balanced_margin", "balanced_entropy"):
        picked = get_strategy(name)(pool, n, rng=_rng(seed)).positions
        counts = np.bincount(probs[picked].argmax(axis=1), minlength=n_classes)
        roomy = available >= n  # classes that could take any share
        assert counts[roomy].max() - counts[roomy].min() <= 1, name


def test_balanced_gives_the_odd_pick_to_the_class_with_fewest_labels():
    rng = _rng(1)
    probs = rng.dirichlet(np.ones(3), size=90)
    labelled = np.arange(90, 96)
    probs = np.vstack([probs, np.full((6, 3), 1 / 3)])
    targets = np.array([0, 0, 0, 2, 2, 1])  # class 1 has fewest
    pool = _pool(probs, list(range(90)), labelled=labelled, labelled_targets=targets)
    picked = get_strategy("balanced_margin")(pool, 4, rng=_rng()).positions
    counts = np.bincount(probs[picked].argmax(axis=1), minlength=3)
    assert counts.tolist() == [1, 2, 1]
    assert probs[picked[0]].argmax() == 1  # rarest first


# --------------------------------------------------------------------------------------------- auto


def _auto_pool(n_labels: int, n_classes: int = 4, targets: np.ndarray | None = None, seed: int = 0) -> PoolView:
    x, y = _blobs(60, n_classes, 8, seed=seed, spread=0.5)
    logits = 3.0 * np.eye(n_classes)[y] + _rng(seed).normal(size=(len(y), n_classes))
    probs = np.exp(logits) / np.exp(logits).sum(axis=1, keepdims=True)
    labelled = np.arange(n_labels) * (len(y) // max(n_labels, 1))
    if targets is None:
        targets = y[labelled]
    return PoolView(
        candidates=np.setdiff1d(np.arange(len(y)), labelled),
        labelled=labelled,
        probs=probs.astype(np.float32),
        embeddings=x,
        labelled_targets=np.asarray(targets),
    )


def test_auto_switches_from_typiclust_to_hybrid_at_the_threshold():
    n_classes = 4
    below = int(LOW_BUDGET_PER_CLASS * n_classes) - 1
    low = get_strategy("auto")(_auto_pool(below), 5, rng=_rng())
    expected = f"{below} labels for 4 classes ({below / 4:.1f}/class < {LOW_BUDGET_PER_CLASS:g}): typiclust"
    assert expected in low.description
    at = int(LOW_BUDGET_PER_CLASS * n_classes)
    high = get_strategy("auto")(_auto_pool(at), 5, rng=_rng())
    assert f"{at} labels for 4 classes ({at / 4:.1f}/class >= {LOW_BUDGET_PER_CLASS:g})" in high.description
    assert "by hybrid" in high.description and "typiclust" not in high.description


def test_auto_cold_start_without_a_model_or_embeddings():
    x, _ = _blobs(10, 2, 4, seed=0)
    cold = get_strategy("auto")(PoolView(candidates=np.arange(20), embeddings=x), 3, rng=_rng())
    assert "no model yet (0 labels): typiclust" in cold.description
    bare = get_strategy("auto")(PoolView(candidates=np.arange(20)), 3, rng=_rng())
    assert "random (typiclust needs embeddings" in bare.description


def test_auto_does_not_starve_a_rare_class():
    n_classes, rare = 4, 3
    pool = _auto_pool(40, n_classes)
    targets = np.where(np.arange(40) < 2, rare, np.arange(40) % 3)  # class 3: 2 labels, the rest ~13 each
    pool = PoolView(
        candidates=pool.candidates, labelled=pool.labelled, probs=pool.probs, embeddings=pool.embeddings,
        labelled_targets=targets,
    )  # fmt: skip
    counts = pool.labelled_counts()
    assert counts.max() >= IMBALANCE_RATIO * counts.min()
    selection = get_strategy("auto")(pool, 8, rng=_rng())
    predicted = pool.probs[selection.positions].argmax(axis=1)
    assert (predicted[:4] == rare).all()  # the balanced half goes where the counts are lowest (2 vs 13)
    assert "predicted class:picks 3:4" in selection.description
    assert "uneven (2..13" in selection.description and "dealt to level the counts" in selection.description


def test_model_free_strategies_run_without_probabilities():
    from flywheel.strategies import MODEL_FREE

    rng = np.random.default_rng(0)
    pool = PoolView(candidates=np.arange(50), embeddings=rng.normal(size=(50, 8)).astype(np.float32))
    for name in MODEL_FREE:
        assert len(get_strategy(name)(pool, 5, rng=np.random.default_rng(1)).positions) == 5, name


# ------------------------------------------------------------------------------------------------ geometry


def test_whitened_embeddings_have_unit_covariance_over_the_pool_rows_and_leave_others_zero():
    rng = _rng(3)
    x = (rng.normal(size=(60, 6)) * np.array([50.0, 10.0, 3.0, 1.0, 0.5, 0.1])).astype(np.float32)
    pool = PoolView(candidates=np.arange(10, 50), labelled=np.arange(50, 60), embeddings=x)
    z = whitened(pool, dims=4).embeddings
    rows = np.arange(10, 60)
    assert z.shape == (60, 4) and not z[:10].any()
    np.testing.assert_allclose(z[rows].mean(axis=0), 0.0, atol=1e-4)
    np.testing.assert_allclose(np.cov(z[rows], rowvar=False), np.eye(4), atol=1e-3)


def test_whitened_returns_the_pool_unchanged_when_there_is_nothing_to_fit():
    no_embeddings = PoolView(candidates=np.arange(3))
    assert whitened(no_embeddings) is no_embeddings
    one_row = PoolView(candidates=np.array([0]), embeddings=np.ones((2, 3), dtype=np.float32))
    assert whitened(one_row) is one_row
    constant = PoolView(candidates=np.arange(4), embeddings=np.ones((4, 3), dtype=np.float32))
    assert whitened(constant) is constant


def test_levelling_quotas_fill_the_lowest_counts_first_and_respect_what_is_available():
    from flywheel.strategies.balanced import levelling_quotas

    tie = np.zeros(4)
    assert levelling_quotas(np.array([2, 13, 13, 8]), np.array([9, 9, 9, 9]), 8, tie).tolist() == [7, 0, 0, 1]
    assert levelling_quotas(np.array([2, 13, 13, 9]), np.array([3, 9, 9, 9]), 8, tie).tolist() == [3, 1, 0, 4]
    assert levelling_quotas(np.array([5, 5, 5, 5]), np.array([9, 9, 9, 9]), 6, tie).tolist() == [2, 2, 1, 1]
