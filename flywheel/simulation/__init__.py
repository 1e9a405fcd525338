"""`flywheel simulate`: pool-based active learning with an oracle, to measure strategies on any image set.

core: the loop on arrays (no I/O); datasets: built-in sources and cached embeddings; publish: the JSON
report, the learning-curve plot and one MLflow run per strategy.
"""

from flywheel.simulation.core import (
    Split,
    budget_schedule,
    labels_to_reach,
    make_split,
    resolve_strategies,
    run_curve,
    simulate,
    summarize,
)

__all__ = [
    "Split",
    "budget_schedule",
    "labels_to_reach",
    "make_split",
    "resolve_strategies",
    "run_curve",
    "simulate",
    "summarize",
]
