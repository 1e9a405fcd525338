"""FAISS at scale: build time, query time, recall@10 against exact search, and memory, on 1,000,000 x 512 vectors.

Synthetic clustered embeddings (bench/selection_cost.py's blobs); 1,000 held-out queries drawn from the same
blobs, k=10. Each index kind is built through flywheel.index.sharded (trained on a sample, added in shards,
saved and loaded back) with the settings below; recall@10 is the share of the exact (Flat) top-10 ids found.

    nice -n 10 .venv/bin/python bench/index_scale.py [--n 1000000] [--dim 512] [--kinds flat,ivf,hnsw,ivfpq]
        [--budget-gb 0.1] [--rerank 32] [--out bench/results/index-scale]

`auto` picks flat up to index.flat_max, ivf above it, ivfpq when vectors exceed index.memory_budget_gb; the
ivfpq row runs with --budget-gb (default 0.1 GB: 1M x 512 float32 is 2 GB) so the plan has to compress.
"""

from __future__ import annotations

import argparse
import os
import platform
import resource
import sys
import tempfile
import time
from pathlib import Path

import numpy as np

from bench.results_files import command_line, write_results
from bench.selection_cost import synthetic_pool
from flywheel.config import IndexSettings
from flywheel.index.sharded import ShardedIndex, VectorsOf, build_vector_index, plan_index


def rss_gb() -> float:
    """Peak resident memory of this process so far (Linux reports kilobytes)."""
    return resource.getrusage(resource.RUSAGE_SELF).ru_maxrss / 1024**2


def dir_bytes(path: Path) -> int:
    return sum(f.stat().st_size for f in path.iterdir() if f.is_file())


def recall_at(found: np.ndarray, exact: np.ndarray | None, k: int) -> float:
    """Mean share of the exact top-k ids that a search found (1.0 for the exact search itself)."""
    if exact is None:
        return 1.0
    return float(np.mean([len(np.intersect1d(a, b)) / k for a, b in zip(found, exact, strict=True)]))


def run_kind(kind: str, data: dict, exact: np.ndarray | None, args) -> list[tuple[dict, np.ndarray]]:
    """Build, save, load back and query one kind; ivfpq is queried twice: raw codes, then re-ranked."""
    x, ids, queries = data["x"], data["ids"], data["queries"]
    settings = IndexSettings(
        kind=kind, memory_budget_gb=args.budget_gb if kind == "ivfpq" else 64.0, nprobe=args.nprobe, rerank=args.rerank
    )
    t, cpu = time.perf_counter(), time.process_time()
    index = build_vector_index(x, ids, settings)
    build_s, build_cpu = time.perf_counter() - t, time.process_time() - cpu
    with tempfile.TemporaryDirectory(prefix="flywheel-index-") as tmp:
        t = time.perf_counter()
        index.save(tmp)
        save_s = time.perf_counter() - t
        disk = dir_bytes(Path(tmp))
        t = time.perf_counter()
        index = ShardedIndex.load(tmp, settings)
        load_s = time.perf_counter() - t
    variants: list[tuple[str, VectorsOf | None]] = [(kind, None)]
    if kind == "ivfpq":  # re-rank from the vectors on disk (memory-mapped), as from the embedding store
        variants.append((f"ivfpq + re-rank x{settings.rerank}", lambda wanted: data["on_disk"][(wanted - 3) // 7]))
    out = []
    for name, vectors_of in variants:
        t, cpu = time.perf_counter(), time.process_time()
        _, found = index.search(queries, args.k, vectors_of=vectors_of)
        query_s, query_cpu = time.perf_counter() - t, time.process_time() - cpu
        recall = recall_at(found, exact, args.k)
        row = {
            "kind": name,
            "factory": index.plan.factory,
            "train_size": index.plan.train_size,
            "shards": len(index.shards),
            "build_s": build_s,
            "build_cpu_s": build_cpu,
            "query_s": query_s,
            "query_cpu_s": query_cpu,
            "queries_per_s": len(queries) / query_s,
            "recall_at_10": recall,
            "index_bytes_on_disk": disk,
            "bytes_estimate": index.plan.bytes_estimate,
            "save_s": save_s,
            "load_s": load_s,
            "peak_rss_gb_so_far": rss_gb(),
            "settings": settings.model_dump(),
        }
        print(
            f"{name:20s} {index.plan.factory:18s} build {build_s:7.1f} s ({build_cpu:.0f} CPU s) | "
            f"{len(queries)} queries {query_s:6.2f} s ({query_cpu:.1f} CPU s) "
            f"| recall@{args.k} {recall:.3f} | disk {disk / 1e9:.2f} GB | peak RSS {rss_gb():.1f} GB",
            flush=True,
        )
        out.append((row, found))
    return out


def markdown(meta: dict, rows: list[dict]) -> list[str]:
    return [
        f"# FAISS at scale: {meta['n']:,} x {meta['dim']} vectors ({meta['machine']})",
        "",
        f"Synthetic clustered vectors ({meta['blobs']} blobs), {meta['queries']:,} held-out queries, k={meta['k']}; "
        "recall@10 against exact search (flat). Built through `flywheel.index.sharded` (trained on a sample, "
        f"added in shards, saved and loaded back). Command: `{meta['command']}`",
        "",
        "Wall seconds, and in brackets CPU seconds of all the process's threads: on a shared machine the CPU "
        "seconds are the steadier figure (wall = CPU / cores only when the cores are free).",
        "",
        "| kind | FAISS index | trained on | build s (CPU s) | 1k queries s (CPU s) | recall@10 | on disk GB |",
        "|---|---|---:|---:|---:|---:|---:|",
        *[
            f"| {r['kind']} | `{r['factory']}` | {r['train_size']:,} | {r['build_s']:.1f} ({r['build_cpu_s']:.0f}) | "
            f"{r['query_s']:.2f} ({r['query_cpu_s']:.1f}) | {r['recall_at_10']:.3f} | "
            f"{r['index_bytes_on_disk'] / 1e9:.2f} |"
            for r in rows
        ],
        "",
        f"Peak RSS of the whole run: {meta['peak_rss_gb']:.1f} GB (the vectors alone are "
        f"{meta['n'] * meta['dim'] * 4 / 1e9:.1f} GB). What `auto` plans for this pool: {meta['auto_plan']}.",
    ]


def main() -> None:
    parser = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    parser.add_argument("--n", type=int, default=1_000_000)
    parser.add_argument("--dim", type=int, default=512)
    parser.add_argument("--queries", type=int, default=1000)
    parser.add_argument("--k", type=int, default=10)
    parser.add_argument("--blobs", type=int, default=200)
    parser.add_argument("--kinds", default="flat,ivf,hnsw,ivfpq")
    parser.add_argument("--nprobe", type=int, default=IndexSettings().nprobe)
    parser.add_argument("--budget-gb", type=float, default=0.1, help="memory budget of the ivfpq row")
    parser.add_argument("--rerank", type=int, default=IndexSettings().rerank, help="ivfpq: re-rank rerank x k")
    parser.add_argument("--note", default="")
    parser.add_argument("--out", type=Path, default=Path("bench/results/index-scale"))
    args = parser.parse_args()

    t = time.perf_counter()
    everything, _ = synthetic_pool(args.n + args.queries, args.dim, n_blobs=args.blobs)
    x, queries = everything[: args.n], everything[args.n :].copy()
    del everything
    ids = np.arange(args.n, dtype=np.int64) * 7 + 3  # sample ids are not row numbers
    print(f"{args.n:,} x {args.dim} vectors + {args.queries} queries in {time.perf_counter() - t:.1f} s", flush=True)

    kinds = args.kinds.split(",")
    with tempfile.TemporaryDirectory(prefix="flywheel-vectors-") as tmp:
        np.save(Path(tmp) / "x.npy", x)
        data = {"x": x, "ids": ids, "queries": queries, "on_disk": np.load(Path(tmp) / "x.npy", mmap_mode="r")}
        rows, exact = [], None
        for kind in ["flat"] + [k for k in kinds if k != "flat"]:  # flat first: it is the ground truth
            for row, found in run_kind(kind, data, exact, args):
                if kind == "flat":
                    exact = found
                if kind in kinds:
                    rows.append(row)
    meta = {
        "n": args.n,
        "dim": args.dim,
        "queries": args.queries,
        "k": args.k,
        "blobs": args.blobs,
        "machine": f"CPU, {platform.machine()}, {len(os.sched_getaffinity(0))} cores",
        "peak_rss_gb": rss_gb(),
        "auto_plan": plan_index(args.n, args.dim, IndexSettings()).reason,
        "command": command_line("bench/index_scale.py", sys.argv[1:]),
        "note": args.note,
    }
    write_results(args.out, meta, rows, markdown(meta, rows))


if __name__ == "__main__":
    main()
