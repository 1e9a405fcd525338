"""Embeddings: run a frozen body over images once, and keep the vectors on disk keyed by sample id.

Every round reuses the pool's embeddings (for the linear head, FAISS and diversity strategies), so only
new samples — or a new body (backbone, weights version, image size: the store key) — cost a forward pass.
"""

from __future__ import annotations

import logging
import re
from collections.abc import Callable, Iterator, Sequence
from contextlib import AbstractContextManager, contextmanager, nullcontext
from pathlib import Path
from typing import TYPE_CHECKING, Any

import numpy as np
import numpy.typing as npt
import torch

from flywheel import faults
from flywheel.atomic import atomic_path, remove_with_sidecar, verify_checksum
from flywheel.errors import BadImageError, CorruptFileError, DataError, FlywheelError
from flywheel.features.backbones import BackboneSpec
from flywheel.features.pipeline import Embedder, embed_all, embed_stream
from flywheel.sources.images import load_image

if TYPE_CHECKING:
    from rich.progress import Progress

log = logging.getLogger(__name__)

# Images embedded between two saves in embed_samples: bounds the work lost to a crash, while keeping the
# number of whole-file rewrites (each O(store size)) small.

ProgressFn = Callable[[int, int], None]
"""Called as (images embedded so far, images to embed) after each batch, e.g. to update a Prefect artifact."""


class MissingEmbeddingsError(FlywheelError, KeyError):
    """Some requested ids have no vector in the store (embed them first with embed_samples)."""

    def __str__(self) -> str:  # KeyError would print the repr of the message
        return str(self.args[0])


def resolve_device(name: str) -> torch.device:
    """Map "auto" to cuda when available, else cpu; anything else is passed to torch.device."""
    if name == "auto":
        return torch.device("cuda" if torch.cuda.is_available() else "cpu")
    try:
        device = torch.device(name)
    except RuntimeError as exc:
        raise DataError(f"unknown device {name!r}: {exc}") from exc
    if device.type == "cuda" and not torch.cuda.is_available():
        raise DataError(f"device {name!r} requested but CUDA is not available here; use 'auto' or 'cpu'")
    return device


def _progress(enabled: bool) -> AbstractContextManager[Progress | None]:
    """A transient rich progress bar, or a null context yielding None."""
    if not enabled:
        return nullcontext(None)
    from rich.progress import BarColumn, MofNCompleteColumn, Progress, TextColumn, TimeRemainingColumn

    return Progress(
        TextColumn("{task.description}"),
        BarColumn(),
        MofNCompleteColumn(),
        TimeRemainingColumn(),
        transient=True,
    )


def embed_paths(
    paths: Sequence[str], embedder: Embedder, *, progress: bool = True, on_progress: ProgressFn | None = None
) -> npt.NDArray[np.float32]:
    """Features of each image: (N, D) float32, row i for paths[i], with a progress bar (the pipeline does the work)."""
    with _counting(embedder, len(paths), progress=progress, on_progress=on_progress) as on_batch:
        return embed_all(paths, embedder, on_batch=on_batch)


@contextmanager
def _counting(
    embedder: Embedder, total: int, *, progress: bool, on_progress: ProgressFn | None
) -> Iterator[Callable[[int], None]]:
    """The pipeline's per-batch callback, advancing a progress bar (when shown) and on_progress."""
    with _progress(progress and total > 0) as bar:
        what = f"embedding ({embedder.spec.name}, {embedder.image_size}px)"
        task = bar.add_task(what, total=total) if bar else None
        yield _batch_counter(bar, task, on_progress, total)


def _batch_counter(bar: Any, task: Any, on_progress: ProgressFn | None, total: int) -> Callable[[int], None]:
    """The pipeline's per-batch callback: advance the bar and report (done, total) to on_progress."""
    done = 0

    def on_batch(n: int) -> None:
        nonlocal done
        done += n
        if bar is not None:
            bar.update(task, advance=n)
        if on_progress is not None:
            on_progress(done, total)

    return on_batch


PART = "part-{:06d}.npz"  # one add: its ids (n,) int64 and vectors (n, D) float32, checksummed
COMPACT_ABOVE = 256  # parts; more are joined into one on the next add (reads stay a few hundred opens at most)


class EmbeddingStore:
    """Embeddings on disk per (backbone, weights version, image size), keyed by sample id; append-only and atomic.

    Files: root/key/part-NNNNNN.npz, one per `add`, each written atomically with a sha256 sidecar, so adding
    rows writes only the new part: the cost of an add does not grow with the store. An id stored again (a
    vector recomputed) is answered from its newest part. A part that fails its checksum (or cannot be read)
    is deleted and its vectors are recomputed, never trusted; the others stay. Older stores kept everything
    in ids.npy + vectors.npy: they are read as the oldest part. One writer per key at a time.
    """

    def __init__(self, root: Path, key: str):
        self.dir = Path(root) / key
        self.key = key
        self._ids: npt.NDArray[np.int64] | None = None
        self._vectors: npt.NDArray[np.float32] | None = None
        self._stamp: tuple[str, ...] | None = None  # the part files when loaded

    @staticmethod
    def key_for(spec: BackboneSpec, weights_version: str, image_size: int) -> str:
        """A filesystem-safe name: a different body or input size must never share cached vectors."""
        raw = f"{spec.name}__{spec.weights_id}__{weights_version}__{image_size}px"
        return re.sub(r"[^A-Za-z0-9_.-]+", "-", raw)

    # -- loading
    def _parts(self) -> list[Path]:
        return sorted(self.dir.glob("part-*.npz")) if self.dir.is_dir() else []

    def _file_stamp(self) -> tuple[str, ...]:
        legacy = ("ids.npy",) if (self.dir / "ids.npy").exists() else ()
        return legacy + tuple(p.name for p in self._parts())

    def _load(self) -> tuple[npt.NDArray[np.int64], npt.NDArray[np.float32] | None]:
        """The stored rows (newest vector per id), re-read when another writer added or removed parts."""
        stamp = self._file_stamp()
        if self._ids is None or stamp != self._stamp:
            pieces = [piece for piece in (self._legacy(), *map(self._read, self._parts())) if piece is not None]
            if pieces:
                ids = np.concatenate([i for i, _ in pieces])
                vectors = np.concatenate([v for _, v in pieces])
                _, newest_first = np.unique(ids[::-1], return_index=True)
                keep = np.sort(len(ids) - 1 - newest_first)  # the newest row of each id, in stored order
                self._ids, self._vectors = ids[keep], vectors[keep]
            else:
                self._ids, self._vectors = np.empty(0, np.int64), None
            self._stamp = self._file_stamp()
        return self._ids, self._vectors

    def _read(self, part: Path) -> tuple[npt.NDArray[np.int64], npt.NDArray[np.float32]] | None:
        try:
            verify_checksum(part)
            with np.load(part) as data:
                ids, vectors = data["ids"].astype(np.int64, copy=False), data["vectors"]
            if vectors.ndim != 2 or len(vectors) != len(ids):
                raise CorruptFileError(f"{len(ids)} ids but vectors of shape {vectors.shape}")
            return ids, vectors
        except (CorruptFileError, ValueError, OSError, EOFError, KeyError) as exc:
            log.warning("embedding store part %s is damaged (%s): deleted, its vectors will be recomputed", part, exc)
            remove_with_sidecar(part)
            return None

    def _legacy(self) -> tuple[npt.NDArray[np.int64], npt.NDArray[np.float32]] | None:
        """ids.npy + vectors.npy of an older store: the oldest part, or nothing when damaged (then deleted)."""
        ids_path, vec_path = self.dir / "ids.npy", self.dir / "vectors.npy"
        if not ids_path.exists():
            return None
        try:
            verify_checksum(ids_path)
            verify_checksum(vec_path)
            ids, vectors = np.load(ids_path), np.load(vec_path)
            if len(vectors) < len(ids):
                raise CorruptFileError(f"{len(ids)} ids but only {len(vectors)} vectors")
            return ids.astype(np.int64, copy=False), vectors[: len(ids)]
        except (CorruptFileError, ValueError, OSError, EOFError) as exc:
            log.warning("embedding store %s is damaged (%s): discarded, its vectors will be recomputed", self.dir, exc)
            for name in ("ids.npy", "vectors.npy"):
                remove_with_sidecar(self.dir / name)
            return None

    def discard(self) -> None:
        """Delete the stored files (and checksums): everything is embedded again on the next embed_samples."""
        for part in self._parts():
            remove_with_sidecar(part)
        for name in ("ids.npy", "vectors.npy"):
            remove_with_sidecar(self.dir / name)
        self._ids = self._vectors = self._stamp = None

    def __len__(self) -> int:
        return len(self._load()[0])

    def _positions(
        self, ids: Sequence[int] | npt.NDArray[np.int64]
    ) -> tuple[npt.NDArray[np.intp], npt.NDArray[np.bool_]]:
        """Row of each id in the store and a mask of which ids are present."""
        stored, _ = self._load()
        query = np.asarray(ids, dtype=np.int64).reshape(-1)
        if not len(stored):
            return np.zeros(len(query), np.int64), np.zeros(len(query), bool)
        order = np.argsort(stored, kind="stable")
        sorted_ids = stored[order]
        at = np.clip(np.searchsorted(sorted_ids, query), 0, len(sorted_ids) - 1)
        found = sorted_ids[at] == query
        return order[at], found

    # -- public API
    def missing(self, ids: Sequence[int]) -> list[int]:
        """The ids (in the given order, without repeats) that have no vector yet."""
        _, found = self._positions(ids)
        return list(dict.fromkeys(int(i) for i, ok in zip(np.asarray(ids).reshape(-1), found, strict=True) if not ok))

    def get(self, ids: Sequence[int]) -> npt.NDArray[np.float32]:
        """(len(ids), D) float32, rows in the order of ids."""
        rows, found = self._positions(ids)
        if not found.all():
            absent = np.asarray(ids, dtype=np.int64).reshape(-1)[~found]
            raise MissingEmbeddingsError(
                f"{len(absent)} of {len(found)} ids have no embedding under {self.key} "
                f"(e.g. {absent[:5].tolist()}); run embed_samples first"
            )
        _, vectors = self._load()
        if vectors is None:  # only reachable with an empty query
            return np.empty((0, 0), np.float32)
        return vectors[rows]

    def add(self, ids: Sequence[int], vectors: npt.NDArray[np.floating[Any]]) -> None:
        """Store vectors (N, D) for ids (N,) as a new part; ids already stored get the new vectors."""
        new_ids: npt.NDArray[np.int64] = np.asarray(ids, dtype=np.int64).reshape(-1)
        vectors = np.asarray(vectors, dtype=np.float32)
        if vectors.ndim != 2 or len(vectors) != len(new_ids):
            raise DataError(f"add: {len(new_ids)} ids but vectors of shape {vectors.shape}")
        if len(np.unique(new_ids)) != len(new_ids):
            raise DataError("add: ids contain duplicates")
        if not len(new_ids):
            return
        _, old = self._load()
        if old is not None and old.shape[1] != vectors.shape[1]:
            raise DataError(f"add: {vectors.shape[1]}-d vectors into a {old.shape[1]}-d store {self.dir}")
        parts = self._parts()
        if len(parts) >= COMPACT_ABOVE:
            self._compact(parts)
            parts = self._parts()
        number = int(parts[-1].name[5:11]) + 1 if parts else 0
        self._write_part(number, new_ids, vectors)
        faults.point("embed:after_vectors")
        self._ids = self._vectors = self._stamp = None  # re-read on the next question

    def _write_part(self, number: int, ids: npt.NDArray[np.int64], vectors: npt.NDArray[np.float32]) -> None:
        self.dir.mkdir(parents=True, exist_ok=True)
        with atomic_path(self.dir / PART.format(number), checksum=True) as tmp, open(tmp, "wb") as f:
            np.savez(f, ids=ids, vectors=vectors)

    def _compact(self, parts: list[Path]) -> None:
        """Join every part (and a legacy pair) into one, newest after the rest; a crash midway leaves rows twice,
        which loading resolves (the newest wins, and both copies are the same)."""
        ids, vectors = self._load()
        if vectors is None:
            return
        number = int(parts[-1].name[5:11]) + 1
        self._write_part(number, ids, vectors)
        for part in parts:
            remove_with_sidecar(part)
        for name in ("ids.npy", "vectors.npy"):
            remove_with_sidecar(self.dir / name)


def embed_samples(
    store: EmbeddingStore,
    ids: Sequence[int],
    paths: Sequence[str],
    embedder: Embedder,
    *,
    progress: bool = True,
    on_progress: ProgressFn | None = None,
) -> npt.NDArray[np.float32]:
    """Embed only the ids missing from the store (saving as it goes); return (len(ids), D) in ids' order.

    on_progress counts only the images embedded now. One stream of shards (`options.shard_size` images, each
    stored as it completes): a crash loses at most one shard, and the rerun embeds only what is missing.
    """
    if len(ids) != len(paths):
        raise DataError(f"embed_samples: {len(ids)} ids but {len(paths)} paths")
    path_of = dict(zip((int(i) for i in ids), paths, strict=True))
    todo = store.missing(ids)
    with _counting(embedder, len(todo), progress=progress, on_progress=on_progress) as on_batch:
        for start, vectors in embed_stream([path_of[i] for i in todo], embedder, on_batch=on_batch):
            store.add(todo[start : start + len(vectors)], vectors)  # each shard saved as it completes
    return store.get(ids)


def embed_available(
    store: EmbeddingStore,
    ids: Sequence[int],
    paths: Sequence[str],
    embedder: Embedder,
    *,
    on_bad: Callable[[int, BadImageError], None],
    progress: bool = True,
    on_progress: ProgressFn | None = None,
) -> tuple[npt.NDArray[np.float32], list[int]]:
    """`embed_samples`, except that images which cannot be decoded are reported to `on_bad(id, error)` and
    left out, so one bad file does not stop the rest. Returns (vectors, the ids they belong to).

    The happy path costs nothing extra: only when embedding fails are the images not yet embedded decoded
    one by one to find the culprits (if none is found, the original error propagates).
    """
    try:
        vectors = embed_samples(store, ids, paths, embedder, progress=progress, on_progress=on_progress)
        return vectors, [int(i) for i in ids]
    except Exception:
        path_of = dict(zip((int(i) for i in ids), paths, strict=True))
        broken: dict[int, BadImageError] = {}
        for i in store.missing(ids):
            try:
                load_image(path_of[i])
            except BadImageError as exc:
                broken[i] = exc
        if not broken:
            raise
    for i, error in broken.items():
        on_bad(i, error)
    keep = [k for k, i in enumerate(ids) if int(i) not in broken]
    return embed_available(
        store, [ids[k] for k in keep], [paths[k] for k in keep], embedder,
        on_bad=on_bad, progress=progress, on_progress=on_progress,
    )  # fmt: skip
