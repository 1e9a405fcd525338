"""FAISS cosine index addressed by sample id."""

from __future__ import annotations

import numpy as np
import pytest

from flywheel.errors import CorruptFileError, DataError, UnknownChoiceError
from flywheel.index.flat import build_index, index_ids, load_index, load_or_build, radius_search, save_index, search


@pytest.fixture
def data():
    rng = np.random.default_rng(0)
    vectors = rng.normal(size=(50, 16)).astype(np.float32)
    ids = np.arange(1000, 1050, dtype=np.int64)[::-1].copy()  # ids unrelated to positions
    return vectors, ids


def test_self_search_returns_own_id_first(data):
    vectors, ids = data
    index = build_index(vectors, ids)
    scores, found = search(index, vectors * 3.0, k=5)  # scale must not matter: cosine
    assert found.shape == (50, 5) and found.dtype == np.int64
    np.testing.assert_array_equal(found[:, 0], ids)
    np.testing.assert_allclose(scores[:, 0], 1.0, atol=1e-5)
    assert (np.diff(scores, axis=1) <= 1e-6).all()


def test_cosine_ranks_by_angle_not_length():
    vectors = np.array([[1, 0], [10, 1], [0, 1]], dtype=np.float32)
    index = build_index(vectors, np.array([7, 8, 9]))
    _, found = search(index, np.array([1, 0.01], dtype=np.float32), k=3)
    assert found.tolist() == [[7, 8, 9]]


def test_k_larger_than_index_pads_with_minus_one(data):
    vectors, ids = data
    _, found = search(build_index(vectors[:2], ids[:2]), vectors[:1], k=4)
    assert found[0, 2:].tolist() == [-1, -1]


def test_save_load_round_trip(tmp_path, data):
    vectors, ids = data
    path = tmp_path / "sub" / "pool.faiss"
    save_index(build_index(vectors, ids), path)
    assert sorted(p.name for p in path.parent.iterdir()) == ["pool.faiss", "pool.faiss.sha256"]
    _, found = search(load_index(path), vectors[:3], k=1)
    np.testing.assert_array_equal(found[:, 0], ids[:3])


def test_errors_name_the_problem(tmp_path, data):
    vectors, ids = data
    with pytest.raises(DataError, match="missing.faiss"):
        load_index(tmp_path / "missing.faiss")
    with pytest.raises(DataError, match="50 vectors but 3 ids"):
        build_index(vectors, ids[:3])
    with pytest.raises(DataError, match="8-d, index is 16-d"):
        search(build_index(vectors, ids), vectors[:, :8], k=1)
    with pytest.raises(UnknownChoiceError, match="flat"):
        build_index(vectors, ids, kind="hnsw")
    with pytest.raises(DataError, match="duplicates"):
        build_index(vectors[:2], np.array([1, 1]))


def test_radius_search_finds_every_neighbour_above_the_cosine(data):
    vectors, ids = data
    twins = np.vstack([vectors, vectors[3] * 2 + 1e-4, vectors[7]])  # a near copy of row 3, a copy of row 7
    index = build_index(twins, np.concatenate([ids, [5001, 5002]]))
    found = radius_search(index, vectors[[3, 7, 9]], 0.999)
    assert sorted(found[0][0].tolist()) == sorted([ids[3], 5001])
    assert sorted(found[1][0].tolist()) == sorted([ids[7], 5002])
    assert found[2][0].tolist() == [ids[9]]  # random 16-d vectors are far apart
    assert (found[0][1] >= 0.999).all() and (np.diff(found[0][1]) <= 0).all()


def test_a_damaged_index_is_refused_on_load_and_rebuilt(tmp_path, data, caplog):
    vectors, ids = data
    path = tmp_path / "pool.faiss"
    save_index(build_index(vectors, ids), path)
    blob = bytearray(path.read_bytes())
    blob[-10] ^= 0xFF
    path.write_bytes(bytes(blob))
    with pytest.raises(CorruptFileError, match=r"pool\.faiss is corrupt"):
        load_index(path)
    index = load_or_build(path, vectors, ids)
    assert "cannot be used" in caplog.text
    np.testing.assert_array_equal(np.sort(index_ids(index)), np.sort(ids))
    np.testing.assert_array_equal(search(load_index(path), vectors[:2], k=1)[1][:, 0], ids[:2])  # saved again


def test_a_stale_index_is_rebuilt_for_the_current_ids(tmp_path, data):
    vectors, ids = data
    path = tmp_path / "pool.faiss"
    save_index(build_index(vectors[:10], ids[:10]), path)
    assert len(index_ids(load_or_build(path, vectors, ids))) == 50
    assert len(index_ids(load_index(path))) == 50
