"""Random sampling: the reference every other strategy must beat, and the cold start."""

from __future__ import annotations

import numpy as np

from flywheel.strategies.base import PoolView, Selection, check_request


def random(pool: PoolView, n: int, *, rng: np.random.Generator) -> Selection:
    """n candidates uniformly at random (score = 0: no preference)."""
    check_request(pool, n)
    positions = rng.choice(pool.candidates, size=n, replace=False).astype(np.int64)
    return Selection(
        positions=positions,
        scores=np.zeros(n),
        strategy="random",
        description=f"{n} of {len(pool.candidates)} candidates uniformly at random",
    )
