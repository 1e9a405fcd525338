"""Load: a bounded burst of 5,000 webhook deliveries on 127.0.0.1, duplicated and reordered, at the real
receiver; no label may be lost or doubled. (The 20,000-annotation sync runs on a private Label Studio:
test_labelstudio_private.py; bench/webhook_burst.py prints the same figures.)"""

from __future__ import annotations

import time

import pytest
from pydantic import SecretStr
from sqlalchemy import select

from bench.webhook_burst import count, deliveries, prepare, send, serving
from flywheel.app.webhook import create_app
from flywheel.catalog import Annotation, LabelChange, WebhookEvent
from flywheel.config import Settings
from tests.integration.labelstudio_support import with_section

pytestmark = pytest.mark.integration

DELIVERIES, ANNOTATED = 5000, 1000  # 1,000 created + 1,000 updated + 200 deleted + 2,800 duplicates


def test_burst_of_5000_webhook_deliveries_loses_and_doubles_nothing(settings: Settings) -> None:
    settings = with_section(settings, "webhook", secret=SecretStr("load-secret"), emit_events=False)
    catalog, samples = prepare(settings, ANNOTATED)
    bodies, expected = deliveries(samples, DELIVERIES)
    with serving(create_app(settings, catalog)) as port:
        began = time.monotonic()
        statuses = send(port, bodies, "load-secret")
        seconds = time.monotonic() - began
    print(f"\n{len(bodies)} webhook deliveries in {seconds:.1f} s ({len(bodies) / seconds:.0f}/s)")

    assert statuses == [200] * DELIVERIES
    assert catalog.labels() == expected  # nothing lost, nothing revived after its deletion
    assert count(catalog, WebhookEvent) == DELIVERIES  # every delivery recorded
    assert count(catalog, Annotation) == ANNOTATED  # one row per annotation, however often it came
    with catalog.transaction() as session:
        history = session.execute(select(LabelChange.sample_id, LabelChange.label).order_by(LabelChange.id)).all()
    last: dict[int, str | None] = {}
    for sample, label in history:  # every history row is a real change: never the same label twice running
        assert last.get(sample, "<none>") != label
        last[sample] = label
    assert {s: label for s, label in last.items() if label is not None} == expected
