"""The simulate report leaves the library here: learning-curve plot, JSON file, one MLflow run per strategy."""

from __future__ import annotations

import json
import time
from collections.abc import Mapping
from pathlib import Path
from typing import Any

import numpy as np
from matplotlib.figure import Figure
from mlflow import MlflowClient

PLOT_ARTIFACT = "curves.png"
METRICS_PER_BATCH = 1000  # the MLflow server's limit per log_batch call


def experiment_name(dataset: str) -> str:
    return f"flywheel-simulate-{dataset}"


def plot_curves(report: Mapping[str, Any]) -> Figure:
    """Accuracy vs labels, mean +- std band per strategy, and the full-label accuracy as a dashed line."""
    figure = Figure(figsize=(7, 4.5), dpi=110)  # no pyplot: no global state, works headless (Agg canvas)
    ax = figure.add_subplot()
    for name, curve in report["strategies"].items():
        budgets = np.asarray(curve["budgets"])
        mean, std = np.asarray(curve["accuracy_mean"]), np.asarray(curve["accuracy_std"])
        (line,) = ax.plot(budgets, mean, marker="o", markersize=2.5, label=f"{name} (AULC {100 * curve['aulc']:.1f})")
        ax.fill_between(budgets, mean - std, mean + std, color=line.get_color(), alpha=0.15)
    ax.axhline(report["full_label_accuracy"], color="grey", linestyle="--", linewidth=1, label="all labels")
    ax.set_xlabel("labels")
    ax.set_ylabel("test accuracy")
    ax.set_title(f"{report['dataset']}: {report['n_pool']} images, {len(report['classes'])} classes")
    ax.grid(alpha=0.3)
    ax.legend(fontsize=8, loc="lower right")
    figure.tight_layout()
    return figure


def save_plot(figure: Figure, path: Path) -> None:
    from matplotlib.backends.backend_agg import FigureCanvasAgg

    FigureCanvasAgg(figure)
    path.parent.mkdir(parents=True, exist_ok=True)
    figure.savefig(path)


def write_report(report: Mapping[str, Any], path: Path) -> None:
    path.parent.mkdir(parents=True, exist_ok=True)
    path.write_text(json.dumps(report, indent=2) + "\n")


def log_runs(client: MlflowClient, report: Mapping[str, Any], figure: Figure, *, backbone: str) -> dict[str, str]:
    """One run per strategy in experiment flywheel-simulate-<dataset>; returns {strategy: run_id}.

    Metrics per budget step (step = number of labels), the summary numbers, and the plot as an artifact.
    """
    from mlflow.entities import Metric, Param

    name_of_experiment = experiment_name(report["dataset"])
    experiment = client.get_experiment_by_name(name_of_experiment)
    experiment_id = experiment.experiment_id if experiment else client.create_experiment(name_of_experiment)
    run_ids = {}
    for name, curve in report["strategies"].items():
        run = client.create_run(experiment_id, run_name=f"simulate-{name}", tags={"kind": "simulate"})
        run_id = run.info.run_id
        params = {
            "dataset": report["dataset"],
            "strategy": name,
            "seeds": len(report.get("seeds", [])),
            "budgets": ",".join(str(b) for b in curve["budgets"]),
            "backbone": backbone,
            "initial_per_class": report.get("initial_per_class"),
            "budget_per_class": report.get("budget_per_class"),
            "batch_size": report.get("batch_size"),
            "n_pool": report["n_pool"],
        }
        now = int(time.time() * 1000)
        metrics = [
            Metric(key, float(curve[key][i]), now, int(budget))
            for i, budget in enumerate(curve["budgets"])
            for key in ("accuracy_mean", "accuracy_std", "balanced_accuracy_mean")
        ]
        summary = {"aulc": curve["aulc"], "full_label_accuracy": report["full_label_accuracy"]}
        if "balanced_aulc" in curve:
            summary["balanced_aulc"] = curve["balanced_aulc"]
        if curve["labels_to_95pct_of_full"] is not None:
            summary["labels_to_95pct_of_full"] = curve["labels_to_95pct_of_full"]
        metrics += [Metric(key, float(value), now, 0) for key, value in summary.items()]
        client.log_batch(run_id, params=[Param(k, str(v)[:6000]) for k, v in params.items()])
        for start in range(0, len(metrics), METRICS_PER_BATCH):
            client.log_batch(run_id, metrics=metrics[start : start + METRICS_PER_BATCH])
        client.log_figure(run_id, figure, PLOT_ARTIFACT)
        if curve.get("descriptions"):
            client.log_text(run_id, "\n".join(curve["descriptions"]), "rounds.txt")
        client.set_terminated(run_id)
        run_ids[name] = run_id
    return run_ids
