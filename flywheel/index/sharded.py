"""FAISS at scale: the index type chosen by pool size and memory, trained on a sample, grown and saved in shards.

- flat: exact; the default up to `index.flat_max` vectors (1k queries over 100k x 512 take ~0.6 s on 2 cores).
- ivf: IVF-Flat, the default above that while the vectors fit `index.memory_budget_gb`: k-means lists trained on
  a sample, `nprobe` lists searched per query; adds need no retraining. (hnsw: no training and the best
  recall per query time, but a slower build and +2*M*4 bytes per vector; chosen by `index.kind = "hnsw"`.)
- ivfpq: IVF with product-quantised codes when full vectors would exceed the budget: m bytes per vector,
  m the largest that fits.

All use inner product on L2-normalised vectors (cosine) and return sample ids. The vectors live in shards
of at most `index.shard_size`, each a FAISS index built from one trained, empty template, so an add fills
the last shard (or opens a new one) and a save rewrites only the shards that changed. On disk: a directory
with manifest.json, template.faiss and shard-NNNNN.faiss (each written by shard.save_index, atomically).
"""

from __future__ import annotations

import json
import math
from collections.abc import Callable
from dataclasses import asdict, dataclass
from pathlib import Path
from typing import Any

import faiss
import numpy as np
import numpy.typing as npt

from flywheel.atomic import atomic_path
from flywheel.config import IndexSettings
from flywheel.errors import ConfigError, DataError
from flywheel.index.shard import load_index, normalized, radius_search, save_index, search

MANIFEST = "manifest.json"
FORMAT = 1
ID_BYTES = 8  # an int64 sample id per vector, in the IDMap or the inverted lists
PQ_BITS = 8  # one byte per sub-quantiser code
MIN_POINTS_PER_LIST = 39  # FAISS warns below this many training points per IVF list
PQ_POINTS_PER_CENTROID = 64  # PQ codebooks (256 centroids of a few dims each) train well on 16k points

VectorsOf = Callable[[npt.NDArray[np.int64]], npt.NDArray[np.floating[Any]]]
"""ids (M,) -> their full vectors (M, D), for re-ranking PQ search results (`ShardedIndex.search`)."""


@dataclass(frozen=True)
class IndexPlan:
    """What to build for n vectors of dimension dim, and why."""

    kind: str  # flat | ivf | hnsw | ivfpq
    dim: int
    factory: str  # faiss.index_factory description
    nlist: int = 0
    pq_m: int = 0
    train_size: int = 0  # vectors sampled to train (0: no training)
    bytes_estimate: int = 0
    reason: str = ""


def index_bytes(kind: str, n: int, dim: int, *, nlist: int = 0, pq_m: int = 0, hnsw_m: int = 32) -> int:
    """Approximate memory of an index of n vectors (what the budget is checked against)."""
    per_vector = {
        "flat": 4 * dim + ID_BYTES,
        "ivf": 4 * dim + ID_BYTES,
        "hnsw": 4 * dim + ID_BYTES + 2 * hnsw_m * 4,  # level-0 links dominate the graph
        "ivfpq": pq_m + ID_BYTES,
    }[kind]
    centroids = 4 * dim * nlist + (256 * 4 * dim if kind == "ivfpq" else 0)  # + PQ codebooks
    return n * per_vector + centroids


def auto_nlist(n: int) -> int:
    """4 * sqrt(n) rounded to a power of two, at least 16 (the usual IVF guideline)."""
    return max(16, int(2 ** round(math.log2(4 * math.sqrt(max(n, 1))))))


def plan_index(n: int, dim: int, settings: IndexSettings) -> IndexPlan:
    """The index for n vectors under the settings (kind "auto": by pool size, then memory)."""
    budget = int(settings.memory_budget_gb * 1e9)
    kind = settings.kind
    if kind == "auto":
        if n <= settings.flat_max:
            kind, reason = "flat", f"{n:,} vectors <= index.flat_max {settings.flat_max:,}: exact search"
        elif index_bytes("ivf", n, dim) <= budget:
            kind, reason = "ivf", f"{n:,} vectors > index.flat_max; full vectors fit index.memory_budget_gb"
        else:
            kind, reason = (
                "ivfpq",
                (
                    f"{n:,} x {dim} vectors need {index_bytes('ivf', n, dim) / 1e9:.1f} GB > index.memory_budget_gb "
                    f"{settings.memory_budget_gb:g}: compressed codes"
                ),
            )
    else:
        reason = f"index.kind = {kind}"
    nlist = settings.nlist or auto_nlist(n)
    if kind in ("ivf", "ivfpq"):
        nlist = max(1, min(nlist, n // MIN_POINTS_PER_LIST or 1))  # never more lists than training supports
    train = min(n, max(settings.train_size, MIN_POINTS_PER_LIST * nlist))
    if kind == "flat":
        return IndexPlan("flat", dim, "IDMap,Flat", bytes_estimate=index_bytes("flat", n, dim), reason=reason)
    if kind == "hnsw":
        return IndexPlan("hnsw", dim, f"IDMap,HNSW{settings.hnsw_m},Flat",
                         bytes_estimate=index_bytes("hnsw", n, dim, hnsw_m=settings.hnsw_m), reason=reason)  # fmt: skip
    if kind == "ivf":
        return IndexPlan("ivf", dim, f"IVF{nlist},Flat", nlist=nlist, train_size=train,
                         bytes_estimate=index_bytes("ivf", n, dim, nlist=nlist), reason=reason)  # fmt: skip
    fitting = [m for m in _pq_sizes(dim) if index_bytes("ivfpq", n, dim, nlist=nlist, pq_m=m) <= budget]
    if not fitting:
        smallest = _pq_sizes(dim)[-1]
        raise ConfigError(
            f"index.memory_budget_gb {settings.memory_budget_gb:g} cannot hold {n:,} vectors even as "
            f"{smallest}-byte PQ codes ({index_bytes('ivfpq', n, dim, nlist=nlist, pq_m=smallest) / 1e9:.2f} GB); "
            "raise the budget"
        )
    m = fitting[0]
    return IndexPlan("ivfpq", dim, f"IVF{nlist},PQ{m}x{PQ_BITS}", nlist=nlist, pq_m=m, train_size=train,
                     bytes_estimate=index_bytes("ivfpq", n, dim, nlist=nlist, pq_m=m),
                     reason=f"{reason}; PQ{m} ({m} bytes per vector) is the largest that fits")  # fmt: skip


def _pq_sizes(dim: int) -> list[int]:
    """Sub-quantiser counts m dividing dim with sub-vectors of >= 4 dims, largest first."""
    return [m for m in range(dim // 4, 0, -1) if dim % m == 0 and m & (m - 1) == 0] or [1]


def _tune(index: faiss.Index, settings: IndexSettings) -> None:
    """Apply the query-time knobs (nprobe, efSearch) to a shard."""
    ivf = faiss.try_extract_index_ivf(index)
    if ivf is not None:
        ivf.nprobe = min(settings.nprobe, ivf.nlist)
    inner = faiss.downcast_index(index.index) if isinstance(index, faiss.IndexIDMap) else index
    if isinstance(inner, faiss.IndexHNSW):
        inner.hnsw.efSearch = settings.ef_search


class ShardedIndex:
    """A cosine index over sample ids, held as shards built from one trained template."""

    def __init__(self, plan: IndexPlan, template: faiss.Index, settings: IndexSettings):
        self.plan, self.template, self.settings = plan, template, settings
        self.shards: list[faiss.Index] = []
        self.shard_ids: list[npt.NDArray[np.int64]] = []
        self._dirty: set[int] = set()
        self._home: Path | None = None  # the directory this index was loaded from or last saved to

    # -- building
    @classmethod
    def create(cls, plan: IndexPlan, sample: npt.NDArray[np.floating[Any]], settings: IndexSettings) -> ShardedIndex:
        """An empty index; IVF kinds are trained on `sample` (float32 rows, normalised here)."""
        template = faiss.index_factory(plan.dim, plan.factory, faiss.METRIC_INNER_PRODUCT)
        if isinstance(template, faiss.IndexIVFPQ):
            # the factory turns it on: it serves Hamming search, slowly
            template.do_polysemous_training = False  # type: ignore[attr-defined]  # missing from faiss's stubs
            template.pq.cp.max_points_per_centroid = PQ_POINTS_PER_CENTROID
        if not template.is_trained:
            x = normalized(sample, "training vectors")
            if len(x) < plan.nlist:
                raise DataError(f"{plan.factory}: {len(x)} training vectors for {plan.nlist} lists")
            template.train(x)
        return cls(plan, template, settings)

    @property
    def ntotal(self) -> int:
        return sum(len(i) for i in self.shard_ids)

    @property
    def ids(self) -> npt.NDArray[np.int64]:
        return np.concatenate(self.shard_ids) if self.shard_ids else np.empty(0, np.int64)

    def add(self, vectors: npt.NDArray[np.floating[Any]], ids: npt.NDArray[np.integer[Any]]) -> None:
        """Add vectors (N, D) under ids (N,); ids already in the index are refused."""
        x = normalized(vectors, "vectors")
        ids = np.ascontiguousarray(ids, dtype=np.int64).reshape(-1)
        if len(ids) != len(x):
            raise DataError(f"index add: {len(x)} vectors but {len(ids)} ids")
        if x.shape[1] != self.plan.dim:
            raise DataError(f"index add: {x.shape[1]}-d vectors into a {self.plan.dim}-d index")
        if len(np.unique(ids)) != len(ids) or np.isin(ids, self.ids).any():
            raise DataError("index add: ids repeat or are already in the index")
        start = 0
        while start < len(x):
            if not self.shards or len(self.shard_ids[-1]) >= self.settings.shard_size:
                self.shards.append(self._new_shard())
                self.shard_ids.append(np.empty(0, np.int64))
            room = self.settings.shard_size - len(self.shard_ids[-1])
            stop = min(len(x), start + room)
            self.shards[-1].add_with_ids(x[start:stop], ids[start:stop])
            self.shard_ids[-1] = np.concatenate([self.shard_ids[-1], ids[start:stop]])
            self._dirty.add(len(self.shards) - 1)
            start = stop

    def _new_shard(self) -> faiss.Index:
        shard = faiss.clone_index(self.template)
        _tune(shard, self.settings)
        return shard

    # -- querying
    def search(
        self, queries: npt.NDArray[np.floating[Any]], k: int, *, vectors_of: VectorsOf | None = None
    ) -> tuple[npt.NDArray[np.float32], npt.NDArray[np.int64]]:
        """Top-k by cosine over all shards: scores (Q, k) descending, ids (Q, k); -1 ids pad a small index.

        PQ codes approximate the vectors; given `vectors_of(ids) -> (len(ids), D)` (e.g. rows of the
        memory-mapped embedding store), an ivfpq index shortlists `index.rerank` x k ids and re-ranks them by
        exact cosine, so only the shortlist's full vectors are ever read.
        """
        if k < 1:
            raise DataError(f"search: k must be >= 1, got {k}")
        rerank = vectors_of is not None and self.plan.kind == "ivfpq" and self.settings.rerank > 1
        wanted = k * self.settings.rerank if rerank else k
        if not self.shards:
            q = np.atleast_2d(queries)
            return np.full((len(q), k), -np.inf, np.float32), np.full((len(q), k), -1, np.int64)
        parts = [search(shard, queries, wanted) for shard in self.shards]
        scores = np.concatenate([p[0] for p in parts], axis=1)
        ids = np.concatenate([p[1] for p in parts], axis=1)
        if rerank:
            assert vectors_of is not None  # rerank needs it
            scores = _exact_scores(queries, ids, vectors_of)
        scores[ids < 0] = -np.inf
        top = np.argsort(-scores, axis=1, kind="stable")[:, :k]
        return np.take_along_axis(scores, top, axis=1), np.take_along_axis(ids, top, axis=1)

    def radius_search(
        self, queries: npt.NDArray[np.floating[Any]], min_cosine: float
    ) -> list[tuple[npt.NDArray[np.int64], npt.NDArray[np.float32]]]:
        """Every stored id with cosine >= min_cosine to each query, over all shards: per query (ids, scores),
        most similar first. Exact on flat shards; IVF and HNSW shards look where their search would look."""
        q = np.atleast_2d(queries)
        per_shard = [radius_search(shard, q, min_cosine) for shard in self.shards]
        out = []
        for i in range(len(q)):
            ids = np.concatenate([found[i][0] for found in per_shard] or [np.empty(0, np.int64)])
            scores = np.concatenate([found[i][1] for found in per_shard] or [np.empty(0, np.float32)])
            order = np.argsort(-scores, kind="stable")
            out.append((ids[order], scores[order]))
        return out

    # -- disk
    def save(self, directory: Path | str) -> None:
        """Write changed shards, then the manifest (atomically, last): a reader sees the old or the new index."""
        directory = Path(directory).absolute()
        directory.mkdir(parents=True, exist_ok=True)
        if directory != self._home:  # a new index, or another directory: write everything
            (directory / MANIFEST).unlink(missing_ok=True)  # readers see no index rather than a mixed one
            self._dirty = set(range(len(self.shards)))
            save_index(self.template, directory / "template.faiss")
        files = [f"shard-{i:05d}.faiss" for i in range(len(self.shards))]
        for i in sorted(self._dirty):
            save_index(self.shards[i], directory / files[i])
            with atomic_path(directory / f"shard-{i:05d}.ids.npy") as tmp, open(tmp, "wb") as f:
                np.save(f, self.shard_ids[i])
        manifest = {
            "format": FORMAT,
            "plan": asdict(self.plan),
            "shards": [{"file": name, "n": len(ids)} for name, ids in zip(files, self.shard_ids, strict=True)],
        }
        with atomic_path(directory / MANIFEST) as tmp:
            Path(tmp).write_text(json.dumps(manifest, indent=1))
        for stale in directory.glob("shard-*"):  # shards of an earlier, larger index
            if stale.name.split(".")[0] + ".faiss" not in files:
                stale.unlink()
        self._dirty.clear()
        self._home = directory

    @classmethod
    def load(cls, directory: Path | str, settings: IndexSettings) -> ShardedIndex:
        """Read an index written by `save`; DataError names a missing or inconsistent file."""
        directory = Path(directory)
        try:
            manifest = json.loads((directory / MANIFEST).read_text())
        except FileNotFoundError as exc:
            raise DataError(f"no index at {directory} ({MANIFEST} missing)") from exc
        except json.JSONDecodeError as exc:
            raise DataError(f"{directory / MANIFEST} is not valid JSON: {exc}") from exc
        if manifest.get("format") != FORMAT:
            raise DataError(f"{directory / MANIFEST}: format {manifest.get('format')!r}, expected {FORMAT}")
        index = cls(IndexPlan(**manifest["plan"]), load_index(directory / "template.faiss"), settings)
        for entry in manifest["shards"]:
            shard = load_index(directory / entry["file"])
            ids = np.load(directory / entry["file"].replace(".faiss", ".ids.npy"))
            if shard.ntotal != entry["n"] or len(ids) != entry["n"]:
                raise DataError(f"{directory / entry['file']}: {shard.ntotal} vectors, manifest says {entry['n']}")
            _tune(shard, settings)
            index.shards.append(shard)
            index.shard_ids.append(ids)
        index._home = directory.absolute()
        return index


def _exact_scores(
    queries: npt.NDArray[np.floating[Any]], ids: npt.NDArray[np.int64], vectors_of: VectorsOf
) -> npt.NDArray[np.float32]:
    """Cosine of each query with each of its candidate ids (Q, C); -1 ids score -inf."""
    q = normalized(queries, "queries")
    valid = ids >= 0
    unique, inverse = np.unique(ids[valid], return_inverse=True)
    candidates = normalized(vectors_of(unique), "re-rank vectors") if len(unique) else np.empty((0, q.shape[1]))
    scores = np.full(ids.shape, -np.inf, dtype=np.float32)
    rows = np.nonzero(valid)[0]
    scores[valid] = np.einsum("ij,ij->i", q[rows], candidates[inverse])
    return scores


def build_vector_index(
    vectors: npt.NDArray[np.floating[Any]], ids: npt.NDArray[np.integer[Any]], settings: IndexSettings, *, seed: int = 0
) -> ShardedIndex:
    """Plan by size, train on a random sample of `plan.train_size` rows, then add everything in shards."""
    vectors = np.asarray(vectors, dtype=np.float32)
    if vectors.ndim != 2:
        raise DataError(f"vectors must be (N, D), got shape {vectors.shape}")
    if len(ids) != len(vectors):
        raise DataError(f"index build: {len(vectors)} vectors but {len(ids)} ids")
    plan = plan_index(len(vectors), vectors.shape[1], settings)
    sample = vectors[:0]
    if plan.train_size:
        rows = np.random.default_rng(seed).choice(len(vectors), size=plan.train_size, replace=False)
        sample = vectors[np.sort(rows)]
    index = ShardedIndex.create(plan, sample, settings)
    for start in range(0, len(vectors), settings.shard_size):  # normalise a shard at a time: bounded memory
        index.add(vectors[start : start + settings.shard_size], ids[start : start + settings.shard_size])
    return index


def sync_vector_index(
    directory: Path | str,
    vectors: npt.NDArray[np.floating[Any]],
    ids: npt.NDArray[np.integer[Any]],
    settings: IndexSettings,
    *,
    seed: int = 0,
) -> tuple[ShardedIndex, str]:
    """Bring the index at `directory` up to (vectors, ids): add the new ids to the saved index when its plan
    still holds for the new size; rebuild when none is saved, the plan changed or ids went away. Saves it
    and returns (index, what was done)."""
    ids = np.asarray(ids, dtype=np.int64).reshape(-1)
    wanted = plan_index(len(ids), np.asarray(vectors).shape[1], settings)
    try:
        index = ShardedIndex.load(directory, settings)
    except DataError:
        index = None
    if index is not None and (index.plan.kind, index.plan.dim) == (wanted.kind, wanted.dim):
        have = index.ids
        if np.isin(have, ids).all():
            new = ~np.isin(ids, have)
            if new.any():
                index.add(np.asarray(vectors)[new], ids[new])
            index.save(directory)
            return index, f"added {int(new.sum()):,} vectors to the saved {index.plan.kind} index"
    index = build_vector_index(vectors, ids, settings, seed=seed)
    index.save(directory)
    return index, f"built a {index.plan.kind} index: {index.plan.reason}"
