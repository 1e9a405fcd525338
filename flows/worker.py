"""The process worker that runs the deployments' flow runs: detached, one per (workspace, work pool).

Like the servers (flywheel/devservers/services.py) it outlives the command that started it, logs to
`<workspace>/logs/worker-<pool>.log` and records its pid (= process group, so its flow runs stop with it)
in `<workspace>/run/worker-<pool>.pid`. Light on imports, so `make stop` stays quick.

    python -m flows.worker start|stop|status|restore   # restore: start it if this workspace has deployments
"""

from __future__ import annotations

import argparse
import hashlib
import os
import socket
import sys
import time
from collections.abc import Iterator
from contextlib import contextmanager
from datetime import UTC, datetime
from pathlib import Path
from typing import TYPE_CHECKING

from flywheel.config import Settings, load_settings
from flywheel.devservers import log_tail
from flywheel.devservers.services import alive, deployed_marker, kill_group, spawn_detached, worker_files, worker_pid
from flywheel.errors import FlywheelError, exit_code_on_error
from flywheel.health import require_healthy

if TYPE_CHECKING:
    from prefect.client.orchestration import SyncPrefectClient
    from prefect.client.schemas.objects import FlowRun

UNCLAIMED_S = 15.0  # a live worker labels a run it took within a second or two of taking it
REPO = Path(__file__).resolve().parents[1]
PREFECT = Path(sys.executable).parent / "prefect"


@contextmanager
def prefect_api(settings: Settings) -> Iterator[None]:
    """Talk to the Prefect server from the settings (checked first, so a down server fails clearly)."""
    from prefect.settings import PREFECT_API_URL, temporary_settings

    require_healthy("Prefect", settings.prefect.api_url)
    with temporary_settings({PREFECT_API_URL: settings.prefect.api_url}):
        yield


def worker_name(settings: Settings) -> str:
    """One name per (host, workspace, pool): a restarted worker takes its predecessor's place."""
    where = hashlib.sha256(f"{socket.gethostname()}:{settings.workspace}".encode()).hexdigest()[:8]
    return f"flywheel-{settings.prefect.work_pool}-{where}"


def start_worker(settings: Settings, *, timeout: float = 90) -> int:
    """Start (or reuse) a process worker for the pool, detached, and wait until the server has seen it."""
    from prefect.client.orchestration import get_client

    pid = worker_pid(settings)
    if pid is not None:
        return pid
    for line in end_runs_of_worker(settings, f"its worker {worker_name(settings)} died; a new one started"):
        print(line, file=sys.stderr, flush=True)
    pid_file, log = worker_files(settings)
    pool = settings.prefect.work_pool
    argv = [str(PREFECT), "worker", "start", "--pool", pool, "--type", "process", "--name", worker_name(settings)]
    env = {
        **os.environ,
        "PREFECT_API_URL": settings.prefect.api_url,
        "PREFECT_WORKER_QUERY_SECONDS": str(settings.prefect.worker_poll_s),
        "PREFECT_WORKER_HEARTBEAT_SECONDS": str(max(settings.prefect.worker_poll_s, 5.0)),
    }
    proc = spawn_detached(argv, env, REPO, log, pid_file)
    deadline = time.monotonic() + timeout
    with prefect_api(settings), get_client(sync_client=True) as client:
        while True:
            workers = client.read_workers_for_work_pool(pool)
            if any(w.name == worker_name(settings) and w.status == "ONLINE" for w in workers):
                return proc.pid
            if proc.poll() is not None or time.monotonic() > deadline:
                state = f"exited with code {proc.returncode}" if proc.poll() is not None else f"silent for {timeout} s"
                raise FlywheelError(f"the Prefect worker for pool {pool} {state}; {log_tail(log)}")
            time.sleep(0.5)


def end_runs_of_worker(settings: Settings, why: str) -> list[str]:
    """Stop and mark Crashed the runs this worker name started that are still Pending, Running or Cancelling.

    Called when no worker of that name (one per host, workspace and pool) runs here: a killed predecessor's runs
    would otherwise stay Running, each holding its deployment's concurrency slot until the lease lapses (5
    minutes), and the next scheduled round would wait in silence. The process worker starts each run in a
    session of its own, so a run can outlive its worker: such a process is stopped too (TERM, then KILL), as
    `make stop` means. A run a worker took but died before labelling (Pending, no worker name) counts as ours
    once it has been so for UNCLAIMED_S. Forcing Crashed releases the slot. Returns one line per run."""
    from prefect.client.orchestration import get_client
    from prefect.states import Crashed

    ended = []
    with prefect_api(settings), get_client(sync_client=True) as client:
        runs = _unfinished_runs(client, settings.prefect.work_pool)
        if unclaimed := [age for run in runs if (age := _unclaimed_for(run)) is not None]:
            time.sleep(max(0.0, UNCLAIMED_S - min(unclaimed)))  # a live worker elsewhere labels it meanwhile
            runs = _unfinished_runs(client, settings.prefect.work_pool)
        for run in runs:
            if not _is_ours(run, worker_name(settings)):
                continue
            recorded = run.infrastructure_pid or ""
            pid = int(recorded) if recorded.isdigit() else None
            if pid is not None and alive(pid):
                kill_group(pid, grace=10)
            client.set_flow_run_state(run.id, Crashed(message=why), force=True)
            ended.append(f"flow run {run.name} ({run.state_name}, process {pid or 'not started'}) ended: {why}")
    return ended


def _is_ours(run: FlowRun, name: str) -> bool:
    """Labelled with this worker's name, or taken by a worker that died before labelling it (unclaimed long
    enough that no live worker is about to)."""
    age = _unclaimed_for(run)
    return run.labels.get("prefect.worker.name") == name or (age is not None and age >= UNCLAIMED_S)


def _unclaimed_for(run: FlowRun) -> float | None:
    """Seconds a run has been Pending without a worker's label (None when it has one, or is not Pending)."""
    if run.labels.get("prefect.worker.name") or run.state is None or run.state.type.value != "PENDING":
        return None
    return (datetime.now(UTC) - run.state.timestamp).total_seconds()


def _unfinished_runs(client: SyncPrefectClient, pool: str) -> list[FlowRun]:
    from prefect.client.schemas.filters import (
        FlowRunFilter,
        FlowRunFilterState,
        FlowRunFilterStateType,
        WorkPoolFilter,
        WorkPoolFilterName,
    )
    from prefect.client.schemas.objects import StateType

    unfinished = FlowRunFilterStateType(any_=[StateType.PENDING, StateType.RUNNING, StateType.CANCELLING])
    return client.read_flow_runs(
        flow_run_filter=FlowRunFilter(state=FlowRunFilterState(type=unfinished)),
        work_pool_filter=WorkPoolFilter(name=WorkPoolFilterName(any_=[pool])),
    )


def stop_worker(settings: Settings) -> bool:
    """Stop this workspace's worker (and the flow runs it started); False when none was running."""
    pid = worker_pid(settings)
    if pid is not None:
        kill_group(pid, grace=20)
        try:
            ended = end_runs_of_worker(settings, f"stopped with its worker {worker_name(settings)}")
        except FlywheelError as exc:  # Prefect is down: the next worker's start ends them
            ended = [f"its runs are left to the next worker: {exc}"]
        for line in ended:
            print(line, file=sys.stderr, flush=True)
    worker_files(settings)[0].unlink(missing_ok=True)
    return pid is not None


def describe(settings: Settings) -> str:
    pid = worker_pid(settings)
    state = f"pid {pid}" if pid else "not running"
    return f"worker for pool {settings.prefect.work_pool}: {state} (log {worker_files(settings)[1]})"


@exit_code_on_error
def main(argv: list[str] | None = None) -> int:
    parser = argparse.ArgumentParser(prog="python -m flows.worker", description=__doc__.splitlines()[0])
    parser.add_argument("command", choices=("start", "stop", "status", "restore"))
    args = parser.parse_args(argv)
    settings = load_settings()
    if args.command == "restore":  # `make services`: the worker of a deployed workspace comes back with the servers
        if not deployed_marker(settings).exists():
            return 0
        start_worker(settings)
    elif args.command == "start":
        start_worker(settings)
    elif args.command == "stop":
        stopped = "stopped" if stop_worker(settings) else "none was running"
        print(f"worker for pool {settings.prefect.work_pool} from {settings.workspace}: {stopped}")
        return 0
    print(describe(settings))
    return 0


if __name__ == "__main__":
    sys.exit(main())
