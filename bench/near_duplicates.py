"""The round's near-duplicate check on a large pool: a fresh in-memory index per round (before) against the
saved pool index (after, `features.embedded.pool_index`), on the same picks, in the same process.

Synthetic clustered embeddings (bench/selection_cost.py's blobs) with planted near-copies; the round asks
about `--picks` samples, best first, with `--labelled` samples known. Three ways to get the index, timed:

- rebuild: what rounds did before the index was shared: a flat index of the whole pool built in memory;
- saved: the index bootstrap saved, loaded (checksums verified) with nothing new;
- saved + new: the same after `--new` samples were imported since (they are added to the last shard).

    nice -n 10 .venv/bin/python -m bench.near_duplicates [--n 200000] [--dim 1280] [--picks 100] [--repeats 3]
"""

from __future__ import annotations

import argparse
import sys
import tempfile
import time
from collections.abc import Callable
from pathlib import Path
from typing import cast

import numpy as np

from bench.results_files import command_line, write_results
from bench.selection_cost import synthetic_pool
from flywheel.catalog import Catalog
from flywheel.config import Settings, load_settings
from flywheel.features import embedded
from flywheel.index.sharded import ShardedIndex, build_vector_index
from flywheel.sources.quarantine import near_duplicates

REPO = Path(__file__).resolve().parents[1]
MIN_COSINE = 0.98
ROW = ("index", "get_s", "ask_s", "round_step_s", "near_duplicates")


def pool_of(vectors: np.ndarray, ids: np.ndarray) -> embedded.SplitFeatures:
    return embedded.SplitFeatures(ids, [f"{i}.png" for i in ids], [None] * len(ids), ids % 100, vectors)


def timed(step: Callable[[], ShardedIndex], picks: np.ndarray, pool: embedded.SplitFeatures, known: set[int],
          repeats: int) -> tuple[float, float, dict[int, tuple[int, float]]]:  # fmt: skip
    """Median seconds to get the index and to answer the round's question, and the answer."""
    get, ask, found = [], [], {}
    for _ in range(repeats):
        t = time.perf_counter()
        index = step()
        get.append(time.perf_counter() - t)
        t = time.perf_counter()
        found = near_duplicates(index, pool.vectors[picks], [int(i) for i in pool.ids[picks]], known, MIN_COSINE)
        ask.append(time.perf_counter() - t)
    return float(np.median(get)), float(np.median(ask)), found


def run(args: argparse.Namespace, settings: Settings, catalog: Catalog) -> list[dict[str, object]]:
    vectors = synthetic_pool(args.n + args.new, args.dim, seed=0)[0]
    rng = np.random.default_rng(1)
    copies = rng.choice(args.n, size=args.picks // 4, replace=False)
    vectors[copies + 1] = vectors[copies] + 1e-3 * rng.normal(size=(len(copies), args.dim))  # planted near-copies
    ids = np.arange(args.n + args.new, dtype=np.int64)
    old, grown = pool_of(vectors[: args.n], ids[: args.n]), pool_of(vectors, ids)
    picks = np.concatenate([copies + 1, rng.choice(args.n, size=args.picks - len(copies), replace=False)])
    known = {int(i) for i in copies} | {int(i) for i in rng.choice(args.n, size=args.labelled, replace=False)}
    version = embedded.body_version(settings, catalog)
    t = time.perf_counter()
    embedded.rebuild_index(settings, old, version)  # bootstrap's job, not the round's
    saved_s = time.perf_counter() - t
    ways = {
        "rebuild (before)": lambda: build_vector_index(old.vectors, old.ids, settings.index, seed=settings.seed),
        "saved (after)": lambda: embedded.pool_index(settings, catalog, old),
        f"saved + {args.new:,} new (after)": lambda: embedded.pool_index(settings, catalog, grown),
    }
    rows, answers = [], []
    for name, step in ways.items():
        repeats = 1 if "new" in name else args.repeats  # the first call adds them; later calls would find none
        get_s, ask_s, found = timed(step, picks, grown if "new" in name else old, known, repeats)
        answers.append(found)
        rows.append({"index": name, "get_s": round(get_s, 3), "ask_s": round(ask_s, 3),
                     "round_step_s": round(get_s + ask_s, 3), "near_duplicates": len(found)})  # fmt: skip
        print(rows[-1], flush=True)
    rows.append({"index": "saving it at bootstrap (once)", "get_s": round(saved_s, 3), "ask_s": 0.0,
                 "round_step_s": 0.0, "near_duplicates": 0})  # fmt: skip
    assert all(a == answers[0] for a in answers), "the three ways must find the same near-duplicates"
    return rows


def main(argv: list[str] | None = None) -> int:
    parser = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    parser.add_argument("--n", type=int, default=200_000)
    parser.add_argument("--dim", type=int, default=1280, help="EfficientNet-Lite0's embedding width")
    parser.add_argument("--picks", type=int, default=100)
    parser.add_argument("--labelled", type=int, default=1000)
    parser.add_argument("--new", type=int, default=1000)
    parser.add_argument("--repeats", type=int, default=3)
    parser.add_argument("--out", default=str(REPO / "bench" / "results" / "near-duplicates"), help="path stem")
    parser.add_argument("--note", default="", help="a sentence on the run, printed under the results")
    args = parser.parse_args(argv)
    with tempfile.TemporaryDirectory(prefix="flywheel-neardup-") as tmp:
        settings = load_settings(workspace=Path(tmp))
        rows = run(args, settings, Catalog(f"sqlite:///{tmp}/catalog.db"))
    before, after = (cast(float, rows[i]["round_step_s"]) for i in (0, 1))
    command = command_line("bench/near_duplicates.py", sys.argv[1:] if argv is None else argv)
    lines = [
        f"# Near-duplicate check of a round: {args.n:,} x {args.dim} pool, {args.picks} picks",
        "",
        f"`{command}`",
        "",
        f"after / before: **{after / before:.2f}** of the time (median of {args.repeats}); same near-duplicates found.",
        "",
        "| index | get it (s) | ask (s) | round's step (s) | near-duplicates |",
        "|---|---|---|---|---|",
        *("| " + " | ".join(str(r[key]) for key in ROW) + " |" for r in rows),
    ]
    write_results(Path(args.out), {"command": command, "note": args.note}, rows, lines)
    print("\n".join(lines))
    return 0


if __name__ == "__main__":
    sys.exit(main())
