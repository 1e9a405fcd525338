"""BADGE (Ash et al. 2020): k-means++ seeding on the gradient embeddings of the linear head.

The gradient of the cross-entropy loss w.r.t. the head's weights, taking the predicted class as the label,
is g_i = (p_i - onehot(argmax p_i)) (outer) x_i: long when the model is unsure, pointing somewhere new when
the sample is unlike the others. k-means++ seeding on g trades the two off without a knob. The (C * D)
vectors are never built: |g_i - g_j|^2 = |a_i|^2 |x_i|^2 + |a_j|^2 |x_j|^2 - 2 (a_i . a_j)(x_i . x_j).
"""

from __future__ import annotations

import numpy as np

from flywheel.strategies.base import PoolView, Selection, check_request, require_embeddings, require_probs


def badge(pool: PoolView, n: int, *, rng: np.random.Generator) -> Selection:
    """k-means++ seeding on gradient embeddings: first the largest gradient, then each next pick drawn with
    probability proportional to its squared distance from the nearest pick so far."""
    check_request(pool, n)
    probs = require_probs(pool, "badge")
    embeddings = require_embeddings(pool, "badge", instead="'margin' (probabilities only)")
    p = probs[pool.candidates].astype(np.float64)
    a = p.copy()
    a[np.arange(len(a)), p.argmax(axis=1)] -= 1.0  # (M, C): dLoss/dlogits with the predicted label
    x = embeddings[pool.candidates].astype(np.float32)
    sq_norm = (a**2).sum(axis=1) * (x.astype(np.float64) ** 2).sum(axis=1)

    first = int(np.argmax(sq_norm))
    picks, scores = [first], [float(sq_norm[first])]
    nearest = np.full(len(a), np.inf)
    taken = np.zeros(len(a), dtype=bool)
    taken[first] = True
    random_fill = 0
    while len(picks) < n:
        c = picks[-1]
        d2 = sq_norm + sq_norm[c] - 2.0 * (a @ a[c]) * (x @ x[c]).astype(np.float64)
        nearest = np.minimum(nearest, np.maximum(d2, 0.0))
        weight = np.where(taken, 0.0, nearest)
        total = weight.sum()
        if total <= 0 or not np.isfinite(total):  # every left-over gradient equals a pick: uniform
            random_fill += 1
            j = int(rng.choice(np.flatnonzero(~taken)))
        else:
            j = int(rng.choice(len(a), p=weight / total))
        picks.append(j)
        scores.append(float(nearest[j]))
        taken[j] = True
    note = f"; {random_fill} drawn uniformly (all remaining gradients identical)" if random_fill else ""
    description = (
        f"badge: k-means++ seeding over {len(a)} gradient embeddings ({p.shape[1]} classes x "
        f"{x.shape[1]} features); score = squared distance to the nearest earlier pick{note}"
    )
    return pool.pick(picks, scores, strategy="badge", description=description)
