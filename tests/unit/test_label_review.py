"""Label review and provenance without servers: planted wrong labels are found, disagreeing annotators are
flagged, cross-validation never judges a label with a head that saw it, and a training set lists what it used."""

from __future__ import annotations

import csv
import io
from typing import Any

import numpy as np
import pytest

from flywheel.catalog import Catalog, NewSample
from flywheel.errors import DataError
from flywheel.insight import provenance, review
from flywheel.training.crossval import cross_validate, curve_sizes, stratified_folds


def _blobs(n_per_class: int = 60, n_classes: int = 4, seed: int = 0):
    """Well separated Gaussian clusters: every clean label is easy, so a flipped one stands out."""
    rng = np.random.default_rng(seed)
    centres = rng.normal(0, 6, (n_classes, 16))
    targets = np.repeat(np.arange(n_classes), n_per_class)
    features = (centres[targets] + rng.normal(0, 1, (len(targets), 16))).astype(np.float32)
    return features, targets


def test_stratified_folds_deal_each_class_evenly():
    targets = np.repeat(np.arange(3), [10, 7, 5])
    folds = stratified_folds(targets, 5, np.random.default_rng(0))
    for c in range(3):
        counts = np.bincount(folds[targets == c], minlength=5)
        assert counts.max() - counts.min() <= 1
    assert np.bincount(folds, minlength=5).tolist() == [5, 5, 4, 4, 4]  # 22 rows: sizes within one
    assert curve_sizes(100, n_sizes=4, smallest=10).tolist() == [10, 22, 46, 100]
    assert curve_sizes(100, n_sizes=1, smallest=10).tolist() == [100]


def test_out_of_fold_probabilities_never_come_from_a_head_that_saw_the_label():
    features, targets = _blobs()
    features[0] = features[targets == 1][5]  # row 0 (class 0) sits on a class-1 point: only memory could save it
    cv = cross_validate(features, targets, 4, folds=5, n_sizes=3, l2=0.1, seed=0)
    assert cv.probs.shape == (len(targets), 4)
    np.testing.assert_allclose(cv.probs.sum(1), 1.0, rtol=1e-5)
    assert cv.probs[0].argmax() == 1  # judged by heads trained without it
    assert cv.accuracy.shape == (3, 5) and cv.sizes[-1] == 192 and (cv.accuracy[-1] > 0.95).all()
    with pytest.raises(DataError, match="too few for 5-fold"):
        cross_validate(features[:9], targets[:9], 4, folds=5, l2=0.1, seed=0)


def _planted(seed: int) -> tuple[np.ndarray, np.ndarray, Any]:
    """Four blobs of 80 with 32 labels moved to another class: (noisy labels, wrong positions, cross-validation)."""
    features, truth = _blobs(n_per_class=80)
    rng = np.random.default_rng(seed)
    noisy = truth.copy()
    wrong = rng.choice(len(truth), size=32, replace=False)
    noisy[wrong] = (truth[wrong] + rng.integers(1, 4, size=32)) % 4
    return noisy, wrong, cross_validate(features, noisy, 4, folds=5, n_sizes=1, l2=0.1, seed=0)


def test_confident_learning_finds_planted_wrong_labels():
    noisy, wrong, cv = _planted(1)
    flagged = review.confident_learning(noisy, cv.probs)
    hits = np.isin(flagged, wrong).sum()
    assert hits / len(flagged) >= 0.9 and hits / len(wrong) >= 0.9
    scores = cv.probs[flagged, noisy[flagged]]
    assert (np.diff(scores) >= -1e-9).all()  # most suspicious (lowest self-confidence) first


def test_suspects_merge_both_signals_and_skip_reviewed_samples():
    features, targets = _blobs(n_per_class=30, n_classes=3)
    targets = targets.copy()
    targets[3] = 2  # planted: sample 103 is a class-0 image labelled "c"
    ids = np.arange(100, 100 + len(targets))
    cv = cross_validate(features, targets, 3, folds=5, n_sizes=1, l2=0.1, seed=0)
    votes = {110: [("ann@x", "a"), ("bob@x", "b"), ("cy@x", "a")], 111: [("ann@x", "a"), ("bob@x", "a")]}
    suspects = {s.sample_id: s for s in review.find_suspects(ids, targets, cv.probs, ["a", "b", "c"], votes)}
    assert suspects[103].label == "c" and suspects[103].suggested == "a"
    assert suspects[103].reasons[0].startswith(review.CONFIDENT_LEARNING)
    assert review.DISAGREEMENT in suspects[110].reasons[-1] and "b: bob@x" in suspects[110].reasons[-1]
    assert 111 not in suspects  # they agree
    again = review.find_suspects(ids, targets, cv.probs, ["a", "b", "c"], votes, exclude={103})
    assert 103 not in {s.sample_id for s in again}
    assert review.disagreements({1: [("a", "x")], 2: [("a", "x"), ("b", "y")]}) == {2: {"x": ["a"], "y": ["b"]}}


def test_selection_provenance_and_training_set_csv(tmp_path):
    catalog = Catalog(f"sqlite:///{tmp_path / 'c.db'}")
    catalog.add_samples(
        [NewSample(f"/img/{i}.png", f"{i:064x}", "a") for i in range(3)], source="t", split="pool", classes=["a"]
    )
    round_id = catalog.start_round(strategy="auto", n_labels=0)
    provenance.record_selection(
        catalog, round_id=round_id, strategy="auto", params={"k_per_round": 2, "description": "auto: typiclust"},
        model_version="7", picks=[(2, 0.9), (1, 0.4)],
    )  # fmt: skip
    records = provenance.provenance_of(catalog, [1, 2, 3, 99])
    assert set(records) == {1, 2, 3}
    assert (records[2].rank, records[2].score, records[2].model_version, records[2].round_id) == (1, 0.9, "7", round_id)
    assert records[1].rank == 2 and records[1].params["description"] == "auto: typiclust"
    assert records[3].strategy is None and records[3].label is None
    text = provenance.training_set_csv({1: "a", 2: "a"}, {1: "train", 2: "holdout"}, records)
    rows = list(csv.DictReader(io.StringIO(text)))
    assert [(r["sample_id"], r["role"], r["rank"], r["strategy"]) for r in rows] == [
        ("1", "train", "2", "auto"),
        ("2", "holdout", "1", "auto"),
    ]
    assert rows[0]["content_hash"] == f"{0:064x}" and '"k_per_round": 2' in rows[0]["params"]


def test_the_self_confidence_cutoff_keeps_only_labels_the_model_all_but_rules_out():
    noisy, _, cv = _planted(2)
    everything = review.confident_learning(noisy, cv.probs)
    cutoff = float(np.median(cv.probs[everything, noisy[everything]]))  # half of the flags lie above it
    kept = review.confident_learning(noisy, cv.probs, max_self_confidence=cutoff)
    assert 0 < len(kept) < len(everything) and set(kept) <= set(everything)
    assert (cv.probs[kept, noisy[kept]] <= cutoff).all()
    assert list(kept) == [i for i in everything if cv.probs[i, noisy[i]] <= cutoff]  # same order, most suspicious first
