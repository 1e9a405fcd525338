"""Pool scale: the product's own steps on a pool of N procedurally drawn images, each timed with its peak memory.

For each N: draw N distinct small images on disk (ten shape classes, random size, place and colours), then run
what a project runs on them: import into the catalog (SQLite or PostgreSQL), embed (up to --embed-max images
through the real pipeline; past that the rate is measured on those and the rest of the store is filled with
synthetic vectors, so the later steps still see N), bootstrap (the FAISS index and the Label Studio project),
one round with `auto` (head on 20 labels per class, scoring the pool, selection, near-duplicate check, push of
`--k` tasks to the real Label Studio), the simulated annotator on those tasks, and the sync that reads them back.

    .venv/bin/python -m bench.pool_scale [--sizes 10000,100000] [--embed-max 20000] [--k 1000]
                                         [--catalog sqlite|postgres]

Needs the servers (`make services`; with `--catalog postgres` the local cluster, `make postgresql`). Writes
bench/results/pool-scale.md/.json and a log-log plot of seconds per step against N (pool-scale.png).
"""

from __future__ import annotations

import argparse
import os
import sys
import threading
import time
from collections.abc import Callable, Iterator
from concurrent.futures import ProcessPoolExecutor
from contextlib import contextmanager
from pathlib import Path
from typing import Any, TypeVar

import numpy as np
import torch
from PIL import Image, ImageDraw

from bench.results_files import command_line, write_results
from flywheel import labelstudio, loop
from flywheel.catalog import POOL, Catalog
from flywheel.config import Settings, load_settings
from flywheel.features.backbones import build_body, get_spec
from flywheel.features.pipeline import Embedder
from flywheel.features.store import EmbeddingStore, embed_samples
from flywheel.labelstudio.annotator import annotate_open_tasks
from flywheel.registry import tracking
from flywheel.sources.importing import import_source

REPO = Path(__file__).resolve().parents[1]
SHAPES = ("circle", "square", "triangle", "cross", "ring", "bar", "diamond", "dot", "frame", "wedge")
T = TypeVar("T")


def draw(path: Path, shape: str, rng: np.random.Generator, size: int = 32) -> None:
    """One image of `shape`: random background, colour, size and place, so no two files are alike."""
    image = Image.new("RGB", (size, size), tuple(int(v) for v in rng.integers(0, 256, 3)))
    pen, ink = ImageDraw.Draw(image), tuple(int(v) for v in rng.integers(0, 256, 3))
    r = int(rng.integers(6, 14))
    x, y = (int(v) for v in rng.integers(r, size - r, 2))
    box = (x - r, y - r, x + r, y + r)
    figures: dict[str, Callable[[], None]] = {
        "circle": lambda: pen.ellipse(box, fill=ink),
        "square": lambda: pen.rectangle(box, fill=ink),
        "triangle": lambda: pen.polygon([(x, y - r), (x - r, y + r), (x + r, y + r)], fill=ink),
        "cross": lambda: pen.line([(x - r, y), (x + r, y), (x, y), (x, y - r), (x, y + r)], ink, 3),
        "ring": lambda: pen.ellipse(box, outline=ink, width=3),
        "bar": lambda: pen.rectangle((x - r, y - 2, x + r, y + 2), fill=ink),
        "diamond": lambda: pen.polygon([(x, y - r), (x + r, y), (x, y + r), (x - r, y)], fill=ink),
        "dot": lambda: pen.ellipse((x - 3, y - 3, x + 3, y + 3), fill=ink),
        "frame": lambda: pen.rectangle(box, outline=ink, width=3),
        "wedge": lambda: pen.pieslice(box, 0, 120, fill=ink),
    }
    figures[shape]()
    image.save(path)


def draw_range(root: Path, start: int, stop: int) -> None:
    for i in range(start, stop):
        shape = SHAPES[i % len(SHAPES)]
        draw(root / shape / f"{i:07d}.png", shape, np.random.default_rng(i))


def draw_pool(root: Path, n: int) -> Path:
    """N images in ImageFolder layout (the folder is the truth the simulated annotator answers with)."""
    for shape in SHAPES:
        (root / shape).mkdir(parents=True, exist_ok=True)
    chunks = [(s, min(n, s + 5000)) for s in range(0, n, 5000)]
    with ProcessPoolExecutor(os.cpu_count() or 1) as pool:
        list(pool.map(draw_range, [root] * len(chunks), *zip(*chunks, strict=True)))
    return root


class PeakMemory:
    """The highest resident memory of this process while a step runs, sampled from /proc every 20 ms."""

    def __init__(self) -> None:
        self.peak_kb, self._stop = 0, threading.Event()

    def _sample(self) -> None:
        while not self._stop.wait(0.02):
            self.peak_kb = max(self.peak_kb, _rss_kb())

    @contextmanager
    def watching(self) -> Iterator[None]:
        self.peak_kb = _rss_kb()
        thread = threading.Thread(target=self._sample, daemon=True)
        thread.start()
        try:
            yield
        finally:
            self._stop.set()
            thread.join()
            self._stop.clear()


def _rss_kb() -> int:
    with open("/proc/self/status") as f:
        return next(int(line.split()[1]) for line in f if line.startswith("VmRSS:"))


def timed(steps: dict[str, dict[str, float]], name: str, fn: Callable[[], T]) -> T:
    memory = PeakMemory()
    with memory.watching():
        began = time.perf_counter()
        result = fn()
        seconds = time.perf_counter() - began
    steps[name] = {"seconds": round(seconds, 2), "peak_gb": round(memory.peak_kb / 1024**2, 2)}
    print(f"  {name}: {seconds:.1f} s, peak {memory.peak_kb / 1024**2:.2f} GB", flush=True)
    return result


def embed_pool(settings: Settings, catalog: Catalog, embed_max: int) -> dict[str, float]:
    """Embed up to embed_max pool images for real; fill the rest of the store with synthetic vectors of the
    same size and spread. -> images embedded and their rate."""
    rows = catalog.samples(POOL)
    store = EmbeddingStore(
        settings.dirs.embeddings, EmbeddingStore.key_for(get_spec(settings.backbone), "imagenet", settings.image_size)
    )
    embedder = Embedder.configured(build_body(settings.backbone), settings, device=torch.device("cpu"))
    real = rows[:embed_max]
    began = time.perf_counter()
    vectors = embed_samples(store, [r.id for r in real], [r.uri for r in real], embedder, progress=False)
    rate = len(real) / (time.perf_counter() - began)
    rng = np.random.default_rng(0)
    for start in range(len(real), len(rows), 100_000):
        chunk = rows[start : start + 100_000]
        picked = vectors[rng.integers(0, len(vectors), len(chunk))]
        noise = rng.standard_normal(picked.shape, dtype=np.float32) * vectors.std(0) * 0.3
        store.add([r.id for r in chunk], picked + noise)
    return {"embedded": len(real), "images_per_s": round(rate, 1)}


def label_some(catalog: Catalog, per_class: int) -> None:
    """`per_class` samples of each class get their true label, as annotators would have given them."""
    samples = catalog.samples(POOL)
    taken: dict[str, int] = {}
    with catalog.transaction() as session:
        for s in samples:
            if s.truth is not None and taken.get(s.truth, 0) < per_class:
                taken[s.truth] = taken.get(s.truth, 0) + 1
                catalog.upsert_label(session, sample_id=s.id, label=s.truth, annotator="bench", ls_annotation_id=None)


def run_size(n: int, args: argparse.Namespace) -> dict[str, Any]:
    tag = f"n{n}-{os.urandom(2).hex()}"
    overrides: dict[str, Any] = {"workspace": args.workspace / tag, "project": f"scale{tag}".replace("-", ""),
                                 "image_size": 32, "k_per_round": args.k, "strategy": "auto"}  # fmt: skip
    if args.catalog == "postgres":
        from flywheel.devservers import postgres

        pg = load_settings().postgres
        postgres.create_database(pg, f"scale_{tag}".replace("-", "_"))
        overrides["catalog_url"] = pg.url(f"scale_{tag}".replace("-", "_"))
    settings = load_settings(**overrides)
    steps: dict[str, dict[str, float]] = {}
    print(f"N = {n:,}", flush=True)
    folder = timed(steps, "draw images (setup)", lambda: draw_pool(settings.dirs.sources / "drawn", n))
    catalog = Catalog(settings.catalog_url)
    timed(steps, "import", lambda: import_source(catalog, settings, str(folder)))
    embedding = timed(steps, "embed", lambda: embed_pool(settings, catalog, args.embed_max))
    label_some(catalog, 20)
    ls, client = labelstudio.connect(settings), tracking.connect(settings)
    timed(steps, "bootstrap (index, project)", lambda: loop.bootstrap(settings, catalog, ls, progress=False))
    report = timed(steps, "round", lambda: loop.run_round(settings, catalog, ls, client, progress=False))
    project_id = int(catalog.get_meta("ls_project_id") or 0)
    answered = timed(steps, "annotate (simulated)",
                     lambda: annotate_open_tasks(ls, catalog, project_id, rng=np.random.default_rng(0)))  # fmt: skip
    sync = timed(steps, "sync", lambda: loop.run_sync(settings, catalog, ls))
    return {"n": n, "steps": steps, **embedding, "strategy": report.strategy, "pushed": len(report.selected),
            "answered": answered, "labels_after_sync": sync.n_labels}  # fmt: skip


def table(rows: list[dict[str, Any]]) -> list[str]:
    names = list(rows[0]["steps"])
    lines = ["| step | " + " | ".join(f"N = {r['n']:,}" for r in rows) + " |", "|---" * (len(rows) + 1) + "|"]
    for name in names:
        cells = [f"{r['steps'][name]['seconds']:.1f} s, {r['steps'][name]['peak_gb']:.2f} GB" for r in rows]
        lines.append(f"| {name} | " + " | ".join(cells) + " |")
    lines.append("| embedded for real (images/s) | " + " | ".join(
        f"{r['embedded']:,} ({r['images_per_s']:.0f}/s; all N: {r['n'] / r['images_per_s'] / 60:.1f} min)"
        for r in rows) + " |")  # fmt: skip
    lines.append("| round: strategy, tasks pushed, answered, labels after sync | " + " | ".join(
        f"{r['strategy']}, {r['pushed']}, {r['answered']}, {r['labels_after_sync']}" for r in rows) + " |")  # fmt: skip
    return lines


def plot(rows: list[dict[str, Any]], out: Path) -> None:
    import matplotlib

    matplotlib.use("Agg")
    import matplotlib.pyplot as plt

    fig, ax = plt.subplots(figsize=(7, 4.5))
    sizes = [r["n"] for r in rows]
    for name in rows[0]["steps"]:
        ax.plot(sizes, [max(r["steps"][name]["seconds"], 0.01) for r in rows], marker="o", label=name)
    ax.set(xscale="log", yscale="log", xlabel="pool size N", ylabel="seconds", title="flywheel steps against pool size")
    ax.grid(True, which="both", alpha=0.3)
    ax.legend(fontsize=8)
    fig.tight_layout()
    fig.savefig(out.with_suffix(".png"), dpi=120)


def main() -> None:
    parser = argparse.ArgumentParser(description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter)
    parser.add_argument("--sizes", default="10000,100000", help="comma-separated pool sizes")
    parser.add_argument("--embed-max", type=int, default=20_000, help="images embedded for real at most")
    parser.add_argument("--k", type=int, default=1000, help="tasks the round pushes")
    parser.add_argument("--catalog", choices=("sqlite", "postgres"), default="sqlite")
    parser.add_argument("--workspace", type=Path, default=REPO / ".flywheel-poolscale")
    parser.add_argument("--out", type=Path, default=REPO / "bench" / "results" / "pool-scale")
    parser.add_argument("--note", default="")
    args = parser.parse_args()
    rows = [run_size(int(n), args) for n in args.sizes.split(",")]
    meta = {"command": command_line("bench/pool_scale.py", sys.argv[1:]), "cpus": os.cpu_count(),
            "catalog": args.catalog, "note": args.note}  # fmt: skip
    lines = [f"## Pool scale ({time.strftime('%Y-%m-%d')}, {os.cpu_count()} CPU cores, catalog on {args.catalog})",
             "", f"`{meta['command']}`", "", *table(rows)]  # fmt: skip
    write_results(args.out, meta, rows, lines)
    plot(rows, args.out)
    print("\n".join(lines))


if __name__ == "__main__":
    main()
