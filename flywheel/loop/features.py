"""The far-domain cell of the decision table (docs/transfer.md): with very little data, a round's head reads
the stage of the frozen body that probes best on the labels, not always the last one.

Far from ImageNet (digits, sketches, medical images) the last stage describes what was specific to
ImageNet's classes; a middle stage's more general features then separate the new classes better (on digits,
30 labels per class: 94.3% from stage5 against 87.8% from the last stage; bench/results/finetune-digits.md).
The choice is measured every round by cross-validated probes on the training labels (never the held-out
ones the guard compares on), and a stage once embedded stays cached.
"""

from __future__ import annotations

from dataclasses import replace

import numpy as np

from flywheel.catalog import POOL, Catalog
from flywheel.config import Settings
from flywheel.features import embedded
from flywheel.features.backbones import StageBody
from flywheel.features.store import resolve_device
from flywheel.loop.state import State
from flywheel.training import policy, transfer


def head_features(
    settings: Settings, catalog: Catalog, current: State, *, progress: bool
) -> tuple[State, policy.FeatureChoice]:
    """The state a round's head trains on: `current` when the last stage is the choice, else the same pool
    embedded by the chosen stage (cached under `<body version>+<stage>`), with the last stage's pool kept for
    the near-duplicate index."""
    split, classes = current.split, current.classes
    labels_per_class = len(split.train) / max(1, len(classes))
    probe = None
    if policy.wants_stage_probe(labels_per_class, settings.finetune.domain):
        stages = transfer.candidate_stages(current.body, settings.backbone)
        probe = transfer.probe_stages(
            current.body, settings.backbone, stages, [current.pool.paths[i] for i in split.train],
            split.targets[split.train], len(classes), settings.image_size, l2=settings.head_l2,
            seed=settings.seed, device=resolve_device(settings.finetune.device),
        )  # fmt: skip
    choice = policy.choose_features(labels_per_class, probe, domain=settings.finetune.domain)
    if choice.stage == "last":
        return current, choice
    body = StageBody(current.body, settings.backbone, choice.stage)
    version = embedded.features_version(current.body_version, choice.stage)
    pool = embedded.split_features(settings, catalog, POOL, body, version, progress=progress)
    if not np.array_equal(pool.ids, current.pool.ids):  # an image left the pool in between: next round
        return current, policy.FeatureChoice(
            "last", "the pool changed while embedding a stage: last stage", probe or {}
        )
    return replace(current, body=body, pool=pool, features=choice.stage, last_stage_pool=current.pool), choice
