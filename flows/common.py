"""What every flow shares: settings from parameters, clients built at the edge, report artifacts.

Also the pieces the deployments rely on: validated parameters, retries with backoff on network tasks,
persisted results under the workspace, a progress artifact while embedding, and the events that connect
flows (annotations -> sync -> threshold reached -> fine-tune).
"""

from __future__ import annotations

import hashlib
import math
import os
import socket
import sys
import time
from collections.abc import Coroutine, Iterator, Sequence
from contextlib import contextmanager, suppress
from datetime import UTC, datetime
from typing import Annotated, Any, ParamSpec, TypeVar
from uuid import UUID

import httpx
from prefect import Task
from prefect.artifacts import (
    create_markdown_artifact,
    create_progress_artifact,
    create_table_artifact,
    update_progress_artifact,
)
from prefect.blocks.system import Secret
from prefect.client.orchestration import SyncPrefectClient, get_client
from prefect.client.schemas.actions import GlobalConcurrencyLimitCreate
from prefect.client.schemas.objects import State, TaskRun
from prefect.client.schemas.responses import ConcurrencyLimitWithLeaseResponse
from prefect.concurrency._leases import maintain_concurrency_lease  # the lease renewal prefect's own slots use
from prefect.events import emit_event
from prefect.exceptions import MissingContextError, ObjectAlreadyExists, ObjectNotFound, PrefectHTTPStatusError
from prefect.filesystems import LocalFileSystem
from prefect.logging import get_run_logger
from prefect.runtime import flow_run
from prefect.variables import Variable
from pydantic import AfterValidator, SecretStr

from flywheel.app.webhook import THRESHOLD_REACHED
from flywheel.catalog import Round
from flywheel.config import Settings, load_settings, secret_settings
from flywheel.errors import ConfigError, FlywheelError
from flywheel.loop import FinetuneReport, RoundReport, SyncOutcome

SHOWN_SELECTED = 10  # selected samples listed in the round report itself


def project_resource_id(project: str) -> str:
    """The resource every flywheel event names (the webhook receiver's annotation events use it too)."""
    return f"flywheel.project.{project}"


def _valid_overrides(value: dict[str, Any]) -> dict[str, Any]:
    """Build the settings now, so a bad override fails the run before any task starts, naming the setting.
    Secrets are refused: Prefect stores flow parameters (they come from env or secret_blocks instead)."""
    secrets = [name for name in secret_settings() if name.split(".")[1] in (value.get(name.split(".")[0]) or {})]
    if secrets:
        raise ValueError(
            f"{', '.join(secrets)}: secrets are not flow parameters (Prefect stores parameters); "
            "set them in the worker's environment or name a Prefect Secret block in secret_blocks"
        )
    try:
        load_settings(**value)
    except ConfigError as exc:
        raise ValueError(str(exc)) from exc
    return value


Overrides = Annotated[dict[str, Any], AfterValidator(_valid_overrides)]
"""Settings overrides as a flow parameter (e.g. {"k_per_round": 50}), validated when the run starts."""


def settings_from(overrides: dict[str, Any] | None) -> Settings:
    """Flow parameters carry only overrides; everything else comes from env / flywheel.toml, and the secrets
    named in settings.secret_blocks from those Prefect Secret blocks."""
    return with_secret_blocks(load_settings(**(overrides or {})))


def with_secret_blocks(settings: Settings) -> Settings:
    """`settings` with each secret of settings.secret_blocks read from its Prefect Secret block."""
    sections: dict[str, dict[str, SecretStr]] = {}
    for name, block in settings.secret_blocks.items():
        section, field = name.split(".")
        try:
            value = synchronously(Secret.load(block)).get()
        except Exception as exc:  # a missing block is a ValueError, an unreachable server an httpx error
            raise ConfigError(
                f"secret_blocks: {name} names Prefect Secret block {block!r}, which cannot be read "
                f"({type(exc).__name__}: {exc})"
            ) from exc
        sections.setdefault(section, {})[field] = SecretStr(str(value))
    updates = {section: getattr(settings, section).model_copy(update=values) for section, values in sections.items()}
    return settings.model_copy(update=updates) if updates else settings


P = ParamSpec("P")
R = TypeVar("R")


def synchronously(value: R | Coroutine[Any, Any, R]) -> R:
    """The value of one of Prefect's dual sync/async calls made from synchronous code (typed as either)."""
    if isinstance(value, Coroutine):
        raise TypeError(f"a Prefect call gave a coroutine in synchronous code: {value!r}")
    return value


@contextmanager
def project_slot(settings: Settings) -> Iterator[None]:
    """Hold the project's Prefect global concurrency limit (`flywheel-<project>`, 1 slot) for a step that writes.

    The library refuses a second writer at once (flywheel.locking); the deployments' runs instead wait here for
    the slot, so a scheduled round or sync queues behind a fine-tune rather than failing on the project lock.
    The slot is a lease renewed while its holder lives; the holder is recorded in a Prefect variable, so a run
    that waits says who holds it, and releases it at once when that holder was a process on this host that is
    gone (killed mid-run). A holder elsewhere that died frees it when its lease lapses (`prefect.slot_lease_s`).
    """
    name, lease_s = ensure_project_limit(settings), settings.prefect.slot_lease_s
    with get_client(sync_client=True) as client:
        lease_id = _acquire_slot(client, name, lease_s, settings.prefect.slot_report_s)
        try:
            Variable.set(_holder_variable(name), _holder(lease_id), overwrite=True)
            with maintain_concurrency_lease(lease_id, lease_s, raise_on_lease_renewal_failure=True):
                yield
        finally:
            client.release_concurrency_slots_with_lease(lease_id)


def _acquire_slot(client: SyncPrefectClient, name: str, lease_s: float, report_every_s: float) -> UUID:
    """Take the slot, waiting as long as it takes; every `report_every_s` say who holds it."""
    began = reported = time.monotonic()
    while True:
        try:
            response = client.increment_concurrency_slots_with_lease([name], 1, "concurrency", lease_s)
            return ConcurrencyLimitWithLeaseResponse.model_validate(response.json()).lease_id
        except PrefectHTTPStatusError as exc:
            if exc.response.status_code != httpx.codes.LOCKED:
                raise
            retry_after = float(exc.response.headers.get("Retry-After", 1))
        holder = Variable.get(_holder_variable(name), default=None)
        if _died_here(holder):
            assert isinstance(holder, dict)  # _died_here checked it
            _say(f"the project slot {name} was {_described(holder)}, which is gone: releasing it")
            with suppress(PrefectHTTPStatusError):  # its lease may have lapsed meanwhile
                client.release_concurrency_slots_with_lease(UUID(holder["lease_id"]))
            continue
        if time.monotonic() - reported >= report_every_s:
            reported = time.monotonic()
            _say(f"waiting {reported - began:.0f} s for the project slot {name}: {_described(holder)}")
        time.sleep(min(max(retry_after, 0.5), report_every_s))


def _holder_variable(slot: str) -> str:
    return f"{slot}-holder".lower()


def _holder(lease_id: UUID) -> dict[str, str]:
    """Who holds the slot: the flow run (when in one), the process, its lease and when it took the slot."""
    return {"flow_run": str(flow_run.get_name() or "none (called outside a flow run)"), "pid": str(os.getpid()),
            "host": socket.gethostname(), "lease_id": str(lease_id),
            "since": datetime.now(UTC).isoformat(timespec="seconds")}  # fmt: skip


def _described(holder: object) -> str:
    if not isinstance(holder, dict):
        return "its holder is not recorded (a run of an older flywheel, or one that is just starting)"
    return (
        f"held by flow run {holder.get('flow_run')} (pid {holder.get('pid')} on {holder.get('host')}) since "
        f"{holder.get('since')}"
    )


def _died_here(holder: object) -> bool:
    """The recorded holder is a process of this host that no longer exists."""
    if not isinstance(holder, dict) or holder.get("host") != socket.gethostname() or "lease_id" not in holder:
        return False
    try:
        os.kill(int(holder["pid"]), 0)
    except ProcessLookupError:
        return True
    except (PermissionError, ValueError):
        return False
    return False


def _say(message: str) -> None:
    """To the flow run's log inside a run, else to stderr (the command line calls flows directly)."""
    try:
        get_run_logger().info(message)
    except MissingContextError:
        print(message, file=sys.stderr, flush=True)


def ensure_project_limit(settings: Settings) -> str:
    """Create the project's global concurrency limit (1 slot) unless it exists; returns its name."""
    name = f"flywheel-{settings.project}"
    with get_client(sync_client=True) as client:
        try:
            client.read_global_concurrency_limit_by_name(name)
        except ObjectNotFound:
            with suppress(ObjectAlreadyExists):
                client.create_global_concurrency_limit(GlobalConcurrencyLimitCreate(name=name, limit=1))
    return name


def with_retries(network_task: Task[P, R], settings: Settings) -> Task[P, R]:
    """A network task with the settings' retries, each delay double the last (plus jitter): a server that is
    restarting gets time to come back, a dead one fails the run after a bounded wait. What a wait cannot fix
    (a refused token, a port nothing listens on, bad input) fails at once."""
    retries, first = settings.prefect.task_retries, settings.prefect.retry_delay_s
    delays = [first * 2**attempt for attempt in range(retries)]
    return network_task.with_options(
        retries=retries, retry_delay_seconds=delays, retry_jitter_factor=0.2, retry_condition_fn=worth_retrying
    )


def worth_retrying(task: Task[..., Any], task_run: TaskRun, state: State[Any]) -> bool:
    """Prefect's retry condition: retry unless the failure is one of ours that says a retry cannot help."""
    try:
        state.result()
    except FlywheelError as exc:
        return exc.retryable
    except Exception:  # an SDK's own error (a timeout, a 5xx): worth another try
        return True
    return True


def results_storage(settings: Settings) -> str:
    """A LocalFileSystem block (one per workspace) persisting task results under settings.dirs.results."""
    name = "flywheel-results-" + hashlib.sha256(str(settings.workspace).encode()).hexdigest()[:12]
    LocalFileSystem(basepath=str(settings.dirs.results)).save(name, overwrite=True)
    return f"local-file-system/{name}"


class ProgressArtifact:
    """A Prefect progress artifact, updated at most every `every_s` seconds (and at 100%)."""

    def __init__(self, settings: Settings, kind: str, description: str, every_s: float = 2.0):
        self.id = synchronously(
            create_progress_artifact(0.0, key=artifact_key(settings, kind), description=description)
        )
        self.every_s, self._last = every_s, time.monotonic()

    def __call__(self, done: int, total: int) -> None:
        now = time.monotonic()
        if done >= total or now - self._last >= self.every_s:
            update_progress_artifact(self.id, 100.0 * done / max(total, 1))
            self._last = now

    def finish(self) -> None:
        update_progress_artifact(self.id, 100.0)


def emit_threshold_reached(settings: Settings, outcome: SyncOutcome) -> None:
    """Tell whoever listens (the `finetune` deployment's trigger) that the policy wants a fine-tune."""
    ft = settings.finetune
    emit_event(
        THRESHOLD_REACHED,
        resource={
            "prefect.resource.id": project_resource_id(settings.project),
            "prefect.resource.name": settings.project,
        },
        payload={
            "n_labels": outcome.n_labels,
            "labels_at_last_finetune": outcome.labels_at_last_finetune,
            "new_labels": outcome.n_labels - outcome.labels_at_last_finetune,
            "min_labels": ft.min_labels,
            "every_new_labels": ft.every_new_labels,
        },
    )


def artifact_key(settings: Settings, kind: str) -> str:
    """Prefect artifact keys allow lowercase letters, digits and dashes only."""
    safe = "".join(ch if ch.isalnum() else "-" for ch in settings.project.lower())
    return f"{safe}-{kind}"


def percent(value: float | None) -> str:
    """An accuracy as people read it: 80.8%, or n/a when there is none (no test split, no model)."""
    return "n/a" if value is None or math.isnan(value) else f"{100 * value:.1f}%"


def publish_round_report(settings: Settings, report: RoundReport, history: Sequence[Round] = ()) -> None:
    """The round as a person reads it in the Prefect UI: labels so far, accuracy, what was picked and why.

    `history` (the catalog's rounds, this one included) adds the accuracy so far, round by round.
    """
    per_class = " ".join(f"{cls}: {n}" for cls, n in report.labels_per_class.items())
    model = (
        f"model version **{report.model_version}** ([MLflow run]({report.run_url})), "
        f"{'promoted to champion' if report.promoted else 'not promoted'}: {report.promotion_reason}"
        if report.model_version
        else report.model_note or "no model yet (cold start)"
    )
    markdown = (
        f"# Round {report.round_id}\n\n"
        f"- labels: **{report.n_labels}** ({report.n_train} train / {report.n_holdout} held out)\n"
        f"- labels per class: {per_class}\n"
        f"- held-out accuracy: **{percent(report.holdout_accuracy)}**, "
        f"test accuracy: **{percent(report.test_accuracy)}**\n"
        f"- {model}\n"
        f"- features: `{report.features}`: {report.features_reason}\n"
        f"- selection: `{report.strategy}`: {report.description}\n"
    )
    if report.quarantine.get("total"):  # bad or duplicate files kept out of the pool (flywheel.sources.quarantine)
        reasons = ", ".join(f"{reason}: {n}" for reason, n in sorted(report.quarantine["by_reason"].items()))
        markdown += (
            f"- quarantined: **{report.quarantine['total']}** ({reasons}); list: `{report.quarantine['report']}`\n"
        )
    if report.near_duplicates:
        pairs = ", ".join(f"{d['sample_id']} ~ {d['duplicate_of']}" for d in report.near_duplicates[:SHOWN_SELECTED])
        markdown += f"- near-duplicates not sent this round: {len(report.near_duplicates)} ({pairs})\n"
    if report.after_training is not None:
        markdown += report.after_training.markdown()
    if history:
        markdown += "\n## Accuracy so far\n\n| round | labels | model version | held-out | test |\n"
        markdown += "|---|---|---|---|---|\n"
        markdown += "".join(
            f"| {r.id} | {r.n_labels} | {r.model_version or '-'} | {percent(r.holdout_accuracy)} "
            f"| {percent(r.test_accuracy)} |\n"
            for r in history
        )
    if report.selected:
        top = report.selected[:SHOWN_SELECTED]
        markdown += (
            f"\n## Selected ({len(top)} best of {len(report.selected)}; all in the round-selection table)\n\n"
            "| sample | score | predicted | confidence |\n|---|---|---|---|\n"
        )
        markdown += "".join(
            f"| {s['sample_id']} | {s['score']:.4f} | {s['predicted'] or '-'} | {s['confidence']:.2f} |\n" for s in top
        )
    create_markdown_artifact(markdown, key=artifact_key(settings, "round-report"), description="round report")
    if report.selected:
        create_table_artifact(
            report.selected[:200], key=artifact_key(settings, "round-selection"), description="selected samples"
        )


def publish_sync_report(settings: Settings, outcome: SyncOutcome, next_step: str) -> None:
    """What the sync pulled, the counts the fine-tune policy saw, and what happens next."""
    ft = settings.finetune
    markdown = (
        f"# Sync\n\n- annotations: {outcome.report.summary()}\n- labels: **{outcome.n_labels}** "
        f"({outcome.labels_at_last_finetune} at the last fine-tune; policy: first at {ft.min_labels}, "
        f"then every {ft.every_new_labels} new)\n- fine-tune: **{next_step}**\n"
    )
    create_markdown_artifact(markdown, key=artifact_key(settings, "sync-report"), description="sync report")


def publish_finetune_report(settings: Settings, report: FinetuneReport) -> None:
    lrs = ", ".join(f"{group}: {lr:.2g}" for group, lr in report.lr_by_group.items())
    champion = percent(report.champion_holdout_accuracy) if report.champion_holdout_accuracy is not None else "none"
    markdown = (
        f"# Fine-tune: model version {report.model_version}\n\n"
        f"- backbone: **{report.backbone}** {report.backbone_choice}\n"
        f"- depth: **{report.depth}**: {report.depth_reason}\n"
        f"- learning rates: {lrs}\n"
        f"- held-out accuracy {percent(report.holdout_accuracy)} vs champion {champion} and head-only "
        f"{percent(report.baseline_holdout_accuracy)} on the same labels; "
        f"test accuracy {percent(report.test_accuracy)}\n"
        f"- **{'promoted' if report.promoted else 'not promoted'}**: {report.promotion_reason}\n"
        f"- [MLflow run]({report.run_url}), {report.seconds:.0f} s\n"
    )
    if report.predictions_refreshed is not None:
        markdown += f"- open Label Studio tasks now pre-annotated by it: {report.predictions_refreshed} changed\n"
    create_markdown_artifact(markdown, key=artifact_key(settings, "finetune-report"), description="fine-tune report")


def publish_finetune_skipped(settings: Settings, reason: str) -> None:
    """A fine-tune that did not run says why, where its report would be."""
    markdown = f"# Fine-tune: not run\n\n- {reason}\n"
    create_markdown_artifact(markdown, key=artifact_key(settings, "finetune-report"), description="fine-tune report")
