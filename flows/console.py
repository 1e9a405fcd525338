"""The console of a command that runs flows in its own process (`flywheel demo`, `flywheel round`, ...).

Prefect prints a line for every task run and state change, and the flows' print calls go through the same
logger (`log_prints`). On the console a user wants one line per step and the summary, so the console keeps
the flows' own lines and every warning or error; all of Prefect's lines still reach the Prefect UI (its API
handler) and a log file in the workspace.
"""

from __future__ import annotations

import logging
from pathlib import Path

from prefect.logging.configuration import PROCESS_LOGGING_CONFIG, setup_logging
from prefect.logging.handlers import PrefectConsoleHandler

FLOWS = str(Path(__file__).resolve().parent)
FORMAT = "%(asctime)s | %(levelname)-7s | %(name)s - %(message)s"


class OwnLinesOnly(logging.Filter):
    """Passes a flow's print (logged from a file in flows/) and anything at WARNING or above."""

    def filter(self, record: logging.LogRecord) -> bool:
        return record.levelno >= logging.WARNING or record.pathname.startswith(FLOWS)


def quiet_console(log_file: Path) -> Path:
    """Filter Prefect's console handler (once) and copy every INFO line and above to `log_file`. Prefect's
    logging is set up first: it leaves the root logger alone when that already has a handler of someone else's."""
    if not PROCESS_LOGGING_CONFIG:
        setup_logging()
    root = logging.getLogger()
    for handler in root.handlers:
        if isinstance(handler, PrefectConsoleHandler) and not any(isinstance(f, OwnLinesOnly) for f in handler.filters):
            handler.addFilter(OwnLinesOnly())
    if not any(isinstance(h, logging.FileHandler) and h.baseFilename == str(log_file) for h in root.handlers):
        log_file.parent.mkdir(parents=True, exist_ok=True)
        to_file = logging.FileHandler(log_file)
        to_file.setLevel(logging.INFO)
        to_file.setFormatter(logging.Formatter(FORMAT))
        root.addHandler(to_file)
    return log_file
