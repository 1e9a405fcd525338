"""The project annotators work in: created or updated from the class list and the settings, with the
webhook that tells flywheel about each annotation."""

from __future__ import annotations

import logging
from collections.abc import Iterable, Sequence
from typing import Any

from label_studio_sdk import AllRolesProjectList, LabelStudio, LseProjectCreate, LseProjectResponse, Webhook
from label_studio_sdk.core.api_error import ApiError
from label_studio_sdk.projects.client_ext import ProjectExt

from flywheel.catalog import Catalog
from flywheel.config import Settings
from flywheel.errors import ConfigError, DataError
from flywheel.labelstudio.client import SERVICE
from flywheel.labelstudio.interface import config_classes, label_config

log = logging.getLogger(__name__)

META_PROJECT_ID = "ls_project_id"
TITLE_MIN, TITLE_MAX = 3, 50  # Label Studio's PROJECT_TITLE_MIN_LEN / _MAX_LEN
SECRET_HEADER = "X-Flywheel-Secret"
WEBHOOK_ACTIONS = ["ANNOTATION_CREATED", "ANNOTATIONS_CREATED", "ANNOTATION_UPDATED", "ANNOTATIONS_DELETED"]


def _project_fields(settings: Settings, classes: Sequence[str]) -> dict[str, Any]:
    """What the settings decide about the project: interface, instructions, annotators per task."""
    ls = settings.label_studio
    return {
        "label_config": label_config(classes, mode=ls.label_mode, instructions=ls.instructions),
        "expert_instruction": ls.instructions,
        "show_instruction": bool(ls.instructions),
        "maximum_annotations": ls.overlap,
        "overlap_cohort_percentage": 100,
    }


def _id(project: AllRolesProjectList | LseProjectResponse | LseProjectCreate) -> int:
    """A project's id: Label Studio always sends one, though its SDK types every field optional."""
    assert project.id is not None
    return int(project.id)


def ensure_project(client: LabelStudio, settings: Settings, catalog: Catalog, classes: Sequence[str]) -> int:
    """The id of this project's Label Studio project, created or updated to match `classes` and the settings.

    Looked up by the id in catalog meta, else by title (settings.labelstudio_project_title), else created;
    the id is stored in catalog meta. Choices are only ever added (dropping one Label Studio refuses once
    annotations use it), so a class list that grew updates the config and a shrunk one leaves it. With
    webhook.secret set, the project's webhook to the receiver is registered too.
    """
    title = settings.labelstudio_project_title
    if not TITLE_MIN <= len(title) <= TITLE_MAX:
        raise ConfigError(
            f"Label Studio project title {title!r} has {len(title)} characters; it must have {TITLE_MIN} to "
            f"{TITLE_MAX}: set label_studio.project_title (FLYWHEEL_LABEL_STUDIO__PROJECT_TITLE) or a "
            "shorter project name"
        )
    project: ProjectExt | LseProjectCreate | None = None
    stored = catalog.get_meta(META_PROJECT_ID)
    if stored is not None:
        try:
            project = client.projects.get(int(stored))
        except ApiError as exc:
            if exc.status_code != 404:
                raise
            sent = len(catalog.sent_sample_ids())
            if sent:
                raise DataError(
                    f"{SERVICE} project {stored} recorded in the catalog ({catalog.url}) no longer exists at "
                    f"{settings.label_studio.url}, and {sent} samples were sent to it; point the settings at "
                    "the server that holds it, or start a fresh workspace"
                ) from exc
            log.warning("Label Studio project %s is gone; looking for %r instead", stored, title)
    if project is None:
        # annotated: the SDK's list() override drops the item type
        listed: Iterable[AllRolesProjectList] = client.projects.list(title=title)
        matches = sorted((p for p in listed if p.title == title), key=_id)
        if matches:
            project = client.projects.get(_id(matches[0]))
            if len(matches) > 1:
                log.warning("%d Label Studio projects are titled %r; using id %s", len(matches), title, project.id)
    if project is None:
        project = client.projects.create(
            title=title,
            description=f"flywheel project {settings.project!r}: tasks are pushed by flywheel, not synced",
            **_project_fields(settings, classes),
        )
        log.info("created Label Studio project %s (%r)", project.id, title)
    else:
        present = config_classes(project.label_config or "")
        merged = list(classes) + [name for name in present if name not in classes]
        wanted = _project_fields(settings, merged)
        changed = {k: v for k, v in wanted.items() if getattr(project, k, None) != v}
        if changed:
            client.projects.update(_id(project), **changed)
            log.info("updated %s of Label Studio project %s", ", ".join(sorted(changed)), project.id)
    project_id = _id(project)
    if stored != str(project_id):
        catalog.set_meta(META_PROJECT_ID, str(project_id))
    return project_id


def ensure_webhook(client: LabelStudio, settings: Settings, project_id: int) -> int:
    """The id of the project's webhook to settings.webhook.endpoint, created or corrected (secret header,
    payload, annotation actions). Label Studio must allow loopback targets (SSRF protection off, as
    flywheel.devservers.services starts it)."""
    url = settings.webhook.endpoint
    wanted: dict[str, Any] = {
        "headers": {SECRET_HEADER: settings.webhook.secret.get_secret_value()},
        "send_payload": True,
        "send_for_all_actions": False,
        "is_active": True,
    }
    mine = _hooks_to(client, url, project_id)
    try:
        if not mine:
            hook = client.webhooks.create(url=url, project=project_id, actions=WEBHOOK_ACTIONS, **wanted)
            log.info("registered webhook %s -> %s on Label Studio project %s", hook.id, url, project_id)
            return int(hook.id)
        hook, *stale = mine
        for extra in stale:  # left by receivers of older versions: one delivery per hook is one too many
            client.webhooks.delete(id=_hook_id(extra))
        if any(getattr(hook, k) != v for k, v in wanted.items()) or sorted(hook.actions or []) != WEBHOOK_ACTIONS:
            client.webhooks.update(id=_hook_id(hook), url=url, actions=WEBHOOK_ACTIONS, **wanted)
            log.info("updated webhook %s on Label Studio project %s", hook.id, project_id)
    except ApiError as exc:
        raise ConfigError(
            f"{SERVICE} refused the webhook to {url} (HTTP {exc.status_code}); set webhook.url "
            "(FLYWHEEL_WEBHOOK__URL) to an address the server can reach, and start Label Studio with "
            "LABEL_STUDIO_SSRF_PROTECTION_ENABLED=false for loopback targets"
        ) from exc
    return _hook_id(hook)


def remove_webhooks(client: LabelStudio, url: str, project_id: int) -> int:
    """Delete the project's webhooks to `url` (a receiver that stops cleanly, `flywheel webhook --unregister`):
    Label Studio would otherwise keep delivering to nobody, and slow every save down. Returns how many."""
    hooks = _hooks_to(client, url, project_id)
    for hook in hooks:
        client.webhooks.delete(id=_hook_id(hook))
    return len(hooks)


def _hooks_to(client: LabelStudio, url: str, project_id: int) -> list[Webhook]:
    """The project's webhooks to `url`, oldest first."""
    hooks = [w for w in client.webhooks.list(project=str(project_id)) if w.url == url and w.project == project_id]
    return sorted(hooks, key=_hook_id)


def _hook_id(hook: Webhook) -> int:
    assert hook.id is not None  # listed hooks have ids
    return int(hook.id)
