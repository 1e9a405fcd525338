"""The flywheel as Prefect deployments on a work pool: it runs by itself, the way Prefect users run production flows.

| deployment          | flow         | starts                                              | concurrency (per project) |
|---------------------|--------------|-----------------------------------------------------|---------------------------|
| bootstrap-<project> | bootstrap    | by hand                                             | -                         |
| round-<project>     | round        | cron `prefect.round_cron` in `prefect.timezone`     | 1; later ones queue       |
| sync-<project>      | sync         | every `prefect.sync_interval_s` s, and on           | 1; later ones queue       |
|                     |              | flywheel.labels.changed (the webhook receiver's,    |                           |
|                     |              | at most one per `webhook.sync_every_s`)             |                           |
| finetune-<project>  | finetune     | flywheel.labels.threshold-reached (emitted by sync) | 1; a second is cancelled  |
| simulate-<project>  | annotate-sim | by hand: the simulated annotator answers open tasks | -                         |

Deployments are named per project, so their concurrency limits and event triggers (matching the resource
`flywheel.project.<project>`) are per project. Across deployments, the steps that write (bootstrap, round,
sync, fine-tune) take the project's global concurrency limit `flywheel-<project>` (1 slot): a round due
during a fine-tune waits for it instead of failing on the project lock.

Runs get the deploying settings, secrets left out, as FLYWHEEL_* variables in the work pool's `env` job
variable; secrets come from the worker's own environment (or Prefect Secret blocks, settings.secret_blocks).

    python -m flows.deploy up [--no-worker] [--code-dir DIR]   # work pool, deployments, worker (flows/worker.py)
    python -m flows.deploy status
"""

from __future__ import annotations

import argparse
import inspect
import json
import sys
from pathlib import Path
from typing import Any
from zoneinfo import ZoneInfo, ZoneInfoNotFoundError

from prefect import Flow
from prefect.client.orchestration import get_client
from prefect.client.schemas.actions import WorkPoolCreate
from prefect.client.schemas.objects import ConcurrencyLimitConfig, ConcurrencyLimitStrategy
from prefect.client.schemas.schedules import SCHEDULE_TYPES, CronSchedule, IntervalSchedule
from prefect.deployments.runner import RunnerDeployment
from prefect.events import DeploymentEventTrigger, EventTrigger
from prefect.exceptions import ObjectNotFound
from prefect.runner.storage import LocalStorage
from prefect.schedules import Cron, Schedule
from prefect.workers.process import ProcessWorker
from pydantic import BaseModel, SecretStr
from pydantic_core import to_jsonable_python

from flows.common import (
    THRESHOLD_REACHED,
    ensure_project_limit,
    project_resource_id,
    synchronously,
)
from flows.flywheel_flows import annotate_sim_flow, bootstrap_flow, finetune_flow, round_flow, sync_flow
from flows.worker import REPO, prefect_api, start_worker
from flows.worker import describe as describe_worker
from flywheel.app.webhook import LABELS_CHANGED
from flywheel.config import Settings, load_settings
from flywheel.devservers.services import deployed_marker
from flywheel.errors import ConfigError, exit_code_on_error

KINDS = ("bootstrap", "round", "sync", "finetune", "simulate")
FLOWS: dict[str, Flow] = {
    "bootstrap": bootstrap_flow,
    "round": round_flow,
    "sync": sync_flow,
    "finetune": finetune_flow,
    "simulate": annotate_sim_flow,
}
QUEUE = ConcurrencyLimitConfig(limit=1, collision_strategy=ConcurrencyLimitStrategy.ENQUEUE)
CANCEL_NEW = ConcurrencyLimitConfig(limit=1, collision_strategy=ConcurrencyLimitStrategy.CANCEL_NEW)


def deployment_name(kind: str, settings: Settings) -> str:
    return f"{kind}-{settings.project}"


def full_name(kind: str, settings: Settings) -> str:
    """`<flow>/<deployment>`, as `prefect deployment run` and run_deployment take it."""
    return f"{FLOWS[kind].name}/{deployment_name(kind, settings)}"


def _public(model: BaseModel) -> dict[str, Any]:
    """A settings model as JSON-able values, every SecretStr left out."""
    out: dict[str, Any] = {}
    for name in type(model).model_fields:
        value = getattr(model, name)
        if isinstance(value, BaseModel):
            out[name] = _public(value)
        elif not isinstance(value, SecretStr):
            out[name] = to_jsonable_python(value)
    return out


def settings_env(settings: Settings) -> dict[str, str]:
    """The settings as FLYWHEEL_* variables (sections as JSON), secrets left out: load_settings() in a run
    started with them gives back these settings. The backbone only when something set it: a default must not
    move a project off the backbone it was set up with (flywheel.features.embedded.active_settings)."""
    public = _public(settings)
    if "backbone" not in settings.model_fields_set:
        del public["backbone"]
    return {
        f"FLYWHEEL_{name.upper()}": value if isinstance(value, str) else json.dumps(value)
        for name, value in public.items()
    }


def _round_schedule(settings: Settings) -> Schedule:
    """The round's cron schedule; a bad cron string or time zone names the setting."""
    pf = settings.prefect
    try:
        ZoneInfo(pf.timezone)
        return Cron(pf.round_cron, timezone=pf.timezone)
    except (ValueError, ZoneInfoNotFoundError) as exc:
        raise ConfigError(f"prefect.round_cron {pf.round_cron!r} in prefect.timezone {pf.timezone!r}: {exc}") from exc


def build_deployments(settings: Settings, *, code_dir: Path = REPO) -> list[RunnerDeployment]:
    """The five deployments of this project; `code_dir` is where the repository lives for the worker."""
    pf, project = settings.prefect, settings.project
    on_project = {"prefect.resource.id": project_resource_id(project)}
    specific: dict[str, dict[str, Any]] = {
        "bootstrap": {},
        "round": {"schedules": [_round_schedule(settings)], "concurrency_limit": QUEUE},
        "sync": {
            "interval": pf.sync_interval_s,
            "parameters": {"finetune_when_due": False},  # the finetune deployment's trigger runs it
            "triggers": [
                DeploymentEventTrigger(name=f"sync {project} on annotations", expect={LABELS_CHANGED}, match=on_project)
            ],
            "concurrency_limit": QUEUE,
        },
        "finetune": {
            "triggers": [
                DeploymentEventTrigger(
                    name=f"finetune {project} on threshold", expect={THRESHOLD_REACHED}, match=on_project, threshold=1
                )
            ],
            "concurrency_limit": CANCEL_NEW,
        },
        "simulate": {},
    }
    deployments = []
    for kind in KINDS:
        flow = FLOWS[kind]
        deployment = synchronously(
            flow.to_deployment(
                name=deployment_name(kind, settings),
                work_pool_name=pf.work_pool,
                job_variables={"env": settings_env(settings)},
                tags=["flywheel", f"project:{project}"],
                description=f"flywheel {kind} for project {project!r}: {inspect.getdoc(flow.fn) or flow.name}",
                **specific[kind],
            )
        )
        deployment.storage = LocalStorage(path=str(code_dir))  # pull step: set_working_directory(code_dir)
        deployment.entrypoint = f"{Path(inspect.getfile(flow.fn)).relative_to(REPO)}:{flow.fn.__name__}"
        deployments.append(deployment)
    return deployments


def ensure_work_pool(settings: Settings) -> None:
    """Create the process work pool (default job template) unless it exists."""
    with get_client(sync_client=True) as client:
        try:
            client.read_work_pool(settings.prefect.work_pool)
        except ObjectNotFound:
            template = ProcessWorker.get_default_base_job_template()
            client.create_work_pool(
                WorkPoolCreate(name=settings.prefect.work_pool, type="process", base_job_template=template)
            )


def apply(settings: Settings, *, code_dir: Path = REPO) -> list[str]:
    """Create or update the work pool and the deployments; returns their full names."""
    with prefect_api(settings):
        ensure_work_pool(settings)
        ensure_project_limit(settings)
        for deployment in build_deployments(settings, code_dir=code_dir):
            deployment.apply(work_pool_name=settings.prefect.work_pool)
    return [full_name(kind, settings) for kind in KINDS]


def up(settings: Settings, *, worker: bool = True, code_dir: Path = REPO) -> list[str]:
    """The deployments, and (unless another machine runs it) this workspace's worker: marked, so `make services`
    brings the worker back with the servers and `flywheel services status` reports it."""
    names = apply(settings, code_dir=code_dir)
    if worker:
        marker = deployed_marker(settings)
        marker.parent.mkdir(parents=True, exist_ok=True)
        marker.write_text("\n".join(names) + "\n")
        start_worker(settings)
    return names


# --- command line --------------------------------------------------------------------------------


def describe(settings: Settings) -> list[dict[str, str]]:
    """Each deployment as the server holds it: schedules, triggers, concurrency."""
    rows = []
    with prefect_api(settings), get_client(sync_client=True) as client:
        for kind in KINDS:
            try:
                deployment = client.read_deployment_by_name(full_name(kind, settings))
            except ObjectNotFound:
                rows.append({"deployment": full_name(kind, settings), "starts": "not deployed", "concurrency": ""})
                continue
            starts = [_describe_schedule(s.schedule) for s in deployment.schedules]
            automations = client.read_resource_related_automations(f"prefect.deployment.{deployment.id}")
            starts += [
                f"on {', '.join(sorted(a.trigger.expect))}" for a in automations if isinstance(a.trigger, EventTrigger)
            ]
            limit, options = deployment.global_concurrency_limit, deployment.concurrency_options
            concurrency = f"{limit.limit}, {options.collision_strategy.value.lower()}" if limit and options else "-"
            rows.append({"deployment": full_name(kind, settings), "starts": "; ".join(starts) or "by hand",
                         "concurrency": concurrency})  # fmt: skip
    return rows


def _describe_schedule(schedule: SCHEDULE_TYPES) -> str:
    if isinstance(schedule, CronSchedule):
        return f"cron {schedule.cron} {schedule.timezone}"
    if isinstance(schedule, IntervalSchedule):
        return f"every {schedule.interval.total_seconds():g} s"
    return str(schedule)


@exit_code_on_error
def main(argv: list[str] | None = None) -> int:
    parser = argparse.ArgumentParser(prog="python -m flows.deploy", description=__doc__.splitlines()[0])
    parser.add_argument("command", choices=("up", "status"))
    parser.add_argument("--no-worker", action="store_true", help="up: deployments only (a worker runs elsewhere)")
    parser.add_argument("--code-dir", type=Path, default=REPO, help="up: where the worker finds this repository")
    args = parser.parse_args(argv)
    settings = load_settings()
    if args.command == "up":
        up(settings, worker=not args.no_worker, code_dir=args.code_dir)
    for row in describe(settings):
        print(f"{row['deployment']:34s} {row['starts']:70s} {row['concurrency']}")
    print(describe_worker(settings))
    ui = settings.prefect.api_url.removesuffix("/api")
    print(f"Prefect UI: {ui}/deployments (runs: {ui}/runs, artifacts: {ui}/artifacts)")
    return 0


if __name__ == "__main__":
    sys.exit(main())
