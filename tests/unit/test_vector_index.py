"""The index chosen by pool size and memory, trained on a sample, grown and saved in shards."""

from __future__ import annotations

import numpy as np
import pytest

from flywheel.config import IndexSettings
from flywheel.errors import ConfigError, DataError
from flywheel.index.sharded import (
    ShardedIndex,
    auto_nlist,
    build_vector_index,
    index_bytes,
    plan_index,
    sync_vector_index,
)


def blobs(n: int, dim: int = 32, *, seed: int = 0) -> np.ndarray:
    """n points around 10 well-separated centres: nearest neighbours are unambiguous at the blob level."""
    rng = np.random.default_rng(seed)
    centres = rng.normal(size=(10, dim)).astype(np.float32) * 4
    return (centres[rng.integers(0, 10, n)] + rng.normal(size=(n, dim))).astype(np.float32)


def exact_top(x: np.ndarray, ids: np.ndarray, q: np.ndarray, k: int) -> np.ndarray:
    xn = x / np.linalg.norm(x, axis=1, keepdims=True)
    qn = q / np.linalg.norm(q, axis=1, keepdims=True)
    return ids[np.argsort(-(qn @ xn.T), axis=1)[:, :k]]


def recall(found: np.ndarray, exact: np.ndarray) -> float:
    return float(np.mean([len(np.intersect1d(a, b)) / exact.shape[1] for a, b in zip(found, exact, strict=True)]))


# ------------------------------------------------------------------------------------------------ planning


def test_auto_plan_goes_flat_then_ivf_then_ivfpq_by_size_and_memory():
    settings = IndexSettings(flat_max=100_000, memory_budget_gb=4.0)
    assert plan_index(100_000, 512, settings).kind == "flat"
    ivf = plan_index(1_000_000, 512, settings)
    assert ivf.kind == "ivf" and ivf.factory == "IVF4096,Flat" and ivf.nlist == auto_nlist(1_000_000) == 4096
    assert ivf.train_size == 39 * 4096  # enough points per list, more than train_size
    pq = plan_index(10_000_000, 512, settings)  # 20.5 GB of float32 > 4 GB
    assert pq.kind == "ivfpq" and pq.bytes_estimate <= 4e9 and "memory_budget_gb" in pq.reason
    assert pq.factory == f"IVF{pq.nlist},PQ128x8"  # sub-vectors of 4 dims: the finest code; 1.4 GB fits
    tight = plan_index(10_000_000, 512, IndexSettings(memory_budget_gb=1.0))
    assert tight.pq_m == 64 and tight.bytes_estimate <= 1e9  # the largest code that fits 1 GB:
    assert index_bytes("ivfpq", 10_000_000, 512, nlist=tight.nlist, pq_m=128) > 1e9  # the next size up does not


def test_a_forced_kind_and_a_budget_too_small_to_hold_anything():
    assert plan_index(1000, 64, IndexSettings(kind="hnsw", hnsw_m=16)).factory == "IDMap,HNSW16,Flat"
    assert plan_index(10**6, 64, IndexSettings(kind="ivf", nlist=256)).nlist == 256
    small = plan_index(500, 64, IndexSettings(kind="ivf"))
    assert small.nlist == 500 // 39  # never more lists than the points can train
    with pytest.raises(ConfigError, match="memory_budget_gb"):
        plan_index(10**9, 512, IndexSettings(memory_budget_gb=0.5))


# ------------------------------------------------------------------------------------------------ building


@pytest.mark.parametrize("kind", ["flat", "ivf", "hnsw", "ivfpq"])
def test_each_kind_finds_the_exact_neighbours_and_returns_sample_ids(kind):
    x = blobs(4000)
    ids = np.arange(4000, dtype=np.int64) * 5 + 11
    settings = IndexSettings(kind=kind, nlist=16, nprobe=8, train_size=2000, shard_size=1500, memory_budget_gb=1)
    index = build_vector_index(x, ids, settings)
    assert len(index.shards) == 3 and index.ntotal == 4000  # 1500 + 1500 + 1000
    q = blobs(50, seed=1)
    scores, found = index.search(q, 10)
    assert found.shape == (50, 10) and np.isin(found, ids).all()
    assert (np.diff(scores, axis=1) <= 1e-6).all()  # best first, merged across shards
    floor = {"flat": 1.0, "ivf": 0.9, "hnsw": 0.9, "ivfpq": 0.3}[kind]
    assert recall(found, exact_top(x, ids, q, 10)) >= floor


def test_ivfpq_rerank_from_full_vectors_recovers_recall():
    x = blobs(4000)
    ids = np.arange(4000, dtype=np.int64)
    settings = IndexSettings(kind="ivfpq", nlist=16, nprobe=16, train_size=4000, memory_budget_gb=0.00008, rerank=8)
    index = build_vector_index(x, ids, settings)
    assert index.plan.pq_m <= 8  # 4000 x (8 + 8) bytes + centroids under the 80 kB budget
    q = blobs(50, seed=2)
    exact = exact_top(x, ids, q, 10)
    _, raw = index.search(q, 10)
    scores, reranked = index.search(q, 10, vectors_of=lambda wanted: x[wanted])
    assert recall(reranked, exact) >= max(0.75, 2 * recall(raw, exact))  # 0.84 vs 0.29 when written
    rows = x[reranked[0]]
    expected = (rows / np.linalg.norm(rows, axis=1, keepdims=True)) @ (q[0] / np.linalg.norm(q[0]))
    np.testing.assert_allclose(scores[0], expected, rtol=1e-5)  # re-ranked scores are exact cosines


def test_incremental_adds_fill_the_last_shard_and_a_save_rewrites_only_changed_shards(tmp_path):
    x = blobs(2500)
    ids = np.arange(2500, dtype=np.int64)
    settings = IndexSettings(kind="ivf", nlist=8, train_size=1000, shard_size=1000)
    index = build_vector_index(x[:1500], ids[:1500], settings)  # shards of 1000 + 500
    index.save(tmp_path)
    first = (tmp_path / "shard-00000.faiss").stat().st_mtime_ns
    index.add(x[1500:], ids[1500:])  # 500 into shard 1, then a new shard 2 of 500
    assert [len(s) for s in index.shard_ids] == [1000, 1000, 500]
    index.save(tmp_path)
    assert (tmp_path / "shard-00000.faiss").stat().st_mtime_ns == first  # untouched
    back = ShardedIndex.load(tmp_path, settings)
    assert back.ntotal == 2500 and back.plan == index.plan
    q = x[[3, 1700, 2400]]
    _, found = back.search(q, 1)
    assert found[:, 0].tolist() == [3, 1700, 2400]  # each vector is its own nearest neighbour
    with pytest.raises(DataError, match="already in the index"):
        back.add(x[:2], ids[:2])
    with pytest.raises(DataError, match="8-d vectors into a 32-d"):
        back.add(x[:2, :8], np.array([9001, 9002]))


def test_sync_adds_new_ids_then_rebuilds_when_the_plan_changes_or_ids_vanish(tmp_path):
    x = blobs(900)
    ids = np.arange(900, dtype=np.int64)
    settings = IndexSettings(flat_max=700, shard_size=400, nlist=8, train_size=1000)
    index, what = sync_vector_index(tmp_path, x[:600], ids[:600], settings)
    assert index.plan.kind == "flat" and what.startswith("built")
    index, what = sync_vector_index(tmp_path, x[:650], ids[:650], settings)
    assert what == "added 50 vectors to the saved flat index" and index.ntotal == 650
    index, what = sync_vector_index(tmp_path, x, ids, settings)  # 900 > flat_max: now ivf
    assert index.plan.kind == "ivf" and what.startswith("built a ivf index")
    index, what = sync_vector_index(tmp_path, x[100:], ids[100:], settings)  # ids 0..99 are gone
    assert what.startswith("built") and not np.isin(np.arange(100), index.ids).any()
    assert sorted(p.name for p in tmp_path.glob("shard-*.faiss")) == ["shard-00000.faiss", "shard-00001.faiss"]


def test_load_errors_name_the_file(tmp_path):
    settings = IndexSettings()
    with pytest.raises(DataError, match="manifest.json missing"):
        ShardedIndex.load(tmp_path / "nothing", settings)
    build_vector_index(blobs(50), np.arange(50), settings).save(tmp_path)
    (tmp_path / "manifest.json").write_text("{not json")
    with pytest.raises(DataError, match="not valid JSON"):
        ShardedIndex.load(tmp_path, settings)
    empty = ShardedIndex.create(plan_index(0, 32, settings), blobs(1), settings)
    scores, found = empty.search(blobs(2), 3)
    assert (found == -1).all() and np.isinf(scores).all()
