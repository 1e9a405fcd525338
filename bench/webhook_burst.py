"""A bounded burst of Label Studio webhook deliveries at our receiver on 127.0.0.1: duplicates, updates
before creations, deletions before both. Counts what reached the catalog: labels lost or doubled must be 0.

    .venv/bin/python bench/webhook_burst.py [--deliveries 5000] [--annotations 1000] [--emit]

`--emit` also sends the flywheel.annotation.* Prefect events to the Prefect server in the settings.
The generator and sender are shared with tests/integration/test_labelstudio_load.py.
"""

from __future__ import annotations

import argparse
import asyncio
import json
import os
import random
import tempfile
import threading
import time
from collections.abc import Iterator
from contextlib import contextmanager
from pathlib import Path
from typing import Any

import httpx
import uvicorn
from pydantic import SecretStr
from sqlalchemy import func, select

from flywheel.app.webhook import create_app
from flywheel.catalog import Annotation, Catalog, LabelChange, NewSample, WebhookEvent
from flywheel.config import Settings, load_settings
from flywheel.labelstudio import META_PROJECT_ID, SECRET_HEADER, choice_result

CLASSES = ["cat", "dog", "bird"]
PROJECT = 987654  # the receiver only compares it with the catalog's; no Label Studio call is made


@contextmanager
def serving(app: Any) -> Iterator[int]:
    """Run an ASGI app with uvicorn on a free loopback port in a thread; yields the port."""
    server = uvicorn.Server(uvicorn.Config(app, host="127.0.0.1", port=0, log_level="warning"))
    thread = threading.Thread(target=server.run, daemon=True)
    thread.start()
    deadline = time.monotonic() + 20
    while not server.started:
        if time.monotonic() > deadline or not thread.is_alive():
            raise RuntimeError("the receiver did not start")
        time.sleep(0.05)
    try:
        yield server.servers[0].sockets[0].getsockname()[1]
    finally:
        server.should_exit = True
        thread.join(15)


def _delivery(sample: int, annotation: int, label: str, second: int) -> dict[str, Any]:
    return {
        "action": "ANNOTATION_CREATED" if second == 0 else "ANNOTATION_UPDATED",
        "project": {"id": PROJECT},
        "annotation": {
            "id": annotation, "task": annotation, "project": PROJECT, "completed_by": 1,
            "result": choice_result(label), "was_cancelled": False,
            "updated_at": f"2030-01-01T00:00:{second:02d}.000000Z",
        },
        "task": {"id": annotation, "data": {"sample_id": sample}},
    }  # fmt: skip


def deliveries(samples: list[int], total: int, *, delete_every: int = 5, seed: int = 7) -> tuple[list[bytes], dict]:
    """Bodies of `total` deliveries for one annotation per sample (created, updated, every `delete_every`-th
    deleted), the rest duplicates, all shuffled; and the labels the catalog must end with."""
    rng = random.Random(seed)
    expected: dict[int, str] = {}
    unique: list[dict[str, Any]] = []
    for n, sample in enumerate(samples):
        first, final = rng.choice(CLASSES), rng.choice(CLASSES)
        unique += [_delivery(sample, 10_000 + n, first, 0), _delivery(sample, 10_000 + n, final, 1)]
        if n % delete_every == 0:
            unique.append(
                {"action": "ANNOTATIONS_DELETED", "project": {"id": PROJECT}, "annotations": [{"id": 10_000 + n}]}
            )
        else:
            expected[sample] = final
    if total < len(unique):
        raise ValueError(f"{total} deliveries cannot carry the {len(unique)} distinct ones of {len(samples)} samples")
    bodies = unique + [rng.choice(unique) for _ in range(total - len(unique))]
    rng.shuffle(bodies)
    return [json.dumps(b).encode() for b in bodies], expected


async def _send(port: int, bodies: list[bytes], secret: str, concurrency: int) -> list[int]:
    gate = asyncio.Semaphore(concurrency)
    async with httpx.AsyncClient(trust_env=False, timeout=60, limits=httpx.Limits(max_connections=concurrency)) as http:

        async def post(body: bytes) -> int:
            async with gate:
                response = await http.post(
                    f"http://127.0.0.1:{port}/webhook", content=body, headers={SECRET_HEADER: secret}
                )
                return response.status_code

        return await asyncio.gather(*(post(b) for b in bodies))


def send(port: int, bodies: list[bytes], secret: str, *, concurrency: int = 16) -> list[int]:
    """POST every body with at most `concurrency` in flight; the HTTP statuses in order."""
    return asyncio.run(_send(port, bodies, secret, concurrency))


def prepare(settings: Settings, n_samples: int) -> tuple[Catalog, list[int]]:
    """A catalog bound to PROJECT with n samples (no image files: nothing reads them)."""
    catalog = Catalog(settings.catalog_url)
    catalog.set_meta(META_PROJECT_ID, str(PROJECT))
    news = [NewSample(uri=f"/nonexistent/burst/{i}.png", content_hash=f"{i:064x}") for i in range(n_samples)]
    catalog.add_samples(news, source="burst", split="pool", classes=CLASSES)
    return catalog, [s.id for s in catalog.samples()]


def count(catalog: Catalog, table: Any) -> int:
    with catalog.transaction() as session:
        return session.scalar(select(func.count()).select_from(table)) or 0


def main() -> None:
    parser = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    parser.add_argument("--deliveries", type=int, default=5000)
    parser.add_argument("--annotations", type=int, default=1000)
    parser.add_argument("--concurrency", type=int, default=16)
    parser.add_argument("--emit", action="store_true", help="emit Prefect events (server from the settings)")
    parser.add_argument("--out", type=Path)
    args = parser.parse_args()
    secret = os.urandom(16).hex()
    settings = load_settings(workspace=Path(tempfile.mkdtemp(prefix="flywheel-burst-")), project="burst")
    webhook = settings.webhook.model_copy(update={"secret": SecretStr(secret), "emit_events": args.emit})
    settings = settings.model_copy(update={"webhook": webhook})
    catalog, samples = prepare(settings, args.annotations)
    bodies, expected = deliveries(samples, args.deliveries)
    with serving(create_app(settings, catalog)) as port:
        began = time.monotonic()
        statuses = send(port, bodies, secret, concurrency=args.concurrency)
        seconds = time.monotonic() - began
    labels = catalog.labels()
    figures = {
        "deliveries": len(bodies),
        "seconds": round(seconds, 1),
        "per_second": round(len(bodies) / seconds),
        "non_200": sum(s != 200 for s in statuses),
        "labels_lost": sum(1 for s, label in expected.items() if labels.get(s) != label),
        "labels_extra": sum(1 for s in labels if s not in expected),
        "recorded_deliveries": count(catalog, WebhookEvent),
        "annotation_rows": count(catalog, Annotation),
        "history_rows": count(catalog, LabelChange),
        "emit": args.emit,
        "load_average_1min": round(os.getloadavg()[0], 1),
    }
    print(json.dumps(figures))
    if args.out:
        args.out.write_text(json.dumps(figures, indent=2))


if __name__ == "__main__":
    main()
