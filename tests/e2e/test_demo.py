"""A small demo, end to end through the CLI, the Prefect server and the real Label Studio and MLflow."""

from __future__ import annotations

import json
import os
import subprocess
import sys
from pathlib import Path

import pytest

from flywheel import labelstudio
from flywheel.catalog import Catalog
from flywheel.registry import tracking
from tests.conftest import TEST_PORTS, settings_for

pytestmark = pytest.mark.e2e


def test_small_demo_accuracy_rises_and_everything_is_traceable(tmp_path: Path, services):
    workspace = tmp_path / "ws"
    env = {
        **os.environ,
        "FLYWHEEL_WORKSPACE": str(workspace),
        "FLYWHEEL_PROJECT": "e2e" + os.urandom(3).hex(),
        "FLYWHEEL_LABEL_STUDIO__PORT": str(TEST_PORTS["label_studio"]),
        "FLYWHEEL_MLFLOW__PORT": str(TEST_PORTS["mlflow"]),
        "FLYWHEEL_PREFECT__PORT": str(TEST_PORTS["prefect"]),
        "FLYWHEEL_IMAGE_SIZE": "32",
        "FLYWHEEL_K_PER_ROUND": "40",
        "FLYWHEEL_FINETUNE__MIN_LABELS": "80",
        "FLYWHEEL_FINETUNE__EVERY_NEW_LABELS": "1000",
        "FLYWHEEL_FINETUNE__EPOCHS": "2",
        "FLYWHEEL_FINETUNE__HEAD_EPOCHS": "1",
    }
    summary_file = tmp_path / "summary.json"
    cli = Path(sys.executable).parent / "flywheel"
    command = [
        str(cli),
        "demo",
        "--rounds",
        "3",
        "--pool-size",
        "400",
        "--test-size",
        "300",
        "--out",
        str(summary_file),
    ]
    done = subprocess.run(command, env=env, capture_output=True, text=True, timeout=900)
    assert done.returncode == 0, done.stdout[-3000:] + done.stderr[-3000:]
    assert "labels used" in done.stdout and "http://127.0.0.1" in done.stdout
    # Quiet: one line per step and the summary on the console; Prefect's line per task and state, MLflow's run
    # links and its pickle warning only in the log file and the Prefect UI.
    shown = done.stdout + done.stderr
    assert "round 2: 40 labels" in shown and "simulated annotator answered 40 tasks" in shown
    for chatter in ("Finished in state", "Beginning subflow run", "View run", "Pickle or CloudPickle"):
        assert chatter not in shown, chatter
    assert len(shown.splitlines()) < 80, shown
    assert "Finished in state Completed()" in (workspace / "logs" / "flows.log").read_text()
    summary = json.loads(summary_file.read_text())

    rounds = summary["rounds"]
    assert [r["labels"] for r in rounds] == [0, 40, 80, 120]
    accuracies = [r["test_accuracy"] for r in rounds if r["model_version"]]
    assert len(accuracies) == 3
    assert accuracies[-1] > accuracies[0], accuracies  # more labels, better model
    assert len(summary["finetunes"]) == 1  # the threshold (80 labels) was crossed once

    settings = settings_for(workspace, project=env["FLYWHEEL_PROJECT"])
    mlflow_client = tracking.connect(settings)
    versions = mlflow_client.search_model_versions(f"name='{settings.registered_model_name}'")
    kinds = sorted(str(v.tags.get("kind")) for v in versions)
    assert kinds == ["finetune", "head", "head", "head"]  # every head and the fine-tune are versions
    assert summary["champion"] in {v.version for v in versions}

    catalog = Catalog(settings.catalog_url)
    ls_client = labelstudio.connect(settings)
    project_id = labelstudio.ensure_project(ls_client, settings, catalog, catalog.classes())
    tasks = labelstudio.list_tasks(ls_client, project_id, fields="all")
    assert len(tasks) == 120 and sum(1 for t in tasks if t.annotations) == 120
    assert catalog.count_labels() == 120
