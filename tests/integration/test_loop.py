"""The loop against the real servers: push -> simulated annotation -> sync -> labels; threshold -> fine-tune
-> registered MLflow version + alias; bad input leaves the catalog as it was."""

from __future__ import annotations

import numpy as np
import pytest

from flywheel import labelstudio, loop
from flywheel.catalog import Catalog
from flywheel.config import load_settings
from flywheel.errors import ServiceUnavailableError, UnknownChoiceError
from flywheel.features import embedded
from flywheel.labelstudio import annotator
from flywheel.registry import tracking
from flywheel.sources.importing import import_source

pytestmark = pytest.mark.integration


def _small_project(settings, pool_size=200, test_size=200):
    catalog = Catalog(settings.catalog_url)
    import_source(catalog, settings, "fashion-mnist", pool_size=pool_size, test_size=test_size)
    return catalog


def _answer_and_sync(settings, catalog, ls_client):
    project_id = labelstudio.ensure_project(ls_client, settings, catalog, catalog.classes())
    annotated = annotator.annotate_open_tasks(ls_client, catalog, project_id, rng=np.random.default_rng(0))
    return annotated, loop.run_sync(settings, catalog, ls_client)


def test_round_push_annotate_sync_then_finetune_registers_and_guards(settings):
    settings = settings.model_copy(
        update={
            "image_size": 32,
            "k_per_round": 40,
            "finetune": settings.finetune.model_copy(
                update={"min_labels": 60, "every_new_labels": 30, "epochs": 2, "head_epochs": 1}
            ),
        }
    )
    catalog = _small_project(settings)
    ls_client = labelstudio.connect(settings)
    mlflow_client = tracking.connect(settings)

    first = loop.run_round(settings, catalog, ls_client, mlflow_client, progress=False)
    assert first.model_version is None and first.strategy == "auto" and len(first.selected) == 40
    assert "typiclust" in first.description and "cold start" in first.description
    annotated, outcome = _answer_and_sync(settings, catalog, ls_client)
    assert annotated == 40 and outcome.report.new == 40 and outcome.n_labels == 40
    assert not outcome.finetune_due  # 40 < min_labels
    labels = catalog.labels()
    truth = catalog.truth_of(labels)
    assert all(labels[s] == truth[s] for s in labels)  # the annotator's answers arrived unchanged
    again = loop.run_sync(settings, catalog, ls_client)
    assert again.report.new == 0 and again.n_labels == 40  # idempotent

    second = loop.run_round(settings, catalog, ls_client, mlflow_client, progress=False)
    assert second.model_version is not None and second.strategy == "auto" and "auto:" in second.description
    assert second.promoted  # the first model becomes champion
    assert tracking.champion_version(mlflow_client, settings) == second.model_version
    project_id = labelstudio.ensure_project(ls_client, settings, catalog, [])
    tasks = labelstudio.list_tasks(ls_client, project_id, fields="all")
    versions = {p.model_version for t in tasks for p in (t.predictions or [])}
    assert second.model_version in versions, (second.description, len(tasks))  # annotators see its pre-annotations

    _, outcome = _answer_and_sync(settings, catalog, ls_client)
    assert outcome.n_labels == 80 and outcome.finetune_due
    report = loop.run_finetune(settings, catalog, mlflow_client, progress=False)
    version = mlflow_client.get_model_version(settings.registered_model_name, report.model_version)
    assert version.tags["kind"] == "finetune"
    aliases = set(mlflow_client.get_registered_model(settings.registered_model_name).aliases)
    assert aliases & {"champion", "challenger"}
    expected_alias = "champion" if report.promoted else "challenger"
    assert mlflow_client.get_model_version_by_alias(settings.registered_model_name, expected_alias).version == (
        report.model_version
    )
    assert not np.isnan(report.test_accuracy)
    rerun_due = loop.run_sync(settings, catalog, ls_client).finetune_due
    assert not rerun_due  # the fine-tune recorded its label count

    # By hand, forward to the fine-tuned model: the pool is re-embedded with its body, the index rebuilt.
    assert loop.promote(settings, catalog, mlflow_client, report.model_version, progress=False) == report.model_version
    active = embedded.active_settings(settings, catalog)  # the fine-tune may have started from another backbone
    assert active.backbone == report.backbone
    assert embedded.body_version(active, catalog) == report.model_version
    assert embedded.index_path(active, report.model_version).exists()
    assert tracking.champion_version(mlflow_client, settings) == report.model_version
    third = loop.run_round(settings, catalog, ls_client, mlflow_client, progress=False)
    third_run = mlflow_client.get_run(
        mlflow_client.get_model_version(settings.registered_model_name, third.model_version).run_id
    )
    assert third_run.data.params["body_version"] == report.model_version
    # ... and back to the first head, whose body is the ImageNet one.
    assert loop.promote(settings, catalog, mlflow_client, second.model_version, progress=False) == "imagenet"
    assert embedded.body_version(settings, catalog) == "imagenet"
    # The open tasks (the third round's) now show the rolled-back champion's predictions; annotated tasks keep
    # theirs, and no task is created.
    before = {t.id: t for t in labelstudio.list_tasks(ls_client, project_id, fields="all")}
    open_ids = {t.id for t in labelstudio.list_tasks(ls_client, project_id, query=labelstudio.OPEN_TASKS)}
    assert len(open_ids) == 40
    assert loop.refresh_open_tasks(settings, catalog, ls_client, mlflow_client, progress=False) == 40
    after = {t.id: t for t in labelstudio.list_tasks(ls_client, project_id, fields="all")}
    assert set(after) == set(before)
    scores = {pick["sample_id"]: pick["score"] for pick in third.selected}
    assert max(scores.values()) > 0  # selection scores reach Label Studio as prediction scores, in order
    for task_id in open_ids:
        (prediction,) = after[task_id].predictions  # replaced, none dropped (Label Studio drops scores above 1)
        assert prediction.model_version == second.model_version
        expected = labelstudio.prediction_score(scores[after[task_id].data["sample_id"]])
        assert prediction.score == pytest.approx(expected)
    for task_id in set(after) - open_ids:
        assert [p.id for p in after[task_id].predictions] == [p.id for p in before[task_id].predictions]
    assert loop.refresh_open_tasks(settings, catalog, ls_client, mlflow_client, progress=False) == 0  # idempotent
    with pytest.raises(UnknownChoiceError, match="version of .* '999'"):
        loop.promote(settings, catalog, mlflow_client, "999", progress=False)


def test_unreachable_label_studio_names_the_url_and_changes_nothing(settings):
    catalog = _small_project(settings, pool_size=50, test_size=20)
    before = (catalog.count_samples(), catalog.count_labels(), len(catalog.rounds()))
    down = load_settings(workspace=settings.workspace, project=settings.project, label_studio={"port": 1})
    with pytest.raises(ServiceUnavailableError, match=r"http://127\.0\.0\.1:1"):
        labelstudio.connect(down)
    down_mlflow = load_settings(workspace=settings.workspace, project=settings.project, mlflow={"port": 1})
    with pytest.raises(ServiceUnavailableError, match="MLflow.*127.0.0.1:1"):
        tracking.connect(down_mlflow)
    assert (catalog.count_samples(), catalog.count_labels(), len(catalog.rounds())) == before


def test_unknown_backbone_is_refused_before_the_catalog_changes(settings):
    catalog = _small_project(settings, pool_size=50, test_size=20)
    bad = settings.model_copy(update={"backbone": "alexnet-9000"})
    with pytest.raises(UnknownChoiceError, match="alexnet-9000.*efficientnet_lite0"):
        loop.run_round(bad, catalog, None, tracking.connect(settings), progress=False)
    assert catalog.rounds() == []
