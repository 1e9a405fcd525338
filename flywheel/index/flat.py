"""Nearest-neighbour index over embeddings (cosine similarity), addressed by sample id.

Exact search (Flat) is the right choice at this product's size: 100k x 512 searches 1k queries in ~0.6 s
on 2 cores (ENVIRONMENT.md). `_FACTORY` is the seam for approximate indexes (IVF, HNSW) when pools grow:
add a kind there (IVF also needs `index.train` on a sample before `add_with_ids`).
"""

from __future__ import annotations

import logging
from pathlib import Path
from typing import Any, cast

import faiss
import numpy as np
import numpy.typing as npt

from flywheel.atomic import atomic_path, verify_checksum
from flywheel.errors import DataError, UnknownChoiceError

log = logging.getLogger(__name__)

# kind -> faiss.index_factory description; all built with inner product on L2-normalised vectors = cosine.
_FACTORY = {"flat": "Flat"}


def _normalized(vectors: npt.NDArray[np.floating[Any]], what: str) -> npt.NDArray[np.float32]:
    """A C-contiguous float32 copy with unit rows (zero rows stay zero)."""
    x = np.array(vectors, dtype=np.float32, order="C", copy=True)
    if x.ndim == 1:
        x = x[None, :]
    if x.ndim != 2:
        raise DataError(f"{what} must be (N, D), got shape {x.shape}")
    if not np.isfinite(x).all():
        raise DataError(f"{what} contain NaN or inf")
    faiss.normalize_L2(x)
    return x


def build_index(
    vectors: npt.NDArray[np.floating[Any]], ids: npt.NDArray[np.integer[Any]], *, kind: str = "flat"
) -> faiss.Index:
    """vectors (N, D) float32, ids (N,) int64 -> a cosine index whose search returns those ids."""
    if kind not in _FACTORY:
        raise UnknownChoiceError("index kind", kind, list(_FACTORY))
    x = _normalized(vectors, "vectors")
    ids = np.ascontiguousarray(ids, dtype=np.int64).reshape(-1)
    if len(ids) != len(x):
        raise DataError(f"build_index: {len(x)} vectors but {len(ids)} ids")
    if len(np.unique(ids)) != len(ids):
        raise DataError("build_index: ids contain duplicates")
    inner = faiss.index_factory(x.shape[1], _FACTORY[kind], faiss.METRIC_INNER_PRODUCT)
    index = faiss.IndexIDMap2(inner)
    if len(x):
        index.add_with_ids(x, ids)
    return index


def search(
    index: faiss.Index, queries: npt.NDArray[np.floating[Any]], k: int
) -> tuple[npt.NDArray[np.float32], npt.NDArray[np.int64]]:
    """Top-k by cosine: scores (Q, k) float32 descending, ids (Q, k) int64; -1 ids pad when k > index size."""
    if k < 1:
        raise DataError(f"search: k must be >= 1, got {k}")
    q = _normalized(queries, "queries")
    if q.shape[1] != index.d:
        raise DataError(f"search: queries are {q.shape[1]}-d, index is {index.d}-d")
    scores, ids = index.search(q, k)
    return scores, ids.astype(np.int64, copy=False)


def radius_search(
    index: faiss.Index, queries: npt.NDArray[np.floating[Any]], min_cosine: float
) -> list[tuple[npt.NDArray[np.int64], npt.NDArray[np.float32]]]:
    """Every stored vector with cosine >= min_cosine to each query: per query (ids (m,) int64, scores (m,)),
    most similar first. Used to find near-duplicates, whose count per query is not known in advance."""
    q = _normalized(queries, "queries")
    if q.shape[1] != index.d:
        raise DataError(f"radius_search: queries are {q.shape[1]}-d, index is {index.d}-d")
    lims, scores, ids = index.range_search(q, float(min_cosine) - 1e-6)  # faiss keeps scores > radius
    out = []
    for i in range(len(q)):
        found_ids, found = ids[lims[i] : lims[i + 1]].astype(np.int64), scores[lims[i] : lims[i + 1]]
        order = np.argsort(-found, kind="stable")
        out.append((found_ids[order], found[order]))
    return out


def index_ids(index: faiss.Index) -> npt.NDArray[np.int64]:
    """The ids stored in an index built by build_index, (N,) int64."""
    mapped = cast(faiss.IndexIDMap, faiss.downcast_index(index))  # the stubs type downcast_index's result as Index
    return faiss.vector_to_array(mapped.id_map).astype(np.int64)


def save_index(index: faiss.Index, path: Path | str) -> None:
    """Write atomically (temp file + os.replace) with a sha256 sidecar: a reader never loads half an index,
    and one damaged later fails `load_index`."""
    with atomic_path(path, checksum=True) as tmp:
        faiss.write_index(index, tmp)


def load_index(path: Path | str) -> faiss.Index:
    """Read an index written by save_index; DataError names a missing or unreadable file, CorruptFileError
    one whose checksum does not match."""
    path = Path(path)
    if not path.is_file():
        raise DataError(f"index file not found: {path}")
    verify_checksum(path)
    try:
        return faiss.read_index(str(path))
    except RuntimeError as exc:
        raise DataError(f"cannot read index {path}: {exc}") from None


def load_or_build(
    path: Path | str, vectors: npt.NDArray[np.floating[Any]], ids: npt.NDArray[np.integer[Any]]
) -> faiss.Index:
    """The index at `path` if it is intact and holds exactly `ids`; else rebuilt from the vectors and saved
    (a missing, stale, damaged or unreadable file is never used)."""
    try:
        index = load_index(path)
        if index.d == vectors.shape[1] and np.array_equal(np.sort(index_ids(index)), np.sort(np.asarray(ids))):
            return index
        log.info("index %s is out of date; rebuilding", path)
    except DataError as exc:  # CorruptFileError included
        log.warning("index %s cannot be used (%s); rebuilding", path, exc)
    index = build_index(vectors, ids)
    save_index(index, path)
    return index
