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
from pathlib import Path

from flywheel.config import Settings, load_settings
from flywheel.devservers import log_tail
from flywheel.devservers.services import deployed_marker, kill_group, spawn_detached, worker_files, worker_pid
from flywheel.errors import FlywheelError, exit_code_on_error
from flywheel.health import require_healthy

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
    for line in crash_orphaned_runs(settings):
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


def crash_orphaned_runs(settings: Settings) -> list[str]:
    """Mark Crashed the runs a dead predecessor of this worker left Pending, Running or Cancelling.

    A killed worker reports nothing: its runs would stay Running, holding their deployment's concurrency slot
    until the lease lapses (5 minutes), so the next scheduled round would wait in silence. Only runs labelled
    with this worker's name (one per host, workspace and pool) whose process is gone are touched; called when no
    worker of that name runs here. Forcing the state releases the slot. Returns one line per run crashed."""
    from prefect.client.orchestration import get_client
    from prefect.client.schemas.filters import (
        FlowRunFilter,
        FlowRunFilterState,
        FlowRunFilterStateType,
        WorkPoolFilter,
        WorkPoolFilterName,
    )
    from prefect.client.schemas.objects import StateType
    from prefect.states import Crashed

    unfinished = FlowRunFilterStateType(any_=[StateType.PENDING, StateType.RUNNING, StateType.CANCELLING])
    crashed = []
    with prefect_api(settings), get_client(sync_client=True) as client:
        runs = client.read_flow_runs(
            flow_run_filter=FlowRunFilter(state=FlowRunFilterState(type=unfinished)),
            work_pool_filter=WorkPoolFilter(name=WorkPoolFilterName(any_=[settings.prefect.work_pool])),
        )
        for run in runs:
            if run.labels.get("prefect.worker.name") != worker_name(settings) or _alive(run.infrastructure_pid):
                continue
            why = f"its worker {worker_name(settings)} died (process {run.infrastructure_pid or 'not started'} gone)"
            client.set_flow_run_state(run.id, Crashed(message=why), force=True)
            crashed.append(f"flow run {run.name} ({run.state_name}) marked Crashed: {why}")
    return crashed


def _alive(pid: str | None) -> bool:
    """A process of this host with that pid exists (the process worker records the bare pid)."""
    if not pid or not pid.isdigit():
        return False
    try:
        os.kill(int(pid), 0)
    except ProcessLookupError:
        return False
    except PermissionError:
        return True
    return True


def stop_worker(settings: Settings) -> bool:
    """Stop this workspace's worker (and the flow runs it started); False when none was running."""
    pid = worker_pid(settings)
    if pid is not None:
        kill_group(pid, grace=20)
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
