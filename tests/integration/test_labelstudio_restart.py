"""A sync interrupted by a Label Studio restart, then resumed: nothing lost, nothing doubled.

Runs its OWN Label Studio (own port and data dir under tmp_path), since the shared test server must stay up
for everyone else; one private server start (~30 s) and one restart for the whole module.
"""

from __future__ import annotations

import socket
from pathlib import Path

import pytest
from labelstudio_support import CLASSES, make_images, with_section
from sqlalchemy import func, select

from flywheel import services as svc
from flywheel.catalog import Annotation, Catalog, LabelChange
from flywheel.errors import ServiceUnavailableError
from flywheel.labelstudio import TaskToPush, choice_result, connect, ensure_project, push_tasks, sync_annotations
from tests.conftest import TEST_PORTS, settings_for

pytestmark = pytest.mark.integration

N, PAGE = 24, 8


def _free_port() -> int:
    with socket.socket() as sock:
        sock.bind(("127.0.0.1", 0))
        return sock.getsockname()[1]


def _count(catalog: Catalog, table: object) -> int:
    with catalog.transaction() as session:
        return session.scalar(select(func.count()).select_from(table)) or 0  # type: ignore[arg-type]


def test_sync_interrupted_by_a_label_studio_restart_resumes_without_loss_or_doubles(tmp_path: Path) -> None:
    port = _free_port()
    assert port not in TEST_PORTS.values()
    shared = settings_for(tmp_path / "private", project="restart")
    private = with_section(shared, "label_studio", port=port)
    started = False
    try:
        svc.start(private, ["label_studio"], timeout=240)
        started = True
        client = connect(private)
        catalog = Catalog(private.catalog_url)
        catalog.add_samples(make_images(tmp_path / "images", N), source="t", split="pool", classes=CLASSES)
        project_id = ensure_project(client, private, catalog, CLASSES)
        samples = catalog.samples()
        tasks = [TaskToPush(s.id, s.uri, "cat", 0.5, 0.1) for s in samples]
        pushed = push_tasks(client, catalog, private, project_id, tasks, model_version="1", round_id=None)
        truth = {s.id: s.truth for s in samples}
        for sample, task in pushed.items():
            client.annotations.create(id=task, result=choice_result(truth[sample]))

        def stop_after_first_page(page: int) -> None:
            if page == 1:
                svc.stop(private, ["label_studio"])

        with pytest.raises(ServiceUnavailableError, match=str(port)):
            sync_annotations(client, catalog, project_id, page_size=PAGE, on_page=stop_after_first_page)
        assert len(catalog.labels()) == PAGE  # the first page was committed; the rest waits
        assert _count(catalog, Annotation) == PAGE

        svc.start(private, ["label_studio"], timeout=240)
        resumed = sync_annotations(client, catalog, project_id, page_size=PAGE)
        assert (resumed.new, resumed.updated, resumed.retracted, resumed.rejected) == (N - PAGE, 0, 0, [])
        assert catalog.labels() == truth
        assert _count(catalog, Annotation) == N and _count(catalog, LabelChange) == N  # each labelled once
        again = sync_annotations(client, catalog, project_id, page_size=PAGE)
        assert (again.new, again.updated, again.unchanged) == (0, 0, N)
    finally:
        if started:
            svc.stop(private, ["label_studio"])
