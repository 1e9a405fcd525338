"""One FAISS index (a shard of the pool's vector index): cosine search and range search by sample id, and its
file, written atomically with a checksum.

Every index here uses inner product on L2-normalised vectors, i.e. cosine similarity; `normalized` makes the
copy FAISS needs. flywheel/index/sharded.py builds the pool's index out of such shards.
"""

from __future__ import annotations

from pathlib import Path
from typing import Any

import faiss
import numpy as np
import numpy.typing as npt

from flywheel.atomic import atomic_path, verify_checksum
from flywheel.errors import DataError


def normalized(vectors: npt.NDArray[np.floating[Any]], what: str) -> npt.NDArray[np.float32]:
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


def search(
    index: faiss.Index, queries: npt.NDArray[np.floating[Any]], k: int
) -> tuple[npt.NDArray[np.float32], npt.NDArray[np.int64]]:
    """Top-k by cosine: scores (Q, k) float32 descending, ids (Q, k) int64; -1 ids pad when k > index size."""
    if k < 1:
        raise DataError(f"search: k must be >= 1, got {k}")
    q = normalized(queries, "queries")
    if q.shape[1] != index.d:
        raise DataError(f"search: queries are {q.shape[1]}-d, index is {index.d}-d")
    scores, ids = index.search(q, k)
    return scores, ids.astype(np.int64, copy=False)


def radius_search(
    index: faiss.Index, queries: npt.NDArray[np.floating[Any]], min_cosine: float
) -> list[tuple[npt.NDArray[np.int64], npt.NDArray[np.float32]]]:
    """Every stored vector with cosine >= min_cosine to each query: per query (ids (m,) int64, scores (m,)),
    most similar first. Used to find near-duplicates, whose count per query is not known in advance."""
    q = normalized(queries, "queries")
    if q.shape[1] != index.d:
        raise DataError(f"radius_search: queries are {q.shape[1]}-d, index is {index.d}-d")
    lims, scores, ids = index.range_search(q, float(min_cosine) - 1e-6)  # faiss keeps scores > radius
    out = []
    for i in range(len(q)):
        found_ids, found = ids[lims[i] : lims[i + 1]].astype(np.int64), scores[lims[i] : lims[i + 1]]
        order = np.argsort(-found, kind="stable")
        out.append((found_ids[order], found[order]))
    return out


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
        raise DataError(f"cannot read index {path}: {exc}") from exc
