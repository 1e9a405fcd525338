"""Selection cost at scale: k-center, hybrid, falcun and auto picking k=1,000 from a 1,000,000 x 512 pool.

Synthetic clustered embeddings (float32 blobs) and softmax probabilities over 10 classes stand in for a
real pool. Prints seconds and peak RSS per strategy, and checks that k-center's shortlisted greedy reaches
the same max-min distance as the plain (every point, every step) greedy on a 50k subset.

    .venv/bin/python bench/selection_cost.py [--n 1000000] [--dim 512] [--k 1000]

Bar (issue 4): each under 60 s on 2 CPU cores, peak RSS under 8 GB. Measured on the 2-core dev machine:
quiet (load 1.0): kcenter 4.0 s, hybrid 1.4 s, falcun 1.3 s, auto 3.3 s (whitening, then hybrid: 10
labels/class; 3.1 s when its second phase was k-center), peak RSS 2.66 GB (the pool itself 2.0 GB); while
other jobs held it (load ~7): kcenter 42 s, hybrid 31 s, falcun 7.5 s, peak RSS 2.7 GB. k-center on the 50k
subset equals the plain greedy (ratio 1.0000: the shortlisted greedy is exact).
"""

from __future__ import annotations

import argparse
import resource
import time

import numpy as np

from flywheel.strategies import PoolView, get_strategy
from flywheel.strategies.diversity import kcenter_greedy


def peak_rss_gb() -> float:
    return resource.getrusage(resource.RUSAGE_SELF).ru_maxrss / 1024**2  # Linux: kilobytes


def synthetic_pool(n: int, dim: int, *, n_blobs: int = 200, n_classes: int = 10, seed: int = 0):
    """(embeddings (n, dim) float32 in clustered blobs, probs (n, n_classes) float32), built in blocks."""
    rng = np.random.default_rng(seed)
    centres = rng.normal(size=(n_blobs, dim)).astype(np.float32)
    spread = rng.uniform(0.2, 0.8, size=n_blobs).astype(np.float32)
    project = rng.normal(size=(dim, n_classes)).astype(np.float32) / np.sqrt(dim) * 3
    x = np.empty((n, dim), dtype=np.float32)
    probs = np.empty((n, n_classes), dtype=np.float32)
    for start in range(0, n, 100_000):
        stop = min(n, start + 100_000)
        blob = rng.integers(0, n_blobs, size=stop - start)
        block = rng.standard_normal((stop - start, dim), dtype=np.float32)
        block *= spread[blob, None]
        block += centres[blob]
        x[start:stop] = block
        logits = block @ project
        logits -= logits.max(axis=1, keepdims=True)
        e = np.exp(logits)
        probs[start:stop] = e / e.sum(axis=1, keepdims=True)
    return x, probs


def main() -> None:
    parser = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    parser.add_argument("--n", type=int, default=1_000_000)
    parser.add_argument("--dim", type=int, default=512)
    parser.add_argument("--k", type=int, default=1000)
    parser.add_argument("--labelled", type=int, default=100)
    parser.add_argument("--subset", type=int, default=50_000)
    parser.add_argument("--strategies", default="kcenter,hybrid,falcun,auto")
    args = parser.parse_args()

    t = time.perf_counter()
    x, probs = synthetic_pool(args.n, args.dim)
    print(f"pool: {args.n:,} x {args.dim} float32 ({x.nbytes / 1e9:.1f} GB) built in {time.perf_counter() - t:.1f} s")
    pool = PoolView(
        candidates=np.arange(args.labelled, args.n, dtype=np.int64),
        labelled=np.arange(args.labelled, dtype=np.int64),
        probs=probs,
        embeddings=x,
    )
    for name in args.strategies.split(","):
        t = time.perf_counter()
        selection = get_strategy(name)(pool, args.k, rng=np.random.default_rng(0))
        seconds = time.perf_counter() - t
        assert len(np.unique(selection.positions)) == args.k
        rss = peak_rss_gb()
        print(f"{name:8s} k={args.k}: {seconds:6.1f} s, peak RSS so far {rss:.2f} GB | {selection.description}")

    sub = np.random.default_rng(1).choice(args.n, size=args.subset, replace=False)
    xs = x[np.sort(sub)]
    labelled, candidates = np.arange(args.labelled), np.arange(args.labelled, args.subset)
    t = time.perf_counter()
    _, fast = kcenter_greedy(xs, candidates, labelled, args.k)
    t_fast = time.perf_counter() - t
    t = time.perf_counter()
    _, plain = kcenter_greedy(xs, candidates, labelled, args.k, shortlist=args.subset)  # every point, every step
    t_plain = time.perf_counter() - t
    print(
        f"k-center on a {args.subset:,} subset: shortlisted max-min distance {fast[-1]:.5f} ({t_fast:.1f} s) vs "
        f"plain greedy {plain[-1]:.5f} ({t_plain:.1f} s): ratio {fast[-1] / plain[-1]:.4f}"
    )
    print(f"peak RSS {peak_rss_gb():.2f} GB")


if __name__ == "__main__":
    main()
