"""flywheel simulate against the real MLflow test server: one run per strategy, per-step metrics, the plot."""

from __future__ import annotations

import json

import numpy as np
import pytest
from typer.testing import CliRunner

from flywheel.registry import tracking
from flywheel.simulation import publish, simulate

pytestmark = pytest.mark.integration


def _blobs(seed: int = 0) -> tuple[np.ndarray, np.ndarray, list[str]]:
    rng = np.random.default_rng(seed)
    y = np.repeat([0, 1, 2], 40)
    x = 3 * np.eye(6)[y] + rng.normal(0, 1, (len(y), 6))
    return x.astype(np.float32), y, ["a", "b", "c"]


def test_each_strategy_is_an_mlflow_run_with_curve_metrics_and_plot(settings):
    x, y, classes = _blobs()
    dataset = f"blobs-{settings.project}"
    report = simulate(
        x,
        y,
        classes,
        strategies=["random", "entropy"],
        seeds=2,
        initial_per_class=1,
        budget_per_class=4,
        dataset=dataset,
    )
    client = tracking.connect(settings)
    run_ids = publish.log_runs(client, report, publish.plot_curves(report), backbone=settings.backbone)

    experiment = client.get_experiment_by_name(f"flywheel-simulate-{dataset}")
    runs = client.search_runs([experiment.experiment_id])
    assert sorted(r.data.params["strategy"] for r in runs) == ["entropy", "random"]
    assert {r.info.run_id for r in runs} == set(run_ids.values())
    for run in runs:
        name = run.data.params["strategy"]
        curve = report["strategies"][name]
        assert run.info.status == "FINISHED"
        assert run.data.params["dataset"] == dataset and run.data.params["seeds"] == "2"
        assert run.data.params["budgets"] == "3,6,9,12" and run.data.params["backbone"] == settings.backbone
        history = sorted(client.get_metric_history(run.info.run_id, "accuracy_mean"), key=lambda m: m.step)
        assert [m.step for m in history] == curve["budgets"]
        assert [m.value for m in history] == pytest.approx(curve["accuracy_mean"])
        assert run.data.metrics["aulc"] == pytest.approx(curve["aulc"])
        artifacts = {a.path for a in client.list_artifacts(run.info.run_id)}
        assert {publish.PLOT_ARTIFACT, "rounds.txt"} <= artifacts
        local = client.download_artifacts(run.info.run_id, publish.PLOT_ARTIFACT)
        with open(local, "rb") as fh:
            assert fh.read(8) == b"\x89PNG\r\n\x1a\n"

    # A second simulation of the same data set adds runs to the same experiment.
    publish.log_runs(client, report, publish.plot_curves(report), backbone=settings.backbone)
    assert len(client.search_runs([experiment.experiment_id])) == 4


def _image_folder(root, per_class=8):
    from PIL import Image

    rng = np.random.default_rng(1)
    for name, colour in {"dark": 40, "light": 210}.items():
        (root / name).mkdir(parents=True)
        for i in range(per_class):
            pixels = np.clip(colour + rng.normal(0, 20, (12, 12, 3)), 0, 255).astype(np.uint8)
            Image.fromarray(pixels).save(root / name / f"{i}.png")


def test_cli_simulate_logs_to_mlflow_and_refuses_a_down_server(settings, tmp_path, monkeypatch):
    data = tmp_path / f"tones-{settings.project}"
    _image_folder(data)
    monkeypatch.chdir(tmp_path)
    monkeypatch.setenv("FLYWHEEL_WORKSPACE", str(settings.workspace))
    monkeypatch.setenv("FLYWHEEL_MLFLOW__PORT", str(settings.mlflow.port))
    args = ["simulate", "--data", str(data), "--strategies", "random", "--seeds", "1", "--initial-per-class", "1"]
    result = CliRunner().invoke(app(), [*args, "--budget-per-class", "3", "--out", str(tmp_path / "r.json")])
    assert result.exit_code == 0, result.output
    assert json.loads((tmp_path / "r.json").read_text())["strategies"]["random"]["budgets"] == [2, 4, 6]
    client = tracking.connect(settings)
    experiment = client.get_experiment_by_name(f"flywheel-simulate-{data.name}")
    assert [r.data.params["strategy"] for r in client.search_runs([experiment.experiment_id])] == ["random"]

    monkeypatch.setenv("FLYWHEEL_MLFLOW__PORT", "1")  # nothing listens there
    down = CliRunner().invoke(app(), args)
    assert down.exit_code == 1 and "MLflow is not reachable" in down.output


def app():
    from flywheel.app.cli import app

    return app
