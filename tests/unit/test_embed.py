"""Embedding extraction and the on-disk store."""

from __future__ import annotations

import os
import threading
import time
from pathlib import Path
from typing import Any

import numpy as np
import pytest
import torch
from torch import nn
from torchvision.io import write_png

from flywheel.atomic import atomic_path
from flywheel.errors import DataError, FlywheelError
from flywheel.features import store as store_module
from flywheel.features.backbones import BackboneSpec, build_body, get_spec
from flywheel.features.pipeline import Embedder, EmbedOptions, embed_all
from flywheel.features.store import (
    EmbeddingStore,
    MissingEmbeddingsError,
    embed_available,
    embed_paths,
    embed_samples,
    resolve_device,
)

CPU = torch.device("cpu")
FAKE = BackboneSpec("fake", 3, (0.0, 0.0, 0.0), (1.0, 1.0, 1.0), "fake/v1")


class MeanColour(nn.Module):
    """A stand-in body: (B, 3, H, W) -> per-channel means (B, 3); counts images seen."""

    def __init__(self):
        super().__init__()
        self.seen = 0

    def forward(self, x):
        self.seen += len(x)
        return x.mean(dim=(2, 3))


@pytest.fixture
def images(tmp_path):
    """Six solid-colour PNGs; image i has red = 10*i."""
    paths = []
    for i in range(6):
        img = torch.zeros(3, 8, 8, dtype=torch.uint8)
        img[0] = 10 * i
        paths.append(str(tmp_path / f"{i}.png"))
        write_png(img, paths[-1])
    return paths


def test_embed_paths_shape_dtype_and_order(images):
    out = embed_paths(images, Embedder(MeanColour(), FAKE, 4, CPU, EmbedOptions(4, workers=0)), progress=False)
    assert out.shape == (6, 3) and out.dtype == np.float32
    np.testing.assert_allclose(out[:, 0], np.arange(6) * 10 / 255, atol=1e-6)


def test_embed_paths_with_real_lite0(images):
    lite0 = Embedder(build_body("efficientnet_lite0"), get_spec("efficientnet_lite0"), 32, CPU, EmbedOptions(2, 0))
    out = embed_paths(images[:3], lite0, progress=True)
    assert out.shape == (3, 1280) and out.dtype == np.float32 and np.isfinite(out).all()
    assert not np.allclose(out[0], out[2])


def test_key_is_filesystem_safe_and_distinguishes_bodies():
    key = EmbeddingStore.key_for(FAKE, "models:/flywheel/3", 64)
    assert "/" not in key and ":" not in key
    assert key != EmbeddingStore.key_for(FAKE, "models:/flywheel/3", 96)
    assert key != EmbeddingStore.key_for(FAKE, "models:/flywheel/4", 64)


PART0 = "part-000000.npz"


def test_store_round_trip_order_and_missing(tmp_path):
    store = EmbeddingStore(tmp_path, "k")
    vectors = np.arange(12, dtype=np.float32).reshape(4, 3)
    store.add([10, 20, 30, 40], vectors)
    reopened = EmbeddingStore(tmp_path, "k")
    np.testing.assert_array_equal(reopened.get([30, 10]), vectors[[2, 0]])
    assert reopened.missing([40, 50, 10, 60, 50]) == [50, 60]
    with pytest.raises(MissingEmbeddingsError, match="2 of 3 ids") as err:
        reopened.get([10, 50, 60])
    assert isinstance(err.value, FlywheelError)
    files = sorted(p.name for p in (tmp_path / "k").iterdir())
    assert files == ["part-000000.npz", "part-000000.npz.sha256"]  # no temp left


def test_store_add_overwrites_existing_and_appends_new(tmp_path):
    store = EmbeddingStore(tmp_path, "k")
    store.add([1, 2], np.zeros((2, 3), np.float32))
    store.add([2, 3], np.ones((2, 3), np.float32))
    assert len(EmbeddingStore(tmp_path, "k")) == 3
    np.testing.assert_array_equal(EmbeddingStore(tmp_path, "k").get([1, 2, 3])[:, 0], [0, 1, 1])


def test_store_rejects_bad_adds(tmp_path):
    store = EmbeddingStore(tmp_path, "k")
    store.add([1], np.zeros((1, 3), np.float32))
    with pytest.raises(DataError, match="4-d vectors into a 3-d store"):
        store.add([2], np.zeros((1, 4), np.float32))
    with pytest.raises(DataError, match="duplicates"):
        store.add([5, 5], np.zeros((2, 3), np.float32))
    with pytest.raises(DataError, match="2 ids"):
        store.add([6, 7], np.zeros((3, 3), np.float32))


def _atomic_save(path: Path, array: np.ndarray) -> None:
    with atomic_path(path, checksum=True) as tmp, open(tmp, "wb") as f:
        np.save(f, array)


def _part(folder: Path, ids: list[int], vectors: np.ndarray, number: int = 0) -> None:
    with atomic_path(folder / f"part-{number:06d}.npz", checksum=True) as tmp, open(tmp, "wb") as f:
        np.savez(f, ids=np.array(ids, np.int64), vectors=vectors)


def test_an_older_store_is_read_as_the_oldest_part(tmp_path):
    # ids.npy + vectors.npy as the one-file store wrote them, with a trailing row from an add that died
    _atomic_save(tmp_path / "k" / "ids.npy", np.array([1, 2], np.int64))
    _atomic_save(tmp_path / "k" / "vectors.npy", np.arange(9, dtype=np.float32).reshape(3, 3))
    store = EmbeddingStore(tmp_path, "k")
    assert len(store) == 2 and store.missing([1, 2, 3]) == [3]
    store.add([2, 3], np.full((2, 3), 7, np.float32))
    reopened = EmbeddingStore(tmp_path, "k")
    np.testing.assert_array_equal(reopened.get([1, 2, 3]), [[0, 1, 2], [7, 7, 7], [7, 7, 7]])  # newest wins


def test_adding_rows_writes_only_their_part(tmp_path):
    store = EmbeddingStore(tmp_path, "k")
    store.add([1, 2], np.zeros((2, 3), np.float32))
    store.add([3], np.ones((1, 3), np.float32))
    folder = tmp_path / "k"
    before = {p.name: (p.stat().st_ino, p.stat().st_mtime_ns, p.stat().st_size) for p in folder.iterdir()}
    store.add([4, 5], np.full((2, 3), 2, np.float32))
    after = {p.name: (p.stat().st_ino, p.stat().st_mtime_ns, p.stat().st_size) for p in folder.iterdir()}
    assert {k: after[k] for k in before} == before  # every earlier file untouched
    assert sorted(set(after) - set(before)) == ["part-000002.npz", "part-000002.npz.sha256"]
    np.testing.assert_array_equal(EmbeddingStore(tmp_path, "k").get([5, 3, 1])[:, 0], [2, 1, 0])


def test_many_parts_are_joined(tmp_path, monkeypatch):
    monkeypatch.setattr(store_module, "COMPACT_ABOVE", 4)
    store = EmbeddingStore(tmp_path, "k")
    for i in range(10):
        store.add([i, 100], np.full((2, 3), i, np.float32))  # 100 is stored again each time
    assert len(list((tmp_path / "k").glob("part-*.npz"))) <= 4
    reopened = EmbeddingStore(tmp_path, "k")
    assert len(reopened) == 11
    np.testing.assert_array_equal(reopened.get([0, 9, 100])[:, 0], [0, 9, 9])


@pytest.mark.parametrize(
    "damage",
    [
        lambda d: (d / PART0).write_bytes((d / PART0).read_bytes()[:-1] + b"\1"),  # one byte off
        lambda d: (d / PART0).write_bytes(b""),  # truncated to nothing
        lambda d: (d / f"{PART0}.sha256").unlink(),  # no checksum: not trusted
        lambda d: _part(d, [0, 1, 2], np.zeros((1, 3), np.float32)),  # fewer vectors than ids
    ],
    ids=["bit-flip", "truncated", "no-checksum", "fewer-vectors"],
)
def test_a_damaged_store_is_discarded_and_rebuilt(tmp_path, images, damage, caplog):
    body, kw = MeanColour(), dict[str, Any](progress=False)
    embedder = Embedder(body, FAKE, 4, CPU, EmbedOptions(batch_size=8, workers=0))
    store = EmbeddingStore(tmp_path, "k")
    first = embed_samples(store, [0, 1, 2], images[:3], embedder, **kw)
    damage(tmp_path / "k")
    reopened = EmbeddingStore(tmp_path, "k")
    assert len(reopened) == 0 and "damaged" in caplog.text  # detected on load, never served
    again = embed_samples(reopened, [0, 1, 2], images[:3], embedder, **kw)
    np.testing.assert_allclose(again, first, rtol=1e-5)  # recomputed
    assert len(EmbeddingStore(tmp_path, "k")) == 3


def test_embed_available_quarantines_unreadable_images_and_embeds_the_rest(tmp_path: Path, images: list[str]) -> None:
    body, kw = MeanColour(), dict[str, Any](progress=False)
    embedder = Embedder(body, FAKE, 4, CPU, EmbedOptions(batch_size=8, workers=0))
    truncated = tmp_path / "truncated.png"
    truncated.write_bytes(Path(images[0]).read_bytes()[:-20])
    empty = tmp_path / "empty.png"
    empty.write_bytes(b"")
    store = EmbeddingStore(tmp_path, "k")
    bad: dict[int, str] = {}
    paths = [images[0], str(truncated), images[1], str(empty), images[2]]
    vectors, kept = embed_available(
        store, [0, 1, 2, 3, 4], paths, embedder, on_bad=lambda i, exc: bad.update({i: exc.reason}), **kw
    )
    assert bad == {1: "truncated or corrupt", 3: "empty file"}
    assert kept == [0, 2, 4] and vectors.shape == (3, FAKE.embedding_dim)
    np.testing.assert_allclose(vectors, embed_samples(store, [0, 2, 4], [images[i] for i in range(3)], embedder, **kw))
    with pytest.raises(DataError, match="truncated"):  # without on_bad the error still stops the caller
        embed_samples(EmbeddingStore(tmp_path, "other"), [1], [str(truncated)], embedder, **kw)


def test_embed_samples_embeds_only_missing_ids(tmp_path, images):
    store = EmbeddingStore(tmp_path / "emb", "k")
    body = MeanColour()
    kw = dict[str, Any](progress=False)
    embedder = Embedder(body, FAKE, 4, CPU, EmbedOptions(batch_size=8, workers=0))
    first = embed_samples(store, [0, 1, 2], images[:3], embedder, **kw)
    assert body.seen == 3
    everything = embed_samples(EmbeddingStore(tmp_path / "emb", "k"), [5, 4, 3, 2, 1, 0], images[::-1], embedder, **kw)
    assert body.seen == 6  # only ids 3, 4, 5 were new
    np.testing.assert_allclose(everything[::-1][:3], first)
    np.testing.assert_allclose(everything[:, 0], np.array([5, 4, 3, 2, 1, 0]) * 10 / 255, atol=1e-6)
    embed_samples(store, [0, 5], [images[0], images[5]], embedder, **kw)
    assert body.seen == 6


def test_resolve_device():
    assert resolve_device("cpu") == CPU
    expected = "cuda" if torch.cuda.is_available() else "cpu"
    assert resolve_device("auto").type == expected
    with pytest.raises(DataError, match="unknown device"):
        resolve_device("abacus")
    if not torch.cuda.is_available():
        with pytest.raises(DataError, match="CUDA is not available"):
            resolve_device("cuda")


def test_forked_dataloader_workers_survive_thread_exit_hooks_of_the_parent(images):
    """Prefect's background services register thread-exit hooks; a forked DataLoader worker inheriting them
    used to exit 1 and fail the embedding (e.g. `flywheel round` embedding new images inside a flow run)."""
    parent = os.getpid()

    def fails_outside_the_parent() -> None:
        if os.getpid() != parent:  # like prefect's drain: takes a while, then fails in a process without its thread
            time.sleep(0.5)
            raise RuntimeError("a hook of the parent's threads ran in a worker")

    threading._register_atexit(fails_outside_the_parent)  # what prefect's QueueService does
    try:
        spec = get_spec("efficientnet_lite0")
        out = embed_all(images, Embedder(build_body("efficientnet_lite0"), spec, 16, CPU, EmbedOptions(2, workers=1)))
        assert out.shape == (6, 1280) and np.isfinite(out).all()
    finally:
        hooks = threading._threading_atexits  # holds functools.partial objects
        hooks[:] = [hook for hook in hooks if getattr(hook, "func", None) is not fails_outside_the_parent]
