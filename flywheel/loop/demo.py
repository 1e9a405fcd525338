"""The demo's own record in the catalog, so that `flywheel demo` run again on a workspace shows the loop it ran
(or finishes the one a crash cut short) instead of running more of it over labels it did not make.

It keeps the parameters, one row per round and fine-tune, and the samples its rounds sent: its simulated
annotator answers those tasks only, never the ones left for people.
"""

from __future__ import annotations

import json
import math
from dataclasses import asdict, dataclass, field
from typing import Any

from flywheel.catalog import Catalog
from flywheel.errors import ConfigError
from flywheel.loop import FinetuneReport, RoundReport

DEMO_KEY = "demo"  # catalog meta


@dataclass
class DemoRecord:
    parameters: dict[str, Any]
    rounds: list[dict[str, Any]] = field(default_factory=list)
    finetunes: list[dict[str, Any]] = field(default_factory=list)
    samples: list[int] = field(default_factory=list)
    finished: bool = False
    champion: str | None = None

    def summary(self) -> dict[str, Any]:
        labels = self.rounds[-1]["labels"] if self.rounds else 0
        return {"rounds": self.rounds, "finetunes": self.finetunes, "champion": self.champion, "labels": labels}


def start(catalog: Catalog, parameters: dict[str, Any]) -> DemoRecord:
    """The workspace's demo record: a new one, or the one an earlier run left (finished or cut short) when it
    ran with the same parameters; another demo's record is refused, naming both."""
    stored = catalog.get_meta(DEMO_KEY)
    if stored is None:
        return DemoRecord(parameters=dict(parameters))
    record = DemoRecord(**json.loads(stored))
    if record.parameters != parameters:
        raise ConfigError(
            f"this workspace ({catalog.url}) holds a demo run with {record.parameters}, not {parameters}: run "
            "it with those, `make clean` for a fresh workspace, or set FLYWHEEL_WORKSPACE to another folder"
        )
    return record


def save(catalog: Catalog, record: DemoRecord) -> None:
    catalog.set_meta(DEMO_KEY, json.dumps(asdict(record)))


def add_round(record: DemoRecord, report: RoundReport) -> None:
    record.samples += [int(s["sample_id"]) for s in report.selected]
    record.rounds.append(
        {
            "round": report.round_id,
            "labels": report.n_labels,
            "model_version": report.model_version,
            "test_accuracy": _finite(report.test_accuracy),
            "holdout_accuracy": _finite(report.holdout_accuracy),
            "promoted": report.promoted,
            "selected": len(report.selected),
            "strategy": report.strategy,
        }
    )


def add_finetune(record: DemoRecord, report: FinetuneReport) -> None:
    record.finetunes.append(
        {
            "model_version": report.model_version,
            "depth": report.depth,
            "holdout_accuracy": _finite(report.holdout_accuracy),
            "test_accuracy": _finite(report.test_accuracy),
            "promoted": report.promoted,
            "reason": report.promotion_reason,
        }
    )


def _finite(value: float) -> float | None:
    """NaN (no model, no held-out labels) becomes None, so the record is valid JSON."""
    return None if math.isnan(value) else value
