"""Load on the HTTP endpoints Label Studio calls, on 127.0.0.1: annotation webhooks and ML-backend /predict,
at once, by a growing number of concurrent clients, each step bounded in time. Per step and endpoint: the
sustained rate and the latency percentiles; afterwards, labels lost or doubled must be 0.

    .venv/bin/python -m bench.load [--steps 1,4,16,32] [--seconds 15] [--annotations 2000]

The receiver and the ML backend run in one app, as `flywheel webhook` serves them; the champion is a real
one (bench/ml_backend.py builds it on the digits). Webhook bodies come from bench/webhook_burst.py
(creations, updates, deletions, duplicates, shuffled). The result: bench/results/load.md and .json.
"""

from __future__ import annotations

import argparse
import asyncio
import base64
import itertools
import json
import os
import tempfile
import time
from pathlib import Path
from typing import Any

import httpx
import numpy as np
from pydantic import SecretStr

from bench.ml_backend import Fixed, build
from bench.webhook_burst import deliveries, prepare, serving
from flywheel.app import mlbackend
from flywheel.app.webhook import create_app
from flywheel.labelstudio import SECRET_HEADER
from flywheel.labelstudio.media import image_url

RESULTS = Path(__file__).parent / "results"
TARGET_P95_S = 0.5


async def _step(port: int, clients: int, seconds: float, work: dict[str, Any]) -> dict[str, list[float]]:
    """`clients` concurrent loops, each alternating a webhook delivery and a 1-task /predict, for `seconds`."""
    latencies: dict[str, list[float]] = {"webhook": [], "predict": []}
    failures: list[str] = []
    deadline = time.monotonic() + seconds
    limits = httpx.Limits(max_connections=clients)
    async with httpx.AsyncClient(
        base_url=f"http://127.0.0.1:{port}", trust_env=False, timeout=30, limits=limits
    ) as http:

        async def client(k: int) -> None:
            for turn in itertools.count():
                if time.monotonic() > deadline:
                    return
                kind = "webhook" if (k + turn) % 2 == 0 else "predict"
                started = time.perf_counter()
                if kind == "webhook":
                    body = next(work["bodies"], None)
                    if body is None:  # every delivery sent: predict only
                        continue
                    response = await http.post("/webhook", content=body, headers=work["webhook_headers"])
                else:
                    response = await http.post("/predict", content=next(work["predicts"]), headers=work["auth"])
                latencies[kind].append(time.perf_counter() - started)
                if response.status_code != 200:
                    failures.append(f"{kind} {response.status_code}: {response.text[:200]}")

        await asyncio.gather(*(client(k) for k in range(clients)))
    if failures:
        raise RuntimeError(f"{len(failures)} failed requests, e.g. {failures[0]}")
    return latencies


def main() -> None:
    parser = argparse.ArgumentParser(description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter)
    parser.add_argument("--steps", default="1,4,16,32", help="concurrent clients per step")
    parser.add_argument("--seconds", type=float, default=15.0, help="length of each step")
    parser.add_argument("--annotations", type=int, default=2000)
    parser.add_argument("--deliveries", type=int, default=20000)
    args = parser.parse_args()
    secret = os.urandom(16).hex()
    with tempfile.TemporaryDirectory(prefix="bench-load-") as tmp:
        champion, paths, model_settings = build(Path(tmp), 1797)
        settings = model_settings.model_copy(update={"project": "load"})
        webhook = settings.webhook.model_copy(
            update={"secret": SecretStr(secret), "emit_events": False, "ml_backend": False}
        )
        settings = settings.model_copy(update={"webhook": webhook, "catalog_url": f"sqlite:///{tmp}/catalog.db"})
        catalog, samples = prepare(settings, args.annotations)
        bodies, expected = deliveries(samples, args.deliveries)
        app = create_app(settings, catalog)
        mlbackend.add_routes(app, settings, Fixed(champion))  # type: ignore[arg-type]  # duck-typed source
        tasks = ({"id": k + 1, "data": {"image": image_url(p, settings), "sample_id": k}} for k, p in enumerate(paths))
        work: dict[str, Any] = {
            "bodies": iter(bodies),
            "predicts": itertools.cycle([json.dumps({"tasks": [t]}).encode() for t in tasks]),
            "webhook_headers": {SECRET_HEADER: secret, "content-type": "application/json"},
            "auth": {"authorization": "Basic " + base64.b64encode(f"flywheel:{secret}".encode()).decode(),
                     "content-type": "application/json"},
        }  # fmt: skip
        rows = []
        with serving(app) as port:
            for clients in [int(c) for c in args.steps.split(",")]:
                latencies = asyncio.run(_step(port, clients, args.seconds, work))
                for kind, seconds in latencies.items():
                    if seconds:
                        rows.append(_row(clients, kind, seconds, args.seconds))
                        print(json.dumps(rows[-1]), flush=True)
            rest = list(work["bodies"])  # deliveries no step reached: sent now, so every label can be checked
            asyncio.run(_drain(port, rest, work["webhook_headers"]))
        labels = catalog.labels()
    lost = sum(1 for s, label in expected.items() if labels.get(s) != label)
    extra = sum(1 for s in labels if s not in expected)
    _write(rows, lost, extra, args)


async def _drain(port: int, bodies: list[bytes], headers: dict[str, str]) -> None:
    async with httpx.AsyncClient(base_url=f"http://127.0.0.1:{port}", trust_env=False, timeout=60) as http:
        for body in bodies:
            assert (await http.post("/webhook", content=body, headers=headers)).status_code == 200


def _row(clients: int, kind: str, seconds: list[float], step_s: float) -> dict[str, Any]:
    ms = np.array(seconds) * 1000
    return {
        "clients": clients, "endpoint": kind, "requests": len(seconds), "per_second": round(len(seconds) / step_s, 1),
        "p50_ms": round(float(np.percentile(ms, 50)), 1), "p95_ms": round(float(np.percentile(ms, 95)), 1),
        "p99_ms": round(float(np.percentile(ms, 99)), 1),
    }  # fmt: skip


def _write(rows: list[dict[str, Any]], lost: int, extra: int, args: argparse.Namespace) -> None:
    held = [r for r in rows if r["p95_ms"] < TARGET_P95_S * 1000]
    best = {k: max((r["per_second"] for r in held if r["endpoint"] == k), default=0.0) for k in ("webhook", "predict")}
    lines = [
        "## Load on the webhook receiver and the ML backend (bench/load.py)\n",
        f"{datetime_now()}, {os.cpu_count()} CPU cores, 127.0.0.1, steps of {args.seconds:g} s; each client alternates "
        "a webhook delivery and a 1-task /predict.\n",
        "| clients | endpoint | requests | per second | p50 ms | p95 ms | p99 ms |",
        "|---:|---|---:|---:|---:|---:|---:|",
        *(f"| {r['clients']} | {r['endpoint']} | {r['requests']} | {r['per_second']} | {r['p50_ms']} | "
          f"{r['p95_ms']} | {r['p99_ms']} |" for r in rows),
        "",
        f"Sustained with p95 under {TARGET_P95_S * 1000:.0f} ms: webhook {best['webhook']}/s, predict "
        f"{best['predict']}/s. Labels lost: {lost}; labels that should not exist: {extra} "
        f"(after every one of the {args.deliveries} deliveries for {args.annotations} annotations was sent).",
    ]  # fmt: skip
    RESULTS.mkdir(exist_ok=True)
    (RESULTS / "load.md").write_text("\n".join(lines) + "\n")
    (RESULTS / "load.json").write_text(json.dumps({"rows": rows, "lost": lost, "extra": extra, "best": best}, indent=1))
    print("\n".join(lines))
    if lost or extra:
        raise SystemExit(f"labels lost {lost}, extra {extra}")


def datetime_now() -> str:
    return time.strftime("%Y-%m-%d", time.gmtime())


if __name__ == "__main__":
    main()
