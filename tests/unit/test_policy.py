"""The decision table, the fine-tune trigger and the discriminative learning rates."""

from __future__ import annotations

import pytest
import torch
from torch import nn

from flywheel.config import FinetuneSettings
from flywheel.errors import UnknownChoiceError
from flywheel.features.backbones import Classifier, StageBody, build_body, group_modules, layer_groups
from flywheel.training.policy import (
    HEAD_ONLY_BELOW,
    LAST_GROUPS_FAR,
    LAST_GROUPS_NEAR,
    LAST_LAYERS_BELOW,
    DepthDecision,
    choose_depth,
    choose_features,
    param_groups,
    set_frozen_eval,
    should_finetune,
    training_schedule,
)


@pytest.mark.parametrize(
    ("per_class", "far", "label", "groups"),
    [
        (0, False, "head", 0),
        (HEAD_ONLY_BELOW - 0.5, True, "head", 0),
        (HEAD_ONLY_BELOW, False, "last", LAST_GROUPS_NEAR),
        (150, True, "last", LAST_GROUPS_FAR),
        (LAST_LAYERS_BELOW - 1, False, "last", LAST_GROUPS_NEAR),
        (LAST_LAYERS_BELOW, False, "all", 9),
        (5000, True, "all", 9),
    ],
)
def test_decision_table(per_class, far, label, groups):
    decision = choose_depth(per_class, 9, far_domain=far)
    assert (decision.label, decision.trainable_groups) == (label, groups)
    assert f"{per_class:.1f}" in decision.reason  # the reason carries the numbers


def test_far_domain_with_little_data_points_at_earlier_stages():
    assert "earlier stages" in choose_depth(3, 9, far_domain=True).reason


def test_last_never_exceeds_the_body():
    assert choose_depth(150, 1, far_domain=True).trainable_groups == 1


@pytest.mark.parametrize(("override", "groups"), [("head", 0), ("last", LAST_GROUPS_NEAR), ("all", 9)])
def test_override_wins_over_the_table(override, groups):
    decision = choose_depth(1000 if override == "head" else 1, 9, override=override)
    assert (decision.label, decision.trainable_groups) == (override, groups)
    assert "forced" in decision.reason


def test_bad_inputs():
    with pytest.raises(UnknownChoiceError, match="deep"):
        choose_depth(10, 9, override="deep")
    with pytest.raises(ValueError, match="n_groups"):
        choose_depth(10, 0)
    with pytest.raises(ValueError, match="labels_per_class"):
        choose_depth(-1, 9)


@pytest.mark.parametrize(
    ("n", "last", "expected"),
    [(299, 0, False), (300, 0, True), (450, 300, False), (500, 300, True), (700, 300, True)],
)
def test_should_finetune(n, last, expected):
    assert should_finetune(n, last, min_labels=300, every_new_labels=200) is expected


@pytest.fixture(scope="module")
def body() -> nn.Module:
    return build_body("efficientnet_lite0", pretrained=False)


def _classifier(body) -> Classifier:
    for p in body.parameters():
        p.requires_grad_(True)
    return Classifier("efficientnet_lite0", body, nn.Linear(1280, 2), ["a", "b"], 32)


def test_param_group_rates_are_one_tenth_hundredth(body):
    clf = _classifier(body)
    groups = param_groups(clf, DepthDecision(3, "last", "test"), head_lr=0.01, weight_decay=1e-4)
    assert [(g["name"], g["lr"]) for g in groups] == [
        ("head", 0.01),
        ("head_conv", 0.01 / 10),
        ("stage7", 0.01 / 100),
        ("stage6", 0.01 / 100),
    ]
    assert all(g["weight_decay"] == 1e-4 for g in groups)
    named = dict(layer_groups(body, "efficientnet_lite0"))
    assert {id(p) for p in groups[2]["params"]} == {id(p) for p in named["stage7"]}


def test_frozen_groups_lose_gradients_and_stay_out_of_the_optimizer(body):
    clf = _classifier(body)
    groups = param_groups(clf, DepthDecision(2, "last", "test"), head_lr=0.01, weight_decay=0.0)
    in_optimizer = {id(p) for g in groups for p in g["params"]}
    for name, params in layer_groups(body, "efficientnet_lite0"):
        trainable = name in ("stage7", "head_conv")
        assert all(p.requires_grad is trainable for p in params), name
        assert all((id(p) in in_optimizer) is trainable for p in params), name
    assert all(p.requires_grad for p in clf.head.parameters())
    torch.optim.AdamW(groups)  # the dicts are valid optimizer param groups


def test_head_only_decision_gives_one_group(body):
    clf = _classifier(body)
    groups = param_groups(clf, DepthDecision(0, "head", "test"), head_lr=0.1, weight_decay=0.0)
    assert [g["name"] for g in groups] == ["head"]
    assert not any(p.requires_grad for p in body.parameters())


def test_set_frozen_eval_puts_only_frozen_modules_in_eval(body):
    clf = _classifier(body)
    param_groups(clf, DepthDecision(1, "last", "test"), head_lr=0.1, weight_decay=0.0)
    clf.train()
    set_frozen_eval(clf.body)
    assert not body._bn0.training and not body._blocks[0].training
    assert body._bn1.training and body.training


def test_training_schedule_grows_small_runs_and_picks_epochs_only_on_enough_validation():
    settings = FinetuneSettings(epochs=8, head_epochs=1, batch_size=64)  # min_body_steps 150, select on 200
    small = training_schedule(425, 75, settings, trains_body=True)  # 50 labels/class of 10 classes
    assert (small.epochs, small.head_epochs) == (1 + 22, 1)  # 7 steps an epoch: 22 body epochs for 150 steps
    assert not small.select_by_validation and "too few" in small.reason
    large = training_schedule(8500, 1500, settings, trains_body=True)  # 133 steps an epoch: 7 body epochs do
    assert (large.epochs, large.select_by_validation) == (8, True) and "lengthened" not in large.reason
    capped = training_schedule(10, 2, settings.model_copy(update={"max_epochs": 12}), trains_body=True)
    assert capped.epochs == 12  # 150 one-step epochs wanted, max_epochs allows 12
    head_only = training_schedule(425, 75, settings, trains_body=False)
    assert head_only.epochs == 8  # nothing in the body to move
    assert training_schedule(10, 2, settings.model_copy(update={"max_epochs": 3}), trains_body=True).epochs == 8


def test_far_domain_cell_reads_the_stage_that_probes_best_only_with_little_data():
    probe = {"stage4": 0.80, "stage5": 0.86, "stage6": 0.84, "last": 0.78}
    far = choose_features(30.0, probe)
    assert far.stage == "stage5" and "far domain" in far.reason and far.probe == probe
    assert choose_features(30.0, {**probe, "last": 0.85}).stage == "last"  # within the margin: no switch
    assert choose_features(150.0, probe).stage == "last"  # enough data: the depth policy takes over
    assert choose_features(30.0, probe, domain="near").stage == "last"
    assert choose_features(30.0, None).stage == "last"  # too few labels to probe
    early = choose_features(5.0, probe)  # under 8 training labels per class the probe is noise
    assert early.stage == "last" and "from 8" in early.reason


def test_a_stage_body_gives_the_stage_features_the_probe_measured():
    body = build_body("efficientnet_lite0", pretrained=False)
    stage = StageBody(body, "efficientnet_lite0", "stage5")
    x = torch.randn(3, 3, 64, 64)
    captured = []
    groups = dict(group_modules(body, "efficientnet_lite0"))
    handle = groups["stage5"][-1].register_forward_hook(lambda _m, _i, out: captured.append(out.mean(dim=(2, 3))))
    with torch.no_grad():
        body.eval()(x)
        handle.remove()
        features = stage.eval()(x)
    assert features.shape == (3, stage.embedding_dim) and stage.embedding_dim == 112
    torch.testing.assert_close(features, captured[0])
    assert not groups["stage5"][-1]._forward_hooks  # the per-call hook is gone: the module pickles
    with pytest.raises(UnknownChoiceError):
        StageBody(body, "efficientnet_lite0", "stage9")
