"""The annotation ledger on a real SQLite catalog: ordering, tombstones, votes (no Label Studio needed)."""

from __future__ import annotations

from datetime import datetime
from pathlib import Path

import pytest

from flywheel.catalog import Catalog, NewSample
from flywheel.labelstudio import ledger
from flywheel.labelstudio.interface import LabelMode

CLASSES = ["cat", "dog", "bird"]


@pytest.fixture
def catalog(tmp_path: Path) -> Catalog:
    catalog = Catalog(f"sqlite:///{tmp_path / 'catalog.db'}")
    catalog.add_samples(
        [NewSample(f"/x/{i}.png", f"{i:064x}") for i in range(3)], source="t", split="pool", classes=CLASSES
    )
    return catalog


def obs(annotation: int, *choices: str, user: int = 1, second: int = 0, sample: int = 1) -> ledger.Observation:
    return ledger.Observation(
        annotation_id=annotation, task_id=100 + sample, project_id=7, sample_id=sample, user_id=user,
        annotator=f"u{user}@x", choices=choices, updated_at=datetime(2030, 1, 1, 0, 0, second),
    )  # fmt: skip


def run(catalog: Catalog, *observations: ledger.Observation, mode: LabelMode = "single") -> list[str]:
    return ledger.with_retries(
        catalog,
        lambda s: ledger.apply(s, observations, classes=CLASSES, mode=mode),
    ).outcomes


def test_deletion_before_creation_leaves_a_tombstone(catalog: Catalog) -> None:
    assert run(catalog, ledger.deletion(5)) == ["applied"]
    assert run(catalog, obs(5, "dog")) == ["stale: annotation 5 was deleted"]
    assert catalog.labels() == {}


def test_versions_apply_in_updated_at_order_whatever_the_arrival(catalog: Catalog) -> None:
    assert run(catalog, obs(5, "bird", second=2), obs(5, "dog", second=1), obs(5, "bird", second=2)) == [
        "applied", "stale", "duplicate",
    ]  # fmt: skip
    assert catalog.labels() == {1: "bird"}
    assert [c.reason for c in ledger.label_history(catalog, 1)] == ["labelled"]


def test_one_vote_per_annotator_majority_and_ties(catalog: Catalog) -> None:
    run(catalog, obs(1, "cat", user=1), obs(2, "dog", user=1, second=1))  # the same person changed their mind
    assert catalog.labels() == {1: "dog"}
    run(catalog, obs(3, "cat", user=2))
    assert catalog.labels() == {} and ledger.in_review(catalog) == {1: {"cat": [3], "dog": [2]}}
    run(catalog, obs(4, "cat", user=3))
    assert catalog.labels() == {1: "cat"} and ledger.in_review(catalog) == {}
    assert [c.reason for c in ledger.label_history(catalog, 1)] == ["labelled", "review", "labelled"]
    score = ledger.agreement(catalog, mode="single")
    assert score.per_task == {1: pytest.approx(2 / 3)}
    assert score.per_annotator == {"u1@x": 0.0, "u2@x": 1.0, "u3@x": 1.0}


def test_multi_label_votes_on_the_set_in_class_order(catalog: Catalog) -> None:
    run(catalog, obs(1, "dog", "cat", user=1), obs(2, "cat", "dog", user=2), mode="multi")
    assert catalog.labels() == {1: '["cat", "dog"]'}
    assert run(catalog, obs(3, user=3), mode="multi") == ["applied"]  # chose nothing: stored as rejected
    assert catalog.labels() == {1: '["cat", "dog"]'}


def test_unknown_label_and_foreign_tasks_are_reported(catalog: Catalog) -> None:
    foreign = ledger.Observation(annotation_id=9, task_id=99, sample_id=None, choices=("cat",))
    missing = ledger.Observation(annotation_id=10, task_id=98, sample_id=10**6, choices=("cat",))
    applied = ledger.with_retries(
        catalog, lambda s: ledger.apply(s, [obs(1, "zebra"), foreign, missing], classes=CLASSES, mode="single")
    )
    assert "label 'zebra' is not a class" in applied.problems[0]
    assert "task 99: no data.sample_id" in applied.problems[1] and "is not in the catalog" in applied.problems[2]
    assert catalog.labels() == {} and [a.state for a in ledger.annotations_of(catalog, 1)] == ["rejected"]


def test_a_bulk_delivery_without_task_data_finds_the_sample_through_the_recorded_task(catalog: Catalog) -> None:
    with catalog.transaction() as session:
        catalog.record_tasks(session, ls_project_id=7, task_ids={2: 502}, round_id=None, model_version=None, scores={})
    bare = ledger.Observation(
        annotation_id=8, task_id=502, user_id=1, choices=("bird",), updated_at=datetime(2030, 1, 1)
    )
    assert run(catalog, bare) == ["applied"]
    assert catalog.labels() == {2: "bird"}
