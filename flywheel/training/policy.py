"""The transfer-learning decision table as pure functions: when to fine-tune, how deep, at what rates.

Everything here encodes docs/transfer.md ("How deep to go"): little data -> train only the head
(the body is a fixed feature extractor); some data -> fine-tune the last layers, more of them when the
domain is far from ImageNet; much data -> unfreeze everything. Trainable layers closer to the input get
smaller learning rates (1/10, 1/100 of the head's) so pretrained weights are specialised, not overwritten.
"""

from __future__ import annotations

from dataclasses import dataclass
from typing import Any

from torch import nn

from flywheel.config import FinetuneSettings
from flywheel.errors import UnknownChoiceError
from flywheel.features.backbones import Classifier, layer_groups

HEAD_ONLY_BELOW = 100.0
"""Labels per class below which only the head trains (docs/transfer.md: few labels, the head alone).
Measured (bench/finetune.py, Fashion-MNIST, Lite0 at 64 px, 2,000 test images, CPU, 8 epochs, head lr 1e-2,
2026-11-26): at 10 labels/class the linear probe gives 72.1%, the last stage and the whole body 70.8%; at
50/class 78.8% vs 78.5% for both (neither fine-tune beat its starting weights on validation). At 500/class
the whole body wins: 85.8% against the probe's 84.5% (the last stage 82.5%, stopped early)."""

LAST_LAYERS_BELOW = 200.0
"""Labels per class below which only the last groups train ("medium -> fine-tune the later layers");
at or above it the whole body trains ("more data -> unfreeze more of the network")."""

LAST_GROUPS_NEAR = 2
"""Body groups unfrozen with some data on a domain near ImageNet ("fine-tune a few layers")."""

LAST_GROUPS_FAR = 4
"""... on a far domain ("very different, some data -> fine-tune many layers"; ENVIRONMENT.md: on
Fashion-MNIST the last 4 blocks beat head-only by 3 points)."""

BODY_LR_FACTORS = (0.1, 0.01)
"""The last unfrozen body group trains at head_lr/10, every earlier unfrozen group at head_lr/100."""

DEPTHS = ("auto", "head", "last", "all")


@dataclass(frozen=True)
class DepthDecision:
    """How many body groups (counted from the output end) train, and why, for the run's log."""

    trainable_groups: int
    label: str  # "head" | "last" | "all"
    reason: str


def choose_depth(
    labels_per_class: float, n_groups: int, *, override: str = "auto", far_domain: bool = False
) -> DepthDecision:
    """The decision table: labels per class (and domain distance) -> how much of the body to unfreeze."""
    if override not in DEPTHS:
        raise UnknownChoiceError("fine-tune depth", override, list(DEPTHS))
    if n_groups < 1:
        raise ValueError(f"n_groups must be >= 1, got {n_groups}")
    if labels_per_class < 0:
        raise ValueError(f"labels_per_class must be >= 0, got {labels_per_class}")
    domain = "far from" if far_domain else "near"
    last_k = min(n_groups, LAST_GROUPS_FAR if far_domain else LAST_GROUPS_NEAR)
    data = f"{labels_per_class:.1f} labels/class"

    if override != "auto":
        k = {"head": 0, "last": last_k, "all": n_groups}[override]
        return DepthDecision(
            k, override, f"depth forced to {override!r} by settings: {k} of {n_groups} body groups train ({data})"
        )
    if labels_per_class < HEAD_ONLY_BELOW:
        hint = "; domain is far from ImageNet: consider probing features from earlier stages" if far_domain else ""
        return DepthDecision(
            0,
            "head",
            f"{data} < {HEAD_ONLY_BELOW:g}: body frozen, head only (fixed feature extractor){hint}",
        )
    if labels_per_class < LAST_LAYERS_BELOW:
        return DepthDecision(
            last_k,
            "last",
            f"{HEAD_ONLY_BELOW:g} <= {data} < {LAST_LAYERS_BELOW:g}, domain {domain} ImageNet: "
            f"fine-tune the last {last_k} of {n_groups} body groups",
        )
    return DepthDecision(
        n_groups,
        "all",
        f"{data} >= {LAST_LAYERS_BELOW:g}: fine-tune all {n_groups} body groups",
    )


STAGE_PROBE_FROM = 8.0
"""Training labels per class from which the stage probe is trusted: on Fashion-MNIST, 5.6 labels per class
picked stage6 by cross-validation, and that head tested 11 points below the last stage's
(`flywheel simulate --loop`, 2026-12-07)."""

FEATURE_MARGIN = 0.02
"""Cross-validated probe accuracy an earlier stage must add over the last one before a head reads it (a
switch re-embeds the pool once; two points keep noise from flipping it round after round)."""


@dataclass(frozen=True)
class FeatureChoice:
    """Which stage's features a round's head reads ("last" or a layer group), why, and the probe behind it."""

    stage: str
    reason: str
    probe: dict[str, float]


def wants_stage_probe(labels_per_class: float, domain: str = "auto") -> bool:
    """Whether a round probes the stages: very little data (under HEAD_ONLY_BELOW training labels per class),
    but enough for the probe to mean something (STAGE_PROBE_FROM), unless the domain is set to near."""
    return domain != "near" and STAGE_PROBE_FROM <= labels_per_class < HEAD_ONLY_BELOW


def choose_features(labels_per_class: float, probe: dict[str, float] | None, *, domain: str = "auto") -> FeatureChoice:
    """The decision table's first row: with very little data the head reads the last stage when the domain is
    near the pretraining data, and the earlier stage that probes best when it is far (docs/transfer.md)."""
    if not wants_stage_probe(labels_per_class, domain):
        why = "finetune.domain is 'near'" if domain == "near" else (
            f"{labels_per_class:.1f} training labels/class, the stage probe runs from {STAGE_PROBE_FROM:g} "
            f"to {HEAD_ONLY_BELOW:g}"
        )  # fmt: skip
        return FeatureChoice("last", f"{why}: the head reads the last stage", {})
    if probe is None:
        return FeatureChoice("last", "too few labels per class to probe the stages: the head reads the last", {})
    best = max(probe, key=lambda stage: probe[stage])
    figures = ", ".join(f"{stage} {acc:.3f}" for stage, acc in probe.items())
    if best != "last" and probe[best] > probe["last"] + FEATURE_MARGIN:
        return FeatureChoice(best, f"probe ({figures}): {best} beats the last stage by more than "
                             f"{FEATURE_MARGIN:g}, a far domain: the head reads {best}", probe)  # fmt: skip
    return FeatureChoice("last", f"probe ({figures}): no stage beats the last by more than {FEATURE_MARGIN:g}", probe)


def should_finetune(n_labels: int, labels_at_last_finetune: int, *, min_labels: int, every_new_labels: int) -> bool:
    """True once there are min_labels labels, then every every_new_labels new ones (the mixed approach).

    labels_at_last_finetune <= 0 means no fine-tune has run yet.
    """
    if n_labels < min_labels:
        return False
    if labels_at_last_finetune <= 0:
        return True
    return n_labels - labels_at_last_finetune >= every_new_labels


def param_groups(
    classifier: Classifier, decision: DepthDecision, head_lr: float, weight_decay: float
) -> list[dict[str, Any]]:
    """Optimizer param groups per the decision; freezes (requires_grad=False) every group it leaves out.

    Returns [{"name", "params", "lr", "weight_decay"}], head first, then the unfrozen body groups from the
    output end inwards: the last at head_lr/10, earlier ones at head_lr/100.
    """
    groups = layer_groups(classifier.body, classifier.backbone)
    k = max(0, min(decision.trainable_groups, len(groups)))
    frozen, trainable = groups[: len(groups) - k], groups[len(groups) - k :]
    for _, params in frozen:
        for p in params:
            p.requires_grad_(False)
    head_params = list(classifier.head.parameters())
    for p in head_params:
        p.requires_grad_(True)
    out = [{"name": "head", "params": head_params, "lr": head_lr, "weight_decay": weight_decay}]
    for depth, (name, params) in enumerate(reversed(trainable)):
        for p in params:
            p.requires_grad_(True)
        factor = BODY_LR_FACTORS[0] if depth == 0 else BODY_LR_FACTORS[1]
        out.append({"name": name, "params": params, "lr": head_lr * factor, "weight_decay": weight_decay})
    return [g for g in out if g["params"]]


def set_frozen_eval(module: nn.Module) -> None:
    """Put every submodule whose parameters are all frozen into eval mode.

    A frozen group's BatchNorm must keep its ImageNet running statistics (and its stochastic depth must be
    off); modules with trainable parameters, and parameter-free ones between them, stay as they are.
    """
    for m in module.modules():
        params = list(m.parameters())
        if params and not any(p.requires_grad for p in params):
            m.eval()


@dataclass(frozen=True)
class Schedule:
    """How long a fine-tune trains, and whether validation may pick its epoch, from the data's size."""

    epochs: int
    head_epochs: int
    select_by_validation: bool
    reason: str


def training_schedule(n_train: int, n_val: int, settings: FinetuneSettings, *, trains_body: bool) -> Schedule:
    """How long and on what a fine-tune settles (docs/transfer.md, "A recipe for little data").

    The configured epochs are lengthened so the body phase takes `min_body_steps` optimizer steps (with 500
    images at batch 64 an epoch is 8 steps: the 7 configured body epochs were 56 steps, too few for the body to
    move), up to `max_epochs`. Validation picks the epoch (and stops the run early) only when it holds
    `min_validation_to_select` images: on 15 of them one image moves the score by 7 points, and runs stopped on
    noise; below that the schedule runs to its end and its last weights are kept."""
    steps_per_epoch = max(1, -(-n_train // settings.batch_size))
    epochs, head_epochs = settings.epochs, min(settings.head_epochs, settings.epochs)
    body_epochs = epochs - head_epochs
    if trains_body:
        wanted = -(-settings.min_body_steps // steps_per_epoch)
        body_epochs = max(body_epochs, min(wanted, settings.max_epochs - head_epochs))
    total = head_epochs + body_epochs
    select = n_val >= settings.min_validation_to_select
    length = f"{total} epochs ({head_epochs} head + {body_epochs} body, {steps_per_epoch} steps each)"
    if total != epochs:
        length += f", lengthened from {epochs} so the body takes at least {settings.min_body_steps} steps"
    choice = (
        f"best validation epoch of {n_val} images, with early stopping"
        if select
        else f"last epoch's weights: {n_val} validation images < finetune.min_validation_to_select "
        f"{settings.min_validation_to_select} are too few to choose one"
    )
    return Schedule(total, head_epochs, select, f"{length}; {choice}")
