"""The pool's vector index with its flat plan, and the shard files it is saved in: cosine search by sample id."""

from __future__ import annotations

import numpy as np
import pytest

from flywheel.config import IndexSettings
from flywheel.errors import CorruptFileError, DataError
from flywheel.index.shard import load_index, save_index, search
from flywheel.index.sharded import ShardedIndex, build_vector_index

FLAT = IndexSettings(kind="flat", shard_size=20)  # 50 vectors make three shards: every query crosses shards


def build_index(vectors: np.ndarray, ids: np.ndarray) -> ShardedIndex:
    return build_vector_index(vectors, ids, FLAT)


@pytest.fixture
def data():
    rng = np.random.default_rng(0)
    vectors = rng.normal(size=(50, 16)).astype(np.float32)
    ids = np.arange(1000, 1050, dtype=np.int64)[::-1].copy()  # ids unrelated to positions
    return vectors, ids


def test_self_search_returns_own_id_first(data):
    vectors, ids = data
    index = build_index(vectors, ids)
    scores, found = index.search(vectors * 3.0, k=5)  # scale must not matter: cosine
    assert found.shape == (50, 5) and found.dtype == np.int64
    np.testing.assert_array_equal(found[:, 0], ids)
    np.testing.assert_allclose(scores[:, 0], 1.0, atol=1e-5)
    assert (np.diff(scores, axis=1) <= 1e-6).all()


def test_cosine_ranks_by_angle_not_length():
    vectors = np.array([[1, 0], [10, 1], [0, 1]], dtype=np.float32)
    index = build_index(vectors, np.array([7, 8, 9]))
    _, found = index.search(np.array([[1, 0.01]], dtype=np.float32), k=3)
    assert found.tolist() == [[7, 8, 9]]


def test_k_larger_than_index_pads_with_minus_one(data):
    vectors, ids = data
    _, found = build_index(vectors[:2], ids[:2]).search(vectors[:1], k=4)
    assert found[0, 2:].tolist() == [-1, -1]


def test_save_load_round_trip(tmp_path, data):
    vectors, ids = data
    build_index(vectors, ids).save(tmp_path / "pool")
    names = sorted(p.name for p in (tmp_path / "pool").iterdir())
    assert names[:3] == ["manifest.json", "shard-00000.faiss", "shard-00000.faiss.sha256"] and len(names) == 12
    _, found = ShardedIndex.load(tmp_path / "pool", FLAT).search(vectors[:3], k=1)
    np.testing.assert_array_equal(found[:, 0], ids[:3])


def test_errors_name_the_problem(tmp_path, data):
    vectors, ids = data
    with pytest.raises(DataError, match="missing.faiss"):
        load_index(tmp_path / "missing.faiss")
    with pytest.raises(DataError, match="50 vectors but 3 ids"):
        build_index(vectors, ids[:3])
    with pytest.raises(DataError, match="8-d, index is 16-d"):
        build_index(vectors, ids).search(vectors[:, :8], k=1)
    with pytest.raises(DataError, match="ids repeat"):
        build_index(vectors[:2], np.array([1, 1]))


def test_radius_search_finds_every_neighbour_above_the_cosine(data):
    vectors, ids = data
    twins = np.vstack([vectors, vectors[3] * 2 + 1e-4, vectors[7]])  # a near copy of row 3, a copy of row 7
    index = build_index(twins, np.concatenate([ids, [5001, 5002]]))
    found = index.radius_search(vectors[[3, 7, 9]], 0.999)
    assert sorted(found[0][0].tolist()) == sorted([ids[3], 5001])
    assert sorted(found[1][0].tolist()) == sorted([ids[7], 5002])
    assert found[2][0].tolist() == [ids[9]]  # random 16-d vectors are far apart
    assert (found[0][1] >= 0.999).all() and (np.diff(found[0][1]) <= 0).all()


def test_a_damaged_shard_file_is_refused_on_load(tmp_path, data):
    vectors, ids = data
    path = tmp_path / "shard.faiss"
    save_index(build_index(vectors, ids).shards[0], path)
    np.testing.assert_array_equal(search(load_index(path), vectors[:2], k=1)[1][:, 0], ids[:2])
    blob = bytearray(path.read_bytes())
    blob[-10] ^= 0xFF
    path.write_bytes(bytes(blob))
    with pytest.raises(CorruptFileError, match=r"shard\.faiss is corrupt"):
        load_index(path)
