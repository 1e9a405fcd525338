"""How fast the ML backend answers Label Studio: POST /predict over HTTP on 127.0.0.1, with the pool embedded.

    .venv/bin/python -m bench.ml_backend [--pool 1797] [--calls 100] [--batch 1000]

The champion is a real one (the frozen EfficientNet-Lite0 body and a head trained on the digits' vectors),
served by the receiver's app exactly as `flywheel webhook` serves it; only the registry lookup (cached for
`recheck_s` in the product) is replaced by the champion built here. It prints p50/p95 of 1-task calls for a
pool sample (cached vector) and for an image the pool does not hold (a forward pass), the seconds of one
1,000-task call, and each against the same work called in-process (the reference): the HTTP and JSON cost.
"""

from __future__ import annotations

import argparse
import base64
import json
import tempfile
import time
from pathlib import Path
from typing import Any

import httpx
import numpy as np
import torch
from fastapi import FastAPI
from pydantic import SecretStr

from bench.webhook_burst import serving
from flywheel.app import mlbackend
from flywheel.app.webhook import Receiver
from flywheel.catalog import Catalog
from flywheel.config import load_settings
from flywheel.features.backbones import Classifier, build_body, get_spec
from flywheel.features.pipeline import Embedder
from flywheel.features.store import EmbeddingStore, embed_samples
from flywheel.labelstudio.media import image_url
from flywheel.serving.champion import Champion, predict
from flywheel.simulation.datasets import load_dataset
from flywheel.training.head import train_head

SECRET = "bench-ml-backend"


class Fixed:
    """A champion source that always answers the champion built here."""

    def __init__(self, champion: Champion):
        self.champion = champion

    def current(self) -> Champion:
        return self.champion


def build(folder: Path, pool: int) -> tuple[Champion, list[str], Any]:
    settings = load_settings(workspace=folder / "ws", webhook={"secret": SecretStr(SECRET)})
    data = load_dataset("digits", settings)
    paths, targets = data.paths[:pool], data.targets[:pool]
    spec, body = get_spec(settings.backbone), build_body(settings.backbone, pretrained=True)
    store = EmbeddingStore(folder / "embeddings", "bench")
    embedder = Embedder.configured(body, settings, device=torch.device("cpu"))
    vectors = embed_samples(store, list(range(len(paths))), paths, embedder, progress=False)
    head = train_head(vectors, targets, len(data.classes))
    classifier = Classifier(spec.name, body, head, list(data.classes), settings.image_size).eval()
    return Champion("1", classifier, store), paths, settings


def percentile_ms(seconds: list[float], q: float) -> float:
    return float(np.percentile(seconds, q) * 1000)


def timed(call: Any, repeats: int) -> list[float]:
    out = []
    for _ in range(repeats):
        started = time.perf_counter()
        call()
        out.append(time.perf_counter() - started)
    return out


def main() -> None:
    parser = argparse.ArgumentParser(description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter)
    parser.add_argument("--pool", type=int, default=1797)
    parser.add_argument("--calls", type=int, default=100)
    parser.add_argument("--batch", type=int, default=1000)
    args = parser.parse_args()
    with tempfile.TemporaryDirectory(prefix="bench-ml-") as tmp:
        champion, paths, settings = build(Path(tmp), args.pool)
        app = FastAPI()
        app.state.receiver = Receiver(settings, Catalog(f"sqlite:///{tmp}/catalog.db"))
        mlbackend.add_routes(app, settings, Fixed(champion))  # type: ignore[arg-type]  # duck-typed source
        auth = {"authorization": "Basic " + base64.b64encode(f"flywheel:{SECRET}".encode()).decode()}

        def task(k: int, *, in_pool: bool = True) -> dict[str, Any]:
            data: dict[str, Any] = {"image": image_url(paths[k], settings)}
            return {"id": k + 1, "data": {**data, "sample_id": k} if in_pool else data}

        with serving(app) as port, httpx.Client(base_url=f"http://127.0.0.1:{port}", trust_env=False) as http:

            def post(tasks: list[dict[str, Any]]) -> None:
                response = http.post("/predict", content=json.dumps({"tasks": tasks}), headers=auth, timeout=60)
                assert response.status_code == 200 and len(response.json()["results"]) == len(tasks), response.text

            post([task(0)])  # warm: the store's first load, the first forward pass
            post([task(0, in_pool=False)])
            rows = [
                ("1 pool task", timed(lambda: post([task(1)]), args.calls),
                 timed(lambda: predict(champion, [1], [paths[1]]), args.calls)),
                ("1 new image", timed(lambda: post([task(2, in_pool=False)]), args.calls),
                 timed(lambda: predict(champion, [None], [paths[2]]), args.calls)),
            ]  # fmt: skip
            batch = [task(k % len(paths)) for k in range(args.batch)]
            ids, locs = [k % len(paths) for k in range(args.batch)], [paths[k % len(paths)] for k in range(args.batch)]
            rows.append((f"{args.batch} pool tasks", timed(lambda: post(batch), 5),
                         timed(lambda: predict(champion, ids, locs), 5)))  # fmt: skip
    print(f"POST /predict on 127.0.0.1, pool of {len(paths)} digits embedded, {torch.get_num_threads()} threads")
    print(f"{'call':>16} {'p50 ms':>8} {'p95 ms':>8} {'in-process p95 ms':>18} {'ratio':>6}")
    for name, http_s, direct_s in rows:
        p95, ref = percentile_ms(http_s, 95), percentile_ms(direct_s, 95)
        print(f"{name:>16} {percentile_ms(http_s, 50):8.1f} {p95:8.1f} {ref:18.1f} {p95 / ref:6.2f}")


if __name__ == "__main__":
    main()
