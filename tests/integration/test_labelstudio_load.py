"""Load: a bounded burst of webhook deliveries (duplicated, reordered) and a sync of 20,000 annotations
from the real Label Studio test server; no label may be lost or doubled."""

from __future__ import annotations

import asyncio
import json
import random
import time
from pathlib import Path
from typing import Any

import httpx
import pytest
from labelstudio_support import CLASSES, serving, with_section
from pydantic import SecretStr
from sqlalchemy import func, select

from flywheel.catalog import Annotation, Catalog, LabelChange, NewSample, WebhookEvent
from flywheel.config import Settings
from flywheel.labelstudio import META_PROJECT_ID, SECRET_HEADER, choice_result, connect, ensure_project
from flywheel.labelstudio.sync import sync_annotations
from flywheel.webhook import create_app

pytestmark = pytest.mark.integration

DELIVERIES, ANNOTATED, DELETED_EVERY = 5000, 1000, 5  # 1,000 created + 1,000 updated + 200 deleted + duplicates
CONCURRENCY = 16


def _fake_samples(catalog: Catalog, n: int) -> list[int]:
    """n catalog samples (no image files: nothing here reads them)."""
    news = [NewSample(uri=f"/nonexistent/load/{i}.png", content_hash=f"{i:064x}") for i in range(n)]
    catalog.add_samples(news, source="load", split="pool", classes=CLASSES)
    return [s.id for s in catalog.samples()]


def _count(catalog: Catalog, table: Any) -> int:
    with catalog.transaction() as session:
        return session.scalar(select(func.count()).select_from(table)) or 0


def _delivery(project: int, sample: int, annotation: int, label: str, second: int) -> dict[str, Any]:
    return {
        "action": "ANNOTATION_CREATED" if second == 0 else "ANNOTATION_UPDATED",
        "project": {"id": project},
        "annotation": {
            "id": annotation,
            "task": annotation,
            "project": project,
            "completed_by": 1,
            "result": choice_result(label),
            "was_cancelled": False,
            "updated_at": f"2030-01-01T00:00:{second:02d}.000000Z",
        },
        "task": {"id": annotation, "data": {"sample_id": sample}},
    }


async def _send(port: int, bodies: list[bytes], secret: str) -> list[int]:
    gate = asyncio.Semaphore(CONCURRENCY)
    limits = httpx.Limits(max_connections=CONCURRENCY)
    async with httpx.AsyncClient(trust_env=False, timeout=60, limits=limits) as client:

        async def post(body: bytes) -> int:
            async with gate:
                response = await client.post(
                    f"http://127.0.0.1:{port}/webhook", content=body, headers={SECRET_HEADER: secret}
                )
                return response.status_code

        return await asyncio.gather(*(post(b) for b in bodies))


def test_burst_of_5000_webhook_deliveries_loses_and_doubles_nothing(settings: Settings) -> None:
    project = 987654  # the receiver only compares it with the catalog's; no Label Studio call is made
    settings = with_section(settings, "webhook", secret=SecretStr("load-secret"), emit_events=False)
    catalog = Catalog(settings.catalog_url)
    catalog.set_meta(META_PROJECT_ID, str(project))
    samples = _fake_samples(catalog, ANNOTATED)
    rng = random.Random(7)
    expected: dict[int, str] = {}
    unique: list[dict[str, Any]] = []
    for n, sample in enumerate(samples):
        first, final = rng.choice(CLASSES), rng.choice(CLASSES)
        unique += [_delivery(project, sample, 10_000 + n, first, 0), _delivery(project, sample, 10_000 + n, final, 1)]
        if n % DELETED_EVERY == 0:
            unique.append(
                {"action": "ANNOTATIONS_DELETED", "project": {"id": project}, "annotations": [{"id": 10_000 + n}]}
            )
        else:
            expected[sample] = final
    deliveries = unique + [rng.choice(unique) for _ in range(DELIVERIES - len(unique))]
    rng.shuffle(deliveries)  # duplicates anywhere, updates before creations, deletions before both
    bodies = [json.dumps(d).encode() for d in deliveries]

    with serving(create_app(settings, catalog)) as port:
        began = time.monotonic()
        statuses = asyncio.run(_send(port, bodies, "load-secret"))
        seconds = time.monotonic() - began
    print(f"\n{len(bodies)} webhook deliveries in {seconds:.1f} s ({len(bodies) / seconds:.0f}/s)")

    assert statuses == [200] * DELIVERIES
    assert catalog.labels() == expected  # nothing lost, nothing revived after its deletion
    assert _count(catalog, WebhookEvent) == DELIVERIES  # every delivery recorded
    assert _count(catalog, Annotation) == ANNOTATED  # one row per annotation, however often it came
    with catalog.transaction() as session:
        history = session.execute(select(LabelChange.sample_id, LabelChange.label).order_by(LabelChange.id)).all()
    last: dict[int, str | None] = {}
    for sample, label in history:  # every history row is a real change: never the same label twice running
        assert last.get(sample, "<none>") != label
        last[sample] = label
    assert {s: label for s, label in last.items() if label is not None} == expected


def test_sync_of_20000_annotations_loses_and_doubles_nothing(settings: Settings, tmp_path: Path) -> None:
    n = 20_000
    catalog = Catalog(settings.catalog_url)
    samples = _fake_samples(catalog, n)
    client = connect(settings)
    project_id = ensure_project(client, settings, catalog, CLASSES)
    try:
        truth = {sample: CLASSES[(sample * 7) % 3] for sample in samples}
        for start in range(0, n, 10_000):  # tasks arrive with their annotation: seeding 20k by API would take 30 min
            client.projects.import_tasks(
                project_id,
                request=[
                    {
                        "data": {"image": f"/data/{s}.png", "sample_id": s},
                        "annotations": [{"result": choice_result(truth[s])}],
                    }
                    for s in samples[start : start + 10_000]
                ],
            )
        began = time.monotonic()
        first = sync_annotations(client, catalog, project_id, export_above=2000)
        seconds = time.monotonic() - began
        print(f"\nsync of {n} annotations ({first.mode}): {seconds:.1f} s")
        assert (first.mode, first.new, first.updated, first.rejected) == ("export", n, 0, [])
        assert catalog.labels() == truth  # none lost, none wrong
        assert _count(catalog, Annotation) == n and _count(catalog, LabelChange) == n  # none doubled
    finally:
        client.projects.delete(project_id)
