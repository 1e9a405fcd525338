"""Strategy registry: names -> `query(pool, n, *, rng) -> Selection`."""

from __future__ import annotations

from flywheel.errors import UnknownChoiceError
from flywheel.strategies.base import PoolView, Selection, Strategy
from flywheel.strategies.baseline import random
from flywheel.strategies.uncertainty import entropy

STRATEGIES: dict[str, Strategy] = {"random": random, "entropy": entropy}


def get_strategy(name: str) -> Strategy:
    try:
        return STRATEGIES[name]
    except KeyError:
        raise UnknownChoiceError("strategy", name, list(STRATEGIES)) from None


__all__ = ["STRATEGIES", "PoolView", "Selection", "Strategy", "get_strategy"]
