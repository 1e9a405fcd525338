"""Query provenance: for every labelled sample, why it was asked for and how it was answered.

Why: the round, the strategy and its parameters, the model version that scored the pool, the sample's score
and rank (recorded when a round pushes its selection). How: each annotation's annotator, choice, time and
the annotator's working time, read from Label Studio after a sync (Label Studio's `created_at` and
`lead_time`), and the label review's verdict. Every registered model carries its training set with this
provenance as an MLflow artifact (training_set.csv), so any model can be rebuilt and any label traced;
`flywheel explain SAMPLE_ID` prints one sample's record.
"""

from __future__ import annotations

import csv
import io
import json
from collections.abc import Iterable, Mapping, Sequence
from dataclasses import asdict, dataclass, field
from datetime import UTC, datetime
from typing import Any, overload

from label_studio_sdk import LabelStudio
from mlflow import MlflowClient
from sqlalchemy import func, or_, select

from flywheel.catalog import Annotation, Catalog, Label, LabelChange, LabelReview, Provenance, Review, Sample, Task
from flywheel.labelstudio.client import list_tasks
from flywheel.labelstudio.interface import result_choices
from flywheel.labelstudio.ledger import SKIPPED, SUBMITTED
from flywheel.labelstudio.sync import users_by_id

TRAINING_SET_ARTIFACT = "training_set.csv"
READ_CHUNK = 500  # tasks per Label Studio listing


@overload
def _utc(value: datetime | str) -> datetime: ...
@overload
def _utc(value: None) -> None: ...
def _utc(value: datetime | str | None) -> datetime | None:
    """Naive UTC, as the catalog stores times (Label Studio sends ISO strings with a zone)."""
    if value is None:
        return None
    when = datetime.fromisoformat(value) if isinstance(value, str) else value
    return when.astimezone(UTC).replace(tzinfo=None) if when.tzinfo else when


def record_selection(
    catalog: Catalog,
    *,
    round_id: int,
    strategy: str,
    params: Mapping[str, Any],
    model_version: str | None,
    picks: Sequence[tuple[int, float]],
) -> None:
    """One row per picked sample: (sample id, score) in selection order, so rank 1 is the most wanted."""
    now = _utc(datetime.now(UTC))
    ids = [sample_id for sample_id, _ in picks]
    with catalog.transaction() as s:
        known = {p.sample_id: p for p in s.scalars(select(Provenance).where(Provenance.sample_id.in_(ids)))}
        for rank, (sample_id, score) in enumerate(picks, start=1):
            row = known.get(sample_id) or Provenance(sample_id=sample_id)
            row.round_id, row.strategy, row.params = round_id, strategy, json.dumps(dict(params), default=str)
            row.model_version, row.score, row.rank, row.selected_at = model_version, float(score), rank, now
            s.add(row)


def record_annotations(client: LabelStudio, catalog: Catalog, project_id: int) -> int:
    """Read annotator, time and lead time of every annotation (skips included) of the samples whose annotations
    changed since they were last read: new ones, relabels, skips, ties and deletions alike.

    Returns how many samples were read. One Label Studio listing per READ_CHUNK tasks of the project.
    """
    latest = (
        select(Annotation.sample_id, func.max(Annotation.seen_at).label("seen"))
        .group_by(Annotation.sample_id)
        .subquery()
    )
    with catalog.transaction() as s:
        stale = s.execute(
            select(Task.ls_task_id, Task.sample_id)
            .join(latest, latest.c.sample_id == Task.sample_id)
            .outerjoin(Provenance, Provenance.sample_id == Task.sample_id)
            .where(Task.ls_project_id == project_id)
            .where(
                or_(
                    Provenance.id.is_(None),
                    Provenance.annotations_read_at.is_(None),
                    latest.c.seen > Provenance.annotations_read_at,
                )
            )
        ).all()
    if not stale:
        return 0
    sample_of = {int(task_id): int(sample_id) for task_id, sample_id in stale}
    users = users_by_id(client)
    facts: dict[int, list[dict[str, Any]]] = {sample: [] for sample in sample_of.values()}  # all deleted: none
    task_ids = sorted(sample_of)
    for start in range(0, len(task_ids), READ_CHUNK):
        chunk = task_ids[start : start + READ_CHUNK]
        query = json.dumps({"selectedItems": {"all": False, "included": chunk}})
        for task in list_tasks(client, project_id, query=query, fields="all"):
            task = task.dict()
            annotations = sorted(task.get("annotations") or [], key=lambda a: int(a["id"]))
            facts[sample_of[int(task["id"])]] = [_annotation_fact(a, users) for a in annotations]
    now = _utc(datetime.now(UTC))
    with catalog.transaction() as s:
        known = {p.sample_id: p for p in s.scalars(select(Provenance).where(Provenance.sample_id.in_(list(facts))))}
        for sample_id, annotations in facts.items():
            row = known.get(sample_id) or Provenance(sample_id=sample_id)
            answered = [a for a in annotations if not a["skipped"]]
            leads = [float(a["lead_time_s"]) for a in answered if a["lead_time_s"] is not None]
            row.annotations = json.dumps(annotations)
            row.first_annotated_at = min((_utc(a["created_at"]) for a in answered), default=None)
            row.lead_time_s = sum(leads) if leads else None
            row.annotations_read_at = now
            s.add(row)
    return len(facts)


def _annotation_fact(annotation: dict[str, Any], users: Mapping[int, str]) -> dict[str, Any]:
    """What Label Studio says of one annotation: who, what, when, how long, and whether it was a skip."""
    who = annotation.get("completed_by")
    return {
        "annotation_id": int(annotation["id"]),
        "annotator": users.get(int(who), str(who)) if who is not None else "unknown",
        "choices": result_choices(annotation.get("result")),
        "created_at": str(_utc(annotation.get("created_at"))),
        "lead_time_s": annotation.get("lead_time"),
        "skipped": bool(annotation.get("was_cancelled")),
    }


@dataclass(frozen=True)
class SampleProvenance:
    """One sample's whole record: what it is, its label, why it was asked for, how it was answered (every
    annotation, deleted and skipped ones included), how its label changed, a tie waiting, its review."""

    sample_id: int
    uri: str
    content_hash: str
    split: str
    fold: int
    label: str | None
    label_origin: str | None
    round_id: int | None = None
    strategy: str | None = None
    params: dict[str, Any] = field(default_factory=dict)
    model_version: str | None = None
    score: float | None = None
    rank: int | None = None
    selected_at: datetime | None = None
    ls_task_id: int | None = None
    sent_at: datetime | None = None
    # each: annotation_id, annotator, choices, state (submitted, skipped, rejected, deleted), created_at, lead_time_s
    annotations: list[dict[str, Any]] = field(default_factory=list)
    annotators: list[str] = field(default_factory=list)  # whose annotations count now (none deleted)
    first_annotated_at: datetime | None = None
    time_to_label_s: float | None = None  # from sending the task to its first answer that still stands
    lead_time_s: float | None = None  # the annotators' working time, as Label Studio recorded it
    history: list[dict[str, Any]] = field(default_factory=list)  # each: at, reason, previous, label
    tie: dict[str, list[int]] | None = None  # label -> annotation ids, while annotators tie
    review: dict[str, Any] | None = None


def provenance_of(catalog: Catalog, sample_ids: Iterable[int]) -> dict[int, SampleProvenance]:
    """sample id -> its record, for the ids that exist in the catalog."""
    ids = list(sample_ids)
    out: dict[int, SampleProvenance] = {}
    with catalog.transaction() as s:
        for start in range(0, len(ids), 5000):
            chunk = ids[start : start + 5000]
            rows = s.execute(
                select(Sample, Label, Provenance, Task, LabelReview, Review)
                .outerjoin(Label, Label.sample_id == Sample.id)
                .outerjoin(Provenance, Provenance.sample_id == Sample.id)
                .outerjoin(Task, Task.sample_id == Sample.id)
                .outerjoin(LabelReview, LabelReview.sample_id == Sample.id)
                .outerjoin(Review, Review.sample_id == Sample.id)
                .where(Sample.id.in_(chunk))
            ).all()
            ledger = _by_sample(s.scalars(select(Annotation).where(Annotation.sample_id.in_(chunk))))
            history = _by_sample(
                s.scalars(select(LabelChange).where(LabelChange.sample_id.in_(chunk)).order_by(LabelChange.id))
            )
            for sample, label, prov, task, review, tie in rows:
                answers = _answers(ledger.get(sample.id, []), prov)
                out[sample.id] = _record(sample, label, prov, task, review, answers, history.get(sample.id, []), tie)
    return out


def _by_sample(rows: Iterable[Annotation | LabelChange]) -> dict[int, list[Any]]:
    grouped: dict[int, list[Any]] = {}
    for row in rows:
        if row.sample_id is not None:
            grouped.setdefault(row.sample_id, []).append(row)
    return grouped


def _answers(ledger: Sequence[Annotation], prov: Provenance | None) -> list[dict[str, Any]]:
    """Every annotation of a sample in its latest state (the catalog's ledger), with the time and working time
    Label Studio gave for it; annotations read from Label Studio that the ledger has not seen are added."""
    facts = {a["annotation_id"]: a for a in (json.loads(prov.annotations) if prov and prov.annotations else [])}
    answers = [
        {
            "annotation_id": row.ls_annotation_id,
            "annotator": row.annotator,
            "choices": json.loads(row.choices),
            "state": row.state,
            "created_at": facts.get(row.ls_annotation_id, {}).get("created_at"),
            "lead_time_s": facts.get(row.ls_annotation_id, {}).get("lead_time_s"),
        }
        for row in sorted(ledger, key=lambda r: r.ls_annotation_id)
    ]
    seen = {a["annotation_id"] for a in answers}
    answers += [
        {**fact, "state": SKIPPED if fact.get("skipped") else SUBMITTED}
        for annotation_id, fact in sorted(facts.items())
        if annotation_id not in seen
    ]
    for answer in answers:
        answer.pop("skipped", None)
    return answers


def _record(
    sample: Sample,
    label: Label | None,
    prov: Provenance | None,
    task: Task | None,
    review: LabelReview | None,
    answers: list[dict[str, Any]],
    history: Sequence[LabelChange],
    tie: Review | None,
) -> SampleProvenance:
    standing = [a for a in answers if a["state"] == SUBMITTED]
    annotators = list(dict.fromkeys(a["annotator"] for a in standing))
    if not annotators and label is not None:
        annotators = [label.annotator]
    times = [_utc(a["created_at"]) for a in standing if a["created_at"]]
    first = min(times) if times else None
    leads = [float(a["lead_time_s"]) for a in standing if a["lead_time_s"] is not None]
    sent = task.created_at if task is not None else None
    return SampleProvenance(
        sample_id=sample.id,
        uri=sample.uri,
        content_hash=sample.content_hash,
        split=sample.split,
        fold=sample.fold,
        label=label.label if label is not None else None,
        label_origin=label.origin if label is not None else None,
        round_id=prov.round_id if prov is not None else (task.round_id if task is not None else None),
        strategy=prov.strategy if prov is not None else None,
        params=json.loads(prov.params) if prov is not None and prov.params else {},
        model_version=prov.model_version if prov is not None else (task.model_version if task is not None else None),
        score=prov.score if prov is not None else (task.score if task is not None else None),
        rank=prov.rank if prov is not None else None,
        selected_at=prov.selected_at if prov is not None else None,
        ls_task_id=task.ls_task_id if task is not None else None,
        sent_at=sent,
        annotations=answers,
        annotators=annotators,
        first_annotated_at=first,
        time_to_label_s=(first - _utc(sent)).total_seconds() if first is not None and sent is not None else None,
        lead_time_s=sum(leads) if leads else None,
        history=[
            {"at": change.at, "reason": change.reason, "previous": change.previous, "label": change.label}
            for change in history
        ],
        tie=json.loads(tie.votes) if tie is not None else None,
        review=None
        if review is None
        else {
            "status": review.status,
            "label_before": review.label_before,
            "suggested": review.suggested,
            "label_after": review.label_after,
            "reasons": json.loads(review.reasons),
            "reviewer": review.reviewer,
        },
    )


CSV_COLUMNS = (
    "sample_id", "role", "label", "uri", "content_hash", "fold", "round_id", "strategy", "params", "model_version",
    "score", "rank", "selected_at", "ls_task_id", "annotators", "first_annotated_at", "time_to_label_s",
    "lead_time_s", "review_status", "label_before_review",
)  # fmt: skip


def training_set_csv(
    labels: Mapping[int, str], roles: Mapping[int, str], records: Mapping[int, SampleProvenance]
) -> str:
    """The samples a model saw, one row each: the label it was trained on, the sample's role (train, holdout,
    validation) and its provenance. `labels` are the labels used, which may differ from today's."""
    out = io.StringIO()
    writer = csv.DictWriter(out, fieldnames=CSV_COLUMNS)
    writer.writeheader()
    for sample_id in sorted(roles):
        r = records[sample_id]
        row = asdict(r)
        row.update(
            role=roles[sample_id],
            label=labels[sample_id],
            params=json.dumps(r.params, sort_keys=True) if r.params else "",
            annotators=";".join(r.annotators),
            review_status=r.review["status"] if r.review else "",
            label_before_review=r.review["label_before"] if r.review else "",
        )
        writer.writerow({k: "" if row[k] is None else row[k] for k in CSV_COLUMNS})
    return out.getvalue()


def log_training_set(
    client: MlflowClient,
    catalog: Catalog,
    *,
    run_id: str,
    model_name: str,
    version: str,
    labels: Mapping[int, str],
    roles: Mapping[int, str],
) -> None:
    """training_set.csv on the model's run, and a tag on the registered version pointing at it."""
    records = provenance_of(catalog, roles)
    client.log_text(run_id, training_set_csv(labels, roles, records), TRAINING_SET_ARTIFACT)
    counts = {role: sum(1 for r in roles.values() if r == role) for role in sorted(set(roles.values()))}
    client.set_model_version_tag(
        model_name,
        version,
        "training_set",
        f"{TRAINING_SET_ARTIFACT} ({', '.join(f'{n} {role}' for role, n in counts.items())})",
    )
