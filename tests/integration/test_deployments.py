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
import time
from datetime import UTC, datetime, timedelta
from pathlib import Path

import pytest
from prefect.client.orchestration import get_client
from prefect.client.schemas.filters import (
    ArtifactFilter,
    ArtifactFilterFlowRunId,
    TaskRunFilter,
    TaskRunFilterFlowRunId,
)
from prefect.client.schemas.objects import StateType
from prefect.deployments import run_deployment
from prefect.events import emit_event
from prefect.exceptions import ObjectNotFound

from flows import deploy, served, worker
from flows.common import ANNOTATION_EVENTS, THRESHOLD_REACHED, project_resource_id
from flywheel.catalog import TEST, Catalog
from flywheel.config import Settings, load_settings
from flywheel.data import import_source, materialize_fashion_mnist
from tests.conftest import TEST_PORTS

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
        settings.sources_dir / "fashion-mnist", pool_size=pool_size, test_size=test_size, seed=0
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


@pytest.fixture(scope="module")
def background_runs(served_project: Settings) -> dict:
    """Runs started as soon as the worker is up, so their process start-up (~15 s each on 2 busy cores)
    overlaps the fine-tune test: one whose Label Studio port refuses connections, one with a bad override,
    and the sync an annotation event (as the webhook receiver sends them) starts."""
    with socket.socket() as sock:  # a port nothing listens on: connections are refused
        sock.bind(("127.0.0.1", 0))
        closed_port = sock.getsockname()[1]
    name = deploy.full_name("simulate", served_project)
    refused = run_deployment(name, parameters={"overrides": {"label_studio": {"port": closed_port}}}, timeout=0)
    invalid = run_deployment(name, parameters={"overrides": {"k_per_round": 0}}, timeout=0)
    emit_event(
        "flywheel.annotation.created",
        resource={"prefect.resource.id": project_resource_id(served_project.project)},
        payload={"action": "created", "annotation_id": 1},
    )
    return {"refused": refused.id, "closed_port": closed_port, "invalid": invalid.id}


def _emit_threshold(settings: Settings, n_labels: int) -> None:
    emit_event(
        THRESHOLD_REACHED,
        resource={"prefect.resource.id": project_resource_id(settings.project)},
        payload={"n_labels": n_labels, "labels_at_last_finetune": 0},
    )


def _wait(predicate, timeout: float, what: str):
    deadline = time.monotonic() + timeout
    while (value := predicate()) in (None, [], False):
        if time.monotonic() > deadline:
            raise AssertionError(f"{what}: not within {timeout} s")
        time.sleep(0.5)
    return value


def _task_runs(client, flow_run_id):
    return client.read_task_runs(task_run_filter=TaskRunFilter(flow_run_id=TaskRunFilterFlowRunId(any_=[flow_run_id])))


def _artifacts(client, flow_run_id) -> dict:
    by_run = ArtifactFilter(flow_run_id=ArtifactFilterFlowRunId(any_=[flow_run_id]))
    found = client.read_artifacts(artifact_filter=by_run)
    return {a.key: a for a in found}


def test_deployments_exist_with_their_schedules_triggers_and_limits(served_project: Settings, background_runs):
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
    assert [(s.schedule.cron, s.schedule.timezone, s.active) for s in round_.schedules] == [
        ("17 3 * * 1", "Europe/Paris", True)
    ]
    assert [s.schedule.interval for s in sync.schedules] == [timedelta(seconds=600)]
    assert sync.parameters == {"finetune_when_due": False}  # the trigger below runs the fine-tune, not sync
    assert {kind for kind, d in found.items() if d.schedules} == {"round", "sync"}
    assert {kind for kind, a in automations.items() if a} == {"sync", "finetune"}
    [sync_trigger] = [a.trigger for a in automations["sync"]]
    assert sync_trigger.expect == set(ANNOTATION_EVENTS)
    assert sync_trigger.match.model_dump() == {"prefect.resource.id": project_resource_id(settings.project)}
    [finetune_trigger] = [a.trigger for a in automations["finetune"]]
    assert finetune_trigger.expect == {THRESHOLD_REACHED} and finetune_trigger.threshold == 1
    assert finetune_trigger.match.model_dump() == {"prefect.resource.id": project_resource_id(settings.project)}

    limits = {
        kind: (d.global_concurrency_limit.limit, d.concurrency_options.collision_strategy.value)
        for kind, d in found.items()
        if d.global_concurrency_limit
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


def test_threshold_event_starts_one_finetune_and_a_second_event_does_not_overlap_it(served_project: Settings):
    settings = served_project
    began = datetime.now(UTC)
    _emit_threshold(settings, 60)
    with get_client(sync_client=True) as client:
        # Pending: the worker took the run and with it the deployment's only concurrency slot, held until the run
        # ends; the process then needs a while to start, so the second event lands well inside the first run.
        first = _wait(
            lambda: [r for r in served.deployment_runs(client, settings, "finetune") if r.state_name in ACTIVE],
            RUN_TIMEOUT,
            "a finetune run started by the threshold event",
        )
        assert len(served.deployment_runs(client, settings, "finetune")) == 1  # exactly one run for one event
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
        report = _artifacts(client, done.id)[f"{settings.project}-finetune-report"].data

    assert done.state.type == StateType.COMPLETED, done.state.message
    assert second.created < done.end_time  # the second event's run came while the first one ran ...
    assert second.state.type == StateType.CANCELLED and StateType.RUNNING not in second_states  # ... and never ran
    assert len(runs) == 2 and sum(r.state.type == StateType.COMPLETED for r in runs) == 1
    assert all(r.created >= began for r in runs)
    assert "depth: **head**" in report and "learning rates" in report and "[MLflow run](http" in report
    assert "promoted" in report  # promoted or not, and why
    # a promotion refreshes the open tasks' predictions in the same run (this project has no open task)
    assert "**not promoted**" in report or "open Label Studio tasks now pre-annotated by it: 0 changed" in report


def test_a_failing_network_task_is_retried_with_backoff(served_project: Settings, background_runs: dict):
    closed_port = background_runs["closed_port"]
    with get_client(sync_client=True) as client:
        run = served.wait_final(client, background_runs["refused"], timeout=RUN_TIMEOUT)
        [connect] = [t for t in _task_runs(client, run.id) if t.task_key.startswith("connect_label_studio")]
        states = client.read_task_run_states(connect.id)
    assert run.state.type == StateType.FAILED
    assert f"127.0.0.1:{closed_port}" in (connect.state.message or "") + str(run.state.message)
    names = [s.name for s in states]
    assert names.count("AwaitingRetry") == 2 and names.count("Retrying") == 2  # settings: task_retries=2
    assert [s.type for s in states].count(StateType.RUNNING) == 3  # three attempts
    assert connect.run_count == 3
    retries = [s for s in states if s.name == "AwaitingRetry"]
    waits = [(r.state_details.scheduled_time - r.timestamp).total_seconds() for r in retries]
    assert waits[1] > waits[0] > 0.3  # 0.5 s then 1 s, +-20% jitter


def test_a_bad_parameter_fails_the_run_at_once_with_a_clear_message(served_project: Settings, background_runs: dict):
    with pytest.raises(Exception, match="noise_rate"):  # out of bounds: the server refuses to create the run
        run_deployment(deploy.full_name("simulate", served_project), parameters={"noise_rate": 1.5}, timeout=0)
    with get_client(sync_client=True) as client:  # the override is checked when the run starts
        run = served.wait_final(client, background_runs["invalid"], timeout=RUN_TIMEOUT)
        task_runs = _task_runs(client, run.id)
    assert run.state.type == StateType.FAILED
    assert "Validation of flow parameters failed" in run.state.message
    assert "k_per_round" in run.state.message and "greater than or equal to 1" in run.state.message
    assert task_runs == [] and run.total_run_time < timedelta(seconds=5)


@pytest.fixture
def in_process(settings: Settings, monkeypatch: pytest.MonkeyPatch) -> Settings:
    """Flows run in this process with the test's settings (as a worker's run would get them) on the test server."""
    settings = settings.model_copy(update={"image_size": 32, "k_per_round": 12})
    for key, value in deploy.settings_env(settings).items():
        monkeypatch.setenv(key, value)
    with worker.prefect_api(settings):
        yield settings


def test_embedding_is_cached_by_input_hash_with_progress_and_the_round_report(in_process: Settings):
    from flows.flywheel_flows import bootstrap_flow, round_flow

    settings = in_process
    first = bootstrap_flow(pool_size=40, test_size=20, return_state=True)
    again = bootstrap_flow(pool_size=40, test_size=20, return_state=True)
    round_ = round_flow(return_state=True)
    with get_client(sync_client=True) as client:
        embeds = {
            name: [t.state.name for t in _task_runs(client, run.state_details.flow_run_id) if "embed_split" in t.name]
            for name, run in (("first", first), ("again", again))
        }
        first_artifacts = _artifacts(client, first.state_details.flow_run_id)
        round_artifacts = _artifacts(client, round_.state_details.flow_run_id)
    assert embeds == {"first": ["Completed", "Completed"], "again": ["Cached", "Cached"]}
    assert list(settings.results_dir.iterdir())  # the cached results persist under the workspace
    progress = first_artifacts[f"{settings.project}-embedding-pool"]
    assert progress.type == "progress" and progress.data == 100.0
    report = round_artifacts[f"{settings.project}-round-report"].data
    assert "# Round 1" in report and "labels per class" in report and "## Accuracy so far" in report
    assert "## Selected (10 best of 12" in report
    selection = json.loads(round_artifacts[f"{settings.project}-round-selection"].data)
    assert len(selection) == 12 and {"sample_id", "score"} <= set(selection[0])


def test_an_annotation_event_starts_a_sync_run(served_project: Settings, background_runs: dict):
    with get_client(sync_client=True) as client:
        [started] = _wait(
            lambda: [r for r in served.deployment_runs(client, served_project, "sync") if not r.auto_scheduled],
            60,
            "a sync run not from the interval schedule",
        )
        run = served.wait_final(client, started.id, timeout=RUN_TIMEOUT)
        report = _artifacts(client, run.id)[f"{served_project.project}-sync-report"].data
    assert run.state.type == StateType.COMPLETED, run.state.message
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
