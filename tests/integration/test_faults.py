"""Faults lose nothing and do nothing twice, against the real servers.

- A round (and a sync) run in a subprocess that dies as if SIGKILLed (FLYWHEEL_FAULT_AT, flywheel/faults.py)
  at each step: mid-embedding, after training, after registering in MLflow, after selecting, between two
  import chunks, after the push before the catalog commit, before the round is marked finished, inside the
  sync's transaction; and a prediction refresh between clearing the open tasks' predictions and importing.
  After each kill, and after the reruns, Label Studio holds at most one task per sample,
  every catalog task is a Label Studio task, no round is left half-written, and no label is lost.
- Label Studio unavailable mid-round (a loopback proxy in front of the shared server is cut) and MLflow
  restarted (a private server on its own port): the round fails naming the server and URL, nothing stored
  is lost, and the rerun after the server is back completes the same round.
- Bad images and near-duplicates in the pool: quarantined with a reason, never sent, and the round goes on.
"""

from __future__ import annotations

import contextlib
import os
import socket
import subprocess
import sys
import threading
import time
from pathlib import Path

import numpy as np
import pytest
from PIL import Image
from prefect.client.orchestration import get_client
from prefect.client.schemas.filters import ArtifactCollectionFilter
from prefect.settings import PREFECT_API_URL, temporary_settings
from sqlalchemy import select

from flows.common import artifact_key, publish_round_report
from flywheel import labelstudio, loop
from flywheel.catalog import POOL, Catalog, Sample, Task
from flywheel.devservers import services as servers
from flywheel.errors import ServiceUnavailableError
from flywheel.faults import ENV, EXIT_CODE
from flywheel.registry import tracking
from flywheel.sources.importing import import_source
from tests.conftest import REPO, TEST_PORTS, no_settings_file, settings_for

pytestmark = pytest.mark.integration

# A warm parent that has imported flywheel once: each run is a child forked from it (a separate process,
# with its own clients, flock and SQLite connection) that dies at the fault point. Forking skips the ~6 s of
# imports a fresh interpreter pays per kill; torch has run nothing in the parent, so forking it is safe.
ZYGOTE = """
import os, sys, traceback
from flywheel import faults, labelstudio, loop
from flywheel.registry import tracking
from flywheel.catalog import Catalog
from flywheel.config import load_settings
from flywheel.labelstudio import tasks

tasks.IMPORT_CHUNK = 4  # several import requests per push, so a push can die between two of them
print("ready", flush=True)
for line in sys.stdin:
    point, what, *args = line.split()
    pid = os.fork()
    if pid == 0:
        os.dup2(2, 1)  # the child's chatter goes to the log; stdout carries only exit codes
        os.environ[faults.ENV] = point
        try:
            settings = load_settings()
            catalog = Catalog(settings.catalog_url)
            ls = labelstudio.connect(settings)
            if what == "round":
                loop.run_round(settings, catalog, ls, tracking.connect(settings), progress=False)
            elif what == "refresh":  # open tasks to the predictions of registered version args[0]
                loop.refresh_open_tasks(settings, catalog, ls, tracking.connect(settings), args[0], progress=False)
            else:
                loop.run_sync(settings, catalog, ls)
        except BaseException:
            traceback.print_exc()
            os._exit(1)
        os._exit(0)
    _, status = os.waitpid(pid, 0)
    print(os.waitstatus_to_exitcode(status), flush=True)
"""


class _Runs:
    """Rounds and syncs in child processes that die at a named fault point."""

    def __init__(self, settings, log: Path):
        self.log = log
        self.proc = subprocess.Popen(
            [sys.executable, "-c", ZYGOTE], env=_worker_env(settings), cwd=REPO, text=True,
            stdin=subprocess.PIPE, stdout=subprocess.PIPE, stderr=log.open("w"),
        )  # fmt: skip
        assert self.proc.stdin is not None and self.proc.stdout is not None  # both are pipes
        self.stdin, self.stdout = self.proc.stdin, self.proc.stdout
        assert self.stdout.readline().strip() == "ready", log.read_text()[-3000:]

    def killed_at(self, point: str, what: str = "round") -> None:
        """The run must die at `point` (exit 137), not fail earlier or finish."""
        self.stdin.write(f"{point} {what}\n")
        self.stdin.flush()
        code = int(self.stdout.readline())
        assert code == EXIT_CODE, f"{point}: exit {code}\n{self.log.read_text()[-3000:]}"
        assert self.log.read_text().rstrip().endswith(f"{ENV}={point}: exiting with {EXIT_CODE}")

    def close(self) -> None:
        self.stdin.close()
        self.proc.wait(timeout=30)


def _small(settings, **extra):
    return settings.model_copy(update={"image_size": 32, "k_per_round": 10, **extra})


def _worker_env(settings) -> dict[str, str]:
    env = {k: v for k, v in os.environ.items() if not k.startswith("FLYWHEEL_")}
    env.update(
        FLYWHEEL_CONFIG=no_settings_file(settings.workspace),
        FLYWHEEL_WORKSPACE=str(settings.workspace),
        FLYWHEEL_PROJECT=settings.project,
        FLYWHEEL_IMAGE_SIZE=str(settings.image_size),
        FLYWHEEL_K_PER_ROUND=str(settings.k_per_round),
        FLYWHEEL_LABEL_STUDIO__PORT=str(settings.label_studio.port),
        FLYWHEEL_MLFLOW__PORT=str(settings.mlflow.port),
        FLYWHEEL_PREFECT__PORT=str(settings.prefect.port),
        FLYWHEEL_FINETUNE__DEVICE="cpu",
        OMP_NUM_THREADS="1",
    )
    return env


def _annotate(client, catalog: Catalog, project_id: int, task_ids) -> int:
    """Answer these tasks with their sample's truth, as an annotator would (one annotation each)."""
    sample_of = labelstudio.task_sample_ids(client, project_id, task_ids=list(task_ids))
    truth = catalog.truth_of(sample_of.values())
    for task_id, sample_id in sample_of.items():
        answer = truth[sample_id]
        assert answer is not None, f"sample {sample_id} has no truth to answer with"
        client.annotations.create(id=task_id, result=labelstudio.choice_result(answer), project=project_id)
    return len(sample_of)


def _ls_tasks(client, project_id: int) -> list[int]:
    """The sample id of every task in the project (one entry per task)."""
    return list(labelstudio.task_sample_ids(client, project_id).values())


def _check(settings, catalog: Catalog, client, project_id: int) -> dict[str, int]:
    """The invariants that must hold after any crash: no sample twice in Label Studio, the catalog's tasks are
    exactly Label Studio's for the samples it recorded, and at most one round (the resumable one) unfinished."""
    in_ls = labelstudio.task_sample_ids(client, project_id)
    samples = list(in_ls.values())
    assert len(samples) == len(set(samples)), "a sample was sent to Label Studio twice"
    with catalog.transaction() as s:
        recorded = dict(s.execute(select(Task.ls_task_id, Task.sample_id)).tuples().all())
    assert all(in_ls.get(task) == sample for task, sample in recorded.items()), "catalog task missing in LS"
    unfinished = [r.id for r in catalog.rounds() if r.finished_at is None]
    assert len(unfinished) <= 1 and (not unfinished or unfinished[0] == catalog.rounds()[-1].id)
    return {"ls": len(samples), "catalog": len(recorded), "unfinished": len(unfinished)}


def test_a_round_killed_at_every_step_then_rerun_loses_nothing_and_sends_nothing_twice(settings):
    settings = _small(settings)
    catalog = Catalog(settings.catalog_url)
    import_source(catalog, settings, "fashion-mnist", pool_size=120, test_size=30)
    client, mlflow_client = labelstudio.connect(settings), tracking.connect(settings)
    project_id = labelstudio.ensure_project(client, settings, catalog, catalog.classes())
    began = time.monotonic()
    runs = _Runs(settings, settings.workspace / "runs.log")
    try:
        runs.killed_at("embed:after_vectors")  # a part of the pool's vectors saved, the round not begun
        assert catalog.rounds() == [] and _check(settings, catalog, client, project_id)["ls"] == 0
        runs.killed_at("round:after_select")
        assert _check(settings, catalog, client, project_id) == {"ls": 0, "catalog": 0, "unfinished": 1}
        runs.killed_at("push:after_import")  # one chunk of 4 imported, nothing recorded
        assert _check(settings, catalog, client, project_id) == {"ls": 4, "catalog": 0, "unfinished": 1}
        runs.killed_at("push:before_record")  # the 4 reconciled, the other 6 imported, not recorded
        assert _check(settings, catalog, client, project_id) == {"ls": 10, "catalog": 4, "unfinished": 1}
        runs.killed_at("round:before_finish")
        assert _check(settings, catalog, client, project_id) == {"ls": 10, "catalog": 10, "unfinished": 1}
        first = loop.run_round(settings, catalog, client, mlflow_client, progress=False)  # the rerun ends round 1
        assert first.round_id == 1 and first.selected == [] and [r.id for r in catalog.rounds()] == [1]
        assert _check(settings, catalog, client, project_id) == {"ls": 10, "catalog": 10, "unfinished": 0}

        first_tasks = set(labelstudio.task_sample_ids(client, project_id))
        assert _annotate(client, catalog, project_id, first_tasks) == 10
        runs.killed_at("sync:before_commit", "sync")  # labels written inside the transaction: rolled back
        assert catalog.count_labels() == 0
        assert loop.run_sync(settings, catalog, client).n_labels == 10

        def versions() -> int:
            return len(mlflow_client.search_model_versions(f"name='{settings.registered_model_name}'"))

        runs.killed_at("round:after_train")
        assert versions() == 0
        runs.killed_at("round:after_register")  # a version is in MLflow, the catalog does not know it
        assert versions() == 1
        assert _check(settings, catalog, client, project_id) == {"ls": 10, "catalog": 10, "unfinished": 1}
        second = loop.run_round(settings, catalog, client, mlflow_client, progress=False)
        assert second.round_id == 2 and len(second.selected) == 10 and second.model_version == "2"
        champion = tracking.champion_version(mlflow_client, settings)
        assert champion in ("1", "2")  # the open tasks show its predictions
        other = "1" if champion == "2" else "2"
        assert _check(settings, catalog, client, project_id) == {"ls": 20, "catalog": 20, "unfinished": 0}
        # the open tasks shown the other version's predictions, killed between clearing the old ones and importing
        runs.killed_at("refresh:after_delete", f"refresh {other}")
    finally:
        runs.close()
    new_tasks = set(labelstudio.task_sample_ids(client, project_id)) - first_tasks
    assert not any(t.predictions for t in labelstudio.list_tasks(client, project_id, fields="all") if t.id in new_tasks)
    assert loop.refresh_open_tasks(settings, catalog, client, mlflow_client, other, progress=False) == 10  # rerun
    shown = {t.id: t.predictions for t in labelstudio.list_tasks(client, project_id, fields="all")}
    assert all([p.model_version for p in shown[t]] == [other] for t in new_tasks)

    # every annotation made becomes a label: none lost, none doubled
    assert _annotate(client, catalog, project_id, new_tasks) == 10
    assert loop.run_sync(settings, catalog, client).n_labels == 20
    labels, sent = catalog.labels(), _ls_tasks(client, project_id)
    assert sorted(labels) == sorted(sent)
    assert labels == catalog.truth_of(labels)
    assert [r.finished_at is not None for r in catalog.rounds()] == [True, True]
    print(f"\n9 kills + reruns: 20 tasks, 20 labels, 0 lost, 0 doubled, {time.monotonic() - began:.0f} s")


class _Proxy:
    """A loopback TCP proxy in front of a server: cutting it makes the server unreachable at its URL
    (the shared test server itself is never stopped)."""

    def __init__(self, target_port: int, port: int = 0):
        self.target_port = target_port
        self.listener = socket.create_server(("127.0.0.1", port))
        self.port = self.listener.getsockname()[1]
        self.sockets: list[socket.socket] = []
        threading.Thread(target=self._accept, daemon=True).start()

    def _accept(self) -> None:
        while True:
            try:
                client, _ = self.listener.accept()
            except OSError:
                return
            upstream = socket.create_connection(("127.0.0.1", self.target_port))
            self.sockets += [client, upstream]
            for a, b in ((client, upstream), (upstream, client)):
                threading.Thread(target=self._pump, args=(a, b), daemon=True).start()

    @staticmethod
    def _pump(source: socket.socket, sink: socket.socket) -> None:
        try:
            while data := source.recv(65536):
                sink.sendall(data)
        except OSError:
            pass
        finally:
            for end in (source, sink):
                end.close()

    def cut(self) -> None:
        with contextlib.suppress(OSError):
            self.listener.shutdown(socket.SHUT_RDWR)  # wakes the blocked accept(); close alone does not
        self.listener.close()
        for sock in self.sockets:
            with contextlib.suppress(OSError):
                sock.shutdown(socket.SHUT_RDWR)
            sock.close()


def test_label_studio_unavailable_mid_round_fails_clearly_and_the_rerun_completes(settings):
    proxy = _Proxy(TEST_PORTS["label_studio"])
    settings = _small(settings, label_studio=settings.label_studio.model_copy(update={"port": proxy.port}))
    catalog = Catalog(settings.catalog_url)
    import_source(catalog, settings, "fashion-mnist", pool_size=60, test_size=20)
    client, mlflow_client = labelstudio.connect(settings), tracking.connect(settings)
    loop.run_round(settings, catalog, client, mlflow_client, progress=False)
    project_id = labelstudio.ensure_project(client, settings, catalog, [])
    assert len(_ls_tasks(client, project_id)) == 10
    assert _annotate(client, catalog, project_id, labelstudio.task_sample_ids(client, project_id)) == 10
    loop.run_sync(settings, catalog, client)  # labelled: the next round selects again

    proxy.cut()
    with pytest.raises(
        ServiceUnavailableError, match=rf"Label Studio is not reachable at http://127\.0\.0\.1:{proxy.port}"
    ):
        loop.run_round(settings, catalog, client, mlflow_client, progress=False)
    assert len(catalog.sent_sample_ids()) == 10 and [r.finished_at is None for r in catalog.rounds()] == [False, True]

    proxy = _Proxy(TEST_PORTS["label_studio"], port=proxy.port)  # the server is back at the same URL
    try:
        report = loop.run_round(settings, catalog, labelstudio.connect(settings), mlflow_client, progress=False)
        assert report.round_id == 2 and len(report.selected) == 10
        sent = _ls_tasks(client, project_id)
        assert len(sent) == len(set(sent)) == 20 and set(sent) == catalog.sent_sample_ids()
        assert all(r.finished_at is not None for r in catalog.rounds())
    finally:
        proxy.cut()


def _free_port() -> int:
    with socket.socket() as sock:
        sock.bind(("127.0.0.1", 0))
        return sock.getsockname()[1]


def _label(catalog: Catalog, samples: list[Sample]) -> None:
    """Label samples with their truth, as a trusted import would."""
    with catalog.transaction() as session:
        for sample in samples:
            catalog.upsert_label(
                session, sample_id=sample.id, label=str(sample.truth), annotator="t", ls_annotation_id=None
            )


def test_mlflow_restart_mid_round_fails_clearly_loses_nothing_and_the_rerun_completes(tmp_path, monkeypatch):
    monkeypatch.setenv("MLFLOW_HTTP_REQUEST_MAX_RETRIES", "0")  # fail in seconds, not after minutes of backoff
    monkeypatch.setenv("MLFLOW_HTTP_REQUEST_TIMEOUT", "10")
    private = settings_for(tmp_path / "ws", project="t" + os.urandom(4).hex(), image_size=32, k_per_round=10)
    private = private.model_copy(update={"mlflow": private.mlflow.model_copy(update={"port": _free_port()})})
    servers.start(private, ["mlflow"], timeout=120)
    try:
        catalog = Catalog(private.catalog_url)
        import_source(catalog, private, "fashion-mnist", pool_size=60, test_size=20)
        samples = catalog.samples()
        _label(catalog, samples[:40])
        client = tracking.connect(private)
        first = loop.run_round(private, catalog, None, client, select=False, progress=False)
        assert first.model_version == "1" and tracking.champion_version(client, private) == "1"

        _label(catalog, samples[40:])  # new labels: the next round trains and registers
        servers.stop(private, ["mlflow"])
        with pytest.raises(ServiceUnavailableError, match=rf"MLflow is not reachable at {private.mlflow.url}"):
            loop.run_round(private, catalog, None, client, select=False, progress=False)
        assert catalog.count_labels() == 60 and [r.finished_at is None for r in catalog.rounds()] == [False, True]

        servers.start(private, ["mlflow"], timeout=120)
        assert tracking.champion_version(client, private) == "1"  # the registry survived the restart
        assert client.get_run(client.get_model_version(private.registered_model_name, "1").run_id).data.params
        second = loop.run_round(private, catalog, None, tracking.connect(private), select=False, progress=False)
        assert second.round_id == 2 and second.model_version == "2"
        assert all(r.finished_at is not None for r in catalog.rounds()) and catalog.count_labels() == 60
    finally:
        servers.stop(private, ["mlflow"])


def test_bad_images_and_near_duplicates_are_quarantined_and_the_round_goes_on(settings, tmp_path):
    settings = _small(settings, k_per_round=14)
    catalog = Catalog(settings.catalog_url)
    import_source(catalog, settings, "fashion-mnist", pool_size=10, test_size=10)
    pool = catalog.samples(POOL)
    extra = tmp_path / "extra" / "t-shirt"
    extra.mkdir(parents=True)
    for i, sample in enumerate(pool[:3]):  # near copies: one grey level brighter, saved again
        pixels = np.asarray(Image.open(sample.uri), dtype=np.int16)
        Image.fromarray(np.clip(pixels + 1, 0, 255).astype(np.uint8)).save(extra / f"near-{i}.png")
    (extra / "same.png").write_bytes(Path(pool[3].uri).read_bytes())  # an exact copy
    (extra / "empty.png").write_bytes(b"")
    (extra / "cut.png").write_bytes(Path(pool[4].uri).read_bytes()[:-30])  # truncated: fails when decoded
    imported = import_source(catalog, settings, str(tmp_path / "extra"))[POOL]
    assert (imported.added, imported.quarantined) == (4, 2)  # near copies + cut.png in; copy and empty out

    client = labelstudio.connect(settings)
    report = loop.run_round(settings, catalog, client, tracking.connect(settings), progress=False)
    twins = {d["sample_id"]: d["duplicate_of"] for d in report.near_duplicates}
    assert len(twins) == 3 and set(twins.values()) | set(twins) >= {s.id for s in pool[:3]}
    assert report.quarantine["total"] == 6 and report.quarantine["by_reason"] == {
        "duplicate": 1, "empty file": 1, "truncated or corrupt": 1, "near duplicate": 3,
    }  # fmt: skip
    sent = _ls_tasks(client, labelstudio.ensure_project(client, settings, catalog, []))
    assert len(sent) == len(report.selected) == 10 and not set(sent) & set(twins)  # 13 pool images - 3 twins
    assert Path(report.quarantine["report"]).read_text().count("\n") == 7  # header + 6 rows
    with temporary_settings({PREFECT_API_URL: settings.prefect.api_url}):  # the round report people read
        publish_round_report(settings, report)
        with get_client(sync_client=True) as prefect:
            (artifact,) = prefect.read_latest_artifacts(
                artifact_filter=ArtifactCollectionFilter(key={"any_": [artifact_key(settings, "round-report")]})
            )
    assert "quarantined: **6** (duplicate: 1, empty file: 1, near duplicate: 3, truncated or corrupt: 1)" in (
        artifact.data
    )
    assert "near-duplicates not sent this round: 3" in artifact.data
