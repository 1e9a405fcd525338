"""One turn of the flywheel: bootstrap, round, sync, fine-tune, promote (`steps`), and what is due when
(`schedule`), as plain functions the Prefect flows and the command line call."""

from flywheel.loop.steps import (
    BootstrapReport,
    ChampionView,
    FinetuneReport,
    LabelledSplit,
    RoundReport,
    SyncOutcome,
    bootstrap,
    promote,
    refresh_open_tasks,
    run_finetune,
    run_round,
    run_sync,
    split_labels,
    switch_body,
)

__all__ = [
    "BootstrapReport",
    "ChampionView",
    "FinetuneReport",
    "LabelledSplit",
    "RoundReport",
    "SyncOutcome",
    "bootstrap",
    "promote",
    "refresh_open_tasks",
    "run_finetune",
    "run_round",
    "run_sync",
    "split_labels",
    "switch_body",
]
