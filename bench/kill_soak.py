"""Kills at any instant: the loop's steps (round, simulated annotations, sync, fine-tune) run one after another
while a seeded killer sends SIGKILL at a random moment of most of them, up to three times in a row. After the
kills the same step runs again to its end (the restart), and after every kill and every step the invariants
are checked:

- the catalog opens, and no sample has two tasks in Label Studio; every catalog task is in Label Studio;
- after a completed sync, the catalog's labels are exactly the annotations in Label Studio (none lost or doubled);
- every stored file with a checksum verifies;
- the champion alias, when set, points at a registered version;
- the restarted step got going: its wall time, and with `--target worker` the seconds its flow run waited
  between being created and running, are recorded (a slot or lock a dead run held must not make it wait).

`--target cli` kills the CLI command (its process group); `--target worker` runs the steps as the project's
Prefect deployments and kills the *worker* with the flow run it started, then starts a new worker, as
`make services` would. `--restarts` then stops and starts Label Studio, MLflow and (with `--catalog postgres`)
PostgreSQL in the middle of a round: the round either finishes or fails naming the server, and the next one
finishes with the invariants intact.

    .venv/bin/python -m bench.kill_soak [--target cli|worker] [--kills 50] [--kill-within 20] [--seed 7]
                                        [--pool-size 300] [--catalog sqlite|postgres] [--restarts]

A deployment run spends its first 20 s or so starting its process (Pending, then Running), so with
`--target worker` a `--kill-within` of 50 spreads the kills over the runs' whole life.

Starts servers of its own on ports 200 above the demo's (Label Studio 8280, MLflow 5200, Prefect 4400,
PostgreSQL 5633) in its own workspace, and stops them at the end. Writes bench/results/kill-soak[-worker].md/.json.
"""

from __future__ import annotations

import argparse
import contextlib
import json
import os
import random
import signal
import subprocess
import sys
import time
from collections import Counter
from pathlib import Path
from typing import Any

from prefect.client.orchestration import get_client
from prefect.deployments import run_deployment

from flows import deploy, worker
from flows.common import synchronously
from flywheel import atomic, labelstudio
from flywheel.catalog import Catalog
from flywheel.config import Settings, load_settings
from flywheel.devservers import postgres, services
from flywheel.devservers.services import worker_pid
from flywheel.labelstudio.client import list_tasks, task_sample_id
from flywheel.labelstudio.interface import result_choices
from flywheel.registry import tracking

REPO = Path(__file__).resolve().parents[1]
RESULTS = REPO / "bench" / "results"
CYCLE = (["round"], ["annotate-sim"], ["sync", "--no-finetune"], ["round"], ["annotate-sim"], ["sync"], ["finetune"])
DEPLOYED = {"round": "round", "sync": "sync", "finetune": "finetune"}  # --target worker: the rest run as commands
PORTS = {"LABEL_STUDIO__PORT": 8280, "MLFLOW__PORT": 5200, "PREFECT__PORT": 4400, "POSTGRES__PORT": 5633}
RUN_TIMEOUT = 1800.0


def run(command: list[str], env: dict[str, str], *, kill_after: float | None) -> tuple[str, float]:
    """Run `flywheel <command>`; SIGKILL its process group after `kill_after` s when given. -> (outcome, s)."""
    started = time.monotonic()
    process = subprocess.Popen(
        [sys.executable, "-m", "flywheel.app.cli", *command], env=env, start_new_session=True,
        stdout=subprocess.PIPE, stderr=subprocess.STDOUT, text=True,
    )  # fmt: skip
    try:
        output, _ = process.communicate(timeout=kill_after)
    except subprocess.TimeoutExpired:
        os.killpg(process.pid, signal.SIGKILL)
        process.communicate()
        return "killed", time.monotonic() - started
    if process.returncode != 0:
        raise RuntimeError(f"flywheel {' '.join(command)} failed ({process.returncode}):\n{output[-3000:]}")
    return "done", time.monotonic() - started


def run_deployed(settings: Settings, kind: str, *, kill_after: float | None) -> tuple[str, float, float | None]:
    """Run one of the project's deployments; when `kill_after` is given and the run is still going that many
    seconds after it was created, SIGKILL the worker (with its flow run) and start a new worker.
    -> (outcome, seconds, seconds the run waited between created and running; None when killed)."""
    started = time.monotonic()
    run_id = synchronously(run_deployment(deploy.full_name(kind, settings), timeout=0)).id
    with get_client(sync_client=True) as client:
        while (run := client.read_flow_run(run_id)).state is None or not run.state.is_final():
            if kill_after is not None and time.monotonic() - started > kill_after and run.state_name != "Scheduled":
                restart_worker(settings, run.infrastructure_pid)
                return "killed", time.monotonic() - started, None
            if time.monotonic() - started > RUN_TIMEOUT:
                raise RuntimeError(f"{kind} run {run.name} still {run.state_name} after {RUN_TIMEOUT:.0f} s")
            time.sleep(0.5)
    if not run.state.is_completed():
        raise RuntimeError(f"{kind} run {run.name} ended {run.state_name}: {run.state.message}")
    assert run.start_time is not None
    return "done", time.monotonic() - started, (run.start_time - run.created).total_seconds() if run.created else None


def restart_worker(settings: Settings, run_pid: str | None) -> None:
    """Kill the worker with its run (below), then start a new one, as `make services` would."""
    kill_worker_and_run(settings, int(run_pid) if run_pid and run_pid.isdigit() else None)
    worker.start_worker(settings)


def kill_worker_and_run(settings: Settings, run_pid: int | None) -> None:
    """SIGKILL the worker's process group and its flow run's (the process worker starts it in a session of its
    own): nobody is left to report the run's end, as after the OOM killer or a lost host. Returns once the worker
    is gone."""
    for group in (worker_pid(settings), run_pid):
        if group is not None:
            with contextlib.suppress(ProcessLookupError):
                os.killpg(group, signal.SIGKILL)
    deadline = time.monotonic() + 30
    while worker_pid(settings) is not None:
        if time.monotonic() > deadline:
            raise RuntimeError(f"the worker of pool {settings.prefect.work_pool} outlived its SIGKILL by 30 s")
        time.sleep(0.2)


def step(settings: Settings, command: list[str], env: dict[str, str], args: argparse.Namespace,
         kill_after: float | None) -> tuple[str, float, float | None]:  # fmt: skip
    """One step of the cycle, as a deployment run (`--target worker`) or a command."""
    if args.target == "worker" and command[0] in DEPLOYED:
        return run_deployed(settings, DEPLOYED[command[0]], kill_after=kill_after)
    if args.target == "worker" and kill_after is not None:  # the worker's soak kills only the worker
        return "skipped", 0.0, None
    outcome, seconds = run(command, env, kill_after=kill_after)
    return outcome, seconds, None


def invariants(settings: Settings, *, after_sync: bool) -> list[str]:
    problems = []
    catalog = Catalog(settings.catalog_url)
    project_id = int(catalog.get_meta("ls_project_id") or 0)
    ls = labelstudio.connect(settings)
    tasks = list_tasks(ls, project_id, fields="all")
    per_sample = Counter(task_sample_id(t.data) for t in tasks)
    doubled = [s for s, n in per_sample.items() if s is not None and n > 1]
    if doubled:
        problems.append(f"samples with two tasks: {doubled[:5]}")
    in_ls = {int(t.id) for t in tasks}
    with catalog.transaction() as session:
        from flywheel.catalog import Task

        recorded = {int(t.ls_task_id) for t in session.query(Task).all()}
    if recorded - in_ls:
        problems.append(f"catalog tasks missing in Label Studio: {sorted(recorded - in_ls)[:5]}")
    if after_sync:
        answered = {
            sample: result_choices(a["result"])[0]
            for t in tasks
            if (sample := task_sample_id(t.data)) is not None
            for a in (t.annotations or [])
            if not a.get("was_cancelled") and a.get("result")
        }
        labels = catalog.labels()
        if labels != answered:
            lost = {s for s in answered if labels.get(s) != answered[s]}
            extra = set(labels) - set(answered)
            problems.append(f"labels lost or wrong: {len(lost)}, labels without an annotation: {len(extra)}")
    for side in settings.workspace.rglob("*" + atomic.SIDECAR_SUFFIX):
        try:
            atomic.verify_checksum(side.with_name(side.name.removesuffix(atomic.SIDECAR_SUFFIX)))
        except Exception as exc:  # any failure is a finding
            problems.append(f"checksum: {exc}")
    client = tracking.connect(settings)
    version = tracking.champion_version(client, settings)
    if version is not None:
        try:
            tracking.model_version(client, settings, version)
        except Exception as exc:  # any failure is a finding
            problems.append(f"champion {version} is not a registered version: {exc}")
    return problems


def restart_mid_round(settings: Settings, env: dict[str, str], name: str, at_s: float) -> dict[str, Any]:
    """A round as the CLI runs it; `at_s` seconds in, the server `name` is stopped and started again. The round
    either finishes or fails naming what went wrong; then a round, annotations and a sync run to their end."""
    process = subprocess.Popen(
        [sys.executable, "-m", "flywheel.app.cli", "round"], env=env, start_new_session=True,
        stdout=subprocess.PIPE, stderr=subprocess.STDOUT, text=True,
    )  # fmt: skip
    time.sleep(at_s)
    if name == "postgres":
        postgres.stop(settings)
        postgres.start(settings)
    else:
        services.stop(settings, [name])
        services.start(settings, [name])
    output, _ = process.communicate(timeout=RUN_TIMEOUT)
    lines = [line for line in output.splitlines() if line.strip()]
    entry = {"server": name, "at_s": round(at_s, 1), "round": "done" if process.returncode == 0 else "failed",
             "said": lines[-1][:300] if process.returncode else ""}  # fmt: skip
    for command in (["round"], ["annotate-sim"], ["sync", "--no-finetune"]):
        run(command, env, kill_after=None)
    entry["problems"] = invariants(settings, after_sync=True)
    print(json.dumps(entry), flush=True)
    return entry


def soak_env(args: argparse.Namespace) -> dict[str, str]:
    """The soak's settings, as environment variables its commands, worker and deployments all read."""
    env = {"FLYWHEEL_WORKSPACE": str(args.workspace), "FLYWHEEL_PROJECT": f"killsoak{args.seed}",
           "FLYWHEEL_K_PER_ROUND": "20", "FLYWHEEL_FINETUNE__MIN_LABELS": "40",
           "FLYWHEEL_FINETUNE__EVERY_NEW_LABELS": "40", "FLYWHEEL_FINETUNE__MAX_EPOCHS": "2",
           "FLYWHEEL_FINETUNE__MIN_BODY_STEPS": "10", "FLYWHEEL_PREFECT__WORK_POOL": f"killsoak-{args.seed}",
           **{f"FLYWHEEL_{key}": str(port) for key, port in PORTS.items()}}  # fmt: skip
    if args.target == "worker":  # the fine-tunes are the cycle's, not a sync's threshold event
        env["FLYWHEEL_FINETUNE__MIN_LABELS"] = "1000000"
    if args.catalog == "postgres":
        env["FLYWHEEL_CATALOG_URL"] = f"postgresql+psycopg://flywheel@127.0.0.1:{PORTS['POSTGRES__PORT']}/killsoak"
    os.environ.update(env)
    return {**os.environ, **env}


def kill_cycle(settings: Settings, env: dict[str, str], args: argparse.Namespace) -> list[dict[str, Any]]:
    rng = random.Random(args.seed)
    log: list[dict[str, Any]] = []
    kills, n = 0, 0
    while kills < args.kills:
        command = CYCLE[n % len(CYCLE)]
        n += 1
        for _ in range(rng.choice([0, 1, 2, 3])):  # killed up to three times, each at a random moment, restarted
            outcome, seconds, _ = step(settings, command, env, args, kill_after=rng.uniform(1.0, args.kill_within))
            if outcome == "killed":
                kills += 1
                log.append({"step": n, "command": command, "outcome": "killed", "at_s": round(seconds, 1),
                            "problems": invariants(settings, after_sync=False)})  # fmt: skip
                print(json.dumps(log[-1]), flush=True)
        outcome, seconds, waited = step(settings, command, env, args, kill_after=None)  # the restart, to the end
        log.append({"step": n, "command": command, "outcome": outcome, "seconds": round(seconds, 1),
                    "waited_s": waited, "after_kill": bool(log) and log[-1]["outcome"] == "killed",
                    "problems": invariants(settings, after_sync=command[0] == "sync")})  # fmt: skip
        print(json.dumps(log[-1]), flush=True)
    return log


def main() -> None:
    parser = argparse.ArgumentParser(description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter)
    parser.add_argument("--target", choices=("cli", "worker"), default="cli")
    parser.add_argument("--kills", type=int, default=50)
    parser.add_argument("--kill-within", type=float, default=20.0, help="seconds into a step a kill may come")
    parser.add_argument("--seed", type=int, default=7)
    parser.add_argument("--pool-size", type=int, default=300)
    parser.add_argument("--catalog", choices=("sqlite", "postgres"), default="sqlite")
    parser.add_argument("--restarts", action="store_true", help="then restart each server in the middle of a round")
    parser.add_argument("--workspace", type=Path, default=REPO / ".flywheel-killsoak")
    args = parser.parse_args()
    env = soak_env(args)
    settings = load_settings()
    services.start(settings)
    began = time.monotonic()
    try:
        for command in (["import", "fashion-mnist", "--pool-size", str(args.pool_size), "--test-size", "200"],
                        ["bootstrap"]):  # fmt: skip
            run(command, env, kill_after=None)
        with worker.prefect_api(settings):
            if args.target == "worker":
                deploy.up(settings)
            log = kill_cycle(settings, env, args)
            rng = random.Random(args.seed)
            servers = ["label_studio", "mlflow"] + (["postgres"] if args.catalog == "postgres" else [])
            restarted = [restart_mid_round(settings, env, s, rng.uniform(3.0, 15.0)) for s in servers
                         if args.restarts]  # fmt: skip
        write(log, restarted, args, time.monotonic() - began)
    finally:
        worker.stop_worker(settings)
        services.stop(settings)
        postgres.stop(settings)


def write(log: list[dict[str, Any]], restarted: list[dict[str, Any]], args: argparse.Namespace, wall: float) -> None:
    violations = [e for e in log + restarted if e["problems"]]
    restarts = [e["seconds"] for e in log if e["outcome"] == "done"]
    waits = [e["waited_s"] for e in log if e["outcome"] == "done" and e.get("after_kill") and e["waited_s"]]
    killed = [e for e in log if e["outcome"] == "killed"]
    by_command = Counter(" ".join(e["command"]) for e in killed)
    victim = "the Prefect worker (with the flow run it started)" if args.target == "worker" else "the command"
    lines = [
        f"## Kills at any instant (bench/kill_soak.py --target {args.target})\n",
        f"{time.strftime('%Y-%m-%d', time.gmtime())}, {os.cpu_count()} CPU cores, seed {args.seed}, Fashion-MNIST "
        f"pool of {args.pool_size}, catalog on {args.catalog}, {wall / 60:.0f} min wall.\n",
        f"- SIGKILLs of {victim}: **{len(killed)}** ({', '.join(f'{c}: {n}' for c, n in by_command.most_common())}),"
        f" each at a random moment 1 to {args.kill_within:.0f} s into the step (up to three in a row), then the same"
        " step run to its end.",
        f"- Invariant violations: **{len(violations)}** over {len(log) + len(restarted)} checks.",
        f"- Steps run to the end after a kill or on their own: {len(restarts)}; their wall time: median "
        f"{sorted(restarts)[len(restarts) // 2]:.1f} s, longest {max(restarts):.1f} s (process start included).",
    ]
    if waits:
        median = sorted(waits)[len(waits) // 2]
        lines.append(f"- Runs right after a kill waited from created to running: median {median:.1f} s, longest "
                     f"**{max(waits):.1f} s** ({len(waits)} runs; the worker's poll and a process start).")  # fmt: skip
    lines += [f"- {e['server']} restarted {e['at_s']} s into a round: the round {e['round']}"
              + (f" ({e['said']})" if e["said"] else "") + "; the next round, annotations and sync finished"
              for e in restarted]  # fmt: skip
    lines += [f"  - {e.get('step', e.get('server'))}: {'; '.join(e['problems'])}" for e in violations]
    RESULTS.mkdir(exist_ok=True)
    stem = "kill-soak" if args.target == "cli" else "kill-soak-worker"
    (RESULTS / f"{stem}.md").write_text("\n".join(lines) + "\n")
    (RESULTS / f"{stem}.json").write_text(json.dumps({"args": {k: str(v) for k, v in vars(args).items()},
                                                      "log": log, "restarts": restarted}, indent=1))  # fmt: skip
    print("\n".join(lines))


if __name__ == "__main__":
    main()
