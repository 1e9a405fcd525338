"""Label review against the real servers: a careless annotator (30% wrong) and one task three annotators
disagree on; the round flags labels, Label Studio gets review tasks with the model's suggestion; a reviewer
answers them; the next sync corrects the labels through the labelling project and counts what changed."""

from __future__ import annotations

import json

import numpy as np
import pytest
from sqlalchemy import select

from flywheel import labelstudio, loop
from flywheel.catalog import Catalog, LabelReview, Task
from flywheel.insight import review
from flywheel.labelstudio import annotator
from flywheel.labelstudio.interface import choice_result
from flywheel.registry import tracking
from flywheel.sources.importing import import_source
from tests.integration.labelstudio_support import user_id, with_section
from tests.integration.test_provenance import _cli

pytestmark = pytest.mark.integration


def test_flagged_labels_are_reviewed_in_label_studio_and_corrections_counted(settings, monkeypatch):
    settings = settings.model_copy(update={"image_size": 32, "k_per_round": 60})
    settings = with_section(settings, "review", min_labels=20, max_per_round=40)
    settings = with_section(settings, "forecast", bootstrap=20)
    catalog = Catalog(settings.catalog_url)
    import_source(catalog, settings, "fashion-mnist", pool_size=150, test_size=60)
    ls_client, mlflow_client = labelstudio.connect(settings), tracking.connect(settings)
    project_id = labelstudio.ensure_project(ls_client, settings, catalog, catalog.classes())

    loop.run_round(settings, catalog, ls_client, mlflow_client, progress=False)
    rng = np.random.default_rng(3)
    assert annotator.annotate_open_tasks(ls_client, catalog, project_id, noise_rate=0.3, rng=rng) == 60
    loop.run_sync(settings, catalog, ls_client)
    labels = catalog.labels()
    truth = catalog.truth_of(labels)
    wrong = {s for s in labels if labels[s] != truth[s]}
    assert len(wrong) >= 8

    # One task with three annotators, two of them agreeing with the first answer: a majority, but a dispute.
    sample = next(s for s in sorted(labels) if s not in wrong)
    task_id = next(t.ls_task_id for t in _tasks(catalog) if t.sample_id == sample)
    other = next(c for c in catalog.classes() if c != labels[sample])
    for email, label in (("annotator2@localhost", other), ("annotator3@localhost", labels[sample])):
        ls_client.annotations.create(id=task_id, result=choice_result(label), completed_by=user_id(ls_client, email))
    loop.run_sync(settings, catalog, ls_client)
    assert catalog.labels()[sample] == labels[sample]

    second = loop.run_round(settings, catalog, ls_client, mlflow_client, select=False, progress=False)
    after = second.after_training
    assert after is not None and after.reviews_sent > 0 and f"{after.reviews_sent} sent to review" in after.review_note
    with catalog.transaction() as s:
        flagged = {r.sample_id: r for r in s.scalars(select(LabelReview))}
    assert len(flagged) == after.reviews_sent
    assert review.DISAGREEMENT in " ".join(json.loads(flagged[sample].reasons))
    assert len(wrong & set(flagged)) >= len(wrong) // 3  # most of the flags fall on the careless answers

    # What a reviewer sees: a task per flagged label in the review project, the suggestion preset.
    review_project = int(catalog.get_meta(review.META_REVIEW_PROJECT))
    assert ls_client.projects.get(review_project).title == review.review_title(settings)
    tasks = labelstudio.list_tasks(ls_client, review_project, fields="all")
    assert {t.data["sample_id"] for t in tasks} == set(flagged)
    for task in tasks:
        (prediction,) = task.predictions
        row = flagged[task.data["sample_id"]]
        assert prediction.model_version == f"{second.model_version}-cv"
        assert prediction.result[0]["value"]["choices"] == [row.suggested]
        assert f"current label: {row.label_before}" in task.data["note"]
    twice = review.Suspect(sample, labels[sample], other, 0.1, 0.9, ("again",))
    assert review.push_reviews(ls_client, settings, catalog, [twice], model_version="x", round_id=None) == 0
    assert len(labelstudio.list_tasks(ls_client, review_project)) == len(flagged)  # a label is reviewed once

    # The reviewer answers from the truth; the sync writes corrections back and counts them.
    assert annotator.annotate_open_tasks(ls_client, catalog, review_project, rng=rng) == len(flagged)
    outcome = loop.run_sync(settings, catalog, ls_client)
    corrected = {s for s, r in flagged.items() if truth[s] != r.label_before}
    assert outcome.reviews == review.ReviewCounts(
        open=0, confirmed=len(flagged) - len(corrected), corrected=len(corrected)
    )
    now = catalog.labels()
    assert all(now[s] == truth[s] for s in flagged)  # every reviewed label is the reviewer's answer
    assert all(now[s] == labels[s] for s in labels if s not in flagged)  # nothing else moved
    fixed = next(iter(corrected))
    fixed_task = next(t.ls_task_id for t in _tasks(catalog) if t.sample_id == fixed)
    (annotation,) = ls_client.annotations.list(id=fixed_task)  # corrected in place, not a second vote
    assert annotation.result[0]["value"]["choices"] == [truth[fixed]]
    assert loop.run_sync(settings, catalog, ls_client).reviews.corrected == len(corrected)
    assert catalog.labels() == now  # a second sync changes nothing

    status = _cli(monkeypatch, settings, "status")
    assert f"label review: {len(flagged)} flagged labels sent, {len(corrected)} corrected" in status
    explained = _cli(monkeypatch, settings, "explain", str(fixed))
    assert f"corrected: {flagged[fixed].label_before} -> {truth[fixed]}" in explained


def _tasks(catalog: Catalog) -> list[Task]:
    with catalog.transaction() as s:
        return list(s.scalars(select(Task)))
