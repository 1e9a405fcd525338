"""The catalog's tables: samples, labels and their people (annotations, changes, reviews), tasks sent to Label
Studio, rounds, quarantined files, webhook deliveries, provenance and forecasts.

The schema is alembic's (flywheel/catalog/migrations): a change to a table here needs a new revision there.
"""

from __future__ import annotations

from datetime import UTC, datetime

from sqlalchemy import DateTime, Dialect, ForeignKey, String, Text, TypeDecorator
from sqlalchemy.orm import DeclarativeBase, Mapped, mapped_column

POOL, TEST = "pool", "test"


def utc_now() -> datetime:
    """Now, as an aware UTC timestamp (stored naive by UtcDateTime)."""
    return datetime.now(UTC)


class UtcDateTime(TypeDecorator[datetime]):
    """A timestamp kept as naive UTC on every database: an aware value is converted first, so PostgreSQL (which
    would shift it by the session's time zone) and SQLite (which drops the offset) store the same instant."""

    impl = DateTime
    cache_ok = True

    def process_bind_param(self, value: datetime | None, dialect: Dialect) -> datetime | None:
        return value.astimezone(UTC).replace(tzinfo=None) if value is not None and value.tzinfo else value


class Base(DeclarativeBase):
    type_annotation_map = {datetime: UtcDateTime}


class Sample(Base):
    __tablename__ = "samples"
    id: Mapped[int] = mapped_column(primary_key=True)
    uri: Mapped[str] = mapped_column(String(2048), unique=True)
    content_hash: Mapped[str] = mapped_column(String(64), index=True)
    source: Mapped[str] = mapped_column(String(256))
    split: Mapped[str] = mapped_column(String(8), default=POOL, index=True)
    # The label the source claims (folder name, manifest column). Ground truth for the simulated
    # annotator and for test-split evaluation; never used for training unless imported as trusted.
    truth: Mapped[str | None] = mapped_column(String(256))
    # 0..99 from the content hash: a stable bucket, so a labelled sample never moves between the
    # training and held-out sets as labels accumulate.
    fold: Mapped[int] = mapped_column()
    created_at: Mapped[datetime] = mapped_column(default=utc_now)


class ClassName(Base):
    __tablename__ = "classes"
    name: Mapped[str] = mapped_column(String(256), primary_key=True)
    position: Mapped[int] = mapped_column(unique=True)


class Label(Base):
    """The current label of a sample (one per sample)."""

    __tablename__ = "labels"
    id: Mapped[int] = mapped_column(primary_key=True)
    sample_id: Mapped[int] = mapped_column(ForeignKey("samples.id"), unique=True)
    label: Mapped[str] = mapped_column(String(256))
    annotator: Mapped[str] = mapped_column(String(256))
    origin: Mapped[str] = mapped_column(String(32))  # "labelstudio" | "import"
    ls_annotation_id: Mapped[int | None] = mapped_column(unique=True)
    updated_at: Mapped[datetime] = mapped_column(default=utc_now, onupdate=utc_now)


class Task(Base):
    """A sample sent to Label Studio: never sent twice."""

    __tablename__ = "tasks"
    id: Mapped[int] = mapped_column(primary_key=True)
    sample_id: Mapped[int] = mapped_column(ForeignKey("samples.id"), unique=True)
    ls_project_id: Mapped[int] = mapped_column()
    ls_task_id: Mapped[int] = mapped_column(unique=True)
    round_id: Mapped[int | None] = mapped_column(ForeignKey("rounds.id"))
    model_version: Mapped[str | None] = mapped_column(String(64))
    score: Mapped[float | None] = mapped_column()
    created_at: Mapped[datetime] = mapped_column(default=utc_now)


class Round(Base):
    __tablename__ = "rounds"
    id: Mapped[int] = mapped_column(primary_key=True)
    strategy: Mapped[str] = mapped_column(String(64))
    n_labels: Mapped[int] = mapped_column()
    n_selected: Mapped[int] = mapped_column(default=0)
    model_version: Mapped[str | None] = mapped_column(String(64))
    holdout_accuracy: Mapped[float | None] = mapped_column()
    test_accuracy: Mapped[float | None] = mapped_column()
    started_at: Mapped[datetime] = mapped_column(default=utc_now)
    # None while the round runs, or after it crashed: the next run_round resumes that round (same id).
    finished_at: Mapped[datetime | None] = mapped_column()


class Quarantine(Base):
    """A file kept out of the pool, and why: unreadable, too large, or a duplicate of another sample.

    Refused at import (`sample_id` None: it never became a sample), or found bad later (embedding, selection):
    then the sample stays in `samples` (its labels and tasks are history) but is left out of every split.
    """

    __tablename__ = "quarantine"
    id: Mapped[int] = mapped_column(primary_key=True)
    uri: Mapped[str] = mapped_column(String(2048), index=True)
    content_hash: Mapped[str | None] = mapped_column(String(64))
    sample_id: Mapped[int | None] = mapped_column(ForeignKey("samples.id"), unique=True)
    reason: Mapped[str] = mapped_column(String(64))  # short: "truncated or corrupt", "duplicate", ...
    detail: Mapped[str] = mapped_column(Text)
    stage: Mapped[str] = mapped_column(String(16))  # import | embed | select
    duplicate_of: Mapped[int | None] = mapped_column(ForeignKey("samples.id"))
    created_at: Mapped[datetime] = mapped_column(default=utc_now)


class Meta(Base):
    """Small key/value facts about the project (Label Studio project id, last fine-tune size)."""

    __tablename__ = "meta"
    key: Mapped[str] = mapped_column(String(128), primary_key=True)
    value: Mapped[str] = mapped_column(String(2048))


class Annotation(Base):
    """Every Label Studio annotation flywheel has seen, in its latest known state (one row per annotation).

    Webhook deliveries and polling syncs both land here (flywheel.labelstudio.ledger); labels are derived
    from these rows, so a delivery seen twice, late or out of order changes nothing twice.
    """

    __tablename__ = "annotations"
    id: Mapped[int] = mapped_column(primary_key=True)
    ls_annotation_id: Mapped[int] = mapped_column(unique=True)
    # None only for a deletion that arrived before the annotation itself (a tombstone)
    ls_task_id: Mapped[int | None] = mapped_column(index=True)
    ls_project_id: Mapped[int | None] = mapped_column(index=True)
    sample_id: Mapped[int | None] = mapped_column(ForeignKey("samples.id"), index=True)
    ls_user_id: Mapped[int | None] = mapped_column()  # who: one vote per user
    annotator: Mapped[str] = mapped_column(String(256))  # their email, for people to read
    choices: Mapped[str] = mapped_column(Text)  # JSON list of the chosen classes
    state: Mapped[str] = mapped_column(String(16))  # submitted | skipped | rejected | deleted
    problem: Mapped[str | None] = mapped_column(Text)  # why it was rejected
    ls_updated_at: Mapped[datetime] = mapped_column()  # Label Studio's clock: orders versions of one annotation
    seen_at: Mapped[datetime] = mapped_column(default=utc_now, onupdate=utc_now)  # ours: when this state arrived


class LabelChange(Base):
    """History of a sample's label: every new label, relabel, retraction and tie sent to review."""

    __tablename__ = "label_history"
    id: Mapped[int] = mapped_column(primary_key=True)
    sample_id: Mapped[int] = mapped_column(ForeignKey("samples.id"), index=True)
    label: Mapped[str | None] = mapped_column(String(1024))  # None: no label (retracted or in review)
    previous: Mapped[str | None] = mapped_column(String(1024))
    reason: Mapped[str] = mapped_column(String(32))  # labelled | relabelled | retracted | review
    votes: Mapped[str] = mapped_column(Text)  # JSON {label: [annotation ids]} behind the decision
    at: Mapped[datetime] = mapped_column(default=utc_now)


class Review(Base):
    """A sample whose annotators tied: no label until someone breaks the tie in Label Studio."""

    __tablename__ = "reviews"
    sample_id: Mapped[int] = mapped_column(ForeignKey("samples.id"), primary_key=True)
    votes: Mapped[str] = mapped_column(Text)
    since: Mapped[datetime] = mapped_column(default=utc_now)


class WebhookEvent(Base):
    """Each authenticated webhook delivery, as received, with what it changed."""

    __tablename__ = "webhook_events"
    id: Mapped[int] = mapped_column(primary_key=True)
    received_at: Mapped[datetime] = mapped_column(default=utc_now)
    action: Mapped[str] = mapped_column(String(64))
    ls_project_id: Mapped[int | None] = mapped_column()
    ls_annotation_ids: Mapped[str] = mapped_column(Text)  # JSON list
    body_sha256: Mapped[str] = mapped_column(String(64), index=True)
    payload: Mapped[str] = mapped_column(Text)  # the annotation(s) and task part of the body, JSON
    outcome: Mapped[str] = mapped_column(Text)  # applied | duplicate | stale | ignored | rejected: ...
    emitted: Mapped[bool] = mapped_column(default=False)  # whether the Prefect event went out


class Provenance(Base):
    """How a sample came to be labelled (flywheel.insight.provenance). Why it was asked for: the round, the strategy and
    its parameters (JSON), the model version that scored the pool, its score and rank in the selection (1 = most
    wanted). How it was answered, from Label Studio: each annotation's annotator, choice, creation time and the
    annotator's working time (`lead_time`), and the first annotation's time."""

    __tablename__ = "provenance"
    id: Mapped[int] = mapped_column(primary_key=True)
    sample_id: Mapped[int] = mapped_column(ForeignKey("samples.id"), unique=True)
    round_id: Mapped[int | None] = mapped_column(ForeignKey("rounds.id"), index=True)
    strategy: Mapped[str | None] = mapped_column(String(64))
    params: Mapped[str | None] = mapped_column(Text)
    model_version: Mapped[str | None] = mapped_column(String(64))
    score: Mapped[float | None] = mapped_column()
    rank: Mapped[int | None] = mapped_column()
    selected_at: Mapped[datetime | None] = mapped_column()
    annotations: Mapped[str | None] = mapped_column(Text)  # JSON list; None until read from Label Studio
    first_annotated_at: Mapped[datetime | None] = mapped_column()
    lead_time_s: Mapped[float | None] = mapped_column()  # summed over the task's annotations, when recorded
    annotations_read_at: Mapped[datetime | None] = mapped_column()


class LabelReview(Base):
    """A label sent back to Label Studio because it looks wrong (flywheel.insight.review), and the verdict."""

    __tablename__ = "label_reviews"
    id: Mapped[int] = mapped_column(primary_key=True)
    sample_id: Mapped[int] = mapped_column(ForeignKey("samples.id"), unique=True)  # a label is reviewed once
    round_id: Mapped[int | None] = mapped_column(ForeignKey("rounds.id"))
    ls_project_id: Mapped[int] = mapped_column()
    ls_task_id: Mapped[int] = mapped_column(unique=True)
    reasons: Mapped[str] = mapped_column(Text)  # JSON list of why it was flagged
    label_before: Mapped[str] = mapped_column(String(1024))
    suggested: Mapped[str] = mapped_column(String(1024))  # the model's (out-of-sample) suggestion
    self_confidence: Mapped[float | None] = mapped_column()  # out-of-sample probability of label_before
    status: Mapped[str] = mapped_column(String(16), default="open", index=True)  # open | confirmed | corrected
    label_after: Mapped[str | None] = mapped_column(String(1024))
    reviewer: Mapped[str | None] = mapped_column(String(256))
    created_at: Mapped[datetime] = mapped_column(default=utc_now)
    resolved_at: Mapped[datetime | None] = mapped_column()


class ForecastRecord(Base):
    """A round's label-budget forecast (flywheel.insight.forecast.Forecast as JSON), for `flywheel status`."""

    __tablename__ = "forecasts"
    round_id: Mapped[int] = mapped_column(ForeignKey("rounds.id"), primary_key=True)
    forecast: Mapped[str] = mapped_column(Text)
    created_at: Mapped[datetime] = mapped_column(default=utc_now)
