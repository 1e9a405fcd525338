"""What every flow shares: settings from parameters, clients built at the edge, report artifacts."""

from __future__ import annotations

import math
from typing import Any

from prefect.artifacts import create_markdown_artifact, create_table_artifact

from flywheel.config import Settings, load_settings
from flywheel.loop import FinetuneReport, RoundReport


def settings_from(overrides: dict[str, Any] | None) -> Settings:
    """Flow parameters carry only overrides; everything else comes from env / flywheel.toml."""
    return load_settings(**(overrides or {}))


def artifact_key(settings: Settings, kind: str) -> str:
    """Prefect artifact keys allow lowercase letters, digits and dashes only."""
    safe = "".join(ch if ch.isalnum() else "-" for ch in settings.project.lower())
    return f"{safe}-{kind}"


def _pct(value: float) -> str:
    return "n/a" if value is None or math.isnan(value) else f"{100 * value:.1f}%"


def publish_round_report(settings: Settings, report: RoundReport) -> None:
    """The round as a person reads it in the Prefect UI: labels so far, accuracy, what was picked and why."""
    per_class = " ".join(f"{cls}: {n}" for cls, n in report.labels_per_class.items())
    model = (
        f"model version **{report.model_version}** ([MLflow run]({report.run_url})), "
        f"{'promoted to champion' if report.promoted else 'not promoted'}: {report.promotion_reason}"
        if report.model_version
        else "no model yet (cold start)"
    )
    markdown = (
        f"# Round {report.round_id}\n\n"
        f"- labels: **{report.n_labels}** ({report.n_train} train / {report.n_holdout} held out)\n"
        f"- labels per class: {per_class}\n"
        f"- held-out accuracy: **{_pct(report.holdout_accuracy)}**, test accuracy: **{_pct(report.test_accuracy)}**\n"
        f"- {model}\n"
        f"- selection: `{report.strategy}`: {report.description}\n"
    )
    create_markdown_artifact(markdown, key=artifact_key(settings, "round-report"), description="round report")
    if report.selected:
        create_table_artifact(
            report.selected[:200], key=artifact_key(settings, "round-selection"), description="selected samples"
        )


def publish_finetune_report(settings: Settings, report: FinetuneReport) -> None:
    lrs = ", ".join(f"{group}: {lr:.2g}" for group, lr in report.lr_by_group.items())
    champion = _pct(report.champion_holdout_accuracy) if report.champion_holdout_accuracy is not None else "none"
    markdown = (
        f"# Fine-tune: model version {report.model_version}\n\n"
        f"- backbone: **{report.backbone}** {report.backbone_choice}\n"
        f"- depth: **{report.depth}**: {report.depth_reason}\n"
        f"- learning rates: {lrs}\n"
        f"- held-out accuracy {_pct(report.holdout_accuracy)} vs champion {champion} and head-only "
        f"{_pct(report.baseline_holdout_accuracy)} on the same labels; "
        f"test accuracy {_pct(report.test_accuracy)}\n"
        f"- **{'promoted' if report.promoted else 'not promoted'}**: {report.promotion_reason}\n"
        f"- [MLflow run]({report.run_url}), {report.seconds:.0f} s\n"
    )
    create_markdown_artifact(markdown, key=artifact_key(settings, "finetune-report"), description="fine-tune report")
