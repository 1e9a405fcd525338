"""The annotation ledger: where webhook deliveries and polling syncs converge on one idempotent upsert.

Each Label Studio annotation is one `annotations` row holding its latest known state. A version is applied
only when it is newer (Label Studio's `updated_at`) than the stored one, and a deletion is final, so a
delivery seen twice, late or out of order changes nothing twice. A sample's label is then derived from its
annotations: one vote per annotator (their latest), majority wins, a tie goes to review; every change of
label is written to `label_history`.
"""

from __future__ import annotations

import json
import time
from collections import Counter, defaultdict
from collections.abc import Callable, Iterable, Mapping, Sequence
from dataclasses import dataclass, field, replace
from datetime import UTC, datetime
from typing import Any, TypeVar

from sqlalchemy import func, select
from sqlalchemy.exc import IntegrityError, OperationalError
from sqlalchemy.orm import Session

from flywheel.catalog import Annotation, Catalog, Label, LabelChange, Review, Sample, Task
from flywheel.labelstudio.client import task_sample_id
from flywheel.labelstudio.interface import LabelMode, result_choices

SUBMITTED, SKIPPED, REJECTED, DELETED = "submitted", "skipped", "rejected", "deleted"
APPLIED, DUPLICATE, STALE = "applied", "duplicate", "stale"
CHUNK = 5000  # ids per IN (...) query
RETRIES = 5  # a transaction that lost a race with another writer is run again
T = TypeVar("T")


def utc(value: datetime | str | None) -> datetime:
    """Naive UTC, the form the catalog stores and compares (Label Studio sends ISO strings with Z)."""
    if value is None:
        return datetime.min
    when = datetime.fromisoformat(value) if isinstance(value, str) else value
    return when.astimezone(UTC).replace(tzinfo=None) if when.tzinfo else when


def now() -> datetime:
    return utc(datetime.now(UTC))


@dataclass(frozen=True)
class Observation:
    """One state of one annotation, as a webhook delivery or a sync saw it."""

    annotation_id: int
    deleted: bool = False
    task_id: int | None = None
    project_id: int | None = None
    sample_id: int | None = None
    user_id: int | None = None
    annotator: str = ""
    choices: tuple[str, ...] = ()
    cancelled: bool = False
    updated_at: datetime = datetime.min


def observe(annotation: Mapping[str, Any], task: Mapping[str, Any] | None, users: Mapping[int, str]) -> Observation:
    """An annotation dict (webhook payload, export or task listing) and its task, as an Observation."""
    who = annotation.get("completed_by")
    if isinstance(who, dict):  # some export formats nest the user
        who = who.get("id")
    task_id = annotation.get("task") or (task or {}).get("id")
    return Observation(
        annotation_id=int(annotation["id"]),
        task_id=int(task_id) if task_id is not None else None,
        project_id=annotation.get("project") or (task or {}).get("project"),
        sample_id=task_sample_id((task or {}).get("data")),
        user_id=int(who) if who is not None else None,
        annotator=users.get(int(who), f"user {who}") if who is not None else "unknown",
        choices=tuple(result_choices(annotation.get("result"))),
        cancelled=bool(annotation.get("was_cancelled")),
        updated_at=utc(annotation.get("updated_at") or annotation.get("created_at")),
    )


def deletion(annotation_id: int) -> Observation:
    return Observation(annotation_id=int(annotation_id), deleted=True)


@dataclass
class Applied:
    """What one apply() did: an outcome per observation, the problems found, the label changes made."""

    outcomes: list[str] = field(default_factory=list)
    problems: list[str] = field(default_factory=list)
    changes: list[tuple[int, str | None, str]] = field(default_factory=list)  # (sample id, label, reason)
    touched: set[int] = field(default_factory=set)  # samples whose valid annotations were seen


def label_key(choices: Sequence[str], mode: LabelMode, classes: Sequence[str]) -> str:
    """The label a sample gets from `choices`: the class in single mode, a JSON list (class order) in multi."""
    if mode == "single":
        return choices[0]
    order = {name: i for i, name in enumerate(classes)}
    return json.dumps(sorted(set(choices), key=order.__getitem__))


def _problem(obs: Observation, mode: LabelMode, classes: Sequence[str]) -> str | None:
    if obs.cancelled:
        return None
    unknown = [c for c in obs.choices if c not in classes]
    if unknown:
        return f"label {unknown[0]!r} is not a class ({', '.join(classes)})"
    if mode == "single" and len(obs.choices) != 1:
        return f"{len(obs.choices)} choices {list(obs.choices)}, expected exactly one"
    if not obs.choices:
        return "no class chosen"
    return None


def _where(obs: Observation) -> str:
    sample = f" (sample {obs.sample_id})" if obs.sample_id is not None else ""
    return f"task {obs.task_id}{sample}: annotation {obs.annotation_id}"


def _in_chunks(session: Session, make: Callable[[list[Any]], Any], values: Iterable[Any]) -> list[Any]:
    values = list(values)
    rows: list[Any] = []
    for start in range(0, len(values), CHUNK):
        rows.extend(session.execute(make(values[start : start + CHUNK])).all())
    return rows


def apply(session: Session, observations: Sequence[Observation], *, classes: Sequence[str], mode: LabelMode) -> Applied:
    """Upsert `observations` (in order) into the ledger and re-derive the labels of the samples they change."""
    result = Applied()
    observations = _with_samples(session, observations)
    ids = {o.annotation_id for o in observations}
    rows: dict[int, Annotation] = {
        row.ls_annotation_id: row
        for (row,) in _in_chunks(session, lambda c: select(Annotation).where(Annotation.ls_annotation_id.in_(c)), ids)
    }
    sample_ids = {o.sample_id for o in observations if o.sample_id is not None}
    known = {s for (s,) in _in_chunks(session, lambda c: select(Sample.id).where(Sample.id.in_(c)), sample_ids)}
    sent = dict(
        _in_chunks(session, lambda c: select(Task.sample_id, Task.ls_task_id).where(Task.sample_id.in_(c)), known)
    )
    changed: set[int] = set()
    for obs in observations:
        if obs.deleted:
            result.outcomes.append(_delete(session, rows, obs, changed=changed))
            continue
        problem = _unattached(obs, known=known, sent=sent)
        if problem is not None:  # nothing to attach it to: reported, not stored
            result.problems.append(problem)
            result.outcomes.append(f"rejected: {problem}")
            continue
        assert obs.sample_id is not None  # a missing sample id is a problem above
        invalid = _problem(obs, mode, classes)
        if invalid is not None:
            result.problems.append(f"{_where(obs)}: {invalid}")
        state = SKIPPED if obs.cancelled else (REJECTED if invalid else SUBMITTED)
        if state == SUBMITTED:
            result.touched.add(obs.sample_id)
        result.outcomes.append(_upsert(session, rows, obs, state=state, problem=invalid, changed=changed))
    session.flush()
    result.changes = _derive_labels(session, changed, classes=classes, mode=mode)
    return result


def _with_samples(session: Session, observations: Sequence[Observation]) -> Sequence[Observation]:
    """Bulk deliveries (ANNOTATIONS_CREATED) carry no task data: find the sample through the task we recorded."""
    bare = {o.task_id for o in observations if o.sample_id is None and o.task_id is not None and not o.deleted}
    if not bare:
        return observations
    by_task = dict(
        _in_chunks(session, lambda c: select(Task.ls_task_id, Task.sample_id).where(Task.ls_task_id.in_(c)), bare)
    )
    return [
        replace(o, sample_id=by_task[o.task_id]) if o.sample_id is None and o.task_id in by_task else o
        for o in observations
    ]


def _delete(session: Session, rows: dict[int, Annotation], obs: Observation, *, changed: set[int]) -> str:
    """Mark the annotation deleted (final) and its sample `changed`; returns the outcome."""
    row = rows.get(obs.annotation_id)
    if row is not None and row.state == DELETED:
        return DUPLICATE
    if row is None:  # deleted before we saw it: a tombstone, so a late creation cannot revive it
        row = Annotation(ls_annotation_id=obs.annotation_id, annotator="", choices="[]")
        row.ls_updated_at = datetime.min
        rows[obs.annotation_id] = row
        session.add(row)
    row.state, row.seen_at = DELETED, now()
    if row.sample_id is not None:
        changed.add(row.sample_id)
    return APPLIED


def _unattached(obs: Observation, *, known: set[int], sent: Mapping[int, int]) -> str | None:
    """Why `obs` has no catalog sample to attach it to (not a flywheel task, an unknown sample, a duplicate
    task of a sample sent before), or None when it has one."""
    if obs.sample_id is None:
        return f"task {obs.task_id}: no data.sample_id (not a flywheel task)"
    if obs.sample_id not in known:
        return f"task {obs.task_id}: sample {obs.sample_id} is not in the catalog"
    if sent.get(obs.sample_id, obs.task_id) != obs.task_id:
        return f"{_where(obs)}: the sample was sent as task {sent[obs.sample_id]}; this task is a duplicate"
    return None


def _upsert(
    session: Session,
    rows: dict[int, Annotation],
    obs: Observation,
    *,
    state: str,
    problem: str | None,
    changed: set[int],
) -> str:
    """Store `obs` as its annotation's latest state unless the stored one is as new or deleted (a deletion is
    final), marking its sample `changed`; returns the outcome."""
    assert obs.sample_id is not None  # only attached observations are stored
    row = rows.get(obs.annotation_id)
    if row is None:
        row = Annotation(ls_annotation_id=obs.annotation_id)
        rows[obs.annotation_id] = row
        session.add(row)
    elif row.state == DELETED:
        return f"{STALE}: annotation {obs.annotation_id} was deleted"
    elif obs.updated_at <= row.ls_updated_at:
        return DUPLICATE if obs.updated_at == row.ls_updated_at else STALE
    row.ls_task_id, row.ls_project_id, row.sample_id = obs.task_id, obs.project_id, obs.sample_id
    row.ls_user_id, row.annotator, row.choices = obs.user_id, obs.annotator[:256], json.dumps(list(obs.choices))
    row.state, row.problem, row.ls_updated_at, row.seen_at = state, problem, obs.updated_at, now()
    changed.add(obs.sample_id)
    return APPLIED


@dataclass(frozen=True)
class Decision:
    label: str | None  # None: no label
    review: bool
    votes: dict[str, list[int]]  # label -> annotation ids voting for it
    annotators: list[str]  # who voted for the winner
    annotation_id: int | None  # the winner's latest annotation


def _votes(rows: Iterable[Annotation]) -> dict[int, dict[str, Annotation]]:
    """sample id -> user -> their latest submitted annotation (one vote per person)."""
    out: dict[int, dict[str, Annotation]] = defaultdict(dict)
    for row in rows:
        assert row.sample_id is not None  # the rows are selected by sample id
        mine = out[row.sample_id]
        who = str(row.ls_user_id) if row.ls_user_id is not None else row.annotator
        best = mine.get(who)
        if best is None or (row.ls_updated_at, row.ls_annotation_id) > (best.ls_updated_at, best.ls_annotation_id):
            mine[who] = row
    return out


def decide(ballots: Mapping[str, Annotation], mode: LabelMode, classes: Sequence[str]) -> Decision:
    """Majority vote over one sample's ballots; a tie for first place goes to review."""
    votes: dict[str, list[int]] = defaultdict(list)
    for row in ballots.values():
        votes[label_key(json.loads(row.choices), mode, classes)].append(row.ls_annotation_id)
    if not votes:
        return Decision(None, False, {}, [], None)
    counts = Counter({k: len(v) for k, v in votes.items()})
    (top, n), *rest = counts.most_common()
    if rest and rest[0][1] == n:
        return Decision(None, True, dict(votes), [], None)
    winners = [r for r in ballots.values() if label_key(json.loads(r.choices), mode, classes) == top]
    latest = max(winners, key=lambda r: (r.ls_updated_at, r.ls_annotation_id))
    return Decision(top, False, dict(votes), sorted(r.annotator for r in winners), latest.ls_annotation_id)


def _derive_labels(
    session: Session, sample_ids: set[int], *, classes: Sequence[str], mode: LabelMode
) -> list[tuple[int, str | None, str]]:
    """Re-derive the labels and reviews of `sample_ids` from their submitted annotations; returns the label
    changes (sample id, label, reason), each also written to label_history."""
    if not sample_ids:
        return []
    submitted = _in_chunks(
        session,
        lambda c: select(Annotation).where(Annotation.sample_id.in_(c), Annotation.state == SUBMITTED),
        sample_ids,
    )
    ballots = _votes(row for (row,) in submitted)
    labels = {
        r.sample_id: r
        for (r,) in _in_chunks(session, lambda c: select(Label).where(Label.sample_id.in_(c)), sample_ids)
    }
    reviews = {
        r.sample_id: r
        for (r,) in _in_chunks(session, lambda c: select(Review).where(Review.sample_id.in_(c)), sample_ids)
    }
    changes: list[tuple[int, str | None, str]] = []
    for sample_id in sorted(sample_ids):
        decision = decide(ballots.get(sample_id, {}), mode, classes)
        current = labels.get(sample_id)
        previous = current.label if current is not None else None
        votes = json.dumps(decision.votes, sort_keys=True)
        reason = _set_label(session, sample_id, decision, current, in_review=sample_id in reviews)
        if decision.review:
            if sample_id in reviews:
                reviews[sample_id].votes = votes
            else:
                session.add(Review(sample_id=sample_id, votes=votes))
        elif sample_id in reviews:
            session.delete(reviews[sample_id])
        if reason is not None:
            session.add(
                LabelChange(sample_id=sample_id, label=decision.label, previous=previous, reason=reason, votes=votes)
            )
            changes.append((sample_id, decision.label, reason))
    return changes


def _set_label(
    session: Session, sample_id: int, decision: Decision, current: Label | None, *, in_review: bool
) -> str | None:
    """Make the sample's Label row say what `decision` says. Returns why its label changed (the reason
    label_history records), or None when it did not (a tie already in review is not news)."""
    if decision.label is not None:
        annotator = ", ".join(decision.annotators)[:256]
        if current is None:
            session.add(
                Label(
                    sample_id=sample_id,
                    label=decision.label,
                    annotator=annotator,
                    origin="labelstudio",
                    ls_annotation_id=decision.annotation_id,
                )
            )
            return "labelled"
        reason = "relabelled" if current.label != decision.label else None
        current.label, current.origin = decision.label, "labelstudio"
        current.annotator = annotator
        current.ls_annotation_id = decision.annotation_id
        return reason
    if current is not None:
        session.delete(current)
        return "review" if decision.review else "retracted"
    return "review" if decision.review and not in_review else None


def missing_since(session: Session, project_id: int, present: set[int], before: datetime) -> list[Observation]:
    """Deletions implied by a complete snapshot: live annotations of the project it no longer holds that
    were seen before the snapshot began (anything newer may simply be newer than the snapshot)."""
    rows = session.execute(
        select(Annotation.ls_annotation_id).where(
            Annotation.ls_project_id == project_id, Annotation.state != DELETED, Annotation.seen_at < before
        )
    )
    return [deletion(a) for (a,) in rows if a not in present]


def with_retries(catalog: Catalog, work: Callable[[Session], T]) -> T:
    """Run `work` in one catalog transaction, again when a concurrent writer won a race (SQLite busy,
    or the same annotation inserted by the webhook and a sync at once)."""
    for attempt in range(RETRIES):
        try:
            with catalog.transaction() as session:
                return work(session)
        except (OperationalError, IntegrityError):
            if attempt == RETRIES - 1:
                raise
            time.sleep(0.05 * 2**attempt)
    raise AssertionError("unreachable")


# --- reading the ledger ------------------------------------------------------------------------------
def label_history(catalog: Catalog, sample_id: int) -> list[LabelChange]:
    with catalog.transaction() as session:
        return list(
            session.scalars(select(LabelChange).where(LabelChange.sample_id == sample_id).order_by(LabelChange.id))
        )


def in_review(catalog: Catalog) -> dict[int, dict[str, list[int]]]:
    """sample id -> the tied votes (label -> annotation ids) for samples waiting for a tie-break."""
    with catalog.transaction() as session:
        return {r.sample_id: json.loads(r.votes) for r in session.scalars(select(Review).order_by(Review.sample_id))}


def annotations_of(catalog: Catalog, sample_id: int) -> list[Annotation]:
    with catalog.transaction() as session:
        return list(
            session.scalars(select(Annotation).where(Annotation.sample_id == sample_id).order_by(Annotation.id))
        )


@dataclass(frozen=True)
class Agreement:
    """How often annotators agree, on samples with at least two of them."""

    per_task: dict[int, float]  # sample id -> share of votes for the most voted label
    per_annotator: dict[str, float]  # annotator -> share of their votes matching the majority (ties left out)
    mean: float | None  # mean of per_task


def agreement(catalog: Catalog, *, mode: LabelMode) -> Agreement:
    classes = catalog.classes()
    with catalog.transaction() as session:
        several = (  # only samples with more than one submitted annotation can show (dis)agreement
            select(Annotation.sample_id)
            .where(Annotation.state == SUBMITTED)
            .group_by(Annotation.sample_id)
            .having(func.count() > 1)
        )
        rows = list(
            session.scalars(select(Annotation).where(Annotation.state == SUBMITTED, Annotation.sample_id.in_(several)))
        )
        ballots = _votes(rows)
        per_task: dict[int, float] = {}
        hits: dict[str, list[bool]] = defaultdict(list)
        for sample_id, mine in ballots.items():
            if len(mine) < 2:
                continue
            keys = {who: label_key(json.loads(r.choices), mode, classes) for who, r in mine.items()}
            counts = Counter(keys.values()).most_common()
            per_task[sample_id] = counts[0][1] / len(keys)
            if len(counts) > 1 and counts[1][1] == counts[0][1]:
                continue
            for who, key in keys.items():
                hits[mine[who].annotator].append(key == counts[0][0])
    per_annotator = {who: sum(h) / len(h) for who, h in sorted(hits.items())}
    mean = sum(per_task.values()) / len(per_task) if per_task else None
    return Agreement(per_task=per_task, per_annotator=per_annotator, mean=mean)
