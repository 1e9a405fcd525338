"""The simulated annotator: answers open Label Studio tasks from the catalog's ground truth.

It goes through the same Label Studio API a person's annotation does (one annotation per task, created
by the API token's user), so the rest of the flywheel cannot tell the two apart.
"""

from __future__ import annotations

import logging
from collections.abc import Collection

import numpy as np
from label_studio_sdk import LabelStudio

from flywheel.catalog import Catalog
from flywheel.errors import ConfigError
from flywheel.labelstudio import OPEN_TASKS, choice_result, list_tasks, task_sample_id

log = logging.getLogger(__name__)


def careless(label: str, classes: list[str], noise_rate: float, rng: np.random.Generator) -> str:
    """`label`, or with probability `noise_rate` another class drawn uniformly (a careless annotator)."""
    others = [c for c in classes if c != label]
    if rng.random() < noise_rate and others:
        return others[int(rng.integers(len(others)))]
    return label


def annotate_open_tasks(
    client: LabelStudio,
    catalog: Catalog,
    project_id: int,
    *,
    noise_rate: float = 0.0,
    rng: np.random.Generator,
    limit: int | None = None,
    only_samples: Collection[int] | None = None,
) -> int:
    """Annotate up to `limit` open tasks (oldest first) with their sample's truth; returns how many.

    With probability `noise_rate` a label is replaced by another class drawn uniformly (a careless
    annotator). Tasks whose sample has no truth, or is not in `only_samples` when given (the demo answers
    its own tasks only), are left for a person.
    """
    if not 0.0 <= noise_rate <= 1.0:
        raise ConfigError(f"noise_rate must be within [0, 1], got {noise_rate}")
    if limit is not None and limit < 0:
        raise ConfigError(f"limit must be >= 0 or None, got {limit}")
    classes = catalog.classes()
    tasks = sorted(list_tasks(client, project_id, query=OPEN_TASKS), key=lambda t: int(t.id))
    sample_of = {int(t.id): task_sample_id(t.data) for t in tasks}
    if only_samples is not None:
        sample_of = {task: sample for task, sample in sample_of.items() if sample in only_samples}
    truth = catalog.truth_of(s for s in sample_of.values() if s is not None)

    annotated = left = 0
    for task_id, sample_id in sample_of.items():
        if limit is not None and annotated >= limit:
            break
        label = truth.get(sample_id) if sample_id is not None else None
        if label is None:
            left += 1
            continue
        label = careless(label, classes, noise_rate, rng)
        client.annotations.create(id=task_id, result=choice_result(label), project=project_id)
        annotated += 1
    if left:
        log.info("left %d open tasks without ground truth for a person (project %s)", left, project_id)
    return annotated
