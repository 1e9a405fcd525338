"""Label Studio as flywheel's labelling front end: one project, tasks pushed by us, annotations pulled back.

The client is built once at the edge (`connect`) and passed in. Label Studio task ids and catalog sample ids
meet here only: every task carries `data.sample_id`, and every conversion between the two reads it back
from Label Studio rather than trusting positions.
"""

from __future__ import annotations

import json
import logging
import os
import xml.etree.ElementTree as ET
from collections.abc import Iterable, Sequence
from dataclasses import dataclass, field
from datetime import UTC, datetime
from pathlib import Path
from typing import Any
from urllib.parse import quote
from xml.sax.saxutils import quoteattr

import httpx
from label_studio_sdk import LabelStudio
from label_studio_sdk.core.api_error import ApiError
from sqlalchemy import func, select

from flywheel.catalog import Catalog, Label, Task
from flywheel.config import Settings
from flywheel.errors import ConfigError, DataError, FlywheelError, ServiceUnavailableError, UnknownChoiceError
from flywheel.health import require_healthy

log = logging.getLogger(__name__)

SERVICE = "Label Studio"
META_PROJECT_ID = "ls_project_id"
FROM_NAME, TO_NAME = "label", "image"
HEALTH_TIMEOUT_S = 3.0
API_TIMEOUT_S = 300.0  # an export or import of ~10k tasks takes ~10 s; leave room on a loaded machine
IMPORT_CHUNK = 1000  # tasks per import request
PAGE_SIZE = 1000  # tasks per list page
TITLE_MIN, TITLE_MAX = 3, 50  # Label Studio's PROJECT_TITLE_MIN_LEN / _MAX_LEN


# --- connection --------------------------------------------------------------------------------------
def connect(settings: Settings) -> LabelStudio:
    """An SDK client for the configured server, after checking that it answers and accepts the token.

    Raises ServiceUnavailableError when /health does not answer, ConfigError when the token is refused.
    """
    url = settings.label_studio.url
    require_healthy(SERVICE, url, timeout=HEALTH_TIMEOUT_S)
    client = LabelStudio(base_url=url, api_key=settings.label_studio.token.get_secret_value(), timeout=API_TIMEOUT_S)
    try:
        client.users.whoami()
    except ApiError as exc:
        if exc.status_code in (401, 403):
            raise ConfigError(
                f"{SERVICE} at {url} refused the API token (HTTP {exc.status_code}); set "
                "FLYWHEEL_LABEL_STUDIO__TOKEN (label_studio.token) to the legacy API token "
                "of a user of that server"
            ) from None
        raise ServiceUnavailableError(SERVICE, url, f"GET /api/current-user/whoami -> HTTP {exc.status_code}") from None
    except httpx.HTTPError as exc:
        raise ServiceUnavailableError(SERVICE, url, f"{type(exc).__name__}: {exc}") from None
    return client


# --- project -----------------------------------------------------------------------------------------
def label_config(classes: Sequence[str]) -> str:
    """The labelling interface: one image, a single-choice list of the classes (XML-escaped)."""
    if not classes:
        raise ConfigError("cannot build a Label Studio config without classes (the catalog has none yet)")
    choices = "\n".join(f"    <Choice value={quoteattr(name)}/>" for name in classes)
    return (
        "<View>\n"
        f'  <Image name="{TO_NAME}" value="$image"/>\n'
        f'  <Choices name="{FROM_NAME}" toName="{TO_NAME}" choice="single" showInline="true">\n'
        f"{choices}\n"
        "  </Choices>\n"
        "</View>"
    )


def config_classes(config: str) -> list[str]:
    """The Choice values of the `label` Choices tag of a label config (empty when there is none)."""
    try:
        root = ET.fromstring(config)
    except ET.ParseError:
        return []
    for choices in root.iter("Choices"):
        if choices.get("name") == FROM_NAME:
            return [c.get("value", "") for c in choices.iter("Choice")]
    return []


def ensure_project(client: LabelStudio, settings: Settings, catalog: Catalog, classes: Sequence[str]) -> int:
    """The id of this project's Label Studio project, created or updated so its choices cover `classes`.

    Looked up by the id in catalog meta, else by title (settings.labelstudio_project_title), else created;
    the id is stored in catalog meta. Choices are only ever added (dropping one Label Studio refuses once
    annotations use it), so a class list that grew updates the config and a shrunk one leaves it.
    """
    title = settings.labelstudio_project_title
    if not TITLE_MIN <= len(title) <= TITLE_MAX:
        raise ConfigError(
            f"Label Studio project title {title!r} has {len(title)} characters; it must have {TITLE_MIN} to "
            f"{TITLE_MAX}: set label_studio.project_title (FLYWHEEL_LABEL_STUDIO__PROJECT_TITLE) or a "
            "shorter project name"
        )
    project = None
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
                ) from None
            log.warning("Label Studio project %s is gone; looking for %r instead", stored, title)
    if project is None:
        matches = sorted((p for p in client.projects.list(title=title) if p.title == title), key=lambda p: p.id)
        if matches:
            project = client.projects.get(matches[0].id)
            if len(matches) > 1:
                log.warning("%d Label Studio projects are titled %r; using id %s", len(matches), title, project.id)
    if project is None:
        project = client.projects.create(
            title=title,
            label_config=label_config(classes),
            description=f"flywheel project {settings.project!r}: tasks are pushed by flywheel, not synced",
        )
        log.info("created Label Studio project %s (%r)", project.id, title)
    else:
        present = config_classes(project.label_config or "")
        missing = [name for name in classes if name not in present]
        if missing:
            merged = list(classes) + [name for name in present if name not in classes]
            client.projects.update(project.id, label_config=label_config(merged))
            log.info("added classes %s to Label Studio project %s", missing, project.id)
    project_id = int(project.id)
    if stored != str(project_id):
        catalog.set_meta(META_PROJECT_ID, str(project_id))
    return project_id


# --- images ------------------------------------------------------------------------------------------
def _document_root(settings: Settings) -> Path:
    return Path(os.path.normpath(settings.label_studio.document_root.expanduser().absolute()))


def _under_root(path: str | Path, settings: Settings, what: str) -> tuple[Path, Path]:
    """(normalised absolute path, its path relative to the document root), or a ConfigError naming both."""
    if not Path(path).is_absolute():
        raise DataError(f"{what} {str(path)!r} is not an absolute path; Label Studio serves absolute paths only")
    absolute = Path(os.path.normpath(path))
    root = _document_root(settings)
    if root not in absolute.parents:
        raise ConfigError(
            f"{what} {str(absolute)!r} is not below the Label Studio document root {str(root)!r} "
            "(label_studio.document_root, FLYWHEEL_LABEL_STUDIO__DOCUMENT_ROOT, which must match "
            "the server's LABEL_STUDIO_LOCAL_FILES_DOCUMENT_ROOT)"
        )
    return absolute, absolute.relative_to(root)


def image_url(path: str, settings: Settings) -> str:
    """The URL Label Studio serves a local image under: relative to the document root, URL-quoted."""
    _, relative = _under_root(path, settings, "image")
    return f"/data/local-files/?d={quote(relative.as_posix(), safe='/')}"


def _storage_paths(client: LabelStudio, project_id: int) -> set[Path]:
    return {Path(os.path.normpath(s.path)) for s in client.import_storage.local.list(project=project_id) if s.path}


def ensure_local_storage(client: LabelStudio, project_id: int, folder: Path, settings: Settings) -> None:
    """Let Label Studio serve the files below `folder` (a Local Storage on the project, once per folder).

    The storage is never synced: tasks come only from flywheel's pushes.
    """
    absolute, _ = _under_root(folder, settings, "image folder")
    if absolute in _storage_paths(client, project_id):
        return
    _create_storage(client, project_id, absolute)


def _create_storage(client: LabelStudio, project_id: int, folder: Path) -> None:
    try:
        client.import_storage.local.create(
            project=project_id,
            path=str(folder),
            use_blob_urls=True,
            title=f"flywheel: {folder}"[:250],
            description="serves flywheel's images; never synced (tasks are pushed by flywheel)",
        )
    except ApiError as exc:
        raise ConfigError(
            f"{SERVICE} refused a Local Storage for {str(folder)!r} (HTTP {exc.status_code}: {exc.body}); "
            "the folder must exist on the server's machine below its LABEL_STUDIO_LOCAL_FILES_DOCUMENT_ROOT"
        ) from None
    log.info("Label Studio project %s now serves files below %s", project_id, folder)


def _ensure_storages_for(client: LabelStudio, project_id: int, paths: Iterable[str], settings: Settings) -> None:
    """One storage per parent folder not already covered by a storage of the project (listed once)."""
    known = _storage_paths(client, project_id)
    for parent in sorted({_under_root(p, settings, "image")[0].parent for p in paths}):
        if not any(parent == k or k in parent.parents for k in known):
            _under_root(parent, settings, "image folder")
            _create_storage(client, project_id, parent)
            known.add(parent)


# --- listing tasks -----------------------------------------------------------------------------------
def filter_query(items: list[dict[str, Any]], conjunction: str = "and") -> str:
    return json.dumps({"filters": {"conjunction": conjunction, "items": items}})


def number_filter(name: str, operator: str, value: int) -> dict[str, Any]:
    return {"filter": f"filter:tasks:{name}", "operator": operator, "type": "Number", "value": value}


def list_tasks(
    client: LabelStudio, project_id: int, *, query: str | None = None, fields: str = "task_only"
) -> list[Any]:
    """All tasks of the project matching a Data Manager query (JSON), in pages of PAGE_SIZE."""
    kwargs: dict[str, Any] = {"project": project_id, "fields": fields, "page_size": PAGE_SIZE}
    if query is not None:
        kwargs["query"] = query
    return list(client.tasks.list(**kwargs))


def task_sample_id(data: dict[str, Any] | None) -> int | None:
    value = (data or {}).get("sample_id")
    if isinstance(value, bool):
        return None
    try:
        return int(value) if value is not None else None
    except (TypeError, ValueError):
        return None


def _task_sample_ids(
    client: LabelStudio,
    project_id: int,
    *,
    task_ids: Sequence[int] | None = None,
    after_task_id: int | None = None,
) -> dict[int, int]:
    """Label Studio task id -> data.sample_id for the project's tasks: all, just `task_ids`, or those
    with an id above `after_task_id`."""
    query = None
    if task_ids is not None:
        query = json.dumps({"selectedItems": {"all": False, "included": list(task_ids)}})
    elif after_task_id is not None:
        query = filter_query([number_filter("id", "greater", after_task_id)])
    out: dict[int, int] = {}
    for task in list_tasks(client, project_id, query=query):
        sample_id = task_sample_id(task.data)
        if sample_id is not None:
            out[int(task.id)] = sample_id
    return out


# --- pushing tasks -----------------------------------------------------------------------------------
@dataclass(frozen=True)
class TaskToPush:
    sample_id: int
    path: str
    predicted: str
    confidence: float
    score: float


def choice_result(label: str) -> list[dict[str, Any]]:
    return [{"from_name": FROM_NAME, "to_name": TO_NAME, "type": "choices", "value": {"choices": [label]}}]


def _task_payload(task: TaskToPush, settings: Settings, model_version: str | None) -> dict[str, Any]:
    payload: dict[str, Any] = {"data": {"image": image_url(task.path, settings), "sample_id": task.sample_id}}
    if model_version is not None:
        payload["predictions"] = [
            {
                "model_version": model_version,
                "score": float(task.score),
                "result": choice_result(task.predicted),
            }
        ]
    return payload


def push_tasks(
    client: LabelStudio,
    catalog: Catalog,
    settings: Settings,
    project_id: int,
    tasks: Sequence[TaskToPush],
    *,
    model_version: str | None,
    round_id: int | None,
) -> dict[int, int]:
    """Send samples not yet sent as tasks (with the model's prediction unless `model_version` is None).

    Before importing, tasks already in the project whose sample the catalog does not know as sent (a crash
    between import and record) are recorded instead of imported again. Everything is recorded in one
    catalog transaction. Returns sample id -> task id for every sample this call recorded (reconciled or
    imported); samples sent before are left out.
    """
    sent = catalog.sent_sample_ids()
    todo: dict[int, TaskToPush] = {}
    for task in tasks:
        if task.sample_id not in sent and task.sample_id not in todo:
            todo[task.sample_id] = task
    if not todo:
        return {}
    if model_version is not None:
        allowed = catalog.classes()
        for task in todo.values():
            if task.predicted not in allowed:
                raise UnknownChoiceError("predicted class", task.predicted, allowed)
    payloads = {sid: _task_payload(task, settings, model_version) for sid, task in todo.items()}  # checks paths

    # Reconcile. Every push records what it imported, or the next push finds it here first, so tasks the
    # catalog lacks have ids above the highest it recorded for the project: list only those (cheap).
    with catalog.transaction() as session:
        last = session.scalar(select(func.max(Task.ls_task_id)).where(Task.ls_project_id == project_id))
    recorded: dict[int, int] = {}
    for task_id, sample_id in sorted(_task_sample_ids(client, project_id, after_task_id=last).items()):
        if sample_id in todo and sample_id not in recorded:  # the oldest task wins if there are several
            recorded[sample_id] = task_id
    if recorded:
        log.warning("recording %d tasks found in Label Studio but not in the catalog", len(recorded))

    to_import = [sid for sid in todo if sid not in recorded]
    _ensure_storages_for(client, project_id, (todo[sid].path for sid in to_import), settings)
    for start in range(0, len(to_import), IMPORT_CHUNK):
        chunk = to_import[start : start + IMPORT_CHUNK]
        response = client.projects.import_tasks(
            project_id, request=[payloads[sid] for sid in chunk], return_task_ids=True, commit_to_project=True
        )
        task_ids = [int(t) for t in (getattr(response, "task_ids", None) or [])]
        if len(task_ids) != len(chunk):
            raise FlywheelError(
                f"{SERVICE} created {len(task_ids)} tasks for {len(chunk)} samples in project {project_id} "
                f"(import response: {response}); the next push reconciles what was created"
            )
        created = _task_sample_ids(client, project_id, task_ids=task_ids)
        by_sample = {sample_id: task_id for task_id, sample_id in created.items()}
        missing = [sid for sid in chunk if sid not in by_sample]
        if missing or len(by_sample) != len(chunk):
            raise FlywheelError(
                f"the tasks {SERVICE} returned for project {project_id} do not match the samples pushed "
                f"(missing sample ids {missing[:10]}); the next push reconciles what was created"
            )
        recorded.update(by_sample)

    with catalog.transaction() as session:
        catalog.record_tasks(
            session,
            ls_project_id=project_id,
            task_ids=recorded,
            round_id=round_id,
            model_version=model_version,
            scores={sid: float(todo[sid].score) for sid in recorded},
        )
    return recorded


# --- pulling annotations -----------------------------------------------------------------------------
@dataclass(frozen=True)
class SyncReport:
    new: int
    updated: int
    unchanged: int
    skipped: int
    rejected: list[str] = field(default_factory=list)


def _annotation_sort_key(annotation: dict[str, Any]) -> tuple[datetime, int]:
    """Latest first by last edit, then by id (ids grow with creation)."""
    stamp = annotation.get("updated_at") or annotation.get("created_at")
    when = datetime.fromisoformat(stamp) if stamp else datetime.min.replace(tzinfo=UTC)
    return when, int(annotation["id"])


def _choice_of(annotation: dict[str, Any]) -> list[str]:
    for region in annotation.get("result") or []:
        if region.get("from_name") == FROM_NAME and region.get("type") == "choices":
            return list((region.get("value") or {}).get("choices") or [])
    return []


def _annotators(client: LabelStudio, annotations: Sequence[dict[str, Any]]) -> dict[int, str]:
    """annotation id -> the annotator's email (or user id when the user is gone)."""
    if not annotations:
        return {}
    users = {int(u.id): u.email or str(u.id) for u in client.users.list()}
    out: dict[int, str] = {}
    for annotation in annotations:
        who = annotation.get("completed_by")  # the export gives the user id
        out[int(annotation["id"])] = users.get(int(who), str(who)) if who is not None else "unknown"
    return out


def export_annotated(client: LabelStudio, project_id: int) -> list[dict[str, Any]]:
    """Every task of the project with at least one annotation (skips included), as exported JSON dicts."""
    chunks = client.projects.exports.download_sync(project_id, export_type="JSON", download_all_tasks=False)
    return json.loads(b"".join(chunks))


def sync_annotations(client: LabelStudio, catalog: Catalog, project_id: int) -> SyncReport:
    """Pull the latest non-cancelled annotation of each task into the catalog, in one transaction.

    Labels outside catalog.classes() are rejected and reported, not stored; tasks whose annotations were
    all skipped are counted as skipped. Running it again without new annotations changes nothing.
    """
    exported = export_annotated(client, project_id)
    classes = set(catalog.classes())
    rejected: list[str] = []
    skipped = 0
    picks: dict[int, tuple[int, str, dict[str, Any]]] = {}  # sample id -> (task id, label, annotation)
    for task in exported:
        task_id = int(task["id"])
        annotations = [a for a in task.get("annotations") or [] if not a.get("was_cancelled")]
        if not annotations:
            skipped += 1 if task.get("annotations") else 0
            continue
        latest = max(annotations, key=_annotation_sort_key)
        sample_id = task_sample_id(task.get("data"))
        choices = _choice_of(latest)
        if sample_id is None:
            rejected.append(f"task {task_id}: no data.sample_id (not a flywheel task)")
        elif len(choices) != 1:
            rejected.append(
                f"task {task_id} (sample {sample_id}): annotation {latest.get('id')} has "
                f"{len(choices)} choices {choices}, expected exactly one"
            )
        elif choices[0] not in classes:
            rejected.append(
                f"task {task_id} (sample {sample_id}): label {choices[0]!r} from annotation "
                f"{latest.get('id')} is not a class ({', '.join(sorted(classes))})"
            )
        elif sample_id in picks:
            rejected.append(
                f"task {task_id} (sample {sample_id}): sample already labelled through task "
                f"{picks[sample_id][0]}; keeping that one"
            )
        else:
            picks[sample_id] = (task_id, choices[0], latest)

    known_samples = set(catalog.truth_of(picks))
    for sample_id in [s for s in picks if s not in known_samples]:
        task_id, label, _ = picks.pop(sample_id)
        rejected.append(f"task {task_id}: sample {sample_id} is not in the catalog ({catalog.url})")

    annotators = _annotators(client, [annotation for _, _, annotation in picks.values()])
    new = updated = unchanged = 0
    with catalog.transaction() as session:
        labelled = set(session.scalars(select(Label.sample_id).where(Label.sample_id.in_(list(picks)))))
        for sample_id, (_task_id, label, annotation) in picks.items():
            changed = catalog.upsert_label(
                session,
                sample_id=sample_id,
                label=label,
                annotator=annotators[int(annotation["id"])],
                ls_annotation_id=int(annotation["id"]),
            )
            if not changed:
                unchanged += 1
            elif sample_id in labelled:
                updated += 1
            else:
                new += 1
    return SyncReport(new=new, updated=updated, unchanged=unchanged, skipped=skipped, rejected=rejected)
