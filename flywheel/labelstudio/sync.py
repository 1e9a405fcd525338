"""Polling sync: read a complete snapshot of the project's annotations and feed it to the same ledger
the webhook receiver writes, so the two paths converge.

Large projects are read as one export snapshot; small ones are paged by task id and applied page by page,
so a sync interrupted half-way keeps what it applied and the next run finishes the rest (re-applying a
page changes nothing). Deletions are inferred only from a complete pass.
"""

from __future__ import annotations

import json
from collections.abc import Callable, Iterator, Sequence
from dataclasses import dataclass, field
from typing import Any

import httpx
from label_studio_sdk import LabelStudio, RoleBasedTask
from label_studio_sdk.core.pagination import SyncPager
from sqlalchemy.orm import Session

from flywheel import faults
from flywheel.catalog import Catalog
from flywheel.labelstudio import ledger
from flywheel.labelstudio.client import filter_query, number_filter, unavailable
from flywheel.labelstudio.interface import LabelMode

PAGE_SIZE = 500


@dataclass(frozen=True)
class SyncReport:
    new: int  # samples labelled for the first time
    updated: int  # samples whose label changed
    unchanged: int  # samples with a valid annotation whose label stayed
    skipped: int  # tasks whose annotations were all skips (counted, never re-sent)
    rejected: list[str] = field(default_factory=list)  # annotations that cannot become labels, and why
    retracted: int = 0  # samples that lost their label (annotations deleted)
    review: list[int] = field(default_factory=list)  # samples whose annotators tie, waiting for a tie-break
    mode: str = "pages"  # "export" snapshot or "pages"
    agreement: float | None = None  # mean share of votes for the majority, on tasks with 2+ annotators
    agreement_by_annotator: dict[str, float] = field(default_factory=dict)

    def summary(self) -> str:
        """One line a person reads: what changed, read how."""
        parts = [f"{self.new} new", f"{self.updated} relabelled", f"{self.unchanged} unchanged"]
        parts += [f"{n} {what}" for n, what in ((self.retracted, "retracted"), (self.skipped, "skipped")) if n]
        if self.review:
            parts.append(f"{len(self.review)} tied, sent to review")
        if self.rejected:
            parts.append(f"{len(self.rejected)} rejected ({'; '.join(self.rejected[:3])})")
        if self.agreement is not None:
            parts.append(f"annotator agreement {100 * self.agreement:.0f}%")
        return f"{', '.join(parts)} (read as {'an export snapshot' if self.mode == 'export' else 'pages'})"


def users_by_id(client: LabelStudio) -> dict[int, str]:
    """Label Studio user id -> email (what the catalog records as the annotator)."""
    return {int(u.id): u.email or str(u.id) for u in client.users.list()}


def export_annotated(client: LabelStudio, project_id: int) -> list[dict[str, Any]]:
    """Every task of the project with at least one annotation (skips included), as exported JSON dicts."""
    chunks = client.projects.exports.download_sync(project_id, export_type="JSON", download_all_tasks=False)
    tasks: list[dict[str, Any]] = json.loads(b"".join(chunks))
    return tasks


def _pages(client: LabelStudio, project_id: int, page_size: int) -> Iterator[list[dict[str, Any]]]:
    """All tasks in pages ordered by id, each page asked for by `id > last` so concurrent edits cannot
    shift a task past a page boundary."""
    last = 0
    while True:
        query = json.loads(filter_query([number_filter("id", "greater", last)]))
        query["ordering"] = ["tasks:id"]
        pager: SyncPager[RoleBasedTask, Any] = client.tasks.list(  # the SDK's list() drops the item type
            project=project_id, fields="all", page_size=page_size, query=json.dumps(query)
        )
        page = [task.dict() for task in next(iter(pager.iter_pages())).items or []]
        if not page:
            return
        yield page
        last = max(int(t["id"]) for t in page)
        if len(page) < page_size:
            return


def sync_annotations(
    client: LabelStudio,
    catalog: Catalog,
    project_id: int,
    *,
    mode: LabelMode = "single",
    export_above: int = 2000,  # tasks in the project above which one export snapshot is read
    page_size: int = PAGE_SIZE,
    on_page: Callable[[int], None] | None = None,
) -> SyncReport:
    """Bring the catalog's annotations and labels in line with the project; idempotent.

    Labels outside catalog.classes() are rejected and reported (every run), skips are counted, annotations
    gone from Label Studio retract their votes. `on_page(n)` is called after the n-th page is committed.
    """
    started = ledger.now()
    classes = catalog.classes()
    try:
        users = users_by_id(client)
        size = client.projects.get(project_id).task_number or 0  # its annotation counters lag behind imports
        if size > export_above:
            snapshot: Iterator[list[dict[str, Any]]] = iter([export_annotated(client, project_id)])
            how = "export"
        else:
            snapshot, how = _pages(client, project_id, page_size), "pages"
        totals = ledger.Applied()
        present: set[int] = set()
        skipped = 0
        for n, tasks in enumerate(snapshot, start=1):
            observations = []
            for task in tasks:
                annotations = task.get("annotations") or []
                skipped += bool(annotations) and all(a.get("was_cancelled") for a in annotations)
                observations += [ledger.observe(a, task, users) for a in annotations]
            present.update(o.annotation_id for o in observations)
            _add(totals, _apply(catalog, observations, classes, mode))
            if on_page is not None and how == "pages":
                on_page(n)
    except httpx.TransportError as exc:  # the server went away mid-sync: what was committed stays
        raise unavailable(client, exc) from exc

    def retract(session: Session) -> ledger.Applied:
        gone = ledger.missing_since(session, project_id, present, started)
        return ledger.apply(session, gone, classes=classes, mode=mode)

    _add(totals, ledger.with_retries(catalog, retract))
    return _report(catalog, totals, skipped=skipped, how=how, mode=mode)


def _report(catalog: Catalog, totals: ledger.Applied, *, skipped: int, how: str, mode: LabelMode) -> SyncReport:
    """The report of a finished sync: what its ledger applies changed, and the catalog's review queue and
    annotator agreement after it."""
    reasons = [reason for _, _, reason in totals.changes]
    labelled = set(catalog.labels())
    changed = {sample for sample, _, reason in totals.changes if reason in ("labelled", "relabelled")}
    score = ledger.agreement(catalog, mode=mode)
    return SyncReport(
        new=reasons.count("labelled"),
        updated=reasons.count("relabelled"),
        unchanged=len((totals.touched & labelled) - changed),
        skipped=skipped,
        rejected=totals.problems,
        retracted=reasons.count("retracted"),
        review=sorted(ledger.in_review(catalog)),
        mode=how,
        agreement=score.mean,
        agreement_by_annotator=score.per_annotator,
    )


def _apply(
    catalog: Catalog, observations: Sequence[ledger.Observation], classes: list[str], mode: LabelMode
) -> ledger.Applied:
    def work(session: Session) -> ledger.Applied:
        applied = ledger.apply(session, observations, classes=classes, mode=mode)
        faults.point("sync:before_commit")  # crash test: written inside the transaction, not committed
        return applied

    return ledger.with_retries(catalog, work)


def _add(total: ledger.Applied, part: ledger.Applied) -> None:
    total.outcomes += part.outcomes
    total.problems += part.problems
    total.changes += part.changes
    total.touched |= part.touched
