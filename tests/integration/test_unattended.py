"""Left alone for weeks, the flywheel does no work twice (real servers): a second demo on a workspace shows the
first, rounds without new labels register and push nothing, and open tasks always show the champion."""

from __future__ import annotations

from collections.abc import Iterator

import pytest
from label_studio_sdk import LabelStudio
from mlflow import MlflowClient

from flows import deploy, worker
from flywheel import labelstudio, loop
from flywheel.catalog import Catalog
from flywheel.config import Settings
from flywheel.labelstudio import OPEN_TASKS, choice_result, list_tasks
from flywheel.registry import tracking
from flywheel.sources.importing import import_source

pytestmark = pytest.mark.integration


@pytest.fixture
def small(settings: Settings, monkeypatch: pytest.MonkeyPatch) -> Iterator[Settings]:
    """Flows run in this process with the test's settings, as a worker's run would get them."""
    settings = settings.model_copy(update={"image_size": 32, "k_per_round": 10})
    for key, value in deploy.settings_env(settings).items():
        monkeypatch.setenv(key, value)
    with worker.prefect_api(settings):
        yield settings


def _versions(client: MlflowClient, settings: Settings) -> list[str]:
    return sorted(v.version for v in client.search_model_versions(f"name='{settings.registered_model_name}'"))


def _open_task_versions(client: LabelStudio, project_id: int) -> dict[int, set[str | None]]:
    """Open task id -> the model versions of its predictions."""
    open_ids = {int(t.id) for t in list_tasks(client, project_id, query=OPEN_TASKS)}
    versions: dict[int, set[str | None]] = {task: set() for task in open_ids}
    for prediction in client.predictions.list(project=project_id):
        if int(prediction.task) in versions:
            versions[int(prediction.task)].add(prediction.model_version)
    return versions


def _annotate(client: LabelStudio, catalog: Catalog, project_id: int, n: int) -> None:
    """Answer `n` open tasks with their truth, as a person would."""
    for task in sorted(list_tasks(client, project_id, query=OPEN_TASKS), key=lambda t: int(t.id))[:n]:
        sample_id = labelstudio.task_sample_id(task.data)
        assert sample_id is not None
        truth = catalog.truth_of([sample_id])[sample_id]
        assert truth is not None
        client.annotations.create(id=int(task.id), result=choice_result(truth), project=project_id)


def test_a_second_demo_on_the_workspace_shows_the_first_and_does_nothing(small: Settings) -> None:
    from flows.flywheel_flows import demo_flow

    first = demo_flow(rounds=2, pool_size=60, test_size=30)
    client = tracking.connect(small)
    catalog = Catalog(small.catalog_url)
    versions, sent, labels = _versions(client, small), catalog.sent_sample_ids(), catalog.labels()
    again = demo_flow(rounds=2, pool_size=60, test_size=30)
    assert not first["reused"] and again["reused"]
    assert again["rounds"] == first["rounds"] and again["champion"] == first["champion"]
    assert _versions(client, small) == versions and catalog.sent_sample_ids() == sent and catalog.labels() == labels
    with pytest.raises(Exception, match=r"holds a demo run with .*'rounds': 2"):
        demo_flow(rounds=3, pool_size=60, test_size=30)


def test_rounds_without_new_labels_train_register_and_push_nothing(small: Settings) -> None:
    catalog = Catalog(small.catalog_url)
    import_source(catalog, small, "fashion-mnist", pool_size=80, test_size=20)
    ls, client = labelstudio.connect(small), tracking.connect(small)
    loop.bootstrap(small, catalog, ls, progress=False)
    project_id = labelstudio.ensure_project(ls, small, catalog, catalog.classes())
    loop.run_round(small, catalog, ls, client, progress=False)  # cold start: 10 tasks
    _annotate(ls, catalog, project_id, 10)
    loop.run_sync(small, catalog, ls)
    trained = loop.run_round(small, catalog, ls, client, progress=False)
    assert trained.model_version is not None and len(trained.selected) == 10
    versions, sent = _versions(client, small), catalog.sent_sample_ids()
    for _ in range(2):  # nobody labelled anything since
        idle = loop.run_round(small, catalog, ls, client, progress=False)
        assert idle.model_version is None and "nothing trained or registered" in idle.model_note
        assert idle.selected == [] and "no new labels since the last round" in idle.description
    assert _versions(client, small) == versions and catalog.sent_sample_ids() == sent


def test_pushes_stop_at_max_open_tasks_and_resume_once_answered(small: Settings) -> None:
    capped = small.model_copy(update={"label_studio": small.label_studio.model_copy(update={"max_open_tasks": 15})})
    catalog = Catalog(capped.catalog_url)
    import_source(catalog, capped, "fashion-mnist", pool_size=80, test_size=20)
    ls, client = labelstudio.connect(capped), tracking.connect(capped)
    project_id = labelstudio.ensure_project(ls, capped, catalog, catalog.classes())
    first = loop.run_round(capped, catalog, ls, client, progress=False)
    _annotate(ls, catalog, project_id, 1)  # a new label, and 9 tasks still open
    loop.run_sync(capped, catalog, ls)
    second = loop.run_round(capped, catalog, ls, client, progress=False)
    assert [len(first.selected), len(second.selected), catalog.open_task_count()] == [10, 6, 15]  # 9 + 6: the cap
    unsent = next(s for s in catalog.samples() if s.id not in catalog.sent_sample_ids())
    with catalog.transaction() as session:  # a label from elsewhere (say an import): new labels, no task answered
        catalog.upsert_label(
            session, sample_id=unsent.id, label=str(unsent.truth), annotator="t", ls_annotation_id=None
        )
    third = loop.run_round(capped, catalog, ls, client, progress=False)
    assert third.selected == [] and "15 tasks wait for an annotation" in third.description
    assert "max_open_tasks: 15" in third.description and catalog.open_task_count() == 15
    _annotate(ls, catalog, project_id, 10)
    loop.run_sync(capped, catalog, ls)
    assert len(loop.run_round(capped, catalog, ls, client, progress=False).selected) == 10


def test_open_tasks_show_the_champion_after_a_round_that_loses_and_after_promote(small: Settings) -> None:
    catalog = Catalog(small.catalog_url)
    import_source(catalog, small, "fashion-mnist", pool_size=120, test_size=20)
    ls, client = labelstudio.connect(small), tracking.connect(small)
    project_id = labelstudio.ensure_project(ls, small, catalog, catalog.classes())
    loop.run_round(small, catalog, ls, client, progress=False)
    _annotate(ls, catalog, project_id, 10)
    loop.run_sync(small, catalog, ls)
    champion = loop.run_round(small, catalog, ls, client, progress=False)
    assert champion.promoted and champion.model_version is not None
    _annotate(ls, catalog, project_id, 10)
    loop.run_sync(small, catalog, ls)
    strict = small.model_copy(update={"promotion_margin": 1.0})  # nothing can beat the champion by 100 points
    loser = loop.run_round(strict, catalog, ls, client, progress=False)
    assert not loser.promoted and loser.model_version not in (None, champion.model_version)
    shown = _open_task_versions(ls, project_id)
    assert len(shown) == 10 and all(v == {champion.model_version} for v in shown.values())
    assert all(s["predicted"] for s in loser.selected)  # pre-annotated, by the champion
    loop.promote(small, catalog, client, loser.model_version, progress=False)
    loop.refresh_open_tasks(small, catalog, ls, client, loser.model_version, progress=False)
    assert all(v == {loser.model_version} for v in _open_task_versions(ls, project_id).values())
