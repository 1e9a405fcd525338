"""Helpers shared by the Label Studio, webhook and load tests (real servers, no mocks)."""

from __future__ import annotations

import hashlib
import time
from datetime import UTC, datetime, timedelta
from pathlib import Path
from typing import Any

import numpy as np
from PIL import Image

from flywheel.catalog import NewSample
from flywheel.config import Settings

CLASSES = ["cat", "dog", "bird"]


def make_images(folder: Path, n: int) -> list[NewSample]:
    """n tiny PNGs in per-class subfolders, with their truths cycling through CLASSES."""
    rng = np.random.default_rng(0)
    samples = []
    for i in range(n):
        truth = CLASSES[i % len(CLASSES)]
        path = folder / truth / f"img {i}.png"  # a space: the URL must be quoted
        path.parent.mkdir(parents=True, exist_ok=True)
        Image.fromarray(rng.integers(0, 255, (8, 8, 3), dtype=np.uint8)).save(path)
        digest = hashlib.sha256(path.read_bytes()).hexdigest()
        samples.append(NewSample(uri=str(path), content_hash=digest, truth=truth))
    return samples


def with_section(settings: Settings, section: str, **values: object) -> Settings:
    """The same settings with some values of one section replaced."""
    return settings.model_copy(update={section: getattr(settings, section).model_copy(update=values)})


def user_id(client: Any, email: str) -> int:
    """The id of a Label Studio user with this email, created (once per server) when missing."""
    for user in client.users.list():
        if user.email == email:
            return int(user.id)
    return int(client.users.create(username=email.split("@")[0], email=email, password="annotator-pass-123").id)


def prefect_events(settings: Settings, name: str, since: datetime, *, want: int, timeout: float = 30) -> list[Any]:
    """Events called `name` for this project since `since`, read back from the Prefect server's events API
    (polled: the server persists events in batches)."""
    from prefect.client.orchestration import SyncPrefectClient
    from prefect.events.filters import EventFilter, EventNameFilter, EventOccurredFilter, EventResourceFilter

    query = EventFilter(
        occurred=EventOccurredFilter(since=since, until=datetime.now(UTC) + timedelta(hours=1)),
        event=EventNameFilter(name=[name]),
        resource=EventResourceFilter(id=[f"flywheel.project.{settings.project}"]),
    )
    deadline = time.monotonic() + timeout
    with SyncPrefectClient(api=settings.prefect.api_url) as client:
        while True:
            events = client.read_events(filter=query, limit=50).events
            if len(events) >= want or time.monotonic() > deadline:
                return events
            time.sleep(1.0)
