"""Tasks flywheel sends: each sample at most once, with the model's prediction and the selection score,
and the predictions of still-open tasks refreshed when a new champion arrives."""

from __future__ import annotations

import logging
from collections.abc import Mapping, Sequence
from dataclasses import dataclass
from typing import Any, cast

from label_studio_sdk import ImportApiRequest, LabelStudio, PredictionRequest
from sqlalchemy import func, select

from flywheel import faults
from flywheel.catalog import Catalog, Task
from flywheel.config import Settings
from flywheel.errors import FlywheelError, UnknownChoiceError
from flywheel.labelstudio.client import (
    SERVICE,
    filter_query,
    list_tasks,
    number_filter,
    task_sample_id,
    task_sample_ids,
)
from flywheel.labelstudio.interface import choice_result
from flywheel.labelstudio.media import ensure_storages_for, image_url

log = logging.getLogger(__name__)

IMPORT_CHUNK = 5000  # tasks per import request (fewer, larger requests: the import is Label Studio-bound)
# Tasks nobody has touched: no submitted and no skipped annotation (a skip is a person's decision). Submitted
# ones are found by their results, not by `total_annotations`: Label Studio 1.23 leaves that counter at 0 for
# annotations created through the API until a later import recounts the project's tasks.
OPEN_TASKS = filter_query(
    [
        {"filter": "filter:tasks:annotations_results", "operator": "empty", "type": "String", "value": True},
        number_filter("cancelled_annotations", "equal", 0),
    ]
)


@dataclass(frozen=True)
class TaskToPush:
    sample_id: int
    path: str  # a local path, file://, http(s):// or s3:// URI
    predicted: str
    confidence: float
    score: float


def prediction_score(selection_score: float) -> float:
    """The selection score as Label Studio stores it: s / (1 + s), in [0, 1) and in the same order.

    Label Studio's bulk prediction import drops, without an error, every prediction whose score is outside
    [0, 1] (it reports fewer `created`), and selection scores are not bounded (k-center distances reach 2,
    typicality and coverage counts more). One monotone map for every task keeps the data manager's sort by
    prediction score equal to the sort by selection score; the catalog keeps the raw score.
    """
    score = float(selection_score)
    return score / (1.0 + score) if score > 0 else 0.0  # NaN and negatives: 0


def _prediction(predicted: str, score: float, model_version: str) -> dict[str, Any]:
    return {"model_version": model_version, "score": prediction_score(score), "result": choice_result(predicted)}


def _task_payload(task: TaskToPush, settings: Settings, model_version: str | None) -> dict[str, Any]:
    payload: dict[str, Any] = {"data": {"image": image_url(task.path, settings), "sample_id": task.sample_id}}
    if model_version is not None:
        payload["predictions"] = [_prediction(task.predicted, task.score, model_version)]
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
    between import and record) are recorded instead of imported again (`reconcile_tasks`). What is imported
    is recorded in one catalog transaction. Returns sample id -> task id for every sample of `tasks` this
    call recorded (reconciled or imported); samples sent before are left out.
    """
    wanted = {task.sample_id for task in tasks}
    reconciled = {
        s: t for s, t in reconcile_tasks(client, catalog, project_id, round_id=round_id).items() if s in wanted
    }
    sent = catalog.sent_sample_ids()
    todo: dict[int, TaskToPush] = {}
    for task in tasks:
        if task.sample_id not in sent and task.sample_id not in todo:
            todo[task.sample_id] = task
    if not todo:
        return reconciled
    if model_version is not None:
        allowed = catalog.classes()
        for task in todo.values():
            if task.predicted not in allowed:
                raise UnknownChoiceError("predicted class", task.predicted, allowed)
    payloads = {sid: _task_payload(task, settings, model_version) for sid, task in todo.items()}  # checks paths

    ensure_storages_for(client, project_id, (task.path for task in todo.values()), settings)
    recorded = _import_tasks(client, project_id, payloads)
    faults.point("push:before_record")
    with catalog.transaction() as session:
        catalog.record_tasks(
            session,
            ls_project_id=project_id,
            task_ids=recorded,
            round_id=round_id,
            model_version=model_version,
            scores={sid: float(todo[sid].score) for sid in recorded},
        )
    return {**reconciled, **recorded}


def _import_tasks(client: LabelStudio, project_id: int, payloads: Mapping[int, dict[str, Any]]) -> dict[int, int]:
    """Import the task payloads (sample id -> payload) in chunks, each checked to have created its tasks in
    order; returns sample id -> task id. A failure leaves what was created for the next push to reconcile."""
    recorded: dict[int, int] = {}
    to_import = list(payloads)
    for start in range(0, len(to_import), IMPORT_CHUNK):
        chunk = to_import[start : start + IMPORT_CHUNK]
        request = cast(list[ImportApiRequest], [payloads[sid] for sid in chunk])  # the SDK sends dicts as they are
        response = client.projects.import_tasks(
            project_id, request=request, return_task_ids=True, commit_to_project=True
        )
        task_ids = [int(t) for t in (getattr(response, "task_ids", None) or [])]
        if len(task_ids) != len(chunk):
            raise FlywheelError(
                f"{SERVICE} created {len(task_ids)} tasks for {len(chunk)} samples in project {project_id} "
                f"(import response: {response}); the next push reconciles what was created"
            )
        # Label Studio returns a bulk import's task ids in request order. Listing every created task to
        # prove it costs ~2 s per 1,000, so check both ends of the chunk; labels never depend on this
        # mapping anyway (sync reads data.sample_id from each task).
        ends = {task_ids[0]: chunk[0], task_ids[-1]: chunk[-1]}
        found = task_sample_ids(client, project_id, task_ids=list(ends))
        if found != ends:
            raise FlywheelError(
                f"the tasks {SERVICE} returned for project {project_id} do not match the samples pushed "
                f"(task id -> sample id {found}, expected {ends}); the next push reconciles what was created"
            )
        _complete_predictions(client, project_id, dict(zip(task_ids, (payloads[sid] for sid in chunk), strict=True)),
                              created=getattr(response, "prediction_count", None))  # fmt: skip
        recorded.update(zip(chunk, task_ids, strict=True))
        faults.point("push:after_import")
    return recorded


def _complete_predictions(
    client: LabelStudio, project_id: int, payloads: Mapping[int, dict[str, Any]], *, created: int | None
) -> None:
    """Give the just-imported tasks (task id -> payload) the predictions their import dropped.

    Label Studio's bulk task import drops every prediction of a request, without an error, when it fails to
    build one of them; it says so only in the `prediction_count` it returns. The predictions are then sent
    again through the predictions import, which checks each was created."""
    wanted = {task_id: payload["predictions"][0] for task_id, payload in payloads.items() if payload.get("predictions")}
    if not wanted or created is None or created >= len(wanted):
        return
    version = str(next(iter(wanted.values()))["model_version"])
    log.warning(
        "%s kept %d of %d predictions of model version %s in project %d; sending them again",
        SERVICE, created, len(wanted), version, project_id,
    )  # fmt: skip
    _replace_predictions(client, project_id, {t: {"task": t, **p} for t, p in wanted.items()}, model_version=version)


def reconcile_tasks(client: LabelStudio, catalog: Catalog, project_id: int, *, round_id: int | None) -> dict[int, int]:
    """Record the project's flywheel tasks that the catalog does not know, so no sample is ever sent twice.

    Such tasks exist when a push died between Label Studio's import and the catalog's commit (a crash, a
    lost response). Every push records what it imported or finds it here first, so they have ids above the
    highest task id the catalog holds for the project: only those are listed (cheap). They are recorded for
    `round_id` (the round being resumed) whether or not that round selects them again. Returns sample id ->
    task id of what was recorded.
    """
    with catalog.transaction() as session:
        last = session.scalar(select(func.max(Task.ls_task_id)).where(Task.ls_project_id == project_id))
    sent = catalog.sent_sample_ids()
    found: dict[int, int] = {}
    for task_id, sample_id in sorted(task_sample_ids(client, project_id, after_task_id=last).items()):
        if sample_id not in sent and sample_id not in found:  # the oldest task wins if there are several
            found[sample_id] = task_id
    known = set(catalog.truth_of(found))  # a task naming a sample of another catalog is not ours
    found = {s: t for s, t in found.items() if s in known}
    if found:
        log.warning("recording %d tasks found in Label Studio but not in the catalog", len(found))
        with catalog.transaction() as session:
            catalog.record_tasks(
                session, ls_project_id=project_id, task_ids=found, round_id=round_id, model_version=None, scores={}
            )
    return found


def refresh_predictions(
    client: LabelStudio,
    catalog: Catalog,
    project_id: int,
    predicted: Mapping[int, str],
    *,
    model_version: str,
) -> int:
    """Give every still-open task of the project the new champion's prediction; returns how many changed.

    `predicted` maps sample id -> class for (at least) the open tasks' samples. Tasks keep their selection
    score; only the prediction and its model_version change, and no task is created. Annotated and skipped
    tasks keep what their annotator saw. Safe to rerun: a task already carrying only `model_version` is
    left alone, and one a failed call left without a prediction gets it.
    """
    allowed = set(catalog.classes())
    open_tasks = list_tasks(client, project_id, query=OPEN_TASKS)
    with catalog.transaction() as session:
        scores = dict(
            session.execute(select(Task.ls_task_id, Task.score).where(Task.ls_project_id == project_id)).tuples().all()
        )
    versions: dict[int, set[str | None]] = {}  # task id -> model versions of its predictions
    if open_tasks:  # task listings leave out the predictions' versions
        for prediction in client.predictions.list(project=project_id):
            versions.setdefault(int(prediction.task), set()).add(prediction.model_version)
    requests: dict[int, dict[str, Any]] = {}  # task id -> the new prediction
    refreshed: dict[int, int] = {}  # task id -> sample id
    for task in open_tasks:
        task_id, sample_id = int(task.id), task_sample_id(task.data)
        if sample_id is None or sample_id not in predicted or task_id not in scores:
            continue  # not a task flywheel recorded, or no prediction for it
        label = predicted[sample_id]
        if label not in allowed:
            raise UnknownChoiceError("predicted class", label, sorted(allowed))
        if versions.get(task_id) != {model_version}:
            requests[task_id] = {"task": task_id, **_prediction(label, scores[task_id] or 0.0, model_version)}
            refreshed[task_id] = sample_id
    if not requests:
        return 0
    _replace_predictions(client, project_id, requests, model_version=model_version)
    client.projects.update(project_id, model_version=model_version)
    with catalog.transaction() as session:
        for row in session.scalars(select(Task).where(Task.ls_task_id.in_(list(refreshed)))):
            row.model_version = model_version
    log.info("refreshed predictions of %d open tasks to model version %s", len(refreshed), model_version)
    return len(refreshed)


def _replace_predictions(
    client: LabelStudio, project_id: int, requests: Mapping[int, dict[str, Any]], *, model_version: str
) -> None:
    """Swap the predictions of the tasks in `requests` (task id -> new prediction) for the new ones, checking
    that Label Studio created every one (it drops some without an error)."""
    # One data-manager action clears the old predictions of these tasks (deleting them one by one costs
    # ~0.1 s each: 4 minutes for 2,000 open tasks); the new ones follow at once, and a rerun completes a
    # call that died in between.
    client.actions.create(
        id="delete_tasks_predictions", project=project_id, selected_items={"all": False, "included": list(requests)}
    )
    faults.point("refresh:after_delete")
    batch = list(requests.values())
    for start in range(0, len(batch), IMPORT_CHUNK):
        chunk = cast(list[PredictionRequest], batch[start : start + IMPORT_CHUNK])  # the SDK sends dicts as they are
        created = getattr(client.projects.import_predictions(project_id, request=chunk), "created", None)
        if created != len(chunk):
            raise FlywheelError(
                f"{SERVICE} created {created} of {len(chunk)} predictions of model version {model_version} in "
                f"project {project_id}; rerun the refresh (the tasks still without it get it then)"
            )
