"""The catalog's queries: what samples exist, which are labelled, what was sent to Label Studio, which rounds ran.

SQLAlchemy over SQLite by default, PostgreSQL by URL (postgresql+psycopg://...). Every public write is one
transaction, so a failed import or sync leaves the catalog exactly as it was. Opening a catalog upgrades its
schema (flywheel/catalog/migrations) to the tables in flywheel/catalog/models.
"""

from __future__ import annotations

import json
import shutil
from collections.abc import Iterable, Iterator, Sequence
from contextlib import contextmanager
from dataclasses import dataclass
from pathlib import Path

from sqlalchemy import ColumnElement, create_engine, event, func, select
from sqlalchemy.engine import Engine
from sqlalchemy.engine.interfaces import DBAPIConnection
from sqlalchemy.exc import OperationalError
from sqlalchemy.orm import InstrumentedAttribute, Session, sessionmaker
from sqlalchemy.pool import ConnectionPoolEntry

from flywheel.catalog import migrations
from flywheel.catalog.models import (
    POOL,
    Annotation,
    ClassName,
    Label,
    Meta,
    Quarantine,
    Round,
    Sample,
    Task,
    utc_now,
)
from flywheel.errors import DataError, ServiceUnavailableError, WorkspaceWriteError

DISK_FAILURES = (("disk is full", "the disk is full"), ("readonly database", "the database is read-only"),
                 ("No space left", "the disk is full"))  # fmt: skip
RELEASED_DUPLICATES = "released_near_duplicates"  # meta key: sample ids a person let back past the duplicate check


@dataclass(frozen=True)
class NewSample:
    uri: str
    content_hash: str
    truth: str | None = None


@dataclass(frozen=True)
class SampleRow:
    id: int
    uri: str
    truth: str | None
    fold: int


@dataclass(frozen=True)
class Quarantined:
    """A file to keep out of the pool (see the Quarantine table)."""

    uri: str
    reason: str
    detail: str = ""
    content_hash: str | None = None


@dataclass(frozen=True)
class ImportResult:
    added: int
    skipped: int
    labelled: int
    quarantined: int = 0  # unreadable files and exact duplicates, listed in the quarantine table


class Catalog:
    """Thin, explicit queries over the catalog database. Build one per entry point and pass it down."""

    def __init__(self, url: str):
        self.url = url
        self.engine: Engine = engine_for(url)
        try:
            migrations.upgrade(self.engine)
        except OperationalError as exc:  # no server, refused, wrong password, unwritable file: one line
            where = self.engine.url.render_as_string(hide_password=True)
            detail = str(exc.orig).strip().splitlines()[0] if exc.orig else type(exc).__name__
            raise ServiceUnavailableError(
                "the catalog database", where, detail, retryable=False, hint="check catalog_url (FLYWHEEL_CATALOG_URL)"
            ) from exc
        self._sessions = sessionmaker(self.engine, expire_on_commit=False)

    @contextmanager
    def transaction(self) -> Iterator[Session]:
        """One transaction: all of it or none. A full or read-only disk says so, naming the database."""
        try:
            with self._sessions.begin() as session:
                yield session
        except OperationalError as exc:
            reason = next((why for words, why in DISK_FAILURES if words in str(exc.orig)), None)
            if reason is None:
                raise
            where = Path(self.url.removeprefix("sqlite:///")) if self.url.startswith("sqlite:///") else None
            free = shutil.disk_usage(where.parent).free if where is not None else None
            raise WorkspaceWriteError(self.url, reason, free) from exc

    # --- classes -------------------------------------------------------------------------------
    def classes(self) -> list[str]:
        with self.transaction() as s:
            return list(s.scalars(select(ClassName.name).order_by(ClassName.position)))

    def ensure_classes(self, session: Session, names: Iterable[str]) -> list[str]:
        """Append classes not yet known, keeping the positions of existing ones stable."""
        known = list(session.scalars(select(ClassName.name).order_by(ClassName.position)))
        for name in names:
            if name not in known:
                session.add(ClassName(name=name, position=len(known)))
                known.append(name)
        return known

    # --- samples -------------------------------------------------------------------------------
    def add_samples(
        self,
        samples: Sequence[NewSample],
        *,
        source: str,
        split: str,
        classes: Sequence[str],
        trust_labels: bool = False,
        allowed_classes: Sequence[str] = (),
        quarantined: Sequence[Quarantined] = (),
    ) -> ImportResult:
        """Insert new samples in one transaction; URIs already present are skipped, not duplicated.

        `allowed_classes` (from the settings) fixes the class list: a sample whose label is outside it
        fails the whole import, naming the sample. `trust_labels` records source labels as labels.
        A file with the content hash of a sample already in the catalog (or earlier in `samples`) is an
        exact duplicate: it is quarantined with `duplicate_of`, like the unreadable files in `quarantined`.
        """
        _check_classes(samples, allowed_classes)
        with self.transaction() as s:
            self.ensure_classes(s, allowed_classes or classes)
            uris = [x.uri for x in samples] + [q.uri for q in quarantined]
            existing = set(s.scalars(select(Sample.uri).where(Sample.uri.in_(uris))))
            existing |= set(s.scalars(select(Quarantine.uri).where(Quarantine.uri.in_(uris))))
            hashes = [x.content_hash for x in samples]
            by_hash = dict(
                s.execute(select(Sample.content_hash, Sample.id).where(Sample.content_hash.in_(hashes))).tuples().all()
            )
            held = _hold_unreadable(s, quarantined, existing=existing)
            inserted = _insert_samples(s, samples, existing=existing, by_hash=by_hash, source=source, split=split)
            s.flush()  # ids for the rows below
            held += _hold_duplicates(s, inserted.duplicates)
            added, labelled = len(inserted.rows), 0
            if trust_labels and split == POOL:
                labelled = _import_labels(s, inserted.rows)
            skipped = len(samples) + len(quarantined) - added - held
            return ImportResult(added=added, skipped=skipped, labelled=labelled, quarantined=held)

    def samples(self, split: str = POOL) -> list[SampleRow]:
        with self.transaction() as s:
            rows = s.execute(
                select(Sample.id, Sample.uri, Sample.truth, Sample.fold)
                .where(Sample.split == split, _not_quarantined())
                .order_by(Sample.id)
            )
            return [SampleRow(*row) for row in rows]

    def count_samples(self, split: str = POOL) -> int:
        with self.transaction() as s:
            query = select(func.count()).select_from(Sample).where(Sample.split == split, _not_quarantined())
            return s.scalar(query) or 0

    # --- quarantine ----------------------------------------------------------------------------
    def quarantine_samples(
        self, entries: dict[int, Quarantined], *, stage: str, duplicate_of: dict[int, int] | None = None
    ) -> int:
        """Take samples (id -> why) out of the pool in one transaction; returns how many were not already out."""
        twin = duplicate_of or {}
        with self.transaction() as s:
            new = _unrecorded(s, Quarantine.sample_id, entries)
            s.add_all(
                Quarantine(**_fields(entries[i]), sample_id=i, stage=stage, duplicate_of=twin.get(i)) for i in new
            )
            return len(new)

    def quarantined(self) -> list[Quarantine]:
        with self.transaction() as s:
            return list(s.scalars(select(Quarantine).order_by(Quarantine.id)))

    def release(self, quarantine_id: int) -> Quarantine:
        """Let a quarantined file back: a sample returns to its split (a file refused at import is tried again
        at the next import). A near-duplicate released by hand is never set aside as one again."""
        with self.transaction() as s:
            row = s.get(Quarantine, quarantine_id)
            if row is None:
                known = list(s.scalars(select(Quarantine.id).order_by(Quarantine.id)))
                raise DataError(f"no quarantine entry {quarantine_id}; the entries are {known or 'none'}")
            if row.stage == "select" and row.sample_id is not None:
                kept = {*self._released(s), row.sample_id}
                s.merge(Meta(key=RELEASED_DUPLICATES, value=json.dumps(sorted(kept))))
            s.delete(row)
            return row

    def released_duplicates(self) -> set[int]:
        """Sample ids a person released from the near-duplicate check."""
        with self.transaction() as s:
            return self._released(s)

    @staticmethod
    def _released(session: Session) -> set[int]:
        row = session.get(Meta, RELEASED_DUPLICATES)
        return set(json.loads(row.value)) if row else set()

    def truth_of(self, sample_ids: Iterable[int]) -> dict[int, str | None]:
        with self.transaction() as s:
            rows = s.execute(select(Sample.id, Sample.truth).where(Sample.id.in_(list(sample_ids))))
            return dict(rows.tuples().all())

    # --- labels --------------------------------------------------------------------------------
    def labels(self) -> dict[int, str]:
        """sample id -> current label."""
        with self.transaction() as s:
            return dict(s.execute(select(Label.sample_id, Label.label)).tuples().all())

    def count_labels(self) -> int:
        with self.transaction() as s:
            return s.scalar(select(func.count()).select_from(Label)) or 0

    def upsert_label(
        self, session: Session, *, sample_id: int, label: str, annotator: str, ls_annotation_id: int | None
    ) -> bool:
        """Set a sample's label; returns False when the catalog already says exactly this."""
        current = session.scalar(select(Label).where(Label.sample_id == sample_id))
        if current is None:
            session.add(
                Label(
                    sample_id=sample_id,
                    label=label,
                    annotator=annotator,
                    origin="labelstudio",
                    ls_annotation_id=ls_annotation_id,
                )
            )
            return True
        if (current.label, current.ls_annotation_id) == (label, ls_annotation_id):
            return False
        current.label, current.annotator, current.ls_annotation_id = label, annotator, ls_annotation_id
        return True

    # --- Label Studio tasks --------------------------------------------------------------------
    def sent_sample_ids(self) -> set[int]:
        with self.transaction() as s:
            return set(s.scalars(select(Task.sample_id)))

    def open_task_count(self) -> int:
        """Tasks sent to Label Studio that nobody has answered yet (a deleted answer leaves a task open)."""
        answered = select(Annotation.sample_id).where(Annotation.state != "deleted", Annotation.sample_id.is_not(None))
        with self.transaction() as s:
            query = select(func.count()).select_from(Task).where(Task.sample_id.not_in(answered))
            return s.scalar(query) or 0

    def record_tasks(
        self,
        session: Session,
        *,
        ls_project_id: int,
        task_ids: dict[int, int],
        round_id: int | None,
        model_version: str | None,
        scores: dict[int, float],
    ) -> None:
        """Record sample id -> Label Studio task id; tasks already recorded are left alone."""
        session.add_all(
            Task(
                sample_id=i, ls_project_id=ls_project_id, ls_task_id=task_ids[i], round_id=round_id,
                model_version=model_version, score=scores.get(i),
            )
            for i in _unrecorded(session, Task.sample_id, task_ids)
        )  # fmt: skip

    # --- rounds and project facts --------------------------------------------------------------
    def start_round(self, *, strategy: str, n_labels: int) -> int:
        """A new round's id, or the id of the round a crash left unfinished (it is resumed, not repeated)."""
        with self.transaction() as s:
            row = s.scalar(select(Round).where(Round.finished_at.is_(None)).order_by(Round.id.desc()))
            if row is None:
                row = Round(strategy=strategy, n_labels=n_labels)
                s.add(row)
            else:
                row.strategy, row.n_labels = strategy, n_labels
            s.flush()
            return row.id

    def finish_round(self, round_id: int, **values: object) -> None:
        """Store the round's results and mark it finished, in one transaction."""
        with self.transaction() as s:
            row = s.get_one(Round, round_id)
            for key, value in values.items():
                setattr(row, key, value)
            row.finished_at = utc_now()

    def round_task_count(self, round_id: int) -> int:
        """Tasks already recorded for a round (a resumed round pushes only the rest)."""
        with self.transaction() as s:
            return s.scalar(select(func.count()).select_from(Task).where(Task.round_id == round_id)) or 0

    def rounds(self) -> list[Round]:
        with self.transaction() as s:
            return list(s.scalars(select(Round).order_by(Round.id)))

    def get_meta(self, key: str) -> str | None:
        with self.transaction() as s:
            row = s.get(Meta, key)
            return row.value if row else None

    def set_meta(self, key: str, value: str) -> None:
        with self.transaction() as s:
            s.merge(Meta(key=key, value=value))


def engine_for(url: str) -> Engine:
    """The catalog database's engine, not yet migrated (a SQLite file's folder is created, its pragmas set)."""
    if url.startswith("sqlite:///"):
        Path(url.removeprefix("sqlite:///")).parent.mkdir(parents=True, exist_ok=True)
    engine = create_engine(url)
    if url.startswith("sqlite"):
        event.listen(engine, "connect", _sqlite_pragmas)
    return engine


def _check_classes(samples: Sequence[NewSample], allowed_classes: Sequence[str]) -> None:
    """DataError naming the first sample whose label is outside `allowed_classes` (empty: any label goes)."""
    if allowed_classes:
        allowed = set(allowed_classes)
        for sample in samples:
            if sample.truth is not None and sample.truth not in allowed:
                raise DataError(
                    f"unknown class {sample.truth!r} for {sample.uri}; the settings allow: {', '.join(allowed_classes)}"
                )


def _hold_unreadable(session: Session, quarantined: Sequence[Quarantined], *, existing: set[str]) -> int:
    """Quarantine the files not yet known by URI (adding them to `existing`); returns how many."""
    held = 0
    for bad in quarantined:
        if bad.uri not in existing:
            existing.add(bad.uri)
            session.add(Quarantine(**_fields(bad), stage="import"))
            held += 1
    return held


@dataclass(frozen=True)
class _NewRows:
    """What an import adds: sample rows (ids assigned at the next flush), and exact duplicates of a sample."""

    rows: list[tuple[NewSample, Sample]]
    duplicates: list[tuple[NewSample, Sample | int]]  # with the row, or the id, of the sample they repeat


def _insert_samples(
    session: Session,
    samples: Sequence[NewSample],
    *,
    existing: set[str],
    by_hash: dict[str, int],
    source: str,
    split: str,
) -> _NewRows:
    """Add a row for each sample whose URI is not in `existing` (adding it there) and whose content hash is
    neither in `by_hash` (catalogued samples' ids by hash) nor earlier in `samples`; the others are duplicates."""
    originals: dict[str, Sample | int] = dict(by_hash)  # content hash -> the sample that has it
    rows: list[tuple[NewSample, Sample]] = []
    duplicates: list[tuple[NewSample, Sample | int]] = []
    for new in samples:
        if new.uri in existing:
            continue
        existing.add(new.uri)
        if new.content_hash in originals:
            duplicates.append((new, originals[new.content_hash]))
            continue
        row = Sample(
            uri=new.uri,
            content_hash=new.content_hash,
            source=source,
            split=split,
            truth=new.truth,
            fold=int(new.content_hash[:8], 16) % 100,
        )
        session.add(row)
        originals[new.content_hash] = row
        rows.append((new, row))
    return _NewRows(rows, duplicates)


def _hold_duplicates(session: Session, duplicates: Sequence[tuple[NewSample, Sample | int]]) -> int:
    """Quarantine exact duplicates with `duplicate_of` (their originals need ids: flush first); returns how many."""
    for new, original in duplicates:
        original_id = original if isinstance(original, int) else original.id
        entry = Quarantined(new.uri, "duplicate", f"same content (sha256) as sample {original_id}", new.content_hash)
        session.add(Quarantine(**_fields(entry), stage="import", duplicate_of=original_id))
    return len(duplicates)


def _import_labels(session: Session, rows: Sequence[tuple[NewSample, Sample]]) -> int:
    """Record the new samples' source labels as labels (trusted imports); returns how many."""
    labelled = 0
    for new, row in rows:
        if new.truth is not None:
            session.add(Label(sample_id=row.id, label=new.truth, annotator="import", origin="import"))
            labelled += 1
    return labelled


def _fields(entry: Quarantined) -> dict[str, str | None]:
    return {"uri": entry.uri, "reason": entry.reason, "detail": entry.detail, "content_hash": entry.content_hash}


def _not_quarantined() -> ColumnElement[bool]:
    held = select(Quarantine.sample_id).where(Quarantine.sample_id.is_not(None))
    return Sample.id.not_in(held)


def _sqlite_pragmas(dbapi_connection: DBAPIConnection, _record: ConnectionPoolEntry) -> None:
    """WAL lets the UI-facing readers and one writer work at once; foreign keys are off by default."""
    cursor = dbapi_connection.cursor()
    cursor.execute("PRAGMA journal_mode=WAL")
    cursor.execute("PRAGMA foreign_keys=ON")
    cursor.close()


def _unrecorded(session: Session, column: InstrumentedAttribute[int | None], sample_ids: Iterable[int]) -> list[int]:
    """The sample ids (in the order given) that `column` (a sample_id column) does not hold yet."""
    ids = list(sample_ids)
    known = set(session.scalars(select(column).where(column.in_(ids))))
    return [i for i in ids if i not in known]
