"""One turn of the flywheel, a module per step in loop order: `bootstrap`, `round`, `sync`, `finetune`, `promote`;
what every step reads (`state`), what is due when (`schedule`) and the demo's own record (`demo`). The steps are
plain functions the Prefect flows and the command line call."""

from flywheel.loop.bootstrap import BootstrapReport, bootstrap
from flywheel.loop.finetune import FinetuneReport, run_finetune
from flywheel.loop.promote import promote, refresh_open_tasks, switch_body
from flywheel.loop.round import ChampionView, RoundReport, run_round
from flywheel.loop.state import LabelledSplit, split_labels
from flywheel.loop.sync import SyncOutcome, run_sync

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
