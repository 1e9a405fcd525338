"""Label Studio as flywheel's labelling front end: one project, tasks pushed by us, annotations pulled
back by polling (`sync`) or pushed to us by its webhook (`flywheel.app.webhook`), both through one ledger.

client: connection and task listing (task id <-> sample id).   interface: the label config.
media: image URLs (Local Storage, http(s), presigned S3).       project: project settings and webhook.
tasks: push and refresh predictions.                            ledger: annotations -> labels, history.
sync: polling sync (export snapshot or pages).
"""

from flywheel.labelstudio.client import (
    SERVICE,
    connect,
    filter_query,
    list_tasks,
    number_filter,
    task_sample_id,
    task_sample_ids,
)
from flywheel.labelstudio.interface import FROM_NAME, TO_NAME, choice_result, config_classes, config_mode, label_config
from flywheel.labelstudio.media import ensure_local_storage, image_url, presign_s3
from flywheel.labelstudio.project import (
    META_PROJECT_ID,
    SECRET_HEADER,
    ensure_project,
    ensure_webhook,
    remove_webhooks,
)
from flywheel.labelstudio.sync import SyncReport, export_annotated, sync_annotations
from flywheel.labelstudio.tasks import OPEN_TASKS, TaskToPush, prediction_score, push_tasks, refresh_predictions

__all__ = [
    "FROM_NAME",
    "META_PROJECT_ID",
    "OPEN_TASKS",
    "SECRET_HEADER",
    "SERVICE",
    "TO_NAME",
    "SyncReport",
    "TaskToPush",
    "choice_result",
    "config_classes",
    "config_mode",
    "connect",
    "ensure_local_storage",
    "ensure_project",
    "ensure_webhook",
    "export_annotated",
    "filter_query",
    "image_url",
    "label_config",
    "list_tasks",
    "number_filter",
    "presign_s3",
    "prediction_score",
    "push_tasks",
    "refresh_predictions",
    "remove_webhooks",
    "sync_annotations",
    "task_sample_id",
    "task_sample_ids",
]
