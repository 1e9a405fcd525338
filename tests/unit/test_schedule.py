"""What is due (flywheel.loop.schedule): one fine-tune per label state, whoever asks, and none twice."""

from __future__ import annotations

from datetime import UTC, datetime, timedelta

import pytest

from flywheel.catalog import Catalog
from flywheel.config import FinetuneSettings
from flywheel.loop import schedule

NOW = datetime(2026, 12, 7, 12, 0, tzinfo=UTC)
POLICY = FinetuneSettings(min_labels=100, every_new_labels=50, pending_timeout_s=3600)


@pytest.fixture
def catalog(tmp_path) -> Catalog:
    return Catalog(f"sqlite:///{tmp_path / 'catalog.db'}")


def labels(n: int, *, relabel: int | None = None) -> dict[int, str]:
    out = {i: "cat" if i % 2 else "dog" for i in range(n)}
    if relabel is not None:
        out[relabel] = "bird"
    return out


def test_the_label_state_names_exactly_the_labels():
    assert schedule.label_state(labels(10)) == schedule.label_state(dict(reversed(labels(10).items())))
    assert schedule.label_state(labels(10)).digest != schedule.label_state(labels(10, relabel=3)).digest
    assert schedule.label_state(labels(10)).n_labels == 10


def test_a_requested_finetune_is_not_due_again_until_it_finishes_or_times_out(catalog):
    state = schedule.label_state(labels(120))
    first = schedule.finetune_due(catalog, state, POLICY, now=NOW)
    assert first.due and first.counted_from == 0
    schedule.request_finetune(catalog, state, now=NOW)
    again = schedule.finetune_due(catalog, state, POLICY, now=NOW + timedelta(minutes=1))
    assert not again.due and "requested or running" in again.reason
    a_few_more = schedule.label_state(labels(130))  # a sync a little later, with 10 more labels
    assert not schedule.finetune_due(catalog, a_few_more, POLICY, now=NOW + timedelta(minutes=2)).due
    later = schedule.finetune_due(catalog, a_few_more, POLICY, now=NOW + timedelta(hours=2))  # it died
    assert later.due


def test_a_finished_finetune_is_never_repeated_on_the_same_labels(catalog):
    state = schedule.label_state(labels(120))
    schedule.start_finetune(catalog, state, now=NOW)
    schedule.finish_finetune(catalog, state, "14", now=NOW + timedelta(minutes=5))
    assert not schedule.finetune_due(catalog, state, POLICY, now=NOW + timedelta(days=3)).due
    with pytest.raises(schedule.FinetuneNotNeeded, match=r"exactly these 120 labels already ran \(version 14"):
        schedule.start_finetune(catalog, state, now=NOW + timedelta(days=3))
    assert not schedule.finetune_due(catalog, schedule.label_state(labels(160)), POLICY, now=NOW).due  # 40 new
    due = schedule.finetune_due(catalog, schedule.label_state(labels(170)), POLICY, now=NOW)  # 50 new
    assert due.due and due.counted_from == 120
    schedule.start_finetune(catalog, schedule.label_state(labels(120, relabel=7)), now=NOW)  # a relabel: allowed


def test_the_round_model_mark_keeps_the_labels_body_and_version(catalog):
    assert schedule.last_round_model(catalog) is None
    state = schedule.label_state(labels(30))
    schedule.record_round_model(catalog, state, "imagenet", "3", now=NOW)
    mark = schedule.last_round_model(catalog)
    assert mark is not None and (mark.digest, mark.body, mark.version) == (state.digest, "imagenet", "3")
