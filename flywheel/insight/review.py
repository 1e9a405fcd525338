"""Label-quality review: find labels that are likely wrong, send them back to Label Studio, count the corrections.

Two signals. Confident learning (cleanlab's find_label_issues) on out-of-sample probabilities: each label is
judged by heads that never saw it (cross-validation on the labelled set, flywheel.training.crossval). And annotators
who disagree: a task that several people labelled differently. Flagged labels become tasks of a separate
Label Studio project (`<title> review`) with the model's suggestion as the prediction, so the labelling
project and its sync are untouched until a reviewer decides. The verdict goes back to the labelling project
as an ordinary annotation change (the annotation is corrected, or a deciding vote is added where several
annotators disagreed), so the one sync path derives the label; the catalog counts corrected and confirmed.
"""

from __future__ import annotations

import json
import logging
import warnings
from collections.abc import Collection, Iterable, Mapping, Sequence
from dataclasses import dataclass
from datetime import UTC, datetime
from typing import Any, Protocol, cast

import numpy as np
import numpy.typing as npt
from label_studio_sdk import AllRolesProjectList, ImportApiRequest, LabelStudio
from label_studio_sdk.core.api_error import ApiError
from sqlalchemy import func, select

from flywheel.catalog import Annotation, Catalog, LabelReview, Sample, Task
from flywheel.config import Settings
from flywheel.errors import DataError, FlywheelError
from flywheel.labelstudio.client import list_tasks, task_sample_ids
from flywheel.labelstudio.interface import choice_result, label_config, result_choices
from flywheel.labelstudio.media import ensure_storages_for, image_url
from flywheel.labelstudio.sync import users_by_id

log = logging.getLogger(__name__)

META_REVIEW_PROJECT = "ls_review_project_id"
CONFIDENT_LEARNING, DISAGREEMENT = "confident learning", "annotators disagree"
SUBMITTED = "submitted"  # flywheel.catalog.Annotation.state of an annotation that counts
INSTRUCTIONS = "Review: is the label in the header right? Choose the correct class (the model's suggestion is preset)."


@dataclass(frozen=True)
class Suspect:
    """A label flagged for review: what it says, what the model suggests, and why it was flagged."""

    sample_id: int
    label: str
    suggested: str
    self_confidence: float | None  # out-of-sample probability of `label`; None without a model's view
    suggestion_confidence: float | None
    reasons: tuple[str, ...]


def confident_learning(
    targets: npt.NDArray[np.integer[Any]],
    probs: npt.NDArray[np.floating[Any]],
    *,
    max_self_confidence: float = 1.0,
) -> npt.NDArray[np.int64]:
    """Positions of likely wrong labels, most suspicious (lowest self-confidence) first.

    targets: (N,) class index of each label; probs: (N, C) out-of-sample probabilities, rows sum to 1.
    Only labels the out-of-sample model gives at most `max_self_confidence` are kept: cleanlab alone flags
    many right labels of look-alike classes, and a reviewer's time is the cost (docs/labelstudio.md).
    """
    from cleanlab.filter import find_label_issues

    if probs.ndim != 2 or len(probs) != len(targets):
        raise DataError(f"probs must be (N, C) with N = len(targets) = {len(targets)}, got {probs.shape}")
    if len(targets) == 0:
        return np.empty(0, dtype=np.int64)
    with warnings.catch_warnings():
        warnings.simplefilter("ignore")  # "may not flag all label issues in class k": rare classes, said below
        # n_jobs=1: cleanlab's default forks a multiprocessing.Pool, whose workers inherit Prefect's SIGTERM
        # handler inside a task and print a TerminationSignal traceback when the pool closes; at our sizes
        # (thousands of labels) the pool saves nothing
        found = find_label_issues(targets, probs, return_indices_ranked_by="self_confidence", n_jobs=1)
    found = np.asarray(found, dtype=np.int64)
    keep: npt.NDArray[np.bool_] = probs[found, np.asarray(targets)[found]] <= max_self_confidence
    return found[keep]


def disagreements(votes: Mapping[int, Sequence[tuple[str, str]]]) -> dict[int, dict[str, list[str]]]:
    """sample id -> {label: [annotators]} for the samples whose (annotator, label) votes name several labels."""
    out: dict[int, dict[str, list[str]]] = {}
    for sample_id, pairs in votes.items():
        by_label: dict[str, list[str]] = {}
        for annotator, label in pairs:
            by_label.setdefault(label, []).append(annotator)
        if len(by_label) > 1:
            out[sample_id] = by_label
    return out


def find_suspects(
    sample_ids: npt.NDArray[np.integer[Any]],
    targets: npt.NDArray[np.integer[Any]],
    probs: npt.NDArray[np.floating[Any]],
    classes: Sequence[str],
    votes: Mapping[int, Sequence[tuple[str, str]]],
    *,
    exclude: Collection[int] = (),
    max_self_confidence: float = 1.0,
) -> list[Suspect]:
    """Both signals merged, one Suspect per sample, confident-learning order first, then disagreements.

    sample_ids, targets: (N,) the labelled samples and their class indices; probs: (N, C) out-of-sample.
    Samples in `exclude` (reviewed before) are left out.
    """
    row_of = {int(s): i for i, s in enumerate(sample_ids)}
    exclude = set(exclude)
    flagged: dict[int, list[str]] = {}
    for i in confident_learning(targets, probs, max_self_confidence=max_self_confidence):
        flagged.setdefault(int(sample_ids[i]), []).append(
            f"{CONFIDENT_LEARNING}: out-of-sample probability of the label {probs[i, targets[i]]:.2f}, "
            f"of {classes[int(probs[i].argmax())]} {probs[i].max():.2f}"
        )
    for sample_id, by_label in disagreements(votes).items():
        split = "; ".join(f"{label}: {', '.join(who)}" for label, who in sorted(by_label.items()))
        flagged.setdefault(sample_id, []).append(f"{DISAGREEMENT} ({split})")
    out = []
    for sample_id, reasons in flagged.items():
        if sample_id in exclude or sample_id not in row_of:
            continue
        i = row_of[sample_id]
        out.append(
            Suspect(
                sample_id=sample_id,
                label=classes[int(targets[i])],
                suggested=classes[int(probs[i].argmax())],
                self_confidence=float(probs[i, targets[i]]),
                suggestion_confidence=float(probs[i].max()),
                reasons=tuple(reasons),
            )
        )
    return out


def annotator_votes(catalog: Catalog) -> dict[int, list[tuple[str, str]]]:
    """sample id -> (annotator, label) of each submitted single-choice annotation the catalog holds."""
    with catalog.transaction() as s:
        rows = s.execute(
            select(Annotation.sample_id, Annotation.annotator, Annotation.choices).where(Annotation.state == SUBMITTED)
        ).all()
    votes: dict[int, list[tuple[str, str]]] = {}
    for sample_id, annotator, choices in rows:
        chosen = json.loads(choices)
        if len(chosen) == 1:
            votes.setdefault(int(sample_id), []).append((annotator, chosen[0]))
    return votes


def reviewed_sample_ids(catalog: Catalog) -> set[int]:
    with catalog.transaction() as s:
        return set(s.scalars(select(LabelReview.sample_id)))


# --- Label Studio ----------------------------------------------------------------------------------------
class _Stored(Protocol):
    id: int | None


def _stored_id(project: _Stored) -> int:
    """The id of a project Label Studio returned: always set, though the SDK types every id as optional."""
    assert project.id is not None
    return project.id


def review_title(settings: Settings) -> str:
    """`<labelling project title> review`, within Label Studio's 50 characters."""
    return f"{settings.labelstudio_project_title[:43]} review"


def ensure_review_project(client: LabelStudio, settings: Settings, catalog: Catalog, classes: Sequence[str]) -> int:
    """The review project's id: the one recorded in the catalog, else the one titled review_title, else new."""
    stored = catalog.get_meta(META_REVIEW_PROJECT)
    if stored is not None:
        try:
            return _stored_id(client.projects.get(int(stored)))
        except ApiError as exc:
            if exc.status_code != 404:
                raise
            log.warning("Label Studio review project %s is gone; creating another", stored)
    title = review_title(settings)
    listed: Iterable[AllRolesProjectList] = client.projects.list(title=title)  # the SDK's pager loses the item type
    matches = sorted((p for p in listed if p.title == title), key=_stored_id)
    if matches:
        project_id = _stored_id(matches[0])
    else:
        config = label_config(classes, instructions=INSTRUCTIONS).replace(
            "<View>\n", '<View>\n  <Header value="$note" size="5"/>\n', 1
        )
        project_id = _stored_id(
            client.projects.create(
                title=title,
                label_config=config,
                description=f"flywheel project {settings.project!r}: labels flagged as likely wrong",
            )
        )
    catalog.set_meta(META_REVIEW_PROJECT, str(project_id))
    return project_id


def push_reviews(
    client: LabelStudio,
    settings: Settings,
    catalog: Catalog,
    suspects: Sequence[Suspect],
    *,
    model_version: str,
    round_id: int | None,
) -> int:
    """Send suspects not reviewed before as review tasks (the suggestion as prediction); returns how many.

    Tasks the review project already holds for a suspect (a crash between import and record) are recorded,
    not imported again.
    """
    todo = {s.sample_id: s for s in suspects}
    for sample_id in reviewed_sample_ids(catalog):
        todo.pop(sample_id, None)
    if not todo:
        return 0
    project_id = ensure_review_project(client, settings, catalog, catalog.classes())
    with catalog.transaction() as s:
        uris = dict(s.execute(select(Sample.id, Sample.uri).where(Sample.id.in_(list(todo)))).tuples().all())
    found = {sid: tid for tid, sid in task_sample_ids(client, project_id).items() if sid in todo}
    to_import = [sid for sid in todo if sid not in found]
    ensure_storages_for(client, project_id, [uris[sid] for sid in to_import], settings)
    if to_import:
        payloads = [_payload(todo[sid], uris[sid], settings, model_version) for sid in to_import]
        # the SDK sends plain dicts as they are; its annotation names only its ImportApiRequest model
        requests = cast(list[ImportApiRequest], payloads)
        response = client.projects.import_tasks(
            project_id, request=requests, return_task_ids=True, commit_to_project=True
        )
        task_ids = [int(t) for t in (getattr(response, "task_ids", None) or [])]
        created = task_sample_ids(client, project_id, task_ids=task_ids)
        found.update({sid: tid for tid, sid in created.items()})
        if any(sid not in found for sid in to_import):
            raise FlywheelError(
                f"Label Studio created {len(task_ids)} review tasks for {len(to_import)} samples in project "
                f"{project_id}; the next review pass records what was created"
            )
    with catalog.transaction() as s:
        for sample_id, task_id in found.items():
            suspect = todo[sample_id]
            s.add(
                LabelReview(
                    sample_id=sample_id,
                    round_id=round_id,
                    ls_project_id=project_id,
                    ls_task_id=task_id,
                    reasons=json.dumps(list(suspect.reasons)),
                    label_before=suspect.label,
                    suggested=suspect.suggested,
                    self_confidence=suspect.self_confidence,
                )
            )
    return len(found)


def _payload(suspect: Suspect, uri: str, settings: Settings, model_version: str) -> dict[str, Any]:
    note = f"current label: {suspect.label}; model suggests: {suspect.suggested}. Flagged: {'; '.join(suspect.reasons)}"
    return {
        "data": {"image": image_url(uri, settings), "sample_id": suspect.sample_id, "note": note},
        "predictions": [
            {
                "model_version": model_version,
                "score": float(suspect.suggestion_confidence or 0.0),
                "result": choice_result(suspect.suggested),
            }
        ],
    }


@dataclass(frozen=True)
class ReviewCounts:
    open: int
    confirmed: int
    corrected: int

    @property
    def total(self) -> int:
        return self.open + self.confirmed + self.corrected


def review_counts(catalog: Catalog) -> ReviewCounts:
    with catalog.transaction() as s:
        counts = dict(s.execute(select(LabelReview.status, func.count()).group_by(LabelReview.status)).tuples().all())
    return ReviewCounts(counts.get("open", 0), counts.get("confirmed", 0), counts.get("corrected", 0))


def sync_reviews(client: LabelStudio, catalog: Catalog, labelling_project_id: int) -> ReviewCounts:
    """Apply the reviewers' verdicts: a corrected label is written back to the labelling project's task.

    One annotation there: it is corrected in place (a relabel, which the labelling sync applies with its
    history). Several annotations (annotators disagreed): the verdict is added as the deciding annotation.
    Open reviews without a verdict stay open. Returns the counts after this pass.
    """
    with catalog.transaction() as s:
        pending = {r.ls_task_id: r for r in s.scalars(select(LabelReview).where(LabelReview.status == "open"))}
    if not pending:
        return review_counts(catalog)
    project_id = next(iter(pending.values())).ls_project_id
    # By id, not by Label Studio's annotation counters: those lag behind annotations created through the API.
    asked = json.dumps({"selectedItems": {"all": False, "included": sorted(pending)}})
    verdicts: dict[int, tuple[str, str]] = {}  # review task id -> (label, reviewer)
    users = users_by_id(client)
    for task in list_tasks(client, project_id, query=asked, fields="all"):
        annotations = [a for a in (task.annotations or []) if not a.get("was_cancelled")]  # dicts in a listing
        if int(task.id) not in pending or not annotations:
            continue
        latest = max(annotations, key=lambda a: int(a["id"]))
        chosen = result_choices(latest.get("result"))
        if len(chosen) == 1:
            who = latest.get("completed_by")
            verdicts[int(task.id)] = (chosen[0], users.get(int(who), str(who)) if who is not None else "unknown")
    with catalog.transaction() as s:
        task_of = dict(
            s.execute(
                select(Task.sample_id, Task.ls_task_id).where(
                    Task.sample_id.in_([pending[t].sample_id for t in verdicts]),
                    Task.ls_project_id == labelling_project_id,
                )
            )
            .tuples()
            .all()
        )
    now = datetime.now(UTC)
    for review_task, (label, reviewer) in verdicts.items():
        review = pending[review_task]
        if label != review.label_before:
            if review.sample_id not in task_of:
                log.warning(
                    "sample %s has no task in project %s; label left as is", review.sample_id, labelling_project_id
                )
                continue
            _write_back(client, labelling_project_id, task_of[review.sample_id], label)
        with catalog.transaction() as s:
            row = s.get_one(LabelReview, review.id)
            row.status = "confirmed" if label == review.label_before else "corrected"
            row.label_after, row.reviewer, row.resolved_at = label, reviewer, now
    return review_counts(catalog)


def _write_back(client: LabelStudio, project_id: int, task_id: int, label: str) -> None:
    annotations = [a for a in client.annotations.list(id=task_id) if not a.was_cancelled]
    if len(annotations) == 1:
        client.annotations.update(id=int(annotations[0].id), result=choice_result(label))
    else:
        client.annotations.create(id=task_id, result=choice_result(label), project=project_id)
