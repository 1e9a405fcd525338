"""Tests that need their OWN Label Studio (own port and data dir under a temporary folder), started once for
the module (~30 s): a sync interrupted by a Label Studio restart, and a sync of 20,000 annotations.

The restart must not touch the shared test server, and the 20,000-task import and project deletion must not
run beside other tests on it: Label Studio disconnects its model signals process-wide while it deletes a
project, so annotations saved concurrently by other tests would not update their task counters.
"""

from __future__ import annotations

import os
import socket
import time
from collections.abc import Iterator
from pathlib import Path
from typing import cast

import pytest
from label_studio_sdk import ImportApiRequest
from sqlalchemy import func, select

from flywheel.catalog import Annotation, Base, Catalog, LabelChange, NewSample
from flywheel.config import Settings
from flywheel.devservers import services as svc
from flywheel.errors import ServiceUnavailableError
from flywheel.labelstudio import TaskToPush, choice_result, connect, ensure_project, push_tasks, sync_annotations
from tests.conftest import TEST_PORTS, settings_for
from tests.integration.labelstudio_support import CLASSES, make_images, with_section

pytestmark = pytest.mark.integration

N, PAGE = 24, 8
LOAD = 20_000


def _free_port() -> int:
    with socket.socket() as sock:
        sock.bind(("127.0.0.1", 0))
        return sock.getsockname()[1]


def _count(catalog: Catalog, table: type[Base]) -> int:
    with catalog.transaction() as session:
        return session.scalar(select(func.count()).select_from(table)) or 0


@pytest.fixture(scope="module")
def private(tmp_path_factory: pytest.TempPathFactory) -> Iterator[Settings]:
    """A Label Studio of this module's own, stopped at the end."""
    port = _free_port()
    assert port not in TEST_PORTS.values()
    settings = with_section(settings_for(tmp_path_factory.mktemp("private-ls")), "label_studio", port=port)
    svc.start(settings, ["label_studio"], timeout=240)
    try:
        yield settings
    finally:
        svc.stop(settings, ["label_studio"])


def _project(private: Settings, tmp_path: Path) -> tuple[Settings, Catalog]:
    settings = private.model_copy(update={"project": "p" + os.urandom(3).hex()})
    return settings, Catalog(f"sqlite:///{tmp_path / 'catalog.db'}")


def test_sync_of_20000_annotations_loses_and_doubles_nothing(private: Settings, tmp_path: Path) -> None:
    settings, catalog = _project(private, tmp_path)
    news = [NewSample(uri=f"/nonexistent/load/{i}.png", content_hash=f"{i:064x}") for i in range(LOAD)]
    catalog.add_samples(news, source="load", split="pool", classes=CLASSES)  # no image is read here
    samples = [s.id for s in catalog.samples()]
    client = connect(settings)
    project_id = ensure_project(client, settings, catalog, CLASSES)
    truth = {sample: CLASSES[(sample * 7) % 3] for sample in samples}
    for start in range(0, LOAD, 10_000):  # tasks arrive with their annotation: seeding 20k by API takes 30 min
        tasks = [
            {"data": {"image": f"/data/{s}.png", "sample_id": s}, "annotations": [{"result": choice_result(truth[s])}]}
            for s in samples[start : start + 10_000]
        ]
        # the SDK types the request as its models, and sends these dicts as they are
        client.projects.import_tasks(project_id, request=cast(list[ImportApiRequest], tasks))
    began = time.monotonic()
    report = sync_annotations(client, catalog, project_id, export_above=2000)
    print(f"\nsync of {LOAD} annotations ({report.mode}): {time.monotonic() - began:.1f} s")
    assert (report.mode, report.new, report.updated, report.rejected) == ("export", LOAD, 0, [])
    assert catalog.labels() == truth  # none lost, none wrong
    assert _count(catalog, Annotation) == LOAD and _count(catalog, LabelChange) == LOAD  # none doubled


def test_sync_interrupted_by_a_label_studio_restart_resumes_without_loss_or_doubles(
    private: Settings, tmp_path: Path
) -> None:
    settings, catalog = _project(private, tmp_path)
    port = settings.label_studio.port
    client = connect(settings)
    catalog.add_samples(make_images(tmp_path / "images", N), source="t", split="pool", classes=CLASSES)
    project_id = ensure_project(client, settings, catalog, CLASSES)
    samples = catalog.samples()
    tasks = [TaskToPush(s.id, s.uri, "cat", 0.5, 0.1) for s in samples]
    pushed = push_tasks(client, catalog, settings, project_id, tasks, model_version="1", round_id=None)
    truth = {s.id: s.truth for s in samples}
    for sample, task in pushed.items():
        label = truth[sample]
        assert label is not None  # make_images gives every image its truth
        client.annotations.create(id=task, result=choice_result(label))

    def stop_after_first_page(page: int) -> None:
        if page == 1:
            svc.stop(settings, ["label_studio"])

    with pytest.raises(ServiceUnavailableError, match=str(port)):
        sync_annotations(client, catalog, project_id, page_size=PAGE, on_page=stop_after_first_page)
    assert len(catalog.labels()) == PAGE  # the first page was committed; the rest waits
    assert _count(catalog, Annotation) == PAGE

    svc.start(settings, ["label_studio"], timeout=240)
    resumed = sync_annotations(client, catalog, project_id, page_size=PAGE)
    assert (resumed.new, resumed.updated, resumed.retracted, resumed.rejected) == (N - PAGE, 0, 0, [])
    assert catalog.labels() == truth
    assert _count(catalog, Annotation) == N and _count(catalog, LabelChange) == N  # each labelled once
    again = sync_annotations(client, catalog, project_id, page_size=PAGE)
    assert (again.new, again.updated, again.unchanged) == (0, 0, N)
