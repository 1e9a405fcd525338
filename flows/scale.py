"""Distributed embedding and scoring: the shards of flywheel.scaleout as Prefect tasks on a Dask or Ray cluster.

    from flows.scale import distributed, embed_distributed_flow
    distributed(embed_distributed_flow, settings)(split="pool")

`distributed` gives a flow the task runner `scaleout.runner` names (prefect-dask's DaskTaskRunner or
prefect-ray's RayTaskRunner) for the cluster the settings name: a local one of `scaleout.n_workers` worker
processes, or the existing cluster at `scaleout.address` (docs/operations.md).
"""

from __future__ import annotations

from dataclasses import asdict
from typing import Any, ParamSpec, TypeVar

import numpy as np
from prefect import Flow, flow, task, unmapped
from prefect.cache_policies import NO_CACHE
from prefect.task_runners import TaskRunner
from prefect_dask import DaskTaskRunner
from prefect_ray import RayTaskRunner

from flows.common import Overrides, settings_from, with_retries
from flywheel import scaleout
from flywheel.atomic import atomic_path
from flywheel.catalog import POOL, Catalog
from flywheel.config import Settings
from flywheel.features import embedded
from flywheel.features.backbones import get_spec
from flywheel.features.store import EmbeddingStore
from flywheel.registry import tracking

P = ParamSpec("P")
R = TypeVar("R")


def task_runner(settings: Settings) -> TaskRunner[Any]:
    """The task runner for the cluster in settings.scaleout."""
    if settings.scaleout.runner == "ray":
        return RayTaskRunner(**scaleout.ray_runner_options(settings))
    return DaskTaskRunner(**scaleout.dask_runner_options(settings))


def distributed(flow_fn: Flow[P, R], settings: Settings) -> Flow[P, R]:
    """`flow_fn` with its tasks sent to the cluster from the settings."""
    return flow_fn.with_options(task_runner=task_runner(settings))


@task(cache_policy=NO_CACHE)
def embed_shard(settings: Settings, version: str, shard: scaleout.Shard) -> scaleout.ShardResult:
    return scaleout.embed_shard(settings, version, shard)


@task(cache_policy=NO_CACHE)
def score_shard(settings: Settings, key: str, ids: tuple[int, ...], weight: np.ndarray, bias: np.ndarray):
    return scaleout.score_shard(settings, key, ids, weight, bias)


@task(cache_policy=NO_CACHE)
def load_head(settings: Settings, model_version: str) -> tuple[np.ndarray, np.ndarray]:
    head = tracking.load_classifier(settings.mlflow.url, settings.registered_model_name, model_version).head
    return head.weight.detach().numpy(), head.bias.detach().numpy()


def _store(settings: Settings, catalog: Catalog) -> tuple[Settings, str, EmbeddingStore]:
    """The settings with the backbone in use, the body version and its embedding store."""
    settings = embedded.active_settings(settings, catalog)
    version = embedded.body_version(settings, catalog)
    key = EmbeddingStore.key_for(get_spec(settings.backbone), version, settings.image_size)
    return settings, version, EmbeddingStore(settings.dirs.embeddings, key)


@flow(name="embed-distributed", log_prints=True)
def embed_distributed_flow(split: str = POOL, overrides: Overrides | None = None) -> dict[str, Any]:
    """Embed a split's samples missing from the store, one task per shard, then add them in one write."""
    settings = settings_from(overrides)
    catalog = Catalog(settings.catalog_url)
    settings, version, store = _store(settings, catalog)
    rows = catalog.samples(split)
    todo = set(store.missing([r.id for r in rows]))
    todo_rows = [r for r in rows if r.id in todo]
    shards = scaleout.plan_shards([r.id for r in todo_rows], [r.uri for r in todo_rows], settings.scaleout.shard_size)
    results = [f.result() for f in embed_shard.map(unmapped(settings), unmapped(version), shards)]
    added = scaleout.collect_shards(store, results)
    workers = sorted({r.worker for r in results})
    print(f"embedded {added} of {len(rows)} {split} samples in {len(shards)} shards on workers {workers}")
    return {
        "split": split,
        "embedded": added,
        "cached": len(rows) - added,
        "shards": [asdict(r) for r in results],
        "workers": workers,
    }


@flow(name="score-distributed", log_prints=True)
def score_distributed_flow(model_version: str, split: str = POOL, overrides: Overrides | None = None) -> dict:
    """Class probabilities of a split under the head of a registered model (trained on the body in use),
    one task per shard of stored vectors; saved as ids + probs to workspace/scores/."""
    settings = settings_from(overrides)
    catalog = Catalog(settings.catalog_url)
    settings, _, store = _store(settings, catalog)
    ids = [r.id for r in catalog.samples(split)]
    weight, bias = with_retries(load_head, settings)(settings, model_version)
    shards = [
        tuple(ids[s : s + settings.scaleout.shard_size]) for s in range(0, len(ids), settings.scaleout.shard_size)
    ]
    futures = score_shard.map(unmapped(settings), unmapped(store.key), shards, unmapped(weight), unmapped(bias))
    probs = np.concatenate([f.result() for f in futures]) if shards else np.empty((0, len(bias)), np.float32)
    path = settings.workspace / "scores" / f"{store.key}-model{model_version}-{split}.npz"
    with atomic_path(path) as tmp, open(tmp, "wb") as f:
        np.savez(f, ids=np.array(ids, dtype=np.int64), probs=probs)
    print(f"scored {len(ids)} {split} samples with model {model_version} in {len(shards)} shards: {path}")
    return {"path": str(path), "n": len(ids), "shards": len(shards)}
