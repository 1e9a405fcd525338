"""What is due, so a flywheel left alone for weeks does no work twice.

- A **label state** names the labels a model is trained on: their count and a digest of every (sample, label)
  pair. Equal states mean equal training sets.
- **One fine-tune per label state.** A sync that finds a fine-tune due records the request (under the project
  lock) before anyone runs it, so a second sync, a threshold event or a demo at the same labels sees it; the
  fine-tune records its start and its end. A request or start is counted for `finetune.pending_timeout_s`
  (a fine-tune that died is not waited for forever); a finished one forever: asking again on the same label
  state is refused (FinetuneNotNeeded).
- **No round without new labels**: the label state and body a round's head was trained on are remembered; a
  round on the same ones trains and registers nothing, and while the last round's tasks still wait it sends
  no more.

Everything is kept in catalog meta as JSON, written inside the project lock the callers hold.
"""

from __future__ import annotations

import hashlib
import json
from collections.abc import Mapping
from dataclasses import asdict, dataclass
from datetime import UTC, datetime

from flywheel.catalog import Catalog
from flywheel.config import FinetuneSettings
from flywheel.errors import FlywheelError
from flywheel.training.policy import should_finetune

FINETUNE_KEY = "finetune"  # catalog meta: {"pending": Mark | None, "finished": Mark | None}
ROUND_MODEL_KEY = "round_model"  # catalog meta: Mark of the labels and body behind the last registered head
ROUND_LABELS_KEY = "round_labels"  # catalog meta: the LabelState the last finished round saw
LABELS_AT_LAST_FINETUNE = "labels_at_last_finetune"  # also in catalogs made before the marks


class FinetuneNotNeeded(FlywheelError):
    """A fine-tune on exactly these labels already ran: a second would train the same model."""


@dataclass(frozen=True)
class LabelState:
    n_labels: int
    digest: str

    def describe(self) -> str:
        return f"{self.n_labels} labels (state {self.digest})"


@dataclass(frozen=True)
class Mark:
    """A label state at a moment, with what it produced (a model version) or is tied to (a body)."""

    n_labels: int
    digest: str
    at: str  # ISO time, UTC
    version: str | None = None
    body: str | None = None

    @property
    def state(self) -> LabelState:
        return LabelState(self.n_labels, self.digest)

    def age_s(self, now: datetime) -> float:
        return (now - datetime.fromisoformat(self.at)).total_seconds()


@dataclass(frozen=True)
class Due:
    due: bool
    reason: str
    counted_from: int  # labels at the fine-tune the thresholds are counted from (0: none yet)


def label_state(labels: Mapping[int, str]) -> LabelState:
    """The state of a set of labels: equal for equal (sample, label) pairs, whatever their order."""
    digest = hashlib.sha256()
    for sample_id in sorted(labels):
        digest.update(f"{sample_id}\t{labels[sample_id]}\n".encode())
    return LabelState(len(labels), digest.hexdigest()[:16])


def finetune_due(catalog: Catalog, state: LabelState, settings: FinetuneSettings, *, now: datetime) -> Due:
    """Whether the thresholds call for a fine-tune, counting from the last finished one or from one requested
    or running now (not older than the timeout); an identical label state is never due twice."""
    record = _finetune_record(catalog)
    finished, pending = record.get("finished"), _live(record.get("pending"), settings, now)
    last = int(catalog.get_meta(LABELS_AT_LAST_FINETUNE) or 0)
    for mark, what in ((pending, "requested or running"), (finished, "finished")):
        if mark is not None and mark.digest == state.digest:
            return Due(False, f"a fine-tune on these {state.n_labels} labels is {what} (since {mark.at})", 0)
    counted_from = max([last, *(m.n_labels for m in (finished, pending) if m is not None)])
    due = should_finetune(
        state.n_labels, counted_from, min_labels=settings.min_labels, every_new_labels=settings.every_new_labels
    )
    since = f"{counted_from} at the last fine-tune" if counted_from else "no fine-tune yet"
    policy = f"first at {settings.min_labels}, then every {settings.every_new_labels} new"
    return Due(due, f"{state.n_labels} labels, {since} ({policy})", counted_from)


def request_finetune(catalog: Catalog, state: LabelState, *, now: datetime) -> None:
    """Record that a fine-tune at `state` is wanted: until it finishes or times out, nobody asks again."""
    record = _finetune_record(catalog)
    record["pending"] = Mark(state.n_labels, state.digest, now.isoformat())
    _save(catalog, record)


def finetune_refusal(catalog: Catalog, state: LabelState) -> str | None:
    """Why a fine-tune on `state` would only repeat one that finished, or None."""
    finished = _finetune_record(catalog).get("finished")
    if finished is None or finished.digest != state.digest:
        return None
    return (
        f"a fine-tune on exactly these {state.n_labels} labels already ran (version {finished.version}, "
        f"finished {finished.at}); it would train the same model again: label more first"
    )


def start_finetune(catalog: Catalog, state: LabelState, *, now: datetime) -> None:
    """Refuse a fine-tune on a label state that already has one; else mark it as running."""
    refusal = finetune_refusal(catalog, state)
    if refusal:
        raise FinetuneNotNeeded(refusal)
    request_finetune(catalog, state, now=now)


def finish_finetune(catalog: Catalog, state: LabelState, version: str, *, now: datetime) -> None:
    record = _finetune_record(catalog)
    record["finished"] = Mark(state.n_labels, state.digest, now.isoformat(), version=version)
    record["pending"] = None
    _save(catalog, record)
    catalog.set_meta(LABELS_AT_LAST_FINETUNE, str(state.n_labels))


def finetune_status(catalog: Catalog) -> dict[str, Mark | None]:
    """The pending and finished fine-tune marks, for reports."""
    return _finetune_record(catalog)


def last_round_model(catalog: Catalog) -> Mark | None:
    """The label state and body behind the last head a round registered, and its version."""
    stored = catalog.get_meta(ROUND_MODEL_KEY)
    return Mark(**json.loads(stored)) if stored else None


def record_round_model(catalog: Catalog, state: LabelState, body: str, version: str, *, now: datetime) -> None:
    mark = Mark(state.n_labels, state.digest, now.isoformat(), version=version, body=body)
    catalog.set_meta(ROUND_MODEL_KEY, json.dumps(asdict(mark)))


def labels_at_last_round(catalog: Catalog) -> LabelState | None:
    """The label state the last finished round saw (trained on or not)."""
    stored = catalog.get_meta(ROUND_LABELS_KEY)
    return LabelState(**json.loads(stored)) if stored else None


def record_round_labels(catalog: Catalog, state: LabelState) -> None:
    catalog.set_meta(ROUND_LABELS_KEY, json.dumps(asdict(state)))


def utc_now() -> datetime:
    return datetime.now(UTC)


def _live(mark: Mark | None, settings: FinetuneSettings, now: datetime) -> Mark | None:
    return mark if mark is not None and mark.age_s(now) < settings.pending_timeout_s else None


def _finetune_record(catalog: Catalog) -> dict[str, Mark | None]:
    stored = json.loads(catalog.get_meta(FINETUNE_KEY) or "{}")
    return {key: Mark(**stored[key]) if stored.get(key) else None for key in ("pending", "finished")}


def _save(catalog: Catalog, record: dict[str, Mark | None]) -> None:
    catalog.set_meta(FINETUNE_KEY, json.dumps({k: asdict(v) if v else None for k, v in record.items()}))
