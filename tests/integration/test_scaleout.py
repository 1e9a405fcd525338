"""Scale-out through Prefect: embedding and scoring sharded over 2 worker processes, reported to the real
Prefect test server; on Dask once on a local cluster the task runner starts and once on an existing cluster,
and on a local Ray."""

from __future__ import annotations

import os
from pathlib import Path

import numpy as np
import pytest
import torch
from distributed import LocalCluster
from prefect import get_client
from prefect.client.schemas.filters import FlowRunFilter, FlowRunFilterId
from prefect_ray import RayTaskRunner

from flows.deploy import prefect_api
from flows.scale import distributed, embed_distributed_flow, score_distributed_flow, task_runner
from flywheel import scaleout
from flywheel.catalog import Catalog
from flywheel.config import load_settings
from flywheel.features.backbones import Classifier, build_body, get_spec
from flywheel.features.pipeline import Embedder, EmbedOptions, embed_all
from flywheel.features.store import EmbeddingStore, embed_samples
from flywheel.registry import tracking
from flywheel.sources.importing import import_source
from flywheel.training.head import predict_proba, train_head
from tests.conftest import TEST_PORTS
from tests.integration.test_far_domain import _label

pytestmark = pytest.mark.integration
CPU = torch.device("cpu")


@pytest.fixture
def project(tmp_path: Path, services):
    """96 Fashion-MNIST images at 32 px; shards of 16 on 2 workers; overrides are what the flows get."""
    overrides = {
        "workspace": str(tmp_path / "ws"),
        "project": "dask" + os.urandom(3).hex(),
        "label_studio": {"port": TEST_PORTS["label_studio"]},
        "mlflow": {"port": TEST_PORTS["mlflow"]},
        "prefect": {"port": TEST_PORTS["prefect"]},
        "image_size": 32,
        "embed": {"workers": 0},  # the Dask workers are the parallelism here
        "scaleout": {"n_workers": 2, "shard_size": 16},
    }
    settings = load_settings(**overrides)
    catalog = Catalog(settings.catalog_url)
    import_source(catalog, settings, "fashion-mnist", pool_size=96, test_size=10)
    spec = get_spec(settings.backbone)
    store = EmbeddingStore(settings.dirs.embeddings, EmbeddingStore.key_for(spec, "imagenet", 32))
    return settings, overrides, catalog, store


def _task_runs(flow_run_id) -> list:
    with get_client(sync_client=True) as client:
        return client.read_task_runs(flow_run_filter=FlowRunFilter(id=FlowRunFilterId(any_=[flow_run_id])))


def test_embedding_is_sharded_over_a_local_cluster_of_two_workers(project):
    settings, overrides, catalog, store = project
    rows = catalog.samples()
    ids, paths = [r.id for r in rows], [r.uri for r in rows]
    body, spec = build_body(settings.backbone), get_spec(settings.backbone)
    embedder = Embedder(body, spec, 32, CPU, EmbedOptions(batch_size=16, workers=0))
    embed_samples(store, ids[:16], paths[:16], embedder, progress=False)

    with prefect_api(settings):
        state = distributed(embed_distributed_flow, settings)(overrides=overrides, return_state=True)
        result = state.result()
        task_runs = _task_runs(state.state_details.flow_run_id)

    assert result["embedded"] == 80 and result["cached"] == 16  # the 16 already stored were not redone
    assert [s["n"] for s in result["shards"]] == [16] * 5 and not any(s["reused"] for s in result["shards"])
    assert len(result["workers"]) == 2  # both Dask workers took shards
    shard_runs = [t for t in task_runs if t.name.startswith("embed_shard")]
    assert len(shard_runs) == 5 and all(t.state.is_completed() for t in shard_runs)  # seen by the server
    expected = embed_all(paths, embedder)
    np.testing.assert_allclose(store.get(ids), expected, rtol=1e-4, atol=1e-4)
    assert not list(scaleout.shard_dir(settings, store.key).glob("*.npz"))  # shard files joined the store


def test_embedding_is_sharded_over_a_local_ray(project):
    _, overrides, catalog, store = project
    overrides = {**overrides, "scaleout": {**overrides["scaleout"], "runner": "ray"}}
    settings = load_settings(**overrides)
    rows = catalog.samples()
    ids, paths = [r.id for r in rows], [r.uri for r in rows]
    assert isinstance(task_runner(settings), RayTaskRunner)

    with prefect_api(settings):
        state = distributed(embed_distributed_flow, settings)(overrides=overrides, return_state=True)
        result = state.result()
        task_runs = _task_runs(state.state_details.flow_run_id)

    assert result["embedded"] == 96 and result["cached"] == 0 and len(result["shards"]) == 6
    assert result["workers"] and all(w.startswith("ray-") for w in result["workers"])  # Ray workers, not here
    shard_runs = [t for t in task_runs if t.name.startswith("embed_shard")]
    assert len(shard_runs) == 6 and all(t.state.is_completed() for t in shard_runs)  # seen by the server
    body, spec = build_body(settings.backbone), get_spec(settings.backbone)
    expected = embed_all(paths, Embedder(body, spec, 32, CPU, EmbedOptions(workers=0)))
    np.testing.assert_allclose(store.get(ids), expected, rtol=1e-4, atol=1e-4)


def test_scoring_runs_on_an_existing_cluster_at_scaleout_address(project):
    settings, overrides, catalog, store = project
    rows = catalog.samples()
    ids, paths = [r.id for r in rows], [r.uri for r in rows]
    body, spec = build_body(settings.backbone), get_spec(settings.backbone)
    vectors = embed_samples(store, ids, paths, Embedder(body, spec, 32, CPU, EmbedOptions(32, 0)), progress=False)
    classes = sorted({r.truth for r in rows})
    targets = np.array([classes.index(r.truth) for r in rows])
    head = train_head(vectors, targets, len(classes))
    client = tracking.connect(settings)
    logged = tracking.log_classifier(
        client, settings, Classifier(settings.backbone, body, head, classes, 32),
        run_name="dask-scoring", params={"image_size": 32}, metrics={}, tags={"kind": "head"},
    )  # fmt: skip

    with LocalCluster(n_workers=2, threads_per_worker=1, processes=True, dashboard_address=None) as cluster:
        remote = {**overrides, "scaleout": {"address": cluster.scheduler_address, "shard_size": 40}}
        settings_remote = load_settings(**remote)
        assert scaleout.dask_runner_options(settings_remote) == {"address": cluster.scheduler_address}
        with prefect_api(settings):
            result = distributed(score_distributed_flow, settings_remote)(
                model_version=logged.version, overrides=remote
            )
        prefixes = {name: dict(prefix.state_counts) for name, prefix in cluster.scheduler.task_prefixes.items()}

    assert result["n"] == 96 and result["shards"] == 3  # 40 + 40 + 16
    assert prefixes["score_shard"]["memory"] == 3  # the three shards ran on this cluster
    with np.load(result["path"]) as scored:
        assert scored["ids"].tolist() == ids
        np.testing.assert_allclose(scored["probs"], predict_proba(head, vectors), rtol=1e-5, atol=1e-6)


def test_a_shard_file_already_complete_is_reused_not_recomputed(project):
    settings, _, catalog, store = project
    rows = catalog.samples()[:8]
    shard = scaleout.plan_shards([r.id for r in rows], [r.uri for r in rows], 8)[0]
    first = scaleout.embed_shard(settings, "imagenet", shard)
    again = scaleout.embed_shard(settings, "imagenet", shard)
    assert not first.reused and again.reused and again.path == first.path and first.worker == "local"
    assert scaleout.collect_shards(store, [again]) == 8 and store.missing([r.id for r in rows]) == []
    with pytest.raises(Exception, match="6 ids but 5 paths"):
        scaleout.plan_shards([1, 2, 3, 4, 5, 6], ["a"] * 5, 2)
    assert [len(s.ids) for s in scaleout.plan_shards(list(range(5)), ["p"] * 5, 2)] == [2, 2, 1]
    assert scaleout.dask_runner_options(settings)["cluster_kwargs"]["n_workers"] == 2
    assert scaleout.ray_runner_options(settings) == {"init_kwargs": {"num_cpus": 2, "include_dashboard": False}}
    remote = settings.model_copy(update={"scaleout": settings.scaleout.model_copy(update={"address": "ray://h:1"})})
    assert scaleout.ray_runner_options(remote) == {"address": "ray://h:1"}


def test_a_round_with_a_dask_scheduler_embeds_there_and_selects_as_the_local_round(tmp_path: Path, services):
    """With scaleout.address set, bootstrap and round embed on the cluster (a subflow of shard tasks, into the
    store the round reads); the vectors and the round's selection are the ones the same round gives locally."""
    from flows.flywheel_flows import bootstrap_flow, round_flow

    suffix = os.urandom(3).hex()
    results = {}
    with LocalCluster(n_workers=2, threads_per_worker=1, processes=True, dashboard_address=None) as cluster:
        for where, scale in (("local", {}), ("dask", {"address": cluster.scheduler_address})):
            overrides = {
                "workspace": str(tmp_path / where), "project": f"rd{where}{suffix}", "image_size": 32,
                "k_per_round": 10, "label_studio": {"port": TEST_PORTS["label_studio"]},
                "mlflow": {"port": TEST_PORTS["mlflow"]}, "prefect": {"port": TEST_PORTS["prefect"]},
                "embed": {"workers": 0}, "scaleout": {"shard_size": 32, **scale},
            }  # fmt: skip
            settings = load_settings(**overrides)
            catalog = Catalog(settings.catalog_url)
            import_source(catalog, settings, "fashion-mnist", pool_size=96, test_size=20)
            _label(catalog, 2)
            with prefect_api(settings):
                bootstrap_flow(overrides=overrides)
                report = round_flow(overrides=overrides)
            spec, ids = get_spec(settings.backbone), [s.id for s in catalog.samples()]
            store = EmbeddingStore(settings.dirs.embeddings, EmbeddingStore.key_for(spec, "imagenet", 32))
            results[where] = (report, store.get(ids))
        shards = dict(cluster.scheduler.task_prefixes["embed_shard"].state_counts)

    (local, local_vectors), (dask, dask_vectors) = results["local"], results["dask"]
    assert shards["memory"] == 4  # the pool's 96 in three shards of 32, the test split's 20 in one
    np.testing.assert_allclose(dask_vectors, local_vectors, rtol=1e-4, atol=1e-4)
    assert dask.strategy == local.strategy and len(local.selected) == 10
    assert [s["sample_id"] for s in dask.selected] == [s["sample_id"] for s in local.selected]
    assert dask.test_accuracy == pytest.approx(local.test_accuracy, abs=0.051)  # one test image of 20 at most
