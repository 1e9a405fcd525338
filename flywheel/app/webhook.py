"""`flywheel webhook`: the receiver Label Studio posts annotation events to.

It checks the shared secret header in constant time, records every authenticated delivery in the catalog
(`webhook_events`), applies it through the same ledger as `flywheel sync` (so duplicate, late or
out-of-order deliveries change nothing twice), and emits a Prefect event
(`flywheel.annotation.created|updated|deleted`) for each change it applied, which deployments can trigger
on. Label Studio does not retry a failed delivery: polling `flywheel sync` stays the fallback. Like the
CLI, this is an entry point: the only library module that talks to Prefect, and only to emit events.
"""

from __future__ import annotations

import asyncio
import base64
import hashlib
import hmac
import json
import logging
import threading
import time
import uuid
from collections.abc import AsyncIterator, Callable, Sequence
from contextlib import asynccontextmanager
from dataclasses import dataclass, field, replace
from typing import Any

from fastapi import FastAPI, Request
from fastapi.responses import JSONResponse
from sqlalchemy import select
from sqlalchemy.orm import Session
from starlette.concurrency import run_in_threadpool

from flywheel.app import mlbackend
from flywheel.app.refusals import too_large
from flywheel.catalog import Annotation, Catalog, Label, WebhookEvent
from flywheel.config import Settings
from flywheel.errors import ConfigError
from flywheel.labelstudio import ledger
from flywheel.labelstudio.project import META_PROJECT_ID, SECRET_HEADER
from flywheel.serving.champion import ChampionSource

log = logging.getLogger(__name__)

LABELS_CHANGED = "flywheel.labels.changed"  # at most one per webhook.sync_every_s: the sync deployment's trigger
THRESHOLD_REACHED = "flywheel.labels.threshold-reached"  # the finetune deployment's trigger (sync, or Start Training)
ACTIONS = {
    "ANNOTATION_CREATED": "created",
    "ANNOTATIONS_CREATED": "created",
    "ANNOTATION_UPDATED": "updated",
    "ANNOTATIONS_DELETED": "deleted",
}
MAX_BODY = 10 * 1024 * 1024  # bytes; a bulk action on thousands of annotations stays far below
TRAINING_ACTIONS = ("START_TRAINING",)  # the Model page's Start Training button
USERS_REFRESH_S = 30.0  # at most one user listing per this many seconds when an unknown user id shows up


def require_secret(settings: Settings) -> str:
    secret = settings.webhook.secret.get_secret_value()
    if not secret:
        raise ConfigError(
            "the webhook receiver needs a shared secret: set webhook.secret (FLYWHEEL_WEBHOOK__SECRET) to a "
            "long random string; set-up registers it on the Label Studio project"
        )
    return secret


@dataclass(frozen=True)
class Change:
    """One applied change, as the Prefect event tells it."""

    action: str  # created | updated | deleted
    annotation_id: int
    task_id: int | None
    sample_id: int | None
    label: str | None  # the sample's label after the change (None: none)
    version: str  # what makes this change unique (Label Studio's updated_at, or "deleted")


@dataclass
class Outcome:
    status: int
    body: dict[str, Any]
    changes: list[Change] = field(default_factory=list)
    event_row: int | None = None
    train_requested: bool = False  # Label Studio's Start Training


class Receiver:
    """The receiver's work, without HTTP: authenticate, record, apply. One writer at a time per process."""

    def __init__(self, settings: Settings, catalog: Catalog, users: Callable[[], dict[int, str]] | None = None):
        self.settings, self.catalog = settings, catalog
        self._secret = require_secret(settings).encode()
        self._users_source = users
        self._users: dict[int, str] = {}
        self._users_at = float("-inf")
        self._lock = threading.Lock()
        self.refused = 0

    def authorized(self, given: str | None, authorization: str | None = None) -> bool:
        """The shared secret in its header, or as the basic-auth password Label Studio's ML calls carry."""
        if given is None and authorization and authorization.startswith("Basic "):
            try:
                user, _, given = base64.b64decode(authorization[6:], validate=True).decode().partition(":")
            except ValueError:
                given = None
            given = given if given is not None and user == self.settings.webhook.ml_backend_user else None
        ok = given is not None and hmac.compare_digest(given.encode(), self._secret)
        if not ok:
            self.refused += 1
        return ok

    def _user_names(self, ids: Sequence[int]) -> dict[int, str]:
        """Label Studio user id -> email, listed again (rate-limited) when an id is new."""
        unknown = any(i not in self._users for i in ids)
        if self._users_source is not None and unknown and time.monotonic() - self._users_at > USERS_REFRESH_S:
            self._users_at = time.monotonic()
            try:
                self._users = self._users_source()
            except Exception as exc:  # any failure: names are cosmetic; votes count by user id
                log.warning("cannot list Label Studio users (%s); annotators recorded by id", type(exc).__name__)
        return self._users

    def handle(self, body: bytes) -> Outcome:
        try:
            payload = json.loads(body)
            action = str(payload.get("action", ""))
        except (ValueError, AttributeError, RecursionError):
            return Outcome(400, {"error": "the body is not a JSON object"})
        project = payload["project"].get("id") if isinstance(payload.get("project"), dict) else None
        annotations = [payload["annotation"]] if "annotation" in payload else payload.get("annotations") or []
        if not isinstance(annotations, list):
            return Outcome(400, {"error": f"`annotations` must be a list, got {type(annotations).__name__}"})
        if action not in ACTIONS and action not in TRAINING_ACTIONS:
            return self._record(payload, action, project, [], f"ignored: action {action!r}", body)
        expected = self.catalog.get_meta(META_PROJECT_ID)
        if expected is None or str(project) != expected:
            return self._record(payload, action, project, [], f"ignored: project {project} is not {expected}", body)
        if action in TRAINING_ACTIONS:
            outcome = self._record(payload, action, project, [], "fine-tune requested", body)
            return replace(outcome, train_requested=True)
        try:
            if ACTIONS[action] == "deleted":
                observations = [ledger.deletion(int(a["id"])) for a in annotations]
            else:
                users = self._user_names([int(a["completed_by"]) for a in annotations if a.get("completed_by")])
                observations = [ledger.observe(a, payload.get("task"), users) for a in annotations]
        except (KeyError, TypeError, ValueError) as exc:
            return Outcome(400, {"error": f"malformed {action} payload: {type(exc).__name__}: {exc}"})
        return self._record(payload, action, project, observations, None, body)

    def _record(
        self,
        payload: dict[str, Any],
        action: str,
        project: int | None,
        observations: list[ledger.Observation],
        ignored: str | None,
        body: bytes,
    ) -> Outcome:
        classes = self.catalog.classes()
        mode = self.settings.label_studio.label_mode
        kept = {k: payload[k] for k in ("action", "annotation", "annotations", "task") if k in payload}

        def work(session: Session) -> Outcome:
            applied = ledger.apply(session, observations, classes=classes, mode=mode) if observations else None
            outcomes = applied.outcomes if applied else [ignored or "ignored: no annotations"]
            row = WebhookEvent(
                action=action[:64],
                ls_project_id=project if isinstance(project, int) and abs(project) < 2**63 else None,
                ls_annotation_ids=json.dumps([o.annotation_id for o in observations]),
                body_sha256=hashlib.sha256(body).hexdigest(),
                payload=json.dumps(kept),
                outcome="; ".join(outcomes),
            )
            session.add(row)
            session.flush()
            changes = self._changes(session, action, observations, outcomes, applied) if applied else []
            summary = {"outcomes": outcomes, "problems": applied.problems if applied else []}
            return Outcome(200, summary, changes, row.id)

        with self._lock:
            outcome = ledger.with_retries(self.catalog, work)
        for problem in outcome.body["problems"]:
            log.warning("webhook %s: %s", action, problem)
        return outcome

    def _changes(
        self,
        session: Session,
        action: str,
        observations: list[ledger.Observation],
        outcomes: list[str],
        applied: ledger.Applied,
    ) -> list[Change]:
        done = [o for o, status in zip(observations, outcomes, strict=True) if status == ledger.APPLIED]
        if not done:
            return []
        rows = {
            r.ls_annotation_id: r
            for r in session.scalars(
                select(Annotation).where(Annotation.ls_annotation_id.in_([o.annotation_id for o in done]))
            )
        }
        labels = {sample: label for sample, label, _ in applied.changes}
        current = dict(self.catalog_labels(session, {r.sample_id for r in rows.values() if r.sample_id is not None}))
        out = []
        for obs in done:
            row = rows[obs.annotation_id]
            out.append(
                Change(
                    action=ACTIONS[action],
                    annotation_id=obs.annotation_id,
                    task_id=row.ls_task_id,
                    sample_id=row.sample_id,
                    label=labels.get(row.sample_id, current.get(row.sample_id)) if row.sample_id is not None else None,
                    version="deleted" if obs.deleted else obs.updated_at.isoformat(),
                )
            )
        return out

    @staticmethod
    def catalog_labels(session: Session, sample_ids: set[int]) -> list[tuple[int, str]]:
        query = select(Label.sample_id, Label.label).where(Label.sample_id.in_(sample_ids))
        return list(session.execute(query).tuples())

    def mark_emitted(self, event_row: int) -> None:
        with self.catalog.transaction() as session:
            session.get_one(WebhookEvent, event_row).emitted = True


class PrefectEmitter:
    """Sends flywheel.annotation.* events to the Prefect server in the settings over one kept connection, and
    at most one flywheel.labels.changed per webhook.sync_every_s (the `sync` deployment's trigger): a burst of
    annotations starts one sync at its start and one after it, not one each.

    Event ids are derived from the change, so a change Prefect already has is not counted twice there.
    """

    def __init__(self, settings: Settings):
        self.api_url, self.project = settings.prefect.api_url, settings.project
        self.every_s = settings.webhook.sync_every_s
        self._client: Any = None
        self._lock = asyncio.Lock()
        self._unannounced = 0  # changes since the last flywheel.labels.changed
        self._announced_at = float("-inf")  # loop time of the last one
        self._announcing: asyncio.Task[None] | None = None

    def event(self, change: Change) -> Any:
        from prefect.events import Event

        return Event(
            event=f"flywheel.annotation.{change.action}",
            resource={"prefect.resource.id": f"flywheel.project.{self.project}"},
            payload={
                "action": change.action,
                "annotation_id": change.annotation_id,
                "task_id": change.task_id,
                "sample_id": change.sample_id,
                "label": change.label,
            },
            id=uuid.uuid5(uuid.NAMESPACE_URL, f"flywheel/{self.project}/{change.annotation_id}/{change.version}"),
        )

    async def emit(self, changes: Sequence[Change]) -> bool:
        """True when every event went out; on failure the receiver logs it and polling carries on."""
        if not await self._send([self.event(change) for change in changes]):
            return False
        self._announce_later(len(changes))
        return True

    async def request_finetune(self, requested_by: str) -> bool:
        """The event the `finetune` deployment's trigger waits for, asked for by a person, not the threshold."""
        from prefect.events import Event

        resource = {"prefect.resource.id": f"flywheel.project.{self.project}"}
        return await self._send(
            [Event(event=THRESHOLD_REACHED, resource=resource, payload={"requested_by": requested_by})]
        )

    async def _send(self, events: Sequence[Any]) -> bool:
        """True when every event went out; on failure the connection is dropped and the caller says so."""
        from prefect.events.clients import PrefectEventsClient

        async with self._lock:
            try:
                if self._client is None:
                    client = PrefectEventsClient(api_url=self.api_url)
                    await client.__aenter__()
                    self._client = client
                for event in events:
                    await self._client.emit(event)
            except Exception as exc:  # any failure: the catalog already holds what happened
                log.warning("could not emit %d Prefect events to %s: %s", len(events), self.api_url, exc)
                await self.close()
                return False
        return True

    def _announce_later(self, n_changes: int) -> None:
        """flywheel.labels.changed now if none went out for every_s, else once that time is up."""
        self._unannounced += n_changes
        if self._announcing is None:
            wait = self._announced_at + self.every_s - asyncio.get_running_loop().time()
            self._announcing = asyncio.create_task(self._announce(after_s=max(0.0, wait)))

    async def _announce(self, *, after_s: float) -> None:
        from prefect.events import Event

        await asyncio.sleep(after_s)
        self._announcing = None
        n_changes, self._unannounced = self._unannounced, 0
        self._announced_at = asyncio.get_running_loop().time()
        event = Event(
            event=LABELS_CHANGED,
            resource={"prefect.resource.id": f"flywheel.project.{self.project}"},
            payload={"changes": n_changes},
        )
        async with self._lock:
            if self._client is None:
                return  # emit() failed and closed it: the interval schedule syncs instead
            try:
                await self._client.emit(event)
            except Exception as exc:  # any failure: the interval schedule syncs instead
                log.warning("could not emit %s to %s: %s", LABELS_CHANGED, self.api_url, exc)
                await self.close()

    async def close(self) -> None:
        if self._announcing is not None:
            self._announcing.cancel()
            self._announcing = None
        client, self._client = self._client, None
        if client is not None:
            try:
                await client.__aexit__(None, None, None)
            except Exception:  # any failure: closing a broken connection
                log.debug("closing the Prefect events connection failed", exc_info=True)


def create_app(
    settings: Settings,
    catalog: Catalog,
    *,
    users: Callable[[], dict[int, str]] | None = None,
    on_shutdown: Callable[[], None] | None = None,
) -> FastAPI:
    """The FastAPI app: POST /webhook (Label Studio), GET /health, and with `webhook.ml_backend` the ML backend's
    POST /setup and /predict. `on_shutdown` runs when the server stops gracefully (uvicorn then re-raises a
    SIGTERM, so code after uvicorn.run never runs)."""
    receiver = Receiver(settings, catalog, users)
    emitter = PrefectEmitter(settings) if settings.webhook.emit_events else None

    @asynccontextmanager
    async def lifespan(_: FastAPI) -> AsyncIterator[None]:
        yield
        if emitter is not None:
            await emitter.close()
        if on_shutdown is not None:
            await run_in_threadpool(on_shutdown)

    app = FastAPI(title="flywheel webhook receiver", lifespan=lifespan, docs_url=None, redoc_url=None)
    app.state.receiver = receiver

    @app.get("/health")
    async def health() -> dict[str, Any]:
        return {"ok": True, "status": "UP", "refused": receiver.refused}

    if settings.webhook.ml_backend:
        mlbackend.add_routes(app, settings, ChampionSource(settings))

    @app.post("/webhook")
    async def webhook(request: Request) -> JSONResponse:
        if not receiver.authorized(request.headers.get(SECRET_HEADER), request.headers.get("authorization")):
            log.warning("refused a webhook delivery from %s: missing or wrong secret", request.client)
            return JSONResponse({"error": f"missing or wrong {SECRET_HEADER} header"}, status_code=401)
        if (refusal := too_large(request, MAX_BODY)) is not None:
            return refusal
        outcome = await run_in_threadpool(receiver.handle, await request.body())
        if outcome.changes and emitter is not None and await emitter.emit(outcome.changes):
            assert outcome.event_row is not None  # a delivery that changed labels is recorded
            await run_in_threadpool(receiver.mark_emitted, outcome.event_row)
            outcome.body["emitted"] = len(outcome.changes)
        if outcome.train_requested:
            requested = emitter is not None and await emitter.request_finetune("Label Studio: Start Training")
            outcome.body["finetune_requested"] = requested
            if not requested:
                return JSONResponse(
                    {**outcome.body, "error": "no Prefect event went out: run `flywheel finetune`"}, 503
                )
        return JSONResponse(outcome.body, status_code=outcome.status)

    return app


def serve(settings: Settings) -> None:
    """Run the receiver with uvicorn on webhook.host:webhook.port, registered on the project for as long as it
    runs: its webhook is created (or the one an earlier start left is reused) first, and removed on a clean
    stop (Ctrl-C, SIGTERM), so Label Studio never keeps delivering to nobody."""
    import uvicorn

    from flywheel.labelstudio import connect, ensure_webhook, remove_webhooks
    from flywheel.labelstudio.sync import users_by_id

    require_secret(settings)
    catalog = Catalog(settings.catalog_url)
    client = connect(settings)
    project_id = registered_project(catalog)
    ensure_webhook(client, settings, project_id)  # before the ML backend, which would add a hook without the secret
    if settings.webhook.ml_backend:
        mlbackend.connect_when_up(settings, client, project_id)

    def unregister_on_stop() -> None:
        removed = remove_webhooks(client, settings.webhook.endpoint, project_id)
        if settings.webhook.ml_backend:
            removed += mlbackend.disconnect(settings, client, project_id)
        log.warning("receiver stopped: removed %d webhook(s) and ML backends at %s", removed, settings.webhook.endpoint)

    app = create_app(settings, catalog, users=lambda: users_by_id(client), on_shutdown=unregister_on_stop)
    uvicorn.run(app, host=settings.webhook.host, port=settings.webhook.port, log_level="warning")


def unregister(settings: Settings) -> int:
    """Remove the project's webhooks to this receiver's URL (a receiver that died without a clean stop)."""
    from flywheel.labelstudio import connect, remove_webhooks

    return remove_webhooks(
        connect(settings), settings.webhook.endpoint, registered_project(Catalog(settings.catalog_url))
    )


def registered_project(catalog: Catalog) -> int:
    project_id = catalog.get_meta(META_PROJECT_ID)
    if project_id is None:
        raise ConfigError(
            f"the catalog ({catalog.url}) has no Label Studio project yet: run `flywheel bootstrap` first"
        )
    return int(project_id)
