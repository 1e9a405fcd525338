"""48 simulated hours of the flywheel left alone: the deployments and their worker, hourly rounds (run as the
cron would, time compressed), annotators who sometimes idle, a sync after each hour as the interval schedule
would, and the fine-tunes the threshold event starts.

    .venv/bin/python bench/soak.py [--hours 48] [--pool-size 600] [--k 20] [--max-open 40] [--idle 0.35]

It counts what a team would find after two days: model versions against the distinct label states the rounds
saw (one version each, none for a round without new labels), the open tasks after every round against
label_studio.max_open_tasks, and the fine-tunes against the label states they trained on (none twice).
Writes bench/results/soak.json and soak.md. Needs the servers (`make services`); uses its own workspace.
"""

from __future__ import annotations

import argparse
import json
import os
import sys
import time
from dataclasses import asdict, dataclass, field
from datetime import UTC, datetime
from pathlib import Path

import numpy as np
from prefect.client.orchestration import get_client

from bench.results_files import command_line, write_results
from flows import deploy, served, worker
from flywheel import labelstudio
from flywheel.catalog import Catalog
from flywheel.config import Settings, load_settings
from flywheel.devservers import services
from flywheel.labelstudio import annotator
from flywheel.loop import schedule
from flywheel.registry import tracking

REPO = Path(__file__).resolve().parents[1]


@dataclass
class Hour:
    hour: int
    labels: int
    label_state: str
    round_version: str | None
    pushed: int
    open_tasks: int
    annotated: int
    finetune_due: bool


@dataclass
class Soak:
    hours: list[Hour] = field(default_factory=list)
    seconds: float = 0.0


def soak_settings(args: argparse.Namespace) -> Settings:
    return load_settings(
        workspace=REPO / ".flywheel-soak",
        project="soak" + os.urandom(3).hex(),
        image_size=32,
        k_per_round=args.k,
        label_studio={"max_open_tasks": args.max_open},
        prefect={"work_pool": "flywheel-soak", "worker_poll_s": 1, "round_cron": "0 0 1 1 *"},  # rounds: by us
        finetune={"min_labels": args.finetune_min, "every_new_labels": args.finetune_every, "epochs": 2,
                  "head_epochs": 1, "domain": "near", "backbones": ["efficientnet_lite0"], "device": "cpu"},
    )  # fmt: skip


def run_hours(settings: Settings, args: argparse.Namespace) -> Soak:
    catalog = Catalog(settings.catalog_url)
    ls = labelstudio.connect(settings)
    rng = np.random.default_rng(args.seed)
    result = Soak()
    began = time.monotonic()
    served.run(settings, "bootstrap", {"source": "fashion-mnist", "pool_size": args.pool_size, "test_size": 200})
    project_id = labelstudio.ensure_project(ls, settings, catalog, catalog.classes())
    for hour in range(1, args.hours + 1):
        state = schedule.label_state(catalog.labels())
        served.run(settings, "round")
        last = catalog.rounds()[-1]
        busy = rng.random() >= args.idle  # an idle hour: nobody labels anything
        want = int(rng.integers(1, int(1.5 * args.k) + 1)) if busy else 0
        answered = annotator.annotate_open_tasks(ls, catalog, project_id, rng=rng, limit=want) if want else 0
        sync_began = datetime.now(UTC)
        synced = served.run(settings, "sync")
        with get_client(sync_client=True) as client:
            requested = bool(served.threshold_events(client, sync_began, flow_run_id=synced.id))
        result.hours.append(
            Hour(hour, state.n_labels, state.digest, last.model_version, last.n_selected, catalog.open_task_count(),
                 answered, requested)
        )  # fmt: skip
        print(f"hour {hour:2d}: {state.n_labels} labels, version {last.model_version or '-'}, pushed "
              f"{last.n_selected}, open {catalog.open_task_count()}, annotated {answered}"
              + (", fine-tune requested" if requested else ""), flush=True)  # fmt: skip
    result.seconds = round(time.monotonic() - began, 1)
    return result


def verdict(settings: Settings, result: Soak, max_open: int) -> dict[str, object]:
    client = tracking.connect(settings)
    versions = client.search_model_versions(f"name='{settings.registered_model_name}'")
    heads = [v for v in versions if v.tags.get("kind") == "head"]
    finetunes = [v for v in versions if v.tags.get("kind") == "finetune"]
    trained_states = {h.label_state for h in result.hours if h.round_version is not None}
    finetune_states = [client.get_run(v.run_id).data.params.get("n_labels") for v in finetunes if v.run_id]
    return {
        "hours": len(result.hours),
        "distinct_label_states_at_rounds": len({h.label_state for h in result.hours}),
        "label_states_that_trained": len(trained_states),
        "head_versions": len(heads),
        "one_version_per_label_state": len(heads) == len(trained_states),
        "idle_hours": sum(1 for h in result.hours if h.annotated == 0),
        "max_open_tasks_seen": max(h.open_tasks for h in result.hours),
        "open_tasks_cap": max_open,
        "open_tasks_within_cap": all(h.open_tasks <= max_open for h in result.hours),
        "finetune_versions": len(finetunes),
        "finetune_label_counts": finetune_states,
        "no_duplicate_finetune": len(set(finetune_states)) == len(finetune_states),
        "seconds": result.seconds,
    }


def markdown(summary: dict[str, object], result: Soak, command: str) -> list[str]:
    return [
        f"# Soak: {summary['hours']} simulated hours left alone",
        "",
        f"`{command}`",
        "",
        *(f"- {key}: **{value}**" for key, value in summary.items()),
        "",
        "| hour | labels | round's version | pushed | open tasks | annotated | fine-tune requested |",
        "|---|---|---|---|---|---|---|",
        *(
            f"| {h.hour} | {h.labels} | {h.round_version or '-'} | {h.pushed} | {h.open_tasks} | {h.annotated} | "
            f"{'yes' if h.finetune_due else ''} |"
            for h in result.hours
        ),
    ]


def main(argv: list[str] | None = None) -> int:
    parser = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    parser.add_argument("--hours", type=int, default=48)
    parser.add_argument("--pool-size", type=int, default=600)
    parser.add_argument("--k", type=int, default=20, help="k_per_round")
    parser.add_argument("--max-open", type=int, default=40, help="label_studio.max_open_tasks")
    parser.add_argument("--idle", type=float, default=0.35, help="chance that nobody labels in an hour")
    parser.add_argument("--finetune-min", type=int, default=100)
    parser.add_argument("--finetune-every", type=int, default=150)
    parser.add_argument("--seed", type=int, default=0)
    parser.add_argument("--out", default=str(REPO / "bench" / "results" / "soak"), help="path stem")
    parser.add_argument("--note", default="", help="a sentence on the run, printed under the results")
    args = parser.parse_args(argv)
    settings = soak_settings(args)
    services.start(settings)
    deploy.up(settings)
    try:
        with worker.prefect_api(settings):
            result = run_hours(settings, args)
        summary = verdict(settings, result, args.max_open)
    finally:
        worker.stop_worker(settings)
    command = command_line("bench/soak.py", sys.argv[1:] if argv is None else argv)
    meta = {"command": command, "summary": summary, "note": args.note}
    write_results(Path(args.out), meta, [asdict(h) for h in result.hours], markdown(summary, result, command))
    print(json.dumps(summary, indent=2))
    checks = ("one_version_per_label_state", "open_tasks_within_cap", "no_duplicate_finetune")
    return 0 if all(summary[check] for check in checks) else 1


if __name__ == "__main__":
    sys.exit(main())
