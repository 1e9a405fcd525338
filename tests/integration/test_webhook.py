"""The webhook receiver against the real Label Studio and Prefect test servers: Label Studio posts each
annotation change to our receiver, which records it, applies it through the ledger and emits a Prefect event."""

from __future__ import annotations

import json
import os
import signal
import socket
import subprocess
import sys
import time
from collections.abc import Callable, Iterator
from datetime import UTC, datetime, timedelta
from pathlib import Path
from typing import Any

import httpx
import pytest
from pydantic import SecretStr
from sqlalchemy import func, select

from bench.webhook_burst import serving
from flywheel.app.webhook import create_app
from flywheel.catalog import Catalog, WebhookEvent
from flywheel.config import Settings
from flywheel.labelstudio import (
    SECRET_HEADER,
    SyncReport,
    TaskToPush,
    choice_result,
    connect,
    ensure_project,
    ensure_webhook,
    push_tasks,
    sync_annotations,
)
from flywheel.labelstudio.ledger import agreement, annotations_of, in_review, label_history
from flywheel.labelstudio.sync import users_by_id
from tests.integration.labelstudio_support import CLASSES, make_images, prefect_events, user_id, with_section

pytestmark = pytest.mark.integration

SECRET = "test-webhook-secret-" + os.urandom(6).hex()


def wait_for(condition: Callable[[], Any], timeout: float = 15.0) -> Any:
    """Poll until `condition()` is truthy (Label Studio delivers right after the API call returns)."""
    deadline = time.monotonic() + timeout
    while not (value := condition()):
        if time.monotonic() > deadline:
            raise AssertionError(f"condition not met within {timeout} s")
        time.sleep(0.1)
    return value


def _events(catalog: Catalog) -> list[WebhookEvent]:
    with catalog.transaction() as session:
        return list(session.scalars(select(WebhookEvent).order_by(WebhookEvent.id)))


class Hooked:
    """A project whose webhook points at an in-process receiver; tasks pushed for six samples."""

    def __init__(self, settings: Settings, catalog: Catalog, client: Any, port: int):
        self.settings = with_section(settings, "webhook", url=f"http://127.0.0.1:{port}/webhook")
        self.catalog, self.client, self.port = catalog, client, port
        self.project_id = ensure_project(client, self.settings, catalog, CLASSES)
        ensure_webhook(client, self.settings, self.project_id)  # as the receiver does when it starts
        tasks = [TaskToPush(s.id, s.uri, "cat", 0.5, 0.1) for s in catalog.samples()]
        self.tasks = push_tasks(
            client, catalog, self.settings, self.project_id, tasks, model_version="1", round_id=None
        )

    def post(self, body: Any, secret: str | None = SECRET) -> httpx.Response:
        headers = {SECRET_HEADER: secret} if secret is not None else {}
        url = f"http://127.0.0.1:{self.port}/webhook"
        return httpx.post(url, content=json.dumps(body), headers=headers, trust_env=False)

    def sync(self) -> SyncReport:
        return sync_annotations(self.client, self.catalog, self.project_id, mode=self.settings.label_studio.label_mode)


def _hooked(settings: Settings, tmp_path: Path, **label_studio: object) -> Iterator[Hooked]:
    settings = with_section(with_section(settings, "webhook", secret=SecretStr(SECRET)), "label_studio", **label_studio)
    catalog = Catalog(settings.catalog_url)
    catalog.add_samples(make_images(tmp_path / "images", 6), source="test", split="pool", classes=CLASSES)
    client = connect(settings)
    with serving(create_app(settings, catalog, users=lambda: users_by_id(client))) as port:
        hooked = Hooked(settings, catalog, client, port)
        try:
            yield hooked
        finally:
            client.projects.delete(hooked.project_id)


@pytest.fixture
def hooked(settings: Settings, tmp_path: Path) -> Iterator[Hooked]:
    yield from _hooked(settings, tmp_path)


@pytest.fixture
def overlapped(settings: Settings, tmp_path: Path) -> Iterator[Hooked]:
    yield from _hooked(settings, tmp_path, overlap=3)


def _free_port() -> int:
    with socket.socket() as sock:
        sock.bind(("127.0.0.1", 0))
        return sock.getsockname()[1]


@pytest.mark.sqlite_pass  # restarts of the receiver process: the other tests cover the ledger on PostgreSQL
def test_webhook_end_to_end_through_the_cli(settings: Settings, tmp_path: Path) -> None:
    """Label Studio -> `flywheel webhook` (its own process) -> catalog -> Prefect event."""
    port = _free_port()
    settings = with_section(with_section(settings, "webhook", secret=SecretStr(SECRET)), "webhook", port=port)
    catalog = Catalog(settings.catalog_url)
    catalog.add_samples(make_images(tmp_path / "images", 3), source="test", split="pool", classes=CLASSES)
    client = connect(settings)
    project_id = ensure_project(client, settings, catalog, CLASSES)
    env = {
        **os.environ,
        "FLYWHEEL_WORKSPACE": str(settings.workspace),
        "FLYWHEEL_CATALOG_URL": settings.catalog_url,  # PostgreSQL in the PostgreSQL pass
        "FLYWHEEL_PROJECT": settings.project,
        "FLYWHEEL_LABEL_STUDIO__PORT": str(settings.label_studio.port),
        "FLYWHEEL_PREFECT__PORT": str(settings.prefect.port),
        "FLYWHEEL_MLFLOW__PORT": str(settings.mlflow.port),
        "FLYWHEEL_WEBHOOK__SECRET": SECRET,
        "FLYWHEEL_WEBHOOK__PORT": str(port),
    }
    log = (tmp_path / "receiver.log").open("w")

    def start() -> subprocess.Popen[bytes]:
        receiver = subprocess.Popen(
            [sys.executable, "-m", "flywheel.app.cli", "webhook"], env=env, stdout=log, stderr=log
        )
        wait_for(lambda: _answers(f"http://127.0.0.1:{port}/health"), timeout=60)
        return receiver

    def hooks() -> list[tuple[str | None, object]]:
        return [(h.url, h.headers) for h in client.webhooks.list(project=str(project_id))]

    ours = (settings.webhook.endpoint, {SECRET_HEADER: SECRET})
    for _ in range(3):  # restarts, one of them unclean: never more than one hook
        receiver = start()
        assert hooks() == [ours]
        receiver.kill()
        receiver.wait(20)
    assert hooks() == [ours]  # a killed receiver could not remove it: the next start reuses it
    receiver = start()
    try:
        assert hooks() == [ours]
        since = datetime.now(UTC) - timedelta(seconds=5)
        (sample, task), *_ = push_tasks(
            client, catalog, settings, project_id,
            [TaskToPush(s.id, s.uri, "cat", 0.5, 0.1) for s in catalog.samples()], model_version="1", round_id=None,
        ).items()  # fmt: skip
        annotation = client.annotations.create(id=task, result=choice_result("dog"))
        wait_for(lambda: catalog.labels().get(sample) == "dog")
        (event,) = prefect_events(settings, "flywheel.annotation.created", since, want=1)
        assert event.payload == {
            "action": "created",
            "annotation_id": annotation.id,
            "task_id": task,
            "sample_id": sample,
            "label": "dog",
        }
        assert [e.emitted for e in _events(catalog)] == [True]
        receiver.terminate()  # a clean stop (uvicorn shuts down, then re-raises SIGTERM) removes the hook
        assert receiver.wait(20) in (0, -signal.SIGTERM) and hooks() == []
        ensure_webhook(client, settings, project_id)  # as a receiver that died would leave it
        unregister = subprocess.run(
            [sys.executable, "-m", "flywheel.app.cli", "webhook", "--unregister"],
            env=env,
            capture_output=True,
            text=True,
        )
        assert "removed 1 webhook(s)" in unregister.stdout and hooks() == []
    finally:
        receiver.kill()
        client.projects.delete(project_id)
    assert SECRET not in (tmp_path / "receiver.log").read_text()


def _answers(url: str) -> bool:
    try:
        return httpx.get(url, trust_env=False, timeout=2).status_code == 200
    except httpx.HTTPError:
        return False


def test_receiver_refuses_requests_without_the_secret(hooked: Hooked) -> None:
    sample, task = next(iter(hooked.tasks.items()))
    forged = {
        "action": "ANNOTATION_CREATED",
        "project": {"id": hooked.project_id},
        "annotation": {"id": 10**8, "task": task, "completed_by": 1, "result": choice_result("dog"),
                       "updated_at": "2030-01-01T00:00:00Z"},
        "task": {"id": task, "data": {"sample_id": sample}},
    }  # fmt: skip
    assert hooked.post(forged, secret=None).status_code == 401
    assert hooked.post(forged, secret="wrong").status_code == 401
    assert hooked.post(forged, secret=SECRET[:-1]).status_code == 401
    assert _events(hooked.catalog) == [] and hooked.catalog.labels() == {}
    health = httpx.get(f"http://127.0.0.1:{hooked.port}/health", trust_env=False).json()
    assert health["refused"] == 3
    bad = httpx.post(
        f"http://127.0.0.1:{hooked.port}/webhook",
        content=b"{not json",
        headers={SECRET_HEADER: SECRET},
        trust_env=False,
    )
    assert bad.status_code == 400 and hooked.catalog.labels() == {}


def test_relabel_keeps_history_and_delete_retracts(hooked: Hooked) -> None:
    sample, task = next(iter(hooked.tasks.items()))
    annotation = hooked.client.annotations.create(id=task, result=choice_result("dog"))
    wait_for(lambda: hooked.catalog.labels().get(sample) == "dog")
    hooked.client.annotations.update(id=annotation.id, result=choice_result("bird"))
    wait_for(lambda: hooked.catalog.labels().get(sample) == "bird")
    hooked.client.annotations.delete(id=annotation.id)
    wait_for(lambda: sample not in hooked.catalog.labels())

    history = [(c.reason, c.previous, c.label) for c in label_history(hooked.catalog, sample)]
    assert history == [("labelled", None, "dog"), ("relabelled", "dog", "bird"), ("retracted", "bird", None)]
    assert [(a.ls_annotation_id, a.state) for a in annotations_of(hooked.catalog, sample)] == [
        (annotation.id, "deleted")
    ]
    assert [e.action for e in _events(hooked.catalog)] == [
        "ANNOTATION_CREATED",
        "ANNOTATION_UPDATED",
        "ANNOTATIONS_DELETED",
    ]

    report = hooked.sync()  # polling agrees: nothing to add, nothing revived
    assert (report.new, report.updated, report.retracted) == (0, 0, 0)
    assert sample not in hooked.catalog.labels() and len(label_history(hooked.catalog, sample)) == 3


def test_duplicate_late_and_out_of_order_deliveries_change_nothing_twice(hooked: Hooked) -> None:
    sample, task = next(iter(hooked.tasks.items()))
    annotation = hooked.client.annotations.create(id=task, result=choice_result("dog"))
    wait_for(lambda: hooked.catalog.labels().get(sample) == "dog")
    hooked.client.annotations.update(id=annotation.id, result=choice_result("bird"))
    wait_for(lambda: hooked.catalog.labels().get(sample) == "bird")
    created, updated = (json.loads(e.payload) for e in _events(hooked.catalog))

    def replay(payload: dict[str, Any]) -> list[str]:
        body = {**payload, "project": {"id": hooked.project_id}}
        response = hooked.post(body)
        assert response.status_code == 200
        return response.json()["outcomes"]

    assert replay(updated) == ["duplicate"]  # Label Studio (or a proxy) delivered it twice
    assert replay(created) == ["stale"]  # the creation arrives after the update: older, ignored
    assert hooked.catalog.labels()[sample] == "bird"
    assert [c.reason for c in label_history(hooked.catalog, sample)] == ["labelled", "relabelled"]

    hooked.client.annotations.delete(id=annotation.id)
    wait_for(lambda: sample not in hooked.catalog.labels())
    assert replay(updated) == [f"stale: annotation {annotation.id} was deleted"]  # a late update cannot revive it
    deleted = next(json.loads(e.payload) for e in _events(hooked.catalog) if e.action == "ANNOTATIONS_DELETED")
    assert replay(deleted) == ["duplicate"]
    assert sample not in hooked.catalog.labels()
    assert [c.reason for c in label_history(hooked.catalog, sample)] == ["labelled", "relabelled", "retracted"]
    with hooked.catalog.transaction() as session:  # every delivery was recorded, duplicates included
        assert session.scalar(select(func.count()).select_from(WebhookEvent)) == 7


def test_two_annotators_disagreeing_go_to_review_then_majority(overlapped: Hooked) -> None:
    hooked = overlapped
    assert hooked.client.projects.get(hooked.project_id).maximum_annotations == 3
    sample, task = next(iter(hooked.tasks.items()))
    second, third = (user_id(hooked.client, email) for email in ("annotator2@localhost", "annotator3@localhost"))
    hooked.client.annotations.create(id=task, result=choice_result("cat"))
    wait_for(lambda: hooked.catalog.labels().get(sample) == "cat")
    hooked.client.annotations.create(id=task, result=choice_result("dog"), completed_by=second)
    wait_for(lambda: sample in in_review(hooked.catalog))
    assert sample not in hooked.catalog.labels()  # a tie is no label
    score = agreement(hooked.catalog, mode="single")
    assert score.per_task == {sample: 0.5} and score.per_annotator == {}  # a tie has no majority to agree with

    hooked.client.annotations.create(id=task, result=choice_result("cat"), completed_by=third)
    wait_for(lambda: hooked.catalog.labels().get(sample) == "cat")
    assert in_review(hooked.catalog) == {}
    score = agreement(hooked.catalog, mode="single")
    me = hooked.settings.label_studio.username
    assert score.per_task == {sample: pytest.approx(2 / 3)}
    assert score.per_annotator == {me: 1.0, "annotator2@localhost": 0.0, "annotator3@localhost": 1.0}
    assert [c.reason for c in label_history(hooked.catalog, sample)] == ["labelled", "review", "labelled"]

    report = hooked.sync()
    assert (report.new, report.updated, report.unchanged, report.review) == (0, 0, 1, [])
    assert report.agreement == pytest.approx(2 / 3)


def test_unknown_label_is_rejected_and_reported_then_fixed(hooked: Hooked) -> None:
    ensure_project(hooked.client, hooked.settings, hooked.catalog, [*CLASSES, "zebra"])  # a choice added in the UI
    sample, task = next(iter(hooked.tasks.items()))
    annotation = hooked.client.annotations.create(id=task, result=choice_result("zebra"))
    (event,) = wait_for(lambda: _events(hooked.catalog))
    assert "applied" in event.outcome and sample not in hooked.catalog.labels()
    ((row),) = annotations_of(hooked.catalog, sample)
    assert row.state == "rejected" and row.problem is not None and "'zebra' is not a class" in row.problem
    report = hooked.sync()
    assert len(report.rejected) == 1 and f"task {task} (sample {sample})" in report.rejected[0]
    assert "zebra" not in hooked.catalog.classes()

    hooked.client.annotations.update(id=annotation.id, result=choice_result("dog"))
    wait_for(lambda: hooked.catalog.labels().get(sample) == "dog")
    assert hooked.sync().rejected == []


def test_skipped_task_is_counted_and_not_sent_again(hooked: Hooked) -> None:
    sample, task = next(iter(hooked.tasks.items()))
    hooked.client.annotations.create(id=task, result=[], was_cancelled=True)
    wait_for(lambda: [a.state for a in annotations_of(hooked.catalog, sample)] == ["skipped"])
    assert sample not in hooked.catalog.labels()
    assert hooked.sync().skipped == 1
    again = push_tasks(
        hooked.client, hooked.catalog, hooked.settings, hooked.project_id,
        [TaskToPush(sample, hooked.catalog.samples()[0].uri, "cat", 0.5, 0.1)], model_version="1", round_id=None,
    )  # fmt: skip
    assert again == {}
