"""`flywheel explain` tells what people did, against the real Label Studio: a relabel with its history, a deleted
annotation (no label, no time to label), a tie between two annotators, a skip, and a majority of three."""

from __future__ import annotations

from pathlib import Path

import pytest
from typer.testing import CliRunner

from flywheel import labelstudio, loop
from flywheel.app import cli
from flywheel.catalog import Catalog
from flywheel.config import Settings
from flywheel.insight.provenance import provenance_of
from flywheel.labelstudio import TaskToPush, choice_result, push_tasks
from tests.integration.labelstudio_support import CLASSES, make_images, user_id

pytestmark = pytest.mark.integration


def test_explain_tells_relabels_deletions_ties_skips_and_majorities(
    settings: Settings, tmp_path: Path, monkeypatch: pytest.MonkeyPatch
) -> None:
    catalog = Catalog(settings.catalog_url)
    catalog.add_samples(make_images(tmp_path / "images", 5), source="test", split="pool", classes=CLASSES)
    client = labelstudio.connect(settings)
    project_id = labelstudio.ensure_project(client, settings, catalog, CLASSES)
    tasks = push_tasks(
        client, catalog, settings, project_id, [TaskToPush(s.id, s.uri, "cat", 0.5, 0.1) for s in catalog.samples()],
        model_version="1", round_id=None,
    )  # fmt: skip
    (relabelled, r_task), (deleted, d_task), (tied, t_task), (skipped, s_task), (majority, m_task) = tasks.items()
    ann, bea, cy = (user_id(client, f"{who}@annotators.test") for who in ("ann", "bea", "cy"))

    def answer(task: int, label: str, who: int) -> int:
        return int(client.annotations.create(id=task, result=choice_result(label), completed_by=who).id)

    loop.run_sync(settings, catalog, client)  # nothing yet: every later change is one the sync must notice
    first = answer(r_task, "cat", ann)
    gone = answer(d_task, "cat", ann)
    answer(t_task, "cat", ann)
    answer(t_task, "dog", bea)
    client.annotations.create(id=s_task, result=[], was_cancelled=True, completed_by=ann)
    for label, who in (("bird", ann), ("bird", bea), ("dog", cy)):
        answer(m_task, label, who)
    loop.run_sync(settings, catalog, client)
    client.annotations.update(id=first, result=choice_result("dog"))
    client.annotations.delete(id=gone)
    loop.run_sync(settings, catalog, client)
    record = provenance_of(catalog, tasks)

    r = record[relabelled]
    assert r.label == "dog" and [a["state"] for a in r.annotations] == ["submitted"]
    assert [(h["reason"], h["previous"], h["label"]) for h in r.history] == [
        ("labelled", None, "cat"),
        ("relabelled", "cat", "dog"),
    ]
    d = record[deleted]
    assert d.label is None and [a["state"] for a in d.annotations] == ["deleted"]
    assert d.annotators == [] and d.time_to_label_s is None and d.first_annotated_at is None
    assert [h["reason"] for h in d.history] == ["labelled", "retracted"]
    t = record[tied]
    assert t.label is None and t.tie == {
        "cat": [t.annotations[0]["annotation_id"]],
        "dog": [t.annotations[1]["annotation_id"]],
    }
    assert t.annotators == ["ann@annotators.test", "bea@annotators.test"]
    s = record[skipped]
    assert s.label is None and [(a["state"], a["annotator"]) for a in s.annotations] == [
        ("skipped", "ann@annotators.test")
    ]
    m = record[majority]
    assert m.label == "bird" and len(m.annotators) == 3 and m.time_to_label_s is not None

    for key, value in {
        "FLYWHEEL_WORKSPACE": str(settings.workspace),
        "FLYWHEEL_CATALOG_URL": settings.catalog_url,
        "FLYWHEEL_PROJECT": settings.project,
    }.items():
        monkeypatch.setenv(key, value)
    monkeypatch.setattr(cli.console, "width", 250)
    shown = CliRunner().invoke(cli.app, ["explain", str(tied)])
    assert shown.exit_code == 0, shown.output
    assert "tie" in shown.output and "cat: annotations" in shown.output and "dog: annotations" in shown.output
    assert (
        "ann@annotators.test: cat (submitted)" in shown.output
        and "bea@annotators.test: dog (submitted)" in shown.output
    )
