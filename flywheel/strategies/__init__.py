"""Strategy registry: names -> `query(pool, n, *, rng) -> Selection`.

Families: baseline (random), uncertainty (least_confidence, margin, entropy), diversity (kcenter,
typiclust, probcover), gradient (badge), hybrid (hybrid, falcun), balanced (balanced_margin,
balanced_entropy), and auto, the default, which picks among them by budget and class balance.
"""

from __future__ import annotations

from flywheel.errors import UnknownChoiceError
from flywheel.strategies.auto import auto
from flywheel.strategies.balanced import balanced_entropy, balanced_margin
from flywheel.strategies.base import PoolView, Selection, Strategy
from flywheel.strategies.baseline import random
from flywheel.strategies.diversity import kcenter, probcover, typiclust
from flywheel.strategies.gradient import badge
from flywheel.strategies.hybrid import falcun, hybrid
from flywheel.strategies.uncertainty import entropy, least_confidence, margin

STRATEGIES: dict[str, Strategy] = {
    "random": random,
    "least_confidence": least_confidence,
    "margin": margin,
    "entropy": entropy,
    "kcenter": kcenter,
    "typiclust": typiclust,
    "probcover": probcover,
    "badge": badge,
    "falcun": falcun,
    "hybrid": hybrid,
    "balanced_margin": balanced_margin,
    "balanced_entropy": balanced_entropy,
    "auto": auto,
}

# Strategies that need no model (embeddings at most): usable for the cold start as configured.
MODEL_FREE = frozenset({"random", "kcenter", "typiclust", "probcover", "auto"})


def get_strategy(name: str) -> Strategy:
    try:
        return STRATEGIES[name]
    except KeyError:
        raise UnknownChoiceError("strategy", name, list(STRATEGIES)) from None


__all__ = ["MODEL_FREE", "STRATEGIES", "PoolView", "Selection", "Strategy", "get_strategy"]
