"""The flywheel as Prefect flows. Each task is a few lines calling the library; retries sit on I/O only.

bootstrap: import, embed, index, Label Studio project.   round: train head, score, select, push.
sync: pull labels, check thresholds, start the fine-tune.  finetune: deeper fine-tune, guarded promotion.
annotate_sim: the simulated annotator.                     demo: all of it, several rounds, with a summary.

Parameters are validated by pydantic when a run starts (bounds, and `overrides` against the settings), so
a bad one fails the run before any work. flows/deploy.py turns these flows into deployments.
"""

from __future__ import annotations

from dataclasses import asdict, replace
from typing import Annotated, Any

import numpy as np
from label_studio_sdk.client import LabelStudio
from mlflow import MlflowClient
from prefect import flow, task
from prefect.cache_policies import INPUTS, NO_CACHE
from pydantic import Field

from flows.common import (
    Overrides,
    ProgressArtifact,
    emit_threshold_reached,
    percent,
    project_slot,
    publish_finetune_report,
    publish_finetune_skipped,
    publish_round_report,
    publish_sync_report,
    results_storage,
    settings_from,
    with_retries,
)
from flows.scale import distributed, embed_distributed_flow
from flywheel import labelstudio, loop
from flywheel.catalog import POOL, TEST, Catalog
from flywheel.config import Settings
from flywheel.features import embedded
from flywheel.labelstudio import annotator
from flywheel.loop import demo, schedule
from flywheel.registry import tracking
from flywheel.sources.importing import import_source

Count = Annotated[int, Field(ge=1)]
Share = Annotated[float, Field(ge=0, le=1)]


# Network tasks: flows call them through with_retries(task, settings) (retries with backoff from settings).
@task(cache_policy=NO_CACHE)
def connect_label_studio(settings: Settings) -> LabelStudio:
    return labelstudio.connect(settings)


@task(cache_policy=NO_CACHE)
def connect_mlflow(settings: Settings) -> MlflowClient:
    return tracking.connect(settings)


@task(cache_policy=NO_CACHE)
def split_fingerprint(settings: Settings, split: str) -> str:
    return embedded.split_fingerprint(settings, Catalog(settings.catalog_url), split)


@task
def embed_split(settings: Settings, split: str, fingerprint: str) -> dict[str, Any]:
    """Cached on (split, fingerprint): an unchanged split is not even opened again. Progress in the UI."""
    progress = ProgressArtifact(settings, f"embedding-{split}", f"embedding the {split} split")
    split_features = embedded.embed_split(settings, Catalog(settings.catalog_url), split, on_progress=progress)
    progress.finish()
    return {"split": split, "samples": len(split_features.ids), "fingerprint": fingerprint}


def embed(settings: Settings, split: str, overrides: Overrides | None) -> dict[str, Any]:
    """Embed a split unless its fingerprint was embedded before (the result persists under the workspace). With a
    cluster at `scaleout.address`, the samples not yet in the store are embedded there instead, one task per shard
    (flows/scale.py), into the same store the round then reads."""
    if settings.scaleout.address:
        return distributed(embed_distributed_flow, settings)(split=split, overrides=overrides)
    cached = embed_split.with_options(
        cache_policy=INPUTS - "settings", persist_result=True, result_storage=results_storage(settings)
    )
    return cached(settings, split, split_fingerprint(settings, split))


@task(cache_policy=NO_CACHE)
def import_data(settings: Settings, source: str, pool_size: int, test_size: int) -> dict[str, Any]:
    results = import_source(Catalog(settings.catalog_url), settings, source, pool_size=pool_size, test_size=test_size)
    return {split: asdict(result) for split, result in results.items()}


@flow(name="bootstrap", log_prints=True)
def bootstrap_flow(
    source: str | None = None, pool_size: Count = 5000, test_size: Count = 10000, overrides: Overrides | None = None
) -> dict[str, Any]:
    """Embed and index what the catalog holds and create the Label Studio project; `source`, when given, is
    imported first (pool_size and test_size apply to the built-in fashion-mnist only). Nothing is imported
    that was not named."""
    settings = settings_from(overrides)
    client = with_retries(connect_label_studio, settings)(settings)
    with project_slot(settings):
        imported = import_data(settings, source, pool_size, test_size) if source else {}
        for split in (POOL, TEST):
            embed(settings, split, overrides)
        report = task(cache_policy=NO_CACHE)(loop.bootstrap)(settings, Catalog(settings.catalog_url), client)
    added = ", ".join(f"{r['added']} {split} ({r['quarantined']} set aside)" for split, r in imported.items())
    print(f"imported {added or 'nothing'}; embedded {report.n_pool} pool + {report.n_test} test samples")
    return {"imported": imported, **asdict(report)}


@flow(name="round", log_prints=True)
def round_flow(select: bool = True, overrides: Overrides | None = None) -> loop.RoundReport:
    settings = settings_from(overrides)
    ls_client = with_retries(connect_label_studio, settings)(settings) if select else None
    mlflow_client = with_retries(connect_mlflow, settings)(settings)
    catalog = Catalog(settings.catalog_url)
    with project_slot(settings):
        embed(settings, POOL, overrides)  # samples imported since the last round
        report = task(cache_policy=NO_CACHE)(loop.run_round)(settings, catalog, ls_client, mlflow_client, select=select)
    publish_round_report(settings, report, catalog.rounds())
    print(f"round {report.round_id}: {report.n_labels} labels, test accuracy {percent(report.test_accuracy)}")
    return report


@flow(name="finetune", log_prints=True)
def finetune_flow(overrides: Overrides | None = None) -> loop.FinetuneReport | str:
    """A deeper fine-tune with a guarded promotion; on labels that already had one, nothing but the reason why
    (returned, and in the fine-tune report)."""
    settings = settings_from(overrides)
    mlflow_client = with_retries(connect_mlflow, settings)(settings)
    catalog = Catalog(settings.catalog_url)
    with project_slot(settings):
        refusal = schedule.finetune_refusal(catalog, schedule.label_state(catalog.labels()))
        if refusal:
            publish_finetune_skipped(settings, refusal)
            print(f"fine-tune not run: {refusal}")
            return refusal
        report = task(cache_policy=NO_CACHE)(loop.run_finetune)(settings, catalog, mlflow_client)
        if report.promoted:  # open tasks show the new champion's predictions; retried alone, not the fine-tune
            ls_client = with_retries(connect_label_studio, settings)(settings)
            refresh = with_retries(task(cache_policy=NO_CACHE)(loop.refresh_open_tasks), settings)
            refreshed = refresh(settings, catalog, ls_client, mlflow_client, report.model_version)
            report = replace(report, predictions_refreshed=refreshed)
    publish_finetune_report(settings, report)
    print(f"fine-tune {report.depth}: version {report.model_version}, promoted={report.promoted}")
    return report


@task(cache_policy=NO_CACHE)
def pull_annotations(settings: Settings, client: LabelStudio) -> loop.SyncOutcome:
    return loop.run_sync(settings, Catalog(settings.catalog_url), client)


@flow(name="sync", log_prints=True)
def sync_flow(finetune_when_due: bool = True, overrides: Overrides | None = None) -> dict[str, Any]:
    """Pull annotations; when the policy wants a fine-tune, run it here (finetune_when_due) or emit
    flywheel.labels.threshold-reached for the `finetune` deployment's trigger."""
    settings = settings_from(overrides)
    client = with_retries(connect_label_studio, settings)(settings)
    with project_slot(settings):
        outcome = with_retries(pull_annotations, settings)(settings, client)
    print(f"sync: {outcome.report.summary()}; {outcome.n_labels} labels; fine-tune due: {outcome.finetune_due}")
    finetuned = None
    if not outcome.finetune_due:
        next_step = "not due"
    elif finetune_when_due:
        next_step = "running now, in this flow"
    else:
        next_step = "requested: event flywheel.labels.threshold-reached emitted"
        emit_threshold_reached(settings, outcome)
    publish_sync_report(settings, outcome, next_step)
    if outcome.finetune_due and finetune_when_due:
        finetuned = finetune_flow(overrides=overrides)
    return {
        "sync": asdict(outcome.report),
        "summary": outcome.report.summary(),
        "n_labels": outcome.n_labels,
        "finetune_step": next_step,
        "finetune": finetuned,
    }


@flow(name="annotate-sim", log_prints=True)
def annotate_sim_flow(
    noise_rate: Share = 0.0,
    limit: Count | None = None,
    only_samples: list[int] | None = None,
    overrides: Overrides | None = None,
) -> int:
    """The simulated annotator answers open tasks from ground truth (only those of `only_samples`, if given)."""
    settings = settings_from(overrides)
    client = with_retries(connect_label_studio, settings)(settings)
    catalog = Catalog(settings.catalog_url)
    project_id = labelstudio.ensure_project(client, settings, catalog, catalog.classes())
    rng = np.random.default_rng([settings.seed, catalog.count_labels()])
    done = with_retries(task(cache_policy=NO_CACHE)(annotator.annotate_open_tasks), settings)(
        client, catalog, project_id, noise_rate=noise_rate, rng=rng, limit=limit,
        only_samples=set(only_samples) if only_samples is not None else None,
    )  # fmt: skip
    print(f"simulated annotator answered {done} tasks")
    return done


@flow(name="demo", log_prints=True)
def demo_flow(
    rounds: Count = 6,
    source: str = "fashion-mnist",
    pool_size: Count = 5000,
    test_size: Count = 10000,
    noise_rate: Share = 0.0,
    overrides: Overrides | None = None,
) -> dict[str, Any]:
    """bootstrap, then `rounds` x (round -> simulated annotation -> sync, fine-tune when due), then a final
    round that trains on every label without selecting more. Run again on the same workspace, it shows the
    demo that ran (`reused`), or finishes one a crash cut short; it never labels what it did not select."""
    settings = settings_from(overrides)
    catalog = Catalog(settings.catalog_url)
    parameters = {"rounds": rounds, "source": source, "pool_size": pool_size, "test_size": test_size,
                  "noise_rate": noise_rate}  # fmt: skip
    record = demo.start(catalog, parameters)
    if record.finished:
        print(f"this workspace's demo already ran ({len(record.rounds)} rounds): showing it; `make clean` for anew")
        return {**record.summary(), "reused": True}
    bootstrap_flow(source=source, pool_size=pool_size, test_size=test_size, overrides=overrides)
    while len(record.rounds) < rounds:
        demo.add_round(record, round_flow(overrides=overrides))
        annotate_sim_flow(noise_rate=noise_rate, only_samples=record.samples, overrides=overrides)
        synced = sync_flow(overrides=overrides)
        if isinstance(synced["finetune"], loop.FinetuneReport):
            demo.add_finetune(record, synced["finetune"])
        demo.save(catalog, record)
    demo.add_round(record, round_flow(select=False, overrides=overrides))
    record.champion = tracking.champion_version(with_retries(connect_mlflow, settings)(settings), settings)
    record.finished = True
    demo.save(catalog, record)
    return {**record.summary(), "reused": False}
