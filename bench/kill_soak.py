"""Kills at any instant: the loop's commands (round, simulated annotations, sync, fine-tune) run one after another
as the CLI runs them, each in its own process group, while a seeded killer sends SIGKILL at a random moment of
most of them, up to three times in a row. After the kills the same command runs again to its end (the
restart), and after every kill and every step the invariants are checked:

- the catalog opens, and no sample has two tasks in Label Studio; every catalog task is in Label Studio;
- after a completed sync, the catalog's labels are exactly the annotations in Label Studio (none lost or doubled);
- every stored file with a checksum verifies;
- the champion alias, when set, points at a registered version;
- the restarted command got going: its wall time is recorded (the project slot and file lock a dead run held
  must not make it wait).

    .venv/bin/python -m bench.kill_soak [--kills 50] [--seed 7] [--pool-size 300]

Needs the servers (`make services`); uses its own workspace and project. Writes bench/results/kill-soak.md/.json.
"""

from __future__ import annotations

import argparse
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

from flywheel import atomic, labelstudio
from flywheel.catalog import Catalog
from flywheel.config import Settings, load_settings
from flywheel.labelstudio.client import list_tasks, task_sample_id
from flywheel.labelstudio.interface import result_choices
from flywheel.registry import tracking

REPO = Path(__file__).resolve().parents[1]
RESULTS = REPO / "bench" / "results"
CYCLE = (["round"], ["annotate-sim"], ["sync", "--no-finetune"], ["round"], ["annotate-sim"], ["sync"], ["finetune"])


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


def main() -> None:
    parser = argparse.ArgumentParser(description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter)
    parser.add_argument("--kills", type=int, default=50)
    parser.add_argument("--seed", type=int, default=7)
    parser.add_argument("--pool-size", type=int, default=300)
    parser.add_argument("--workspace", type=Path, default=REPO / ".flywheel-killsoak")
    args = parser.parse_args()
    env = {**os.environ, "FLYWHEEL_WORKSPACE": str(args.workspace), "FLYWHEEL_PROJECT": f"killsoak{args.seed}",
           "FLYWHEEL_K_PER_ROUND": "20", "FLYWHEEL_FINETUNE__MIN_LABELS": "40",
           "FLYWHEEL_FINETUNE__EVERY_NEW_LABELS": "40", "FLYWHEEL_FINETUNE__MAX_EPOCHS": "2",
           "FLYWHEEL_FINETUNE__MIN_BODY_STEPS": "10"}  # fmt: skip
    for key, value in env.items():
        if key.startswith("FLYWHEEL_"):
            os.environ[key] = value
    settings = load_settings()
    for command in (["import", "fashion-mnist", "--pool-size", str(args.pool_size), "--test-size", "200"],
                    ["bootstrap"]):  # fmt: skip
        run(command, env, kill_after=None)
    rng = random.Random(args.seed)
    log: list[dict[str, Any]] = []
    kills, step, began = 0, 0, time.monotonic()
    while kills < args.kills:
        command = CYCLE[step % len(CYCLE)]
        step += 1
        for _ in range(rng.choice([0, 1, 2, 3])):  # killed up to three times, each at a random moment, restarted
            outcome, seconds = run(command, env, kill_after=rng.uniform(1.0, 20.0))
            if outcome == "killed":
                kills += 1
                problems = invariants(settings, after_sync=False)
                log.append({"step": step, "command": command, "outcome": "killed", "at_s": round(seconds, 1),
                            "problems": problems})  # fmt: skip
                print(json.dumps(log[-1]), flush=True)
        outcome, seconds = run(command, env, kill_after=None)  # the restart, to the end
        problems = invariants(settings, after_sync=command[0] == "sync")
        log.append({"step": step, "command": command, "outcome": outcome, "seconds": round(seconds, 1),
                    "problems": problems})  # fmt: skip
        print(json.dumps(log[-1]), flush=True)
    write(log, args, time.monotonic() - began)


def write(log: list[dict[str, Any]], args: argparse.Namespace, wall: float) -> None:
    violations = [e for e in log if e["problems"]]
    restarts = [e["seconds"] for e in log if e["outcome"] == "done"]
    killed = [e for e in log if e["outcome"] == "killed"]
    by_command = Counter(" ".join(e["command"]) for e in killed)
    lines = [
        "## Kills at any instant (bench/kill_soak.py)\n",
        f"{time.strftime('%Y-%m-%d', time.gmtime())}, {os.cpu_count()} CPU cores, seed {args.seed}, Fashion-MNIST "
        f"pool of {args.pool_size}, {wall / 60:.0f} min wall.\n",
        f"- SIGKILLs: **{len(killed)}** ({', '.join(f'{c}: {n}' for c, n in by_command.most_common())}), each at a "
        "random moment 1 to 20 s into the command (up to three in a row), then the same command run to its end.",
        f"- Invariant violations: **{len(violations)}** over {len(log)} checks.",
        f"- Commands run to the end after a kill or on their own: {len(restarts)}; their wall time: median "
        f"{sorted(restarts)[len(restarts) // 2]:.1f} s, longest {max(restarts):.1f} s (process start included).",
    ]
    lines += [f"  - step {e['step']} {' '.join(e['command'])}: {'; '.join(e['problems'])}" for e in violations]
    RESULTS.mkdir(exist_ok=True)
    (RESULTS / "kill-soak.md").write_text("\n".join(lines) + "\n")
    (RESULTS / "kill-soak.json").write_text(json.dumps({"args": {k: str(v) for k, v in vars(args).items()},
                                                         "log": log}, indent=1))  # fmt: skip
    print("\n".join(lines))


if __name__ == "__main__":
    main()
