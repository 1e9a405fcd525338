"""Label Studio's ML backend protocol, served by the webhook receiver's app: `/setup` and `/predict` beside
its `/health` and `/webhook`. Annotators get the champion's prediction the moment they open any task, and the
data manager's "Retrieve predictions" fills any selection; the champion is read from the registry, so a
promotion shows within seconds. Every call needs the receiver's secret (Label Studio sends it as the
basic-auth password of the connection that `connect` registers)."""

from __future__ import annotations

import json
import logging
import threading
import time
import urllib.request

from fastapi import FastAPI, Request
from fastapi.responses import JSONResponse
from label_studio_sdk import LabelStudio
from starlette.concurrency import run_in_threadpool

from flywheel.app.refusals import current_champion, too_large
from flywheel.config import Settings
from flywheel.errors import ConfigError, DataError, FlywheelError
from flywheel.labelstudio.mlbackend import ensure_ml_backend, prediction, remove_ml_backends, task_images
from flywheel.labelstudio.project import SECRET_HEADER
from flywheel.serving.champion import ChampionSource, predict

log = logging.getLogger(__name__)

NO_MODEL = "none"  # the model version /setup reports before the project has a champion
MAX_TASKS = 10_000  # tasks in one /predict call; Label Studio sends a selection at once
MAX_BODY = 50 * 1024 * 1024  # bytes of one call: 10,000 tasks with long URLs stay far below


def backend_url(settings: Settings) -> str:
    """Where Label Studio reaches the backend: the receiver's address, without its /webhook."""
    endpoint = settings.webhook.endpoint
    if not endpoint.endswith("/webhook"):
        raise ConfigError(f"webhook.url {endpoint!r} must end in /webhook to serve as the ML backend too")
    return endpoint.removesuffix("/webhook")


def add_routes(app: FastAPI, settings: Settings, champions: ChampionSource) -> None:
    """POST /setup and /predict, refused without the receiver's secret (header or basic auth)."""
    receiver = app.state.receiver
    root = settings.label_studio.document_root

    def refused(request: Request) -> JSONResponse | None:
        if not receiver.authorized(request.headers.get(SECRET_HEADER), request.headers.get("authorization")):
            return JSONResponse({"error": f"missing or wrong {SECRET_HEADER} header or basic auth"}, status_code=401)
        return too_large(request, MAX_BODY)

    @app.post("/setup")
    async def setup(request: Request) -> JSONResponse:
        if (refusal := refused(request)) is not None:
            return refusal
        current = await current_champion(champions)
        if isinstance(current, JSONResponse):
            return current
        return JSONResponse({"model_version": current.version if current else NO_MODEL})

    @app.post("/predict")
    async def predict_tasks(request: Request) -> JSONResponse:
        if (refusal := refused(request)) is not None:
            return refusal
        try:
            tasks = json.loads(await request.body()).get("tasks")
            if not isinstance(tasks, list) or not 0 < len(tasks) <= MAX_TASKS:
                raise DataError(f"`tasks` must be a list of 1 to {MAX_TASKS} tasks")
            images = task_images(tasks, document_root=root)
        except (ValueError, AttributeError, DataError) as exc:
            return JSONResponse({"error": f"not a predict request: {exc}"}, status_code=400)
        current = await current_champion(champions)
        if isinstance(current, JSONResponse):
            return current
        if current is None:
            return JSONResponse({"error": "no champion yet: run `flywheel round` first"}, status_code=503)
        try:
            probs = await run_in_threadpool(
                predict, current, [i.sample_id for i in images], [i.location for i in images]
            )
        except FlywheelError as exc:  # an image that cannot be read: say which
            return JSONResponse({"error": str(exc)}, status_code=422)
        results = [prediction(current.classes[int(p.argmax())], float(p.max()), current.version) for p in probs]
        return JSONResponse({"results": results, "model_version": current.version})


def connect_when_up(
    settings: Settings, client: LabelStudio, project_id: int, *, timeout: float = 60
) -> threading.Thread:
    """Connect the backend on the project's Model page once this server answers (Label Studio calls /health
    and /setup before it accepts a connection); in a thread, so the server can start meanwhile."""

    def connect() -> None:
        url = backend_url(settings)
        deadline = time.monotonic() + timeout
        while time.monotonic() < deadline:
            try:
                with urllib.request.urlopen(f"{url}/health", timeout=2):
                    break
            except OSError:
                time.sleep(0.2)
        try:
            ensure_ml_backend(
                client, project_id, url=url, user=settings.webhook.ml_backend_user,
                password=settings.webhook.secret.get_secret_value(), title=f"flywheel {settings.project}",
            )  # fmt: skip
        except FlywheelError as exc:
            log.error("the ML backend is not connected: %s", exc)

    thread = threading.Thread(target=connect, name="flywheel-ml-connect", daemon=True)
    thread.start()
    return thread


def disconnect(settings: Settings, client: LabelStudio, project_id: int) -> int:
    return remove_ml_backends(client, backend_url(settings), project_id)
