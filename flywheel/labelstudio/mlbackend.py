"""Label Studio's ML backend protocol, the data side: which image a task shows, the prediction a task gets,
and the project's connection to the flywheel's backend (its *Model* page).

Label Studio 1.23 calls a connected backend at `<url>/health` (GET), `<url>/setup` (POST: answers the model
version), `<url>/predict` (POST `{"tasks": [...]}`: answers `{"results": [one prediction per task]}`) and
`<url>/webhook` (annotation events, and `START_TRAINING` from the *Start Training* button), with basic auth
when the connection says so. The HTTP side lives in `flywheel.app.mlbackend`.
"""

from __future__ import annotations

import logging
from collections.abc import Mapping, Sequence
from dataclasses import dataclass
from pathlib import Path
from typing import Any
from urllib.parse import parse_qs, urlparse

from label_studio_sdk import LabelStudio
from label_studio_sdk.core.api_error import ApiError

from flywheel.errors import ConfigError, DataError
from flywheel.labelstudio.client import SERVICE
from flywheel.labelstudio.interface import choice_result

log = logging.getLogger(__name__)

LOCAL_FILES = "/data/local-files/"  # how Label Studio serves a local file: /data/local-files/?d=<relative path>


@dataclass(frozen=True)
class TaskImage:
    """The image a task shows: a pool sample (cached vectors) when flywheel made the task, else a location."""

    task_id: int
    sample_id: int | None
    location: str  # a local path, or an http(s) URL


def task_images(tasks: Sequence[Mapping[str, Any]], *, document_root: Path) -> list[TaskImage]:
    """Each task's image; a DataError names the task and field that do not say which image it is."""
    images = []
    for position, task in enumerate(tasks):
        if not isinstance(task, Mapping) or not isinstance(task.get("data"), Mapping):
            raise DataError(f"tasks[{position}]: a task is an object with a `data` object")
        task_id, data = task.get("id"), task["data"]
        url = data.get("image")
        if not isinstance(task_id, int) or not isinstance(url, str) or not url:
            raise DataError(f"tasks[{position}]: needs an integer `id` and a `data.image` URL, got {task_id!r}/{url!r}")
        sample_id = data.get("sample_id")
        images.append(
            TaskImage(task_id, sample_id if isinstance(sample_id, int) else None, _location(url, document_root))
        )
    return images


def _location(url: str, document_root: Path) -> str:
    """Where to read a task's image: Local Storage URLs map back under the document root."""
    parsed = urlparse(url)
    if parsed.path == LOCAL_FILES:
        relative = parse_qs(parsed.query).get("d", [""])[0]
        path = (document_root / relative).resolve()
        if not relative or not path.is_relative_to(document_root.resolve()):
            raise DataError(f"image {url!r}: not a file below the document root {document_root}")
        return str(path)
    if parsed.scheme in ("http", "https"):
        return url
    raise DataError(f"image {url!r}: the backend reads Local Storage files and http(s) URLs only")


def prediction(label: str, score: float, model_version: str) -> dict[str, Any]:
    """One task's answer: a Choices result, the champion's probability for it, and the version that said it."""
    return {"result": choice_result(label), "score": float(score), "model_version": model_version}


def ensure_ml_backend(client: LabelStudio, project_id: int, *, url: str, user: str, password: str, title: str) -> int:
    """The id of the project's ML backend connection to `url`, created (interactive, basic auth) or corrected.

    Label Studio checks `/health` and `/setup` before it accepts a connection, so the backend must already
    answer. It also adds a webhook to `<url>/webhook` unless one exists: register the receiver's first."""
    wanted = {"auth_method": "BASIC_AUTH", "basic_auth_user": user, "is_interactive": True, "title": title}
    try:
        mine = [b for b in client.ml.list(project=project_id) if (b.url or "").rstrip("/") == url.rstrip("/")]
        if not mine:
            backend = client.ml.create(project=project_id, url=url, basic_auth_pass=password, **wanted)
            log.info("connected ML backend %s -> %s on Label Studio project %s", backend.id, url, project_id)
            return int(backend.id or 0)
        backend, *stale = mine
        for extra in stale:
            client.ml.delete(id=int(extra.id or 0))
        client.ml.update(id=int(backend.id or 0), url=url, basic_auth_pass=password, **wanted)
        return int(backend.id or 0)
    except ApiError as exc:
        raise ConfigError(
            f"{SERVICE} refused the ML backend at {url} (HTTP {exc.status_code}: {exc.body}); it must reach that "
            "address, and be started with ML_BLOCK_LOCAL_IP=false for a loopback one (flywheel services does)"
        ) from exc


def remove_ml_backends(client: LabelStudio, url: str, project_id: int) -> int:
    """Disconnect the project's ML backends at `url`; returns how many."""
    mine = [b for b in client.ml.list(project=project_id) if (b.url or "").rstrip("/") == url.rstrip("/")]
    for backend in mine:
        client.ml.delete(id=int(backend.id or 0))
    return len(mine)
