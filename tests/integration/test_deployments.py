"""The deployments on the real Prefect server, run by a real process worker on a private work pool.

One module-scoped project: a small trusted-label catalog (so a fine-tune needs no annotations), cheap
fine-tune settings, its five deployments and a worker. Tests here watch runs, states and events through the
Prefect client, as a person would in the UI.
"""

from __future__ import annotations

import contextlib
import json
import os
import socket
import threading
import time
from collections.abc import Callable, Iterator
from datetime import UTC, datetime, timedelta
from http.server import BaseHTTPRequestHandler, ThreadingHTTPServer
from pathlib import Path
from typing import Any
from uuid import UUID

import httpx
import pytest
from prefect.client.orchestration import SyncPrefectClient, get_client
from prefect.client.schemas.filters import (
    ArtifactFilter,
    ArtifactFilterFlowRunId,
    TaskRunFilter,
    TaskRunFilterFlowRunId,
)
from prefect.client.schemas.objects import Artifact, FlowRun, State, StateType, TaskRun
from prefect.client.schemas.schedules import CronSchedule, IntervalSchedule
from prefect.deployments import run_deployment
from prefect.events import EventTrigger, emit_event
from prefect.exceptions import ObjectNotFound
from prefect.states import Pending, Scheduled
from pydantic import SecretStr
from pydantic_core import to_jsonable_python

from bench.kill_soak import kill_worker_and_run
from bench.webhook_burst import serving
from flows import deploy, served, worker
from flows.common import THRESHOLD_REACHED, project_resource_id, project_slot, synchronously
from flywheel import labelstudio, loop
from flywheel.app.webhook import LABELS_CHANGED, create_app
from flywheel.catalog import TEST, Catalog
from flywheel.config import Settings, load_settings
from flywheel.devservers.services import worker_pid
from flywheel.features import embedded
from flywheel.labelstudio.project import META_PROJECT_ID
from flywheel.loop import schedule
from flywheel.registry import tracking
from flywheel.sources.importing import import_source, materialize_fashion_mnist
from tests.conftest import TEST_PORTS
from tests.integration.labelstudio_support import with_section

pytestmark = pytest.mark.integration

ACTIVE = ("Pending", "Running")
RUN_TIMEOUT = 240  # seconds for one flow run on 2 busy cores (a fresh process imports torch and prefect)


def _settings(workspace: Path, project: str, pool: str) -> Settings:
    """Tiny and fast: 32 px, 60 trusted labels, one head epoch, quick retries, a worker polling every second."""
    return load_settings(
        workspace=workspace,
        project=project,
        image_size=32,
        label_studio={"port": TEST_PORTS["label_studio"]},
        mlflow={"port": TEST_PORTS["mlflow"]},
        prefect={
            "port": TEST_PORTS["prefect"],
            "work_pool": pool,
            "round_cron": "17 3 * * 1",
            "timezone": "Europe/Paris",
            "sync_interval_s": 600,
            "worker_poll_s": 1,
            "task_retries": 2,
            "retry_delay_s": 0.5,
        },
        finetune={
            "min_labels": 1000,  # sync never asks for a fine-tune here: the tests emit the event themselves
            "every_new_labels": 10,
            "epochs": 2,
            "head_epochs": 1,
            "batch_size": 16,
            "domain": "near",
            "backbones": ["efficientnet_lite0"],
        },
    )


def _labelled_project(settings: Settings, *, pool_size: int, test_size: int) -> None:
    """Fashion-MNIST images whose folder names are imported as labels: fine-tunes need no annotation."""
    pool_root, test_root = materialize_fashion_mnist(
        settings.dirs.sources / "fashion-mnist", pool_size=pool_size, test_size=test_size, seed=0
    )
    catalog = Catalog(settings.catalog_url)
    import_source(catalog, settings, str(pool_root), trust_labels=True)
    import_source(catalog, settings, str(test_root), split=TEST)


@pytest.fixture(scope="module")
def served_project(tmp_path_factory: pytest.TempPathFactory, services: Settings):
    """A project with trusted labels, its deployments on a private process pool, and a worker serving it."""
    suffix = os.urandom(3).hex()
    settings = _settings(tmp_path_factory.mktemp("deployments") / "ws", f"dep{suffix}", f"flywheel-test-{suffix}")
    _labelled_project(settings, pool_size=60, test_size=30)
    deploy.up(settings)
    try:
        with worker.prefect_api(settings):
            yield settings
    finally:
        worker.stop_worker(settings)
        with worker.prefect_api(settings), get_client(sync_client=True) as client:
            for kind in deploy.KINDS:
                with contextlib.suppress(ObjectNotFound):
                    client.delete_deployment(client.read_deployment_by_name(deploy.full_name(kind, settings)).id)
            client.delete_work_pool(settings.prefect.work_pool)


class _Restarting(BaseHTTPRequestHandler):
    """A server that answers every request 503, as one that is starting up does: worth retrying."""

    def do_GET(self) -> None:
        self.send_response(503)
        self.end_headers()

    def log_message(self, format: str, *args: object) -> None:  # quiet
        pass


@pytest.fixture(scope="module")
def background_runs(served_project: Settings) -> Iterator[dict[str, Any]]:
    """Runs started as soon as the worker is up, so their process start-up (~15 s each on 2 busy cores)
    overlaps the fine-tune test: one whose Label Studio answers 503 (retried), one whose port refuses
    connections (not retried), one with a bad override, and the sync an annotation event (as the webhook
    receiver sends them) starts."""
    with socket.socket() as sock:  # a port nothing listens on: connections are refused
        sock.bind(("127.0.0.1", 0))
        closed_port = sock.getsockname()[1]
    restarting = ThreadingHTTPServer(("127.0.0.1", 0), _Restarting)
    threading.Thread(target=restarting.serve_forever, daemon=True).start()
    name = deploy.full_name("simulate", served_project)

    def start(overrides: dict[str, Any]) -> UUID:
        return synchronously(run_deployment(name, parameters={"overrides": overrides}, timeout=0)).id

    runs = {
        "refused": start({"label_studio": {"port": closed_port}}),
        "closed_port": closed_port,
        "restarting": start({"label_studio": {"port": restarting.server_address[1]}}),
        "invalid": start({"k_per_round": 0}),
    }
    emit_event(  # as the webhook receiver announces changed labels
        LABELS_CHANGED,
        resource={"prefect.resource.id": project_resource_id(served_project.project)},
        payload={"changes": 1},
    )
    yield runs
    with get_client(sync_client=True) as client:  # its run must be over before the server goes
        served.wait_final(client, runs["restarting"], timeout=RUN_TIMEOUT)
    restarting.shutdown()


def _emit_threshold(settings: Settings, n_labels: int) -> None:
    emit_event(
        THRESHOLD_REACHED,
        resource={"prefect.resource.id": project_resource_id(settings.project)},
        payload={"n_labels": n_labels, "labels_at_last_finetune": 0},
    )


def _start_training(settings: Settings, workspace: Path) -> dict[str, Any]:
    """Start Training, as Label Studio's Model page sends it to the ML backend's /webhook, through the real receiver:
    its Prefect event is the one the threshold sends. The receiver's catalog is a scratch one that knows the
    Label Studio project id this delivery names (the served project has none: its labels were imported)."""
    settings = with_section(settings, "webhook", secret=SecretStr("start-training-secret"))
    catalog = Catalog(f"sqlite:///{workspace / 'receiver.db'}")
    catalog.set_meta(META_PROJECT_ID, "4242")
    body = {"action": "START_TRAINING", "project": {"id": 4242}, "model_version": "champion"}
    auth = httpx.BasicAuth("flywheel", "start-training-secret")
    with serving(create_app(settings, catalog)) as port:
        answer = httpx.post(f"http://127.0.0.1:{port}/webhook", json=body, auth=auth, trust_env=False)
    assert answer.status_code == 200, answer.text
    return dict(answer.json())


def _final(run: FlowRun) -> State[Any]:
    """A finished run's state (wait_final returns only runs that have one)."""
    assert run.state is not None
    return run.state


def _wait(predicate: Callable[[], Any], timeout: float, what: str) -> Any:
    deadline = time.monotonic() + timeout
    while (value := predicate()) in (None, [], False):
        if time.monotonic() > deadline:
            raise AssertionError(f"{what}: not within {timeout} s")
        time.sleep(0.5)
    return value


def _task_runs(client: SyncPrefectClient, flow_run_id: UUID) -> list[TaskRun]:
    return client.read_task_runs(task_run_filter=TaskRunFilter(flow_run_id=TaskRunFilterFlowRunId(any_=[flow_run_id])))


def _artifacts(client: SyncPrefectClient, flow_run_id: UUID) -> dict[str, Artifact]:
    by_run = ArtifactFilter(flow_run_id=ArtifactFilterFlowRunId(any_=[flow_run_id]))
    found = client.read_artifacts(artifact_filter=by_run)
    return {a.key: a for a in found if a.key}


def _markdown(artifact: Artifact) -> str:
    assert isinstance(artifact.data, str), artifact
    return artifact.data


def _run_id(state: State[Any]) -> UUID:
    assert state.state_details.flow_run_id is not None
    return state.state_details.flow_run_id


def test_deployments_exist_with_their_schedules_triggers_and_limits(
    served_project: Settings, background_runs: dict[str, Any]
):
    settings = served_project
    with get_client(sync_client=True) as client:
        pool = client.read_work_pool(settings.prefect.work_pool)
        assert pool.type == "process"
        workers = client.read_workers_for_work_pool(settings.prefect.work_pool)
        assert [w.status for w in workers if w.name == worker.worker_name(settings)] == ["ONLINE"]
        found = {kind: client.read_deployment_by_name(deploy.full_name(kind, settings)) for kind in deploy.KINDS}
        automations = {
            kind: client.read_resource_related_automations(f"prefect.deployment.{d.id}") for kind, d in found.items()
        }
        project_limit = client.read_global_concurrency_limit_by_name(f"flywheel-{settings.project}")

    round_, sync = found["round"], found["sync"]
    [round_schedule] = round_.schedules
    assert isinstance(round_schedule.schedule, CronSchedule) and round_schedule.active
    assert (round_schedule.schedule.cron, round_schedule.schedule.timezone) == ("17 3 * * 1", "Europe/Paris")
    [sync_schedule] = [s.schedule for s in sync.schedules]
    assert isinstance(sync_schedule, IntervalSchedule) and sync_schedule.interval == timedelta(seconds=600)
    assert sync.parameters == {"finetune_when_due": False}  # the trigger below runs the fine-tune, not sync
    assert {kind for kind, d in found.items() if d.schedules} == {"round", "sync"}
    assert {kind for kind, a in automations.items() if a} == {"sync", "finetune"}
    on_project = {"prefect.resource.id": project_resource_id(settings.project)}
    [sync_trigger] = [a.trigger for a in automations["sync"]]
    assert isinstance(sync_trigger, EventTrigger) and sync_trigger.expect == {LABELS_CHANGED}
    assert to_jsonable_python(sync_trigger.match) == on_project
    [finetune_trigger] = [a.trigger for a in automations["finetune"]]
    assert isinstance(finetune_trigger, EventTrigger) and finetune_trigger.expect == {THRESHOLD_REACHED}
    assert finetune_trigger.threshold == 1 and to_jsonable_python(finetune_trigger.match) == on_project

    limits = {
        kind: (d.global_concurrency_limit.limit, d.concurrency_options.collision_strategy.value)
        for kind, d in found.items()
        if d.global_concurrency_limit and d.concurrency_options
    }
    assert limits == {
        "round": (1, "ENQUEUE"),
        "sync": (1, "ENQUEUE"),
        "finetune": (1, "CANCEL_NEW"),
    }
    assert project_limit.limit == 1 and project_limit.active  # one writing step of the project at a time
    for d in found.values():
        assert d.work_pool_name == settings.prefect.work_pool
        assert d.pull_steps == [{"prefect.deployments.steps.set_working_directory": {"directory": str(worker.REPO)}}]
        assert d.job_variables["env"] == deploy.settings_env(settings)  # the runs' settings, secrets excepted


def test_start_training_starts_one_finetune_and_a_threshold_event_does_not_overlap_it(
    served_project: Settings, tmp_path: Path
):
    settings = served_project
    began = datetime.now(UTC)
    assert _start_training(settings, tmp_path)["finetune_requested"] is True
    with get_client(sync_client=True) as client:
        # Pending: the worker took the run and with it the deployment's only concurrency slot, held until the run
        # ends; the process then needs a while to start, so the second event lands well inside the first run.
        first = _wait(
            lambda: [r for r in served.deployment_runs(client, settings, "finetune") if r.state_name in ACTIVE],
            RUN_TIMEOUT,
            "a finetune run started by Start Training",
        )
        assert len(served.deployment_runs(client, settings, "finetune")) == 1  # exactly one run for one request
        _emit_threshold(settings, 61)  # while the first one runs
        second = _wait(
            lambda: [r for r in served.deployment_runs(client, settings, "finetune") if r.id != first[0].id],
            60,
            "a run for the second event",
        )
        second = served.wait_final(client, second[0].id, timeout=RUN_TIMEOUT)
        done = served.wait_final(client, first[0].id, timeout=RUN_TIMEOUT)
        runs = served.deployment_runs(client, settings, "finetune")
        second_states = [s.type for s in client.read_flow_run_states(second.id)]
        report = _markdown(_artifacts(client, done.id)[f"{settings.project}-finetune-report"])

    assert _final(done).type == StateType.COMPLETED, _final(done).message
    assert second.created and done.end_time and second.created < done.end_time  # it came while the first ran ...
    assert _final(second).type == StateType.CANCELLED and StateType.RUNNING not in second_states  # ... never ran
    assert len(runs) == 2 and sum(r.state_type == StateType.COMPLETED for r in runs) == 1
    assert all(r.created and r.created >= began for r in runs)
    assert "depth: **head**" in report and "learning rates" in report and "[MLflow run](http" in report
    assert "promoted" in report  # promoted or not, and why
    # a promotion refreshes the open tasks' predictions in the same run (this project has no open task)
    assert "**not promoted**" in report or "open Label Studio tasks now pre-annotated by it: 0 changed" in report


@pytest.mark.sqlite_pass  # the receiver, retries and the schedule do not touch the stores
def test_a_threshold_event_on_labels_that_had_their_finetune_runs_none(served_project: Settings):
    """After the fine-tune at 60 labels finished, another request at the same labels trains nothing."""
    settings = served_project
    finished = schedule.finetune_status(Catalog(settings.catalog_url))["finished"]
    assert finished is not None and finished.n_labels == 60  # the threshold test's fine-tune
    began = datetime.now(UTC)
    _emit_threshold(settings, 60)
    with get_client(sync_client=True) as client:
        [run] = _wait(
            lambda: [
                r for r in served.deployment_runs(client, settings, "finetune") if r.created and r.created > began
            ],
            60,
            "a finetune run for the repeated event",
        )
        done = served.wait_final(client, run.id, timeout=RUN_TIMEOUT)
        report = _markdown(_artifacts(client, done.id)[f"{settings.project}-finetune-report"])
    assert _final(done).type == StateType.COMPLETED, _final(done).message
    assert "# Fine-tune: not run" in report and "exactly these 60 labels already ran" in report
    kinds = [v.tags.get("kind") for v in tracking.connect(settings).search_model_versions(
        f"name='{settings.registered_model_name}'")]  # fmt: skip
    assert kinds.count("finetune") == 1  # one fine-tune in all


def test_bootstrap_deployment_reads_a_promoted_finetune_from_the_configured_mlflow(served_project: Settings):
    """The worker's fresh process loads the champion's fine-tuned body before anything there connected to MLflow:
    it must still read the configured server (MLflow's own default is a SQLite file in the working directory)."""
    settings, catalog = served_project, Catalog(served_project.catalog_url)
    client = tracking.connect(settings)
    with project_slot(settings):  # the worker's runs take turns with this one
        finished = schedule.finetune_status(catalog)["finished"]  # the threshold test's fine-tune
        version = finished.version if finished else loop.run_finetune(settings, catalog, client).model_version
        assert version is not None
        loop.promote(settings, catalog, client, version, progress=False)
    assert tracking.champion_version(client, settings) == version
    assert embedded.body_version(settings, catalog) == version  # the pool reads the fine-tune's body now
    stray = worker.REPO / "mlflow.db"
    stray_before = stray.stat().st_mtime if stray.exists() else None
    with get_client(sync_client=True) as prefect:
        started = synchronously(run_deployment(deploy.full_name("bootstrap", settings), timeout=0))
        run = served.wait_final(prefect, started.id, timeout=RUN_TIMEOUT)
    assert _final(run).type == StateType.COMPLETED, _final(run).message
    assert (stray.stat().st_mtime if stray.exists() else None) == stray_before  # no local store was touched


def _connect_states(client: SyncPrefectClient, flow_run_id: UUID) -> tuple[TaskRun, list[str]]:
    [connect] = [t for t in _task_runs(client, flow_run_id) if t.task_key.startswith("connect_label_studio")]
    return connect, [str(s.name) for s in client.read_task_run_states(connect.id)]


@pytest.mark.sqlite_pass  # the receiver, retries and the schedule do not touch the stores
def test_a_server_that_answers_503_is_retried_with_backoff(served_project: Settings, background_runs: dict[str, Any]):
    with get_client(sync_client=True) as client:
        run = served.wait_final(client, background_runs["restarting"], timeout=RUN_TIMEOUT)
        connect, names = _connect_states(client, run.id)
        retries = [s for s in client.read_task_run_states(connect.id) if s.name == "AwaitingRetry"]
    assert _final(run).type == StateType.FAILED
    assert "GET /health answered HTTP 503" in str(_final(run).message) + str(connect.state and connect.state.message)
    assert names.count("AwaitingRetry") == 2 and names.count("Retrying") == 2  # settings: task_retries=2
    assert connect.run_count == 3  # three attempts
    waits = [r.state_details.scheduled_time.timestamp() - r.timestamp.timestamp() for r in retries
             if r.state_details.scheduled_time]  # fmt: skip
    assert waits[1] > waits[0] > 0.3  # 0.5 s then 1 s, +-20% jitter


@pytest.mark.sqlite_pass  # the receiver, retries and the schedule do not touch the stores
def test_a_port_that_refuses_connections_fails_at_once(served_project: Settings, background_runs: dict[str, Any]):
    with get_client(sync_client=True) as client:
        run = served.wait_final(client, background_runs["refused"], timeout=RUN_TIMEOUT)
        connect, names = _connect_states(client, run.id)
    assert _final(run).type == StateType.FAILED
    assert f"127.0.0.1:{background_runs['closed_port']}" in str(connect.state and connect.state.message)
    assert connect.run_count == 1 and "AwaitingRetry" not in names  # a retry could only say the same


def test_a_bad_parameter_fails_the_run_at_once_with_a_clear_message(
    served_project: Settings, background_runs: dict[str, Any]
):
    with pytest.raises(Exception, match="noise_rate"):  # out of bounds: the server refuses to create the run
        run_deployment(deploy.full_name("simulate", served_project), parameters={"noise_rate": 1.5}, timeout=0)
    with get_client(sync_client=True) as client:  # the override is checked when the run starts
        run = served.wait_final(client, background_runs["invalid"], timeout=RUN_TIMEOUT)
        task_runs = _task_runs(client, run.id)
    message = str(_final(run).message)
    assert _final(run).type == StateType.FAILED and "Validation of flow parameters failed" in message
    assert "k_per_round" in message and "greater than or equal to 1" in message
    assert task_runs == [] and run.total_run_time < timedelta(seconds=5)


@pytest.fixture
def in_process(settings: Settings, monkeypatch: pytest.MonkeyPatch) -> Iterator[Settings]:
    """Flows run in this process with the test's settings (as a worker's run would get them) on the test server."""
    settings = settings.model_copy(update={"image_size": 32, "k_per_round": 12})
    for key, value in deploy.settings_env(settings).items():
        monkeypatch.setenv(key, value)
    with worker.prefect_api(settings):
        yield settings


def test_embedding_is_cached_by_input_hash_with_progress_and_the_round_report(in_process: Settings):
    from flows.flywheel_flows import bootstrap_flow, round_flow

    settings = in_process
    first = bootstrap_flow(source="fashion-mnist", pool_size=40, test_size=20, return_state=True)
    again = bootstrap_flow(source="fashion-mnist", pool_size=40, test_size=20, return_state=True)
    round_ = round_flow(return_state=True)
    with get_client(sync_client=True) as client:
        embeds = {
            name: [t.state_name for t in _task_runs(client, _run_id(run)) if "embed_split" in t.name]
            for name, run in (("first", first), ("again", again))
        }
        first_artifacts = _artifacts(client, _run_id(first))
        round_artifacts = _artifacts(client, _run_id(round_))
    assert embeds == {"first": ["Completed", "Completed"], "again": ["Cached", "Cached"]}
    assert list(settings.dirs.results.iterdir())  # the cached results persist under the workspace
    progress = first_artifacts[f"{settings.project}-embedding-pool"]
    assert progress.type == "progress" and progress.data == 100.0
    report = _markdown(round_artifacts[f"{settings.project}-round-report"])
    assert "# Round 1" in report and "labels per class" in report and "## Accuracy so far" in report
    assert "## Selected (10 best of 12" in report
    selection = json.loads(_markdown(round_artifacts[f"{settings.project}-round-selection"]))
    assert len(selection) == 12 and {"sample_id", "score"} <= set(selection[0])


def test_an_annotation_event_starts_a_sync_run(served_project: Settings, background_runs: dict[str, Any]):
    with get_client(sync_client=True) as client:
        [started] = _wait(
            lambda: [r for r in served.deployment_runs(client, served_project, "sync") if not r.auto_scheduled],
            60,
            "a sync run not from the interval schedule",
        )
        run = served.wait_final(client, started.id, timeout=RUN_TIMEOUT)
        report = _markdown(_artifacts(client, run.id)[f"{served_project.project}-sync-report"])
    assert _final(run).type == StateType.COMPLETED, _final(run).message
    assert run.parameters == {"finetune_when_due": False}
    assert "labels: **60**" in report and "fine-tune: **not due**" in report


def test_sync_emits_the_threshold_event_with_the_counts(in_process: Settings):
    """On a project without deployments: only the event is checked here."""
    from flows.flywheel_flows import sync_flow

    settings = in_process
    _labelled_project(settings, pool_size=40, test_size=5)
    began = datetime.now(UTC)
    result = sync_flow(finetune_when_due=False, overrides={"finetune": {"min_labels": 30, "every_new_labels": 10}})
    with get_client(sync_client=True) as client:
        events = _wait(lambda: served.threshold_events(client, began, project=settings.project), 30, "the event")
    assert result["n_labels"] == 40 and result["finetune"] is None
    [event] = events
    assert event.payload == {
        "n_labels": 40,
        "labels_at_last_finetune": 0,
        "new_labels": 40,
        "min_labels": 30,
        "every_new_labels": 10,
    }


@pytest.mark.sqlite_pass  # the receiver, retries and the schedule do not touch the stores
def test_a_burst_of_annotations_starts_a_handful_of_syncs_and_every_label_lands(served_project: Settings) -> None:
    """30 annotations in 30 s through the webhook receiver: each lands at once, and flywheel.labels.changed
    (at most one per webhook.sync_every_s) starts a few syncs, not one per annotation."""
    settings = with_section(served_project, "webhook", secret=SecretStr("burst-" + os.urandom(6).hex()))
    catalog, ls = Catalog(settings.catalog_url), labelstudio.connect(settings)
    project_id = labelstudio.ensure_project(ls, settings, catalog, catalog.classes())
    samples = [s for s in catalog.samples() if s.id not in catalog.sent_sample_ids()][:30]
    pushed = labelstudio.push_tasks(
        ls, catalog, settings, project_id, [labelstudio.TaskToPush(s.id, s.uri, "", 0.0, 0.1) for s in samples],
        model_version=None, round_id=None,
    )  # fmt: skip
    answers = {sample: "bag" if catalog.labels()[sample] != "bag" else "coat" for sample in pushed}
    with serving(create_app(settings, catalog)) as port:
        settings = with_section(settings, "webhook", url=f"http://127.0.0.1:{port}/webhook")
        labelstudio.ensure_webhook(ls, settings, project_id)
        began = datetime.now(UTC)
        try:
            for sample, task in pushed.items():
                ls.annotations.create(id=task, result=labelstudio.choice_result(answers[sample]), project=project_id)
                time.sleep(1.0)
            _wait(lambda: all(catalog.labels()[s] == a for s, a in answers.items()), 30, "every label applied")
            time.sleep(settings.webhook.sync_every_s + 5)  # the last flywheel.labels.changed goes out
        finally:
            labelstudio.remove_webhooks(ls, settings.webhook.endpoint, project_id)
    with get_client(sync_client=True) as client:
        started = [r for r in served.deployment_runs(client, settings, "sync")
                   if r.created and r.created >= began and not r.auto_scheduled]  # fmt: skip
        done = [served.wait_final(client, r.id, timeout=RUN_TIMEOUT) for r in started]
    assert 1 <= len(done) <= 4, [r.created for r in done]  # not one per annotation
    assert all(_final(r).type == StateType.COMPLETED for r in done)
    assert {s: catalog.labels()[s] for s in answers} == answers  # every label landed, once


def test_a_killed_worker_leaves_no_run_holding_the_queue(served_project: Settings, background_runs: dict[str, Any]):
    """SIGKILL the worker and its round's process mid-run (as the OOM killer or a lost host would: nobody left to
    report): the worker started next marks that run Crashed, which frees the round deployment's only slot, and the
    round queued behind it starts without waiting out the slot's lease."""
    settings, name = served_project, deploy.full_name("round", served_project)
    with get_client(sync_client=True) as client:
        _wait(lambda: not _active_runs(client, settings), RUN_TIMEOUT, "the module's other runs to end")
        first = synchronously(run_deployment(name, timeout=0)).id
        running = _wait(
            lambda: (r := client.read_flow_run(first)).state_name == "Running" and r.infrastructure_pid,
            RUN_TIMEOUT,
            "the first round running",
        )
        assert worker_pid(settings) is not None
        kill_worker_and_run(settings, int(running))
        second = synchronously(run_deployment(name, timeout=0)).id  # queued behind the dead run's slot
        worker.start_worker(settings)
        restarted = time.monotonic()
        _wait(lambda: client.read_flow_run(second).state_type != StateType.SCHEDULED, 120, "the queued round")
        waited = time.monotonic() - restarted
        done = served.wait_final(client, second, timeout=RUN_TIMEOUT)
        killed = client.read_flow_run(first)
    assert _final(killed).type == StateType.CRASHED and "worker" in str(_final(killed).message), _final(killed)
    assert _final(done).type == StateType.COMPLETED, _final(done).message
    assert waited < 60, waited  # not the 300 s of the slot's lease: the worker's poll and a process start


def _active_runs(client: SyncPrefectClient, settings: Settings) -> list[FlowRun]:
    runs = [r for kind in deploy.KINDS for r in served.deployment_runs(client, settings, kind)]
    return [r for r in runs if r.state_name in ACTIVE]


def test_a_run_taken_but_never_labelled_is_ended_once_unclaimed(served_project: Settings):
    """A worker killed between taking a run (Pending: the deployment's slot is held) and labelling it with its name
    leaves a run no worker name points to: after UNCLAIMED_S the next worker's start ends it all the same."""
    settings = served_project
    with get_client(sync_client=True) as client:
        _wait(lambda: not _active_runs(client, settings), RUN_TIMEOUT, "the module's other runs to end")
        deployment = client.read_deployment_by_name(deploy.full_name("round", settings))
        later: State[Any] = Scheduled(scheduled_time=datetime.now(UTC) + timedelta(hours=1))  # the worker leaves it
        run = client.create_flow_run_from_deployment(deployment.id, state=later)
        client.set_flow_run_state(run.id, Pending())
        assert client.read_flow_run(run.id).state_type == StateType.PENDING  # taken: the slot is held now
        began = time.monotonic()
        ended = worker.end_runs_of_worker(settings, "test: its worker died before labelling it")
        waited = time.monotonic() - began
        final = client.read_flow_run(run.id)
    assert [line for line in ended if run.name in line] and _final(final).type == StateType.CRASHED
    assert worker.UNCLAIMED_S - 2 <= waited <= worker.UNCLAIMED_S + 30  # it waited for a live worker's label first
