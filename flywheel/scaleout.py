"""Scale-out: embedding and scoring cut into shards that run as independent tasks on a Dask or Ray cluster.

The library half, with no Prefect inside: how the work is cut (`plan_shards`), what one worker does with a
shard (`embed_shard`: the embedding pipeline into a shard file; `score_shard`: a head over stored vectors),
how the shards come back together (`collect_shards`), and which cluster the settings name
(`dask_runner_options`, `ray_runner_options`). flows/scale.py runs these as Prefect tasks on prefect-dask's
DaskTaskRunner or prefect-ray's RayTaskRunner (settings.scaleout.runner).

Workers read images from and write shard files to the workspace, so on a real cluster the workspace must be
storage every worker sees (a shared filesystem or volume) under the same path.
"""

from __future__ import annotations

import os
import zlib
from dataclasses import dataclass
from pathlib import Path
from typing import Any

import numpy as np
import numpy.typing as npt
import torch

from flywheel.atomic import atomic_path
from flywheel.config import Settings
from flywheel.errors import DataError
from flywheel.features.backbones import get_spec
from flywheel.features.pipeline import Embedder, embed_all
from flywheel.features.store import EmbeddingStore, resolve_device
from flywheel.training.head import predict_proba


@dataclass(frozen=True)
class Shard:
    """One task's share of a split: sample ids and their image paths, in catalog order."""

    number: int
    ids: tuple[int, ...]
    paths: tuple[str, ...]


@dataclass(frozen=True)
class ShardResult:
    """What a worker did with a shard: where the vectors are, how many, which worker and device did it."""

    number: int
    path: str
    n: int
    worker: str
    device: str
    reused: bool  # the shard file was already complete (a resumed run): nothing recomputed


def plan_shards(ids: list[int], paths: list[str], shard_size: int) -> list[Shard]:
    """Consecutive shards of at most shard_size samples."""
    if len(ids) != len(paths):
        raise DataError(f"plan_shards: {len(ids)} ids but {len(paths)} paths")
    if shard_size < 1:
        raise DataError(f"plan_shards: scaleout.shard_size must be >= 1, got {shard_size}")
    return [
        Shard(n, tuple(int(i) for i in ids[s : s + shard_size]), tuple(paths[s : s + shard_size]))
        for n, s in enumerate(range(0, len(ids), shard_size))
    ]


def dask_runner_options(settings: Settings) -> dict[str, Any]:
    """Keyword arguments for prefect_dask.DaskTaskRunner: the scheduler at scaleout.address, or a local
    cluster of scaleout.n_workers worker processes (one per GPU is the usual choice)."""
    scale = settings.scaleout
    if scale.address:
        return {"address": scale.address}
    return {
        "cluster_class": "distributed.LocalCluster",
        "cluster_kwargs": {
            "n_workers": scale.n_workers,
            "threads_per_worker": scale.threads_per_worker,
            "processes": True,
            "dashboard_address": None,  # no web UI port to collide with
        },
    }


def ray_runner_options(settings: Settings) -> dict[str, Any]:
    """Keyword arguments for prefect_ray.RayTaskRunner: the cluster at scaleout.address (ray://host:10001),
    or a local Ray with scaleout.n_workers CPUs (so at most that many tasks at once) and no dashboard."""
    scale = settings.scaleout
    if scale.address:
        return {"address": scale.address}
    return {"init_kwargs": {"num_cpus": scale.n_workers, "include_dashboard": False}}


def worker_name() -> str:
    """The Dask worker or Ray worker process running this code, or "local" outside a cluster."""
    try:
        from distributed import get_worker

        return str(get_worker().name)
    except (ImportError, ValueError):
        pass
    import ray

    if ray.is_initialized() and ray.get_runtime_context().worker.mode == ray.WORKER_MODE:
        return f"ray-{ray.get_runtime_context().get_worker_id()[:8]}"
    return "local"


def worker_device(settings: Settings) -> torch.device:
    """The device this worker embeds on: the settings' device, spread over the GPUs when there are several
    (worker i takes GPU i mod count; local-cluster workers are named 0..n-1)."""
    device = resolve_device(settings.finetune.device)
    count = torch.cuda.device_count() if device.type == "cuda" else 0
    if count > 1 and device.index is None:
        name = worker_name()
        slot = int(name) if name.isdigit() else zlib.crc32(name.encode())
        device = torch.device("cuda", slot % count)
    return device


def shard_dir(settings: Settings, key: str) -> Path:
    """Where distributed embedding leaves its shard files before they join the store."""
    return settings.dirs.embeddings / key / "shards"


def _shard_file(settings: Settings, key: str, shard: Shard) -> Path:
    return shard_dir(settings, key) / f"shard-{shard.number:05d}-{shard.ids[0]}-{len(shard.ids)}.npz"


def embed_shard(settings: Settings, version: str, shard: Shard) -> ShardResult:
    """On a worker: embed one shard with the body `version` of settings.backbone into a shard file (written
    atomically). A complete file for the same ids is reused, so a rerun after a crash redoes only the rest."""
    from flywheel.features.embedded import load_body  # features imports tracking (MLflow); only workers need it here

    spec = get_spec(settings.backbone)
    key = EmbeddingStore.key_for(spec, version, settings.image_size)
    path = _shard_file(settings, key, shard)
    device = worker_device(settings)
    if path.exists():
        with np.load(path) as done:
            if tuple(done["ids"].tolist()) == shard.ids:
                return ShardResult(shard.number, str(path), len(shard.ids), worker_name(), str(device), True)
    body = load_body(settings, version)
    vectors = embed_all(list(shard.paths), Embedder.configured(body, settings, device=device))
    with atomic_path(path) as tmp, open(tmp, "wb") as f:
        np.savez(f, ids=np.array(shard.ids, dtype=np.int64), vectors=vectors)
    return ShardResult(shard.number, str(path), len(shard.ids), worker_name(), str(device), False)


def collect_shards(store: EmbeddingStore, results: list[ShardResult]) -> int:
    """Add every shard's vectors to the store in one write, then remove the shard files; returns rows added."""
    if not results:
        return 0
    ids, vectors = [], []
    for result in sorted(results, key=lambda r: r.number):
        with np.load(result.path) as shard:
            ids.append(shard["ids"])
            vectors.append(shard["vectors"])
    store.add(np.concatenate(ids), np.concatenate(vectors))
    for result in results:
        os.unlink(result.path)
    return int(sum(len(i) for i in ids))


def score_shard(
    settings: Settings,
    key: str,
    ids: tuple[int, ...],
    weight: npt.NDArray[np.floating[Any]],
    bias: npt.NDArray[np.floating[Any]],
) -> npt.NDArray[np.float32]:
    """On a worker: class probabilities (len(ids), C) float32 of the stored vectors of `ids` under the
    linear head (weight (C, D), bias (C,))."""
    vectors = EmbeddingStore(settings.dirs.embeddings, key).get(list(ids))
    head = torch.nn.Linear(weight.shape[1], weight.shape[0])
    with torch.no_grad():
        head.weight.copy_(torch.as_tensor(weight))
        head.bias.copy_(torch.as_tensor(bias))
    return predict_proba(head, vectors)
