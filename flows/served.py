"""`make demo-served`: the demo's loop, run through the deployments by the worker instead of in this process.

bootstrap, then rounds x (round -> simulate (the annotator) -> sync; when the sync emits
flywheel.labels.threshold-reached, the finetune deployment's trigger starts a fine-tune, which this waits for),
then a last round that trains on every label without selecting more. Also the helpers the deployment tests use
to watch runs and events.
"""

from __future__ import annotations

import argparse
import sys
import time
from datetime import UTC, datetime
from typing import Any
from uuid import UUID

from prefect.client.orchestration import SyncPrefectClient, get_client
from prefect.client.schemas.filters import FlowRunFilter, FlowRunFilterDeploymentId
from prefect.client.schemas.objects import FlowRun
from prefect.client.schemas.sorting import FlowRunSort
from prefect.deployments import run_deployment
from prefect.events.filters import (
    EventFilter,
    EventNameFilter,
    EventOccurredFilter,
    EventRelatedFilter,
    EventResourceFilter,
)
from prefect.events.schemas.events import ReceivedEvent

from flows import deploy, worker
from flows.common import THRESHOLD_REACHED, percent, project_resource_id, synchronously
from flywheel.catalog import Catalog
from flywheel.config import Settings, load_settings
from flywheel.devservers import services
from flywheel.errors import FlywheelError, exit_code_on_error


def ui_url(settings: Settings, path: str = "") -> str:
    return settings.prefect.api_url.removesuffix("/api") + path


def deployment_runs(client: SyncPrefectClient, settings: Settings, kind: str) -> list[FlowRun]:
    """Every run of one of this project's deployments, oldest first."""
    deployment = client.read_deployment_by_name(deploy.full_name(kind, settings))
    return client.read_flow_runs(
        flow_run_filter=FlowRunFilter(deployment_id=FlowRunFilterDeploymentId(any_=[deployment.id])),
        sort=FlowRunSort.START_TIME_ASC,
    )


def wait_final(client: SyncPrefectClient, run_id: UUID, *, timeout: float, poll_s: float = 1.0) -> FlowRun:
    """The flow run once it is Completed, Failed, Crashed or Cancelled."""
    deadline = time.monotonic() + timeout
    while True:
        run = client.read_flow_run(run_id)
        if run.state is not None and run.state.is_final():
            return run
        if time.monotonic() > deadline:
            raise FlywheelError(f"flow run {run.name} ({run_id}) still {run.state_name} after {timeout:.0f} s")
        time.sleep(poll_s)


def run(settings: Settings, kind: str, parameters: dict[str, Any] | None = None, *, timeout: float = 1800) -> FlowRun:
    """Start a run of one of this project's deployments and wait for it; raise unless it completes."""
    started = synchronously(run_deployment(deploy.full_name(kind, settings), parameters=parameters or {}, timeout=0))
    with get_client(sync_client=True) as client:
        done = wait_final(client, started.id, timeout=timeout)
    if not done.state or not done.state.is_completed():
        raise FlywheelError(
            f"{kind} run {done.name} ended {done.state_name}: {done.state.message if done.state else ''} "
            f"(see {ui_url(settings, f'/runs/flow-run/{done.id}')})"
        )
    return done


def threshold_events(
    client: SyncPrefectClient, since: datetime, *, project: str | None = None, flow_run_id: UUID | None = None
) -> list[ReceivedEvent]:
    """flywheel.labels.threshold-reached events since `since`, for a project and/or emitted by a flow run."""
    event_filter = EventFilter(
        occurred=EventOccurredFilter(since=since),
        event=EventNameFilter(name=[THRESHOLD_REACHED]),
        resource=EventResourceFilter(id=[project_resource_id(project)]) if project else None,
        related=EventRelatedFilter(id=[f"prefect.flow-run.{flow_run_id}"]) if flow_run_id else None,
    )
    return client.read_events(event_filter, limit=50).events  # 50: the server's largest page


def wait_for_finetunes(settings: Settings, since: datetime, *, timeout: float = 3600) -> list[FlowRun]:
    """Wait for the fine-tune a threshold event asked for to appear, then for every fine-tune run to end."""
    deadline = time.monotonic() + timeout
    with get_client(sync_client=True) as client:
        while True:
            runs = deployment_runs(client, settings, "finetune")
            new = [r for r in runs if r.created and r.created >= since]
            if new and all(r.state and r.state.is_final() for r in runs):
                return new
            if time.monotonic() > deadline:
                raise FlywheelError(f"no fine-tune finished within {timeout:.0f} s of the threshold event")
            time.sleep(2)


def demo(settings: Settings, *, rounds: int, pool_size: int, test_size: int, noise_rate: float) -> list[FlowRun]:
    """The loop through the deployments; returns the fine-tune runs the threshold events started."""
    run(settings, "bootstrap", {"source": "fashion-mnist", "pool_size": pool_size, "test_size": test_size})
    finetunes: list[FlowRun] = []
    for number in range(1, rounds + 1):
        run(settings, "round")
        run(settings, "simulate", {"noise_rate": noise_rate})
        began = datetime.now(UTC)
        synced = run(settings, "sync")
        with get_client(sync_client=True) as client:
            requested = threshold_events(client, began, flow_run_id=synced.id)
        print(f"round {number}/{rounds}: labelled and synced" + (", fine-tune requested" if requested else ""))
        if requested:
            finetunes += wait_for_finetunes(settings, began)
    run(settings, "round", {"select": False})
    return finetunes


@exit_code_on_error
def main(argv: list[str] | None = None) -> int:
    parser = argparse.ArgumentParser(prog="python -m flows.served", description=__doc__.splitlines()[0])
    parser.add_argument("--rounds", type=int, default=6)
    parser.add_argument("--pool-size", type=int, default=5000)
    parser.add_argument("--test-size", type=int, default=10000)
    parser.add_argument("--noise-rate", type=float, default=0.0)
    args = parser.parse_args(argv)
    settings = load_settings()
    services.start(settings)
    names = deploy.up(settings)
    print("deployments: " + ", ".join(names))
    began = time.monotonic()
    with worker.prefect_api(settings):
        finetunes = demo(
            settings, rounds=args.rounds, pool_size=args.pool_size, test_size=args.test_size,
            noise_rate=args.noise_rate,
        )  # fmt: skip
    for r in Catalog(settings.catalog_url).rounds():
        print(f"round {r.id}: {r.n_labels} labels, model version {r.model_version or '-'}, "
              f"test accuracy {percent(r.test_accuracy)}")  # fmt: skip
    for f in finetunes:
        print(f"fine-tune run {f.name}: {f.state_name}")
    print(f"done in {time.monotonic() - began:.0f} s. In the Prefect UI ({ui_url(settings)}):")
    print(f"  runs (round, simulate, sync, and the fine-tunes the trigger started): {ui_url(settings, '/runs')}")
    print(f"  deployments, schedules and triggers: {ui_url(settings, '/deployments')}")
    print(f"  round / sync / fine-tune reports and embedding progress: {ui_url(settings, '/artifacts')}")
    print(f"  events (annotations, threshold reached): {ui_url(settings, '/events')}")
    print("the worker and servers keep running (the round runs on its cron); `make stop` ends them")
    return 0


if __name__ == "__main__":
    sys.exit(main())
