"""A sync: pull annotations (and label reviews) from Label Studio into the catalog and say whether a deeper
fine-tune is due; the request is recorded under the lock, so the same labels never ask for one twice."""

from __future__ import annotations

from dataclasses import dataclass

from label_studio_sdk.client import LabelStudio

from flywheel import labelstudio, locking
from flywheel.catalog import Catalog
from flywheel.config import Settings
from flywheel.insight import provenance, review
from flywheel.loop import schedule
from flywheel.loop.state import project_classes


@dataclass(frozen=True)
class SyncOutcome:
    report: labelstudio.SyncReport
    n_labels: int
    finetune_due: bool
    labels_at_last_finetune: int = 0  # 0: none yet; with n_labels, the counts the policy decided on
    reviews: review.ReviewCounts | None = None  # label reviews (flywheel.insight.review) after this sync
    finetune_reason: str = ""  # why a fine-tune is or is not due (flywheel.loop.schedule)


@locking.locked
def run_sync(settings: Settings, catalog: Catalog, ls_client: LabelStudio) -> SyncOutcome:
    project_id = labelstudio.ensure_project(ls_client, settings, catalog, project_classes(catalog))
    ls = settings.label_studio
    reviews = review.sync_reviews(ls_client, catalog, project_id)  # verdicts first: this sync then sees them
    sync = labelstudio.sync_annotations(
        ls_client, catalog, project_id, mode=ls.label_mode, export_above=ls.export_above
    )
    provenance.record_annotations(ls_client, catalog, project_id)
    state, now = schedule.label_state(catalog.labels()), schedule.utc_now()
    due = schedule.finetune_due(catalog, state, settings.finetune, now=now)
    if due.due:  # recorded now, under the lock: a second sync or event on these labels is not due again
        schedule.request_finetune(catalog, state, now=now)
    return SyncOutcome(
        report=sync,
        n_labels=state.n_labels,
        finetune_due=due.due,
        labels_at_last_finetune=due.counted_from,
        reviews=reviews,
        finetune_reason=due.reason,
    )
