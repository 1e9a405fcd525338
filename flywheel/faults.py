"""Crash points for the fault-injection tests (tests/integration/test_faults.py). Test-only: nothing sets
FLYWHEEL_FAULT_AT in normal use, and then `point` is one dictionary lookup.

With FLYWHEEL_FAULT_AT=<name>, the process dies at the point of that name as if killed by SIGKILL: no
exception handlers, `finally` blocks or atexit hooks run, open transactions are never committed. The tests
kill a round at each point, rerun it, and check that nothing was lost or done twice.
"""

from __future__ import annotations

import os
import sys

ENV = "FLYWHEEL_FAULT_AT"
EXIT_CODE = 137  # what a shell reports for a process killed by SIGKILL (128 + 9)

# The named points, in the order a round (then a sync) reaches them.
POINTS = (
    "embed:after_vectors",  # an embedding chunk's vectors are saved, its ids are not
    "round:after_train",  # the head is fitted, nothing is registered
    "round:after_register",  # the model version is in MLflow (and the champion alias moved, if it won)
    "round:after_select",  # the batch is chosen, nothing is sent
    "push:after_import",  # Label Studio holds the first chunk's tasks, the catalog does not know them
    "push:before_record",  # every task is in Label Studio, the catalog transaction has not run
    "round:before_finish",  # tasks are recorded, the round is not marked finished
    "sync:before_commit",  # the labels are written inside the sync's transaction, not committed
)


def point(name: str) -> None:
    """Die here (exit 137, no cleanup) when FLYWHEEL_FAULT_AT names this point."""
    if os.environ.get(ENV) == name:
        sys.stderr.write(f"{ENV}={name}: exiting with {EXIT_CODE}\n")
        sys.stderr.flush()
        os._exit(EXIT_CODE)
