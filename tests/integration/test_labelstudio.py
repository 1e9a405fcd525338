"""flywheel.labelstudio and flywheel.labelstudio.annotator against the real Label Studio test server (no mocks)."""

from __future__ import annotations

import http.server
import json
import socket
import threading
from collections.abc import Iterator
from pathlib import Path

import httpx
import numpy as np
import pytest
from PIL import Image
from pydantic import SecretStr

from flywheel.catalog import Catalog, NewSample
from flywheel.config import Settings
from flywheel.errors import ConfigError, DataError, ServiceUnavailableError, UnknownChoiceError
from flywheel.labelstudio import (
    META_PROJECT_ID,
    TaskToPush,
    choice_result,
    config_classes,
    config_mode,
    connect,
    ensure_local_storage,
    ensure_project,
    image_url,
    list_tasks,
    prediction_score,
    push_tasks,
    refresh_predictions,
    sync_annotations,
)
from flywheel.labelstudio.annotator import annotate_open_tasks
from flywheel.labelstudio.tasks import _complete_predictions
from tests.integration.labelstudio_support import CLASSES, make_images

pytestmark = pytest.mark.integration


@pytest.fixture
def client(settings: Settings):
    return connect(settings)


@pytest.fixture
def catalog(settings: Settings, tmp_path: Path) -> Catalog:
    catalog = Catalog(settings.catalog_url)
    catalog.add_samples(make_images(tmp_path / "images", 6), source="test", split="pool", classes=CLASSES)
    return catalog


@pytest.fixture
def project_id(client, settings: Settings, catalog: Catalog) -> Iterator[int]:
    project_id = ensure_project(client, settings, catalog, catalog.classes())
    yield project_id
    client.projects.delete(project_id)  # keep the shared test server small


def _with_ls(settings: Settings, **values: object) -> Settings:
    """The same settings with some label_studio values replaced."""
    return settings.model_copy(update={"label_studio": settings.label_studio.model_copy(update=values)})


def _to_push(catalog: Catalog, model: str = "cat") -> list[TaskToPush]:
    return [
        TaskToPush(sample_id=s.id, path=s.uri, predicted=model, confidence=0.4, score=0.5 * s.id)  # 0.5 .. 3
        for s in catalog.samples()
    ]


def _task_count(client, project_id: int) -> int:
    return len(list_tasks(client, project_id))


# --- projects ----------------------------------------------------------------------------------------
def test_ensure_project_is_found_again_by_id_and_by_title(client, settings, catalog, project_id, tmp_path):
    assert catalog.get_meta(META_PROJECT_ID) == str(project_id)
    project = client.projects.get(project_id)
    assert project.title == settings.labelstudio_project_title
    assert config_classes(project.label_config) == CLASSES
    assert ensure_project(client, settings, catalog, CLASSES) == project_id
    other = Catalog(f"sqlite:///{tmp_path / 'other.db'}")  # no meta: found by title, not created again
    assert ensure_project(client, settings, other, CLASSES) == project_id
    assert other.get_meta(META_PROJECT_ID) == str(project_id)
    titled = [p for p in client.projects.list(title=settings.labelstudio_project_title)]
    assert len([p for p in titled if p.title == settings.labelstudio_project_title]) == 1


def test_ensure_project_adds_new_classes_to_the_config(client, settings, catalog, project_id):
    assert ensure_project(client, settings, catalog, [*CLASSES, "fish & chips"]) == project_id
    assert config_classes(client.projects.get(project_id).label_config) == [*CLASSES, "fish & chips"]
    # a shorter list never drops a choice Label Studio may already hold annotations for
    ensure_project(client, settings, catalog, ["cat"])
    assert config_classes(client.projects.get(project_id).label_config) == [*CLASSES, "fish & chips"]


def test_project_title_too_long_for_label_studio_is_a_config_error(client, settings, tmp_path):
    long = settings.model_copy(update={"project": "p" * 60})
    catalog = Catalog(f"sqlite:///{tmp_path / 'long.db'}")
    with pytest.raises(ConfigError, match="FLYWHEEL_LABEL_STUDIO__PROJECT_TITLE"):
        ensure_project(client, long, catalog, CLASSES)
    assert catalog.get_meta(META_PROJECT_ID) is None
    assert not [p for p in client.projects.list() if p.title == long.labelstudio_project_title]


# --- pushing -----------------------------------------------------------------------------------------
def test_push_creates_tasks_with_predictions_once(client, settings, catalog, project_id):
    round_id = catalog.start_round(strategy="entropy", n_labels=0)
    pushed = push_tasks(
        client, catalog, settings, project_id, _to_push(catalog), model_version="m-7", round_id=round_id
    )
    samples = {s.id: s for s in catalog.samples()}
    assert set(pushed) == set(samples)
    assert catalog.sent_sample_ids() == set(samples)

    tasks = {t.id: t for t in list_tasks(client, project_id, fields="all")}
    assert set(tasks) == set(pushed.values())
    for sample_id, task_id in pushed.items():
        task = tasks[task_id]
        assert task.data["sample_id"] == sample_id
        assert task.data["image"] == image_url(samples[sample_id].uri, settings)
        (prediction,) = task.predictions
        prediction = prediction if isinstance(prediction, dict) else prediction.model_dump()
        assert prediction["model_version"] == "m-7"
        assert prediction["score"] == pytest.approx(prediction_score(0.5 * sample_id))
        assert prediction["result"][0]["value"]["choices"] == ["cat"]

    again = push_tasks(client, catalog, settings, project_id, _to_push(catalog), model_version="m-8", round_id=None)
    assert again == {}
    assert _task_count(client, project_id) == len(samples)


def test_predictions_a_bulk_import_dropped_are_sent_again(client, settings, catalog, project_id):
    # Label Studio's task import may keep the tasks and drop their predictions, saying so only in its
    # prediction_count: the push then sends them through the predictions import, which counts each one.
    samples = catalog.samples()[:3]
    payloads = [{"data": {"image": image_url(s.uri, settings), "sample_id": s.id}} for s in samples]
    response = client.projects.import_tasks(project_id, request=payloads, return_task_ids=True, commit_to_project=True)
    task_ids = [int(t) for t in response.task_ids]
    assert response.prediction_count == 0
    wanted = {
        task_id: {**payload, "predictions": [{"model_version": "m-3", "score": 0.25, "result": choice_result("dog")}]}
        for task_id, payload in zip(task_ids, payloads, strict=True)
    }
    _complete_predictions(client, project_id, wanted, created=0)
    tasks = {t.id: t for t in list_tasks(client, project_id, fields="all")}
    for task_id in task_ids:
        (prediction,) = tasks[task_id].predictions
        prediction = prediction if isinstance(prediction, dict) else prediction.model_dump()
        assert prediction["model_version"] == "m-3" and prediction["result"][0]["value"]["choices"] == ["dog"]
    _complete_predictions(client, project_id, wanted, created=len(wanted))  # all kept: nothing is sent again
    assert len(list(client.predictions.list(project=project_id))) == len(task_ids)


def test_cold_start_push_has_no_prediction(client, settings, catalog, project_id):
    pushed = push_tasks(client, catalog, settings, project_id, _to_push(catalog)[:2], model_version=None, round_id=None)
    assert len(pushed) == 2
    tasks = list_tasks(client, project_id, fields="all")
    assert len(tasks) == 2 and all(not t.predictions for t in tasks)


def test_push_of_an_unknown_predicted_class_sends_nothing(client, settings, catalog, project_id):
    with pytest.raises(UnknownChoiceError, match="'zebra'"):
        push_tasks(client, catalog, settings, project_id, _to_push(catalog, "zebra"), model_version="m", round_id=None)
    assert _task_count(client, project_id) == 0
    assert catalog.sent_sample_ids() == set()


def test_pushed_image_is_served(client, settings, catalog, project_id):
    sample = catalog.samples()[0]
    (task_id,) = push_tasks(
        client, catalog, settings, project_id, _to_push(catalog)[:1], model_version="m", round_id=None
    ).values()
    url = settings.label_studio.url + client.tasks.get(task_id).data["image"]
    headers = {"Authorization": f"Token {settings.label_studio.token.get_secret_value()}"}
    response = httpx.get(url, headers=headers, timeout=10)
    assert response.status_code == 200
    assert response.content[:8] == b"\x89PNG\r\n\x1a\n"
    assert response.content == Path(sample.uri).read_bytes()
    # the storage covers the class folder; an image outside every storage is not served
    stray = Path(sample.uri).parents[2] / "stray.png"
    Image.new("RGB", (4, 4)).save(stray)
    assert httpx.get(settings.label_studio.url + image_url(str(stray), settings), headers=headers).status_code == 404


def test_crash_between_import_and_record_is_reconciled(client, settings, catalog, project_id):
    samples = catalog.samples()
    orphan = samples[0]
    # the import reached Label Studio, the catalog write did not
    response = client.projects.import_tasks(
        project_id,
        request=[{"data": {"image": image_url(orphan.uri, settings), "sample_id": orphan.id}}],
        return_task_ids=True,
    )
    (orphan_task,) = response.task_ids
    assert catalog.sent_sample_ids() == set()

    pushed = push_tasks(client, catalog, settings, project_id, _to_push(catalog), model_version="m", round_id=None)
    assert pushed[orphan.id] == orphan_task
    assert set(pushed) == {s.id for s in samples}
    assert _task_count(client, project_id) == len(samples)  # recorded, not duplicated
    assert catalog.sent_sample_ids() == {s.id for s in samples}


def test_crash_after_earlier_rounds_is_reconciled(client, settings, catalog, project_id):
    samples = catalog.samples()
    first = push_tasks(client, catalog, settings, project_id, _to_push(catalog)[:2], model_version="m", round_id=None)
    # round two crashed after importing two tasks (both above the ids the catalog recorded)
    orphans = samples[2:4]
    response = client.projects.import_tasks(
        project_id,
        request=[{"data": {"image": image_url(s.uri, settings), "sample_id": s.id}} for s in orphans],
        return_task_ids=True,
    )
    assert min(response.task_ids) > max(first.values())

    pushed = push_tasks(client, catalog, settings, project_id, _to_push(catalog), model_version="m", round_id=None)
    assert {s.id: pushed[s.id] for s in orphans} == dict(zip([s.id for s in orphans], response.task_ids, strict=True))
    assert set(pushed) == {s.id for s in samples[2:]}
    assert _task_count(client, project_id) == len(samples)
    assert catalog.sent_sample_ids() == {s.id for s in samples}


def test_local_storage_is_created_once_and_only_below_the_document_root(client, settings, project_id, tmp_path):
    folder = tmp_path / "images"
    ensure_local_storage(client, project_id, folder, settings)
    ensure_local_storage(client, project_id, folder, settings)
    assert [s.path for s in client.import_storage.local.list(project=project_id)] == [str(folder)]

    root = tmp_path / "root"
    narrow = _with_ls(settings, document_root=root)
    with pytest.raises(ConfigError) as info:
        ensure_local_storage(client, project_id, folder, narrow)
    assert str(folder) in str(info.value) and str(root) in str(info.value)


# --- annotating and syncing --------------------------------------------------------------------------
def test_annotate_then_sync_stores_the_truth_once(client, settings, catalog, project_id):
    push_tasks(client, catalog, settings, project_id, _to_push(catalog), model_version="m", round_id=None)
    samples = catalog.samples()
    assert annotate_open_tasks(client, catalog, project_id, rng=np.random.default_rng(0), limit=4) == 4
    assert annotate_open_tasks(client, catalog, project_id, rng=np.random.default_rng(0)) == len(samples) - 4
    assert annotate_open_tasks(client, catalog, project_id, rng=np.random.default_rng(0)) == 0

    first = sync_annotations(client, catalog, project_id)
    assert (first.new, first.updated, first.unchanged, first.skipped, first.rejected) == (len(samples), 0, 0, 0, [])
    assert catalog.labels() == {s.id: s.truth for s in samples}

    second = sync_annotations(client, catalog, project_id)
    assert (second.new, second.updated, second.unchanged, second.rejected) == (0, 0, len(samples), [])


def test_noisy_annotator_changes_every_label_when_noise_is_one(client, settings, catalog, project_id):
    push_tasks(client, catalog, settings, project_id, _to_push(catalog), model_version="m", round_id=None)
    assert annotate_open_tasks(client, catalog, project_id, noise_rate=1.0, rng=np.random.default_rng(1)) == 6
    assert sync_annotations(client, catalog, project_id).new == 6
    labels = catalog.labels()
    assert all(labels[s.id] != s.truth and labels[s.id] in CLASSES for s in catalog.samples())


def test_task_without_truth_is_left_for_a_person(client, settings, catalog, project_id, tmp_path):
    unknown = make_images(tmp_path / "unlabelled", 7)[-1]  # content unlike the six (no duplicate hash)
    catalog.add_samples(
        [NewSample(uri=unknown.uri, content_hash=unknown.content_hash)], source="t", split="pool", classes=[]
    )
    push_tasks(client, catalog, settings, project_id, _to_push(catalog), model_version="m", round_id=None)
    assert annotate_open_tasks(client, catalog, project_id, rng=np.random.default_rng(0)) == 6
    open_tasks = [t for t in list_tasks(client, project_id, fields="all") if not t.annotations]
    assert [t.data["image"] for t in open_tasks] == [image_url(unknown.uri, settings)]


def test_label_outside_the_classes_is_rejected_and_reported(client, settings, catalog, project_id):
    ensure_project(client, settings, catalog, [*CLASSES, "zebra"])  # someone added a choice in the UI only
    pushed = push_tasks(client, catalog, settings, project_id, _to_push(catalog), model_version="m", round_id=None)
    bad_sample, bad_task = next(iter(pushed.items()))
    client.annotations.create(id=bad_task, result=choice_result("zebra"))
    annotate_open_tasks(client, catalog, project_id, rng=np.random.default_rng(0))

    report = sync_annotations(client, catalog, project_id)
    assert report.new == len(pushed) - 1
    assert len(report.rejected) == 1
    assert f"task {bad_task}" in report.rejected[0] and "'zebra'" in report.rejected[0]
    assert bad_sample not in catalog.labels()
    assert "zebra" not in catalog.classes()
    assert sync_annotations(client, catalog, project_id).rejected == report.rejected  # reported every time


def test_skips_are_counted_and_corrections_update(client, settings, catalog, project_id):
    pushed = push_tasks(client, catalog, settings, project_id, _to_push(catalog), model_version="m", round_id=None)
    (skip_sample, skip_task), (fix_sample, fix_task) = list(pushed.items())[:2]
    client.annotations.create(id=skip_task, result=[], was_cancelled=True)
    annotate_open_tasks(client, catalog, project_id, rng=np.random.default_rng(0))  # skipped task is not open
    first = sync_annotations(client, catalog, project_id)
    assert (first.new, first.skipped) == (len(pushed) - 1, 1)
    assert skip_sample not in catalog.labels()

    truth = catalog.truth_of([fix_sample])[fix_sample]
    other = next(c for c in CLASSES if c != truth)
    correction = client.annotations.create(id=fix_task, result=choice_result(other))  # a second annotator
    second = sync_annotations(client, catalog, project_id)
    assert (second.new, second.updated, second.unchanged, second.skipped) == (0, 1, len(pushed) - 2, 1)
    assert catalog.labels()[fix_sample] == other

    client.annotations.update(id=correction.id, result=choice_result(truth))  # edited back
    third = sync_annotations(client, catalog, project_id)
    assert third.updated == 1 and catalog.labels()[fix_sample] == truth

    # the older annotation edited last is the latest judgement, though its id is lower
    (original,) = [a for a in client.annotations.list(id=fix_task) if a.id != correction.id]
    third_class = next(c for c in CLASSES if c not in (truth, other))
    client.annotations.update(id=original.id, result=choice_result(third_class))
    assert sync_annotations(client, catalog, project_id).updated == 1
    assert catalog.labels()[fix_sample] == third_class


def test_sync_records_annotator_and_annotation_id(client, settings, catalog, project_id):
    from sqlalchemy import select

    from flywheel.catalog import Label

    pushed = push_tasks(client, catalog, settings, project_id, _to_push(catalog)[:1], model_version="m", round_id=None)
    ((sample_id, task_id),) = pushed.items()
    annotation = client.annotations.create(id=task_id, result=choice_result("dog"))
    sync_annotations(client, catalog, project_id)
    with catalog.transaction() as session:
        row = session.scalars(select(Label).where(Label.sample_id == sample_id)).one()
        assert (row.label, row.annotator, row.ls_annotation_id, row.origin) == (
            "dog",
            settings.label_studio.username,
            annotation.id,
            "labelstudio",
        )


# --- connecting --------------------------------------------------------------------------------------
def _closed_port() -> int:
    with socket.socket() as sock:
        sock.bind(("127.0.0.1", 0))
        return sock.getsockname()[1]


def test_connect_to_a_closed_port_names_the_url_and_leaves_the_catalog(settings, catalog, tmp_path):
    before = (catalog.labels(), catalog.sent_sample_ids(), catalog.get_meta(META_PROJECT_ID), catalog.samples())
    down = _with_ls(settings, port=_closed_port())
    with pytest.raises(ServiceUnavailableError) as info:
        connect(down)
    assert down.label_studio.url in str(info.value)
    assert info.value.url == down.label_studio.url
    after = (catalog.labels(), catalog.sent_sample_ids(), catalog.get_meta(META_PROJECT_ID), catalog.samples())
    assert after == before


def test_connect_with_a_wrong_token_names_the_setting_not_the_token(settings):
    wrong = "not-the-token-" + settings.project
    bad = _with_ls(settings, token=SecretStr(wrong))
    with pytest.raises(ConfigError) as info:
        connect(bad)
    assert "FLYWHEEL_LABEL_STUDIO__TOKEN" in str(info.value)
    assert wrong not in str(info.value)
    assert settings.label_studio.token.get_secret_value() not in str(info.value)


def test_sync_of_an_empty_project_reports_nothing(client, catalog, project_id):
    report = sync_annotations(client, catalog, project_id)
    assert (report.new, report.updated, report.unchanged, report.skipped, report.rejected) == (0, 0, 0, 0, [])
    assert json.dumps(catalog.labels()) == "{}"


class _FakeLabelStudio(http.server.BaseHTTPRequestHandler):
    """A real HTTP server that answers /health and whoami with chosen statuses (not a Label Studio)."""

    statuses: dict[str, int] = {}

    def do_GET(self) -> None:  # http.server calls it by this name
        status = next((code for prefix, code in self.statuses.items() if self.path.startswith(prefix)), 404)
        if status == 0:  # hang up without answering
            self.close_connection = True
            self.connection.shutdown(socket.SHUT_RDWR)
            return
        body = b'{"detail": "x"}'
        self.send_response(status)
        self.send_header("Content-Type", "application/json")
        self.send_header("Content-Length", str(len(body)))
        self.end_headers()
        self.wfile.write(body)

    def log_message(self, *args: object) -> None:
        pass


@pytest.fixture
def fake_server() -> Iterator[tuple[int, type[_FakeLabelStudio]]]:
    handler = type("Handler", (_FakeLabelStudio,), {"statuses": {}})
    server = http.server.ThreadingHTTPServer(("127.0.0.1", 0), handler)
    thread = threading.Thread(target=server.serve_forever, daemon=True)
    thread.start()
    yield server.server_address[1], handler
    server.shutdown()
    server.server_close()


@pytest.mark.parametrize(
    ("statuses", "expected"),
    [
        ({"/health": 503}, "GET /health answered HTTP 503"),
        ({"/health": 200, "/api/current-user/whoami": 500}, "HTTP 500"),
        ({"/health": 200, "/api/current-user/whoami": 0}, "RemoteProtocolError"),
    ],
)
def test_connect_to_an_unhealthy_server_is_unavailable(settings, fake_server, statuses, expected):
    port, handler = fake_server
    handler.statuses.update(statuses)
    sick = _with_ls(settings, port=port)
    with pytest.raises(ServiceUnavailableError, match=expected) as info:
        connect(sick)
    assert info.value.url == sick.label_studio.url


def test_a_deleted_project_is_recreated_only_when_nothing_was_sent(client, settings, catalog):
    first = ensure_project(client, settings, catalog, CLASSES)
    client.projects.delete(first)
    second = ensure_project(client, settings, catalog, CLASSES)  # nothing sent: a fresh project is fine
    assert second != first and catalog.get_meta(META_PROJECT_ID) == str(second)
    try:
        push_tasks(client, catalog, settings, second, _to_push(catalog)[:1], model_version=None, round_id=None)
        client.projects.delete(second)
        with pytest.raises(DataError, match=rf"project {second} .* no longer exists.* 1 samples were sent"):
            ensure_project(client, settings, catalog, CLASSES)
        assert catalog.get_meta(META_PROJECT_ID) == str(second)
        assert not [p for p in client.projects.list() if p.title == settings.labelstudio_project_title]
    finally:
        for project in client.projects.list():
            if project.title == settings.labelstudio_project_title:
                client.projects.delete(project.id)


def test_storage_for_a_missing_folder_is_refused_with_the_folder(client, settings, project_id, tmp_path):
    missing = tmp_path / "does-not-exist"
    with pytest.raises(ConfigError, match="does-not-exist"):
        ensure_local_storage(client, project_id, missing, settings)
    assert client.import_storage.local.list(project=project_id) == []


def test_sync_rejects_foreign_ambiguous_and_duplicate_tasks(client, settings, catalog, project_id):
    pushed = push_tasks(client, catalog, settings, project_id, _to_push(catalog), model_version="m", round_id=None)
    sample_id, task_id = next(iter(pushed.items()))
    image = image_url(catalog.samples()[0].uri, settings)
    extra = client.projects.import_tasks(
        project_id,
        request=[
            {"data": {"image": image}},  # not a flywheel task
            {"data": {"image": image, "sample_id": 10**9}},  # a sample the catalog does not have
            {"data": {"image": image, "sample_id": sample_id}},  # a second task for a sample
        ],
        return_task_ids=True,
    ).task_ids
    two = [{**choice_result("cat")[0], "value": {"choices": ["cat", "dog"]}}]
    open_tasks = {t.id for t in list_tasks(client, project_id)} - set(extra) - {task_id}
    ambiguous = min(open_tasks)
    client.annotations.create(id=ambiguous, result=two)
    client.annotations.create(id=task_id, result=choice_result("dog"))
    for extra_task in extra:
        client.annotations.create(id=extra_task, result=choice_result("bird"))

    report = sync_annotations(client, catalog, project_id)
    assert report.new == 1
    assert len(report.rejected) == 4
    text = "\n".join(report.rejected)
    assert f"task {extra[0]}: no data.sample_id" in text
    assert f"task {extra[1]}: sample {10**9} is not in the catalog" in text
    assert f"task {extra[2]} (sample {sample_id}): annotation" in text
    assert f"the sample was sent as task {task_id}; this task is a duplicate" in text
    assert f"task {ambiguous} " in text and "2 choices" in text
    assert catalog.labels() == {sample_id: "dog"}


@pytest.mark.parametrize(("kwargs", "message"), [({"noise_rate": 1.5}, "noise_rate"), ({"limit": -1}, "limit")])
def test_annotator_rejects_bad_arguments(catalog, kwargs, message):
    with pytest.raises(ConfigError, match=message):
        annotate_open_tasks(None, catalog, 1, rng=np.random.default_rng(0), **kwargs)


# --- refreshed predictions, label modes, remote images --------------------------------------------------
def test_new_champion_refreshes_predictions_of_open_tasks_only(client, settings, catalog, project_id):
    pushed = push_tasks(client, catalog, settings, project_id, _to_push(catalog), model_version="3", round_id=None)
    (done_sample, done_task), *open_items = pushed.items()
    client.annotations.create(id=done_task, result=choice_result("dog"))
    predicted = {s.id: "bird" for s in catalog.samples()}
    assert refresh_predictions(client, catalog, project_id, predicted, model_version="4") == len(open_items)
    assert refresh_predictions(client, catalog, project_id, predicted, model_version="4") == 0  # rerun: no change
    tasks = {t.id: t for t in list_tasks(client, project_id, fields="all")}
    assert len(tasks) == len(pushed)  # no new task
    for _, task_id in open_items:
        (prediction,) = tasks[task_id].predictions
        assert prediction.model_version == "4" and prediction.result == choice_result("bird")
        assert prediction.score == pytest.approx(prediction_score(0.5 * tasks[task_id].data["sample_id"]))
    (kept,) = tasks[done_task].predictions
    assert kept.model_version == "3"  # an annotated task keeps what its annotator saw
    assert client.projects.get(project_id).model_version == "4"


def test_multi_label_project_and_instructions(client, settings, catalog):
    multi = _with_ls(settings, label_mode="multi", instructions="Tick every class you see", overlap=2)
    project_id = ensure_project(client, multi, catalog, CLASSES)
    try:
        project = client.projects.get(project_id)
        assert config_mode(project.label_config) == "multi" and "Tick every class you see" in project.label_config
        assert (project.expert_instruction, project.show_instruction, project.maximum_annotations) == (
            "Tick every class you see", True, 2,
        )  # fmt: skip
        pushed = push_tasks(client, catalog, multi, project_id, _to_push(catalog)[:1], model_version="1", round_id=None)
        ((sample_id, task_id),) = pushed.items()
        client.annotations.create(id=task_id, result=choice_result("dog", "cat"))
        report = sync_annotations(client, catalog, project_id, mode="multi")
        assert report.new == 1 and catalog.labels() == {sample_id: '["cat", "dog"]'}
    finally:
        client.projects.delete(project_id)


def test_remote_images_are_sent_as_urls(client, settings, catalog, project_id):
    storage = {"endpoint": "http://127.0.0.1:9000", "access_key": SecretStr("AK"), "secret_key": SecretStr("SK")}
    remote = settings.model_copy(update={"storage": settings.storage.model_copy(update=storage)})
    first, second = catalog.samples()[:2]
    tasks = [
        TaskToPush(first.id, "https://example.org/pics/a.png", "cat", 0.5, 0.1),
        TaskToPush(second.id, "s3://bucket/pics/b.png", "cat", 0.5, 0.1),
    ]
    pushed = push_tasks(client, catalog, remote, project_id, tasks, model_version="1", round_id=None)
    images = {t.id: t.data["image"] for t in list_tasks(client, project_id)}
    assert images[pushed[first.id]] == "https://example.org/pics/a.png"
    assert images[pushed[second.id]].startswith("http://127.0.0.1:9000/bucket/pics/b.png?X-Amz-Algorithm=")
    assert client.import_storage.local.list(project=project_id) == []  # nothing local to serve
