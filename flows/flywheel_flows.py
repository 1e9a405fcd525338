"""The flywheel as Prefect flows. Each task is a few lines calling the library; retries sit on I/O only.

bootstrap: import, embed, index, Label Studio project.   round: train head, score, select, push.
sync: pull labels, check thresholds, start the fine-tune.  finetune: deeper fine-tune, guarded promotion.
annotate_sim: the simulated annotator.                     demo: all of it, several rounds, with a summary.
"""

from __future__ import annotations

import math
from dataclasses import asdict
from typing import Any

import numpy as np
from prefect import flow, task
from prefect.cache_policies import NO_CACHE

from flows.common import publish_finetune_report, publish_round_report, settings_from
from flywheel import annotator, labelstudio, loop, tracking
from flywheel.catalog import Catalog
from flywheel.config import Settings
from flywheel.data import import_source


def _finite(value: float) -> float | None:
    """NaN (no model, no held-out labels) becomes None, so the summary is valid JSON."""
    return None if math.isnan(value) else value


IO_RETRIES = {"retries": 2, "retry_delay_seconds": [2, 10], "cache_policy": NO_CACHE}


@task(**IO_RETRIES)
def connect_label_studio(settings: Settings):
    return labelstudio.connect(settings)


@task(**IO_RETRIES)
def connect_mlflow(settings: Settings):
    return tracking.connect(settings)


@task(cache_policy=NO_CACHE)
def import_data(settings: Settings, source: str, pool_size: int, test_size: int) -> dict[str, Any]:
    results = import_source(Catalog(settings.catalog_url), settings, source, pool_size=pool_size, test_size=test_size)
    return {split: asdict(result) for split, result in results.items()}


@flow(name="bootstrap", log_prints=True)
def bootstrap_flow(
    source: str = "fashion-mnist", pool_size: int = 5000, test_size: int = 10000, overrides: dict | None = None
) -> dict[str, Any]:
    settings = settings_from(overrides)
    client = connect_label_studio(settings)
    imported = import_data(settings, source, pool_size, test_size)
    report = task(loop.bootstrap, cache_policy=NO_CACHE)(settings, Catalog(settings.catalog_url), client)
    print(f"imported {imported}; embedded {report.n_pool} pool + {report.n_test} test samples")
    return {"imported": imported, **asdict(report)}


@flow(name="round", log_prints=True)
def round_flow(select: bool = True, overrides: dict | None = None) -> loop.RoundReport:
    settings = settings_from(overrides)
    ls_client = connect_label_studio(settings) if select else None
    mlflow_client = connect_mlflow(settings)
    report = task(loop.run_round, cache_policy=NO_CACHE)(
        settings, Catalog(settings.catalog_url), ls_client, mlflow_client, select=select
    )
    publish_round_report(settings, report)
    print(f"round {report.round_id}: {report.n_labels} labels, test accuracy {report.test_accuracy:.3f}")
    return report


@flow(name="finetune", log_prints=True)
def finetune_flow(overrides: dict | None = None) -> loop.FinetuneReport:
    settings = settings_from(overrides)
    mlflow_client = connect_mlflow(settings)
    report = task(loop.run_finetune, cache_policy=NO_CACHE)(settings, Catalog(settings.catalog_url), mlflow_client)
    publish_finetune_report(settings, report)
    print(f"fine-tune {report.depth}: version {report.model_version}, promoted={report.promoted}")
    return report


@task(**IO_RETRIES)
def pull_annotations(settings: Settings, client) -> loop.SyncOutcome:
    return loop.run_sync(settings, Catalog(settings.catalog_url), client)


@flow(name="sync", log_prints=True)
def sync_flow(finetune_when_due: bool = True, overrides: dict | None = None) -> dict[str, Any]:
    settings = settings_from(overrides)
    outcome = pull_annotations(settings, connect_label_studio(settings))
    print(f"sync: {outcome.report}; {outcome.n_labels} labels; fine-tune due: {outcome.finetune_due}")
    finetuned = None
    if outcome.finetune_due and finetune_when_due:
        finetuned = finetune_flow(overrides=overrides)
    return {"sync": asdict(outcome.report), "n_labels": outcome.n_labels, "finetune": finetuned}


@flow(name="annotate-sim", log_prints=True)
def annotate_sim_flow(noise_rate: float = 0.0, limit: int | None = None, overrides: dict | None = None) -> int:
    settings = settings_from(overrides)
    client = connect_label_studio(settings)
    catalog = Catalog(settings.catalog_url)
    project_id = labelstudio.ensure_project(client, settings, catalog, catalog.classes())
    rng = np.random.default_rng([settings.seed, catalog.count_labels()])
    done = task(annotator.annotate_open_tasks, cache_policy=NO_CACHE)(
        client, catalog, project_id, noise_rate=noise_rate, rng=rng, limit=limit
    )
    print(f"simulated annotator answered {done} tasks")
    return done


@flow(name="demo", log_prints=True)
def demo_flow(
    rounds: int = 6,
    source: str = "fashion-mnist",
    pool_size: int = 5000,
    test_size: int = 10000,
    noise_rate: float = 0.0,
    overrides: dict | None = None,
) -> dict[str, Any]:
    """bootstrap, then `rounds` x (round -> simulated annotation -> sync, fine-tune when due), then a final
    round that trains on every label without selecting more."""
    settings = settings_from(overrides)
    bootstrap_flow(source=source, pool_size=pool_size, test_size=test_size, overrides=overrides)
    history, finetunes = [], []
    for _ in range(rounds):
        report = round_flow(overrides=overrides)
        history.append(report)
        annotate_sim_flow(noise_rate=noise_rate, overrides=overrides)
        synced = sync_flow(overrides=overrides)
        if synced["finetune"] is not None:
            finetunes.append(synced["finetune"])
    history.append(round_flow(select=False, overrides=overrides))
    champion = tracking.champion_version(connect_mlflow(settings), settings)
    return {
        "rounds": [
            {
                "round": r.round_id,
                "labels": r.n_labels,
                "model_version": r.model_version,
                "test_accuracy": _finite(r.test_accuracy),
                "holdout_accuracy": _finite(r.holdout_accuracy),
                "promoted": r.promoted,
                "selected": len(r.selected),
                "strategy": r.strategy,
            }
            for r in history
        ],
        "finetunes": [
            {
                "model_version": f.model_version,
                "depth": f.depth,
                "holdout_accuracy": _finite(f.holdout_accuracy),
                "test_accuracy": _finite(f.test_accuracy),
                "promoted": f.promoted,
                "reason": f.promotion_reason,
            }
            for f in finetunes
        ],
        "champion": champion,
        "labels": history[-1].n_labels,
    }
