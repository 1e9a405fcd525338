"""A tiny real fine-tune: two visually distinct classes, EfficientNet-Lite0 at 32 px on CPU."""

from __future__ import annotations

import copy

import numpy as np
import pytest
import torch
from torchvision.io import write_png

from flywheel.config import FinetuneSettings
from flywheel.errors import DataError
from flywheel.features.backbones import get_spec, layer_groups, new_classifier
from flywheel.sources.images import choose_augmentation, train_transform
from flywheel.training.finetune import (
    HEAD_PHASE_LR_FACTOR,
    evaluate,
    finetune,
    predict_proba,
    should_stop,
    unfrozen_count,
)
from flywheel.training.policy import DepthDecision

SIZE = 32


def _stripes(horizontal: bool, rng: np.random.Generator) -> torch.Tensor:
    """Stripes with a random period, phase and colour, plus noise: orientation is the only class cue."""
    period = int(rng.integers(4, 9))
    phase = int(rng.integers(0, period))
    line = ((np.arange(48) + phase) % period < period // 2).astype(np.float32)
    img = np.tile(line[:, None], (1, 48)) if horizontal else np.tile(line[None, :], (48, 1))
    colour = rng.uniform(0.4, 1.0, size=3)
    pixels = img[None] * colour[:, None, None] * 255 + rng.normal(0, 12, size=(3, 48, 48))
    return torch.from_numpy(np.clip(pixels, 0, 255).astype(np.uint8))


@pytest.fixture(scope="module")
def stripes(tmp_path_factory):
    root = tmp_path_factory.mktemp("stripes")
    rng = np.random.default_rng(0)
    paths, targets = [], []
    for i in range(64):
        target = i % 2
        paths.append(str(root / f"{i}.png"))
        write_png(_stripes(target == 1, rng), paths[-1])
        targets.append(target)
    targets = np.array(targets)
    return paths[:40], targets[:40], paths[40:], targets[40:]


@pytest.fixture(scope="module")
def classifier():
    return new_classifier("efficientnet_lite0", ["vertical", "horizontal"], SIZE, seed=1)


# The recipe's schedule by data size is off here (min_body_steps 0, any validation picks the epoch): these
# tests check the training mechanics on 40 images; test_small_validation_keeps_the_fixed_schedule the schedule.
MECHANICS = {"min_body_steps": 0, "min_validation_to_select": 0}
SETTINGS = FinetuneSettings(epochs=4, head_epochs=1, batch_size=16, head_lr=1e-2, device="cpu", **MECHANICS)
LAST = DepthDecision(2, "last", "test: last two groups")


@pytest.fixture(scope="module")
def result(classifier, stripes):
    train_p, train_y, val_p, val_y = stripes
    return finetune(
        classifier, train_p, train_y, val_p, val_y, decision=LAST, settings=SETTINGS, seed=7, progress=False
    )


def test_finetune_beats_chance_and_the_untrained_head(result, classifier, stripes):
    _, _, val_p, val_y = stripes
    before = evaluate(classifier, val_p, val_y, device="cpu")
    after = evaluate(result.classifier, val_p, val_y, device="cpu")
    assert after >= 0.85 and after > before
    assert after == pytest.approx(max(h["val_accuracy"] for h in result.history))  # best epoch returned


def test_history_phases_and_rates(result):
    assert [h["phase"] for h in result.history] == ["head", "body", "body", "body"]
    assert [h["epoch"] for h in result.history] == [1, 2, 3, 4]
    assert all(np.isfinite(h["train_loss"]) for h in result.history)
    assert result.lr_by_group == {"head": 1e-2, "head_conv": 1e-3, "stage7": 1e-4}
    assert result.device == "cpu" and result.seconds > 0
    assert 1 <= result.best_epoch <= 4


def test_frozen_groups_and_the_input_model_are_untouched(result, classifier):
    tuned = dict(layer_groups(result.classifier.body, "efficientnet_lite0"))
    original = dict(layer_groups(classifier.body, "efficientnet_lite0"))
    for name in ("stem", "stage1", "stage6"):
        assert all(torch.equal(a, b) for a, b in zip(tuned[name], original[name], strict=True)), name
    assert not all(torch.equal(a, b) for a, b in zip(tuned["stage7"], original["stage7"], strict=True))
    # BatchNorm statistics stay frozen below depth "all"
    assert torch.equal(result.classifier.body._bn1.running_mean, classifier.body._bn1.running_mean)
    assert all(p.requires_grad for p in classifier.parameters())


def test_same_seed_gives_identical_weights(result, classifier, stripes):
    train_p, train_y, val_p, val_y = stripes
    again = finetune(
        classifier, train_p, train_y, val_p, val_y, decision=LAST, settings=SETTINGS, seed=7, progress=False
    )
    a, b = result.classifier.state_dict(), again.classifier.state_dict()
    assert all(torch.equal(a[k], b[k]) for k in a)
    assert [h["train_loss"] for h in again.history] == [h["train_loss"] for h in result.history]


def test_head_only_decision_trains_only_the_head(classifier, stripes):
    train_p, train_y, val_p, val_y = stripes
    settings = FinetuneSettings(epochs=2, head_epochs=1, batch_size=16, device="cpu", **MECHANICS)
    res = finetune(
        classifier,
        train_p[:16],
        train_y[:16],
        [],
        np.array([], dtype=np.int64),
        decision=DepthDecision(0, "head", "test"),
        settings=settings,
        seed=0,
        progress=False,
    )
    assert [h["phase"] for h in res.history] == ["head", "head"]
    assert all(h["val_accuracy"] is None for h in res.history) and res.notes
    before, after = classifier.body.state_dict(), res.classifier.body.state_dict()
    assert all(torch.equal(before[k], after[k]) for k in before)
    assert not torch.equal(res.classifier.head.weight, classifier.head.weight)


def test_small_validation_keeps_the_fixed_schedule_to_its_end(classifier, stripes):
    # 8 validation images cannot choose an epoch: no early stop (patience 1 would stop on noise), no best-epoch
    # pick, the last weights; and 20 images at batch 8 (3 steps an epoch) get epochs until the body took 12 steps.
    train_p, train_y, val_p, val_y = stripes
    settings = SETTINGS.model_copy(
        update={"batch_size": 8, "patience": 1, "min_body_steps": 12, "min_validation_to_select": 9, "max_epochs": 6}
    )
    res = finetune(
        classifier, train_p[:20], train_y[:20], val_p[:8], val_y[:8], decision=LAST, settings=settings, seed=2,
        progress=False,
    )  # fmt: skip
    assert [h["phase"] for h in res.history] == ["head"] + ["body"] * 4  # ceil(12 / 3) body epochs, under 6 in all
    assert res.best_epoch == 5 and not res.stopped_early
    assert all(h["val_accuracy"] is not None for h in res.history)  # still scored and logged
    assert "too few to choose one" in res.notes[0] and "lengthened from 4" in res.notes[0]


def test_predict_proba_rows_sum_to_one(result, stripes):
    probs = predict_proba(result.classifier, stripes[2][:5], device="cpu")
    assert probs.shape == (5, 2) and probs.dtype == np.float32
    np.testing.assert_allclose(probs.sum(1), 1.0, atol=1e-5)


def test_bad_targets_are_data_errors(classifier, stripes):
    train_p, train_y, val_p, val_y = stripes
    with pytest.raises(DataError, match=r"\[0, 2\)"):
        finetune(
            classifier, train_p, train_y + 1, val_p, val_y, decision=LAST, settings=SETTINGS, seed=0, progress=False
        )
    with pytest.raises(DataError, match="at least one training image"):
        finetune(
            classifier,
            [],
            np.array([], dtype=np.int64),
            val_p,
            val_y,
            decision=LAST,
            settings=SETTINGS,
            seed=0,
            progress=False,
        )
    with pytest.raises(DataError, match="40 paths but 3 targets"):
        evaluate(copy.deepcopy(classifier), train_p, train_y[:3], device="cpu")


# ------------------------------------------------------------------ checkpoint, resume, unfreezing, stopping

RESUME = FinetuneSettings(
    epochs=4, head_epochs=1, batch_size=8, head_lr=1e-2, device="cpu", patience=0, gradual_unfreeze=True, **MECHANICS
)
FAR = DepthDecision(4, "last", "test: last four groups")


class Interrupt(Exception):
    pass


def _stop_after(k):
    def callback(info):
        if info.epoch == k:
            raise Interrupt(f"killed after epoch {k}")

    return callback


@pytest.mark.parametrize("interrupt_after", [1, 2])  # at the phase boundary, and mid body phase
def test_resume_after_interruption_gives_bit_identical_weights(classifier, stripes, tmp_path, interrupt_after):
    train_p, train_y, val_p, val_y = stripes
    args = (classifier, train_p[:20], train_y[:20], val_p[:8], val_y[:8])
    kwargs = dict(decision=FAR, settings=RESUME, seed=3, progress=False)
    straight = finetune(*args, **kwargs, checkpoint_dir=tmp_path / "a")
    assert not list((tmp_path / "a").rglob("*.pt"))  # a completed run removes its checkpoint

    with pytest.raises(Interrupt):
        finetune(*args, **kwargs, checkpoint_dir=tmp_path / "b", on_epoch_end=_stop_after(interrupt_after))
    saved = list((tmp_path / "b").rglob("last.pt"))
    assert len(saved) == 1 and not list((tmp_path / "b").rglob("*.partial"))
    assert torch.load(saved[0], weights_only=True)["epoch"] == interrupt_after
    resumed = finetune(*args, **kwargs, checkpoint_dir=tmp_path / "b", resume=True)
    assert resumed.resumed_from == interrupt_after and any("resumed" in n for n in resumed.notes)
    a, b = straight.classifier.state_dict(), resumed.classifier.state_dict()
    assert all(torch.equal(a[k], b[k]) for k in a)
    assert [h["train_loss"] for h in resumed.history] == [h["train_loss"] for h in straight.history]
    assert resumed.best_epoch == straight.best_epoch


def test_resume_false_starts_over_and_other_runs_do_not_share_checkpoints(classifier, stripes, tmp_path):
    train_p, train_y, val_p, val_y = stripes
    kwargs = dict(decision=FAR, settings=RESUME, progress=False, checkpoint_dir=tmp_path)
    with pytest.raises(Interrupt):
        finetune(classifier, train_p[:20], train_y[:20], val_p[:8], val_y[:8], seed=3, **kwargs,
                 on_epoch_end=_stop_after(2))  # fmt: skip
    other_seed = finetune(classifier, train_p[:20], train_y[:20], val_p[:8], val_y[:8], seed=4, resume=True, **kwargs)
    assert other_seed.resumed_from is None  # a different run key: nothing to resume
    fresh = finetune(classifier, train_p[:20], train_y[:20], val_p[:8], val_y[:8], seed=3, resume=False, **kwargs)
    assert fresh.resumed_from is None and len(fresh.history) == 4


def test_optimizer_built_by_finetune_has_the_configured_rate_ratios(classifier, stripes):
    train_p, train_y, val_p, val_y = stripes
    seen = {}

    def record(info):
        seen[info.epoch] = {g["name"]: (g["lr"], g["initial_lr"]) for g in info.optimizer.param_groups}

    finetune(classifier, train_p[:16], train_y[:16], val_p[:8], val_y[:8], decision=FAR, settings=RESUME, seed=0,
             progress=False, on_epoch_end=record)  # fmt: skip
    assert list(seen[1]) == ["head"]
    assert seen[1]["head"][1] == pytest.approx(RESUME.head_lr * HEAD_PHASE_LR_FACTOR)  # the LP head: gently
    body = seen[4]
    assert list(body) == ["head", "head_conv", "stage7", "stage6", "stage5"]
    head_lr, head_initial = body["head"]
    assert head_initial == RESUME.head_lr
    for name, factor in (("head_conv", 10), ("stage7", 100), ("stage6", 100), ("stage5", 100)):
        lr, initial = body[name]
        assert initial == pytest.approx(head_initial / factor)
        assert lr == pytest.approx(head_lr / factor)  # the schedule scales every group alike


def test_gradual_unfreezing_opens_groups_from_the_top(classifier, stripes):
    train_p, train_y, val_p, val_y = stripes
    trainable = {}

    def record(info):
        groups = layer_groups(info.model.body, "efficientnet_lite0")
        trainable[info.epoch] = [name for name, params in groups if params[0].requires_grad]

    settings = RESUME.model_copy(update={"epochs": 5})  # 1 head + 4 body epochs: 4 groups over 2 epochs
    res = finetune(classifier, train_p[:16], train_y[:16], val_p[:8], val_y[:8], decision=FAR, settings=settings,
                   seed=0, progress=False, on_epoch_end=record)  # fmt: skip
    assert trainable[1] == []
    assert trainable[2] == ["stage7", "head_conv"]
    assert trainable[3] == trainable[4] == trainable[5] == ["stage5", "stage6", "stage7", "head_conv"]
    assert [h["trainable_groups"] for h in res.history] == [0, 2, 4, 4, 4]
    tuned = dict(layer_groups(res.classifier.body, "efficientnet_lite0"))
    original = dict(layer_groups(classifier.body, "efficientnet_lite0"))
    assert all(torch.equal(a, b) for a, b in zip(tuned["stage4"], original["stage4"], strict=True))


@pytest.mark.parametrize(
    ("body_epochs", "groups", "gradual", "expected"),
    [(4, 4, True, [2, 4, 4, 4]), (4, 9, True, [5, 9, 9, 9]), (1, 9, True, [9]), (6, 2, True, [1, 2, 2, 2, 2, 2]),
     (4, 4, False, [4, 4, 4, 4]), (3, 0, True, [0, 0, 0])],
)  # fmt: skip
def test_unfrozen_count_schedule(body_epochs, groups, gradual, expected):
    assert [unfrozen_count(e, body_epochs, groups, gradual=gradual) for e in range(body_epochs)] == expected


def _h(phase, acc, loss=1.0):
    return {"phase": phase, "val_accuracy": acc, "val_loss": loss}


def test_should_stop_counts_only_body_epochs_without_improvement():
    assert not should_stop([_h("head", 0.5), _h("head", 0.4), _h("head", 0.3)], 2)  # never in the head phase
    assert should_stop([_h("head", 0.6), _h("body", 0.5), _h("body", 0.55)], 2)
    assert not should_stop([_h("head", 0.6), _h("body", 0.5), _h("body", 0.7)], 2)
    assert not should_stop([_h("head", 0.6), _h("body", 0.6, 0.9), _h("body", 0.5)], 2)  # lower loss is better
    assert not should_stop([_h("head", 0.6), _h("body", 0.5), _h("body", 0.5)], 0)  # patience 0: off
    assert not should_stop([{"phase": "body", "val_accuracy": None, "val_loss": None}] * 3, 1)


def test_early_stopping_ends_the_run_and_keeps_the_best_epoch(classifier, stripes):
    train_p, train_y, val_p, val_y = stripes
    # a validation set of the wrong answers: every improvement in training makes it worse
    settings = RESUME.model_copy(update={"epochs": 6, "patience": 1})
    res = finetune(classifier, train_p[:16], train_y[:16], val_p[:8], 1 - val_y[:8], decision=FAR,
                   settings=settings, seed=0, progress=False)  # fmt: skip
    assert res.stopped_early and len(res.history) < 6
    assert any(n.startswith("early stop") for n in res.notes)


def test_augmentation_is_chosen_for_the_domain(stripes, tmp_path):
    colour = choose_augmentation(stripes[0][:4])
    assert colour.colour_jitter and colour.hflip and "colour" in colour.reason
    grey_paths = []
    for i in range(3):
        grey = torch.full((1, 20, 20), 40 * i, dtype=torch.uint8).expand(3, 20, 20).contiguous()
        grey_paths.append(str(tmp_path / f"g{i}.png"))
        write_png(grey, grey_paths[-1])
    grey = choose_augmentation(grey_paths, hflip=False)
    assert not grey.colour_jitter and not grey.hflip and "grayscale" in grey.reason
    names = [type(t).__name__ for t in train_transform(get_spec("efficientnet_lite0"), 32, grey).transforms]
    assert "ColorJitter" not in names and "RandomHorizontalFlip" not in names
    names = [type(t).__name__ for t in train_transform(get_spec("efficientnet_lite0"), 32, colour).transforms]
    assert "ColorJitter" in names and "RandomHorizontalFlip" in names


@pytest.mark.parametrize("adapt", [False, True])
def test_batchnorm_statistics_adapt_at_depth_all_only_when_asked(classifier, stripes, adapt):
    train_p, train_y, val_p, val_y = stripes
    settings = SETTINGS.model_copy(update={"epochs": 2, "adapt_batchnorm": adapt, "patience": 0})
    everything = DepthDecision(len(layer_groups(classifier.body, "efficientnet_lite0")), "all", "test: all")
    tuned = finetune(
        classifier, train_p, train_y, val_p, val_y, decision=everything, settings=settings, seed=3, progress=False
    )
    unchanged = torch.equal(tuned.classifier.body._bn1.running_mean, classifier.body._bn1.running_mean)
    assert unchanged is not adapt


def test_compiled_training_matches_eager(classifier, stripes):
    """settings.compile runs the same steps through torch.compile. The head epoch (body frozen, so in eval
    mode) matches eager; body epochs draw dropout masks from the compiler's own RNG, so they only have to
    learn as well. The weights come back under their own names."""
    train_p, train_y, val_p, val_y = stripes
    runs = {}
    for compile_ in (False, True):
        settings = SETTINGS.model_copy(update={"epochs": 2, "compile": compile_})
        runs[compile_] = finetune(
            classifier, train_p, train_y, val_p, val_y, decision=LAST, settings=settings, seed=7, progress=False
        )
    eager, compiled = runs[False], runs[True]
    assert [h["phase"] for h in compiled.history] == [h["phase"] for h in eager.history] == ["head", "body"]
    assert compiled.history[0]["train_loss"] == pytest.approx(eager.history[0]["train_loss"], rel=1e-3)
    assert compiled.history[0]["val_accuracy"] == pytest.approx(eager.history[0]["val_accuracy"])
    assert compiled.history[-1]["val_accuracy"] >= eager.history[-1]["val_accuracy"] - 0.1
    a, b = compiled.classifier.state_dict(), eager.classifier.state_dict()
    assert a.keys() == b.keys()  # the compiled wrapper's "_orig_mod." prefix never leaks into the weights


def test_a_checkpoint_written_in_the_background_holds_the_state_at_save_time(tmp_path):
    from flywheel.training.finetune import _CheckpointWriter, _load_checkpoint

    weights = torch.zeros(1000)
    path = tmp_path / "run" / "last.pt"
    with _CheckpointWriter(path) as writer:
        writer.save({"epoch": 1, "model": {"w": weights}, "history": [{"epoch": 1}]})
        weights += 1.0  # training goes on while the file is written
    saved = _load_checkpoint(path)  # waited for on exit; checksum verified
    assert saved["epoch"] == 1 and torch.equal(saved["model"]["w"], torch.zeros(1000))

    with pytest.raises(RuntimeError, match="interrupted"), _CheckpointWriter(path) as writer:
        writer.save({"epoch": 2, "model": {"w": weights}})
        raise RuntimeError("interrupted")
    assert _load_checkpoint(path)["epoch"] == 2  # the write in flight when the run failed completed whole

    with pytest.raises(OSError), _CheckpointWriter(tmp_path / "file" / "last.pt") as writer:
        (tmp_path / "file").write_text("a file where the folder should be")
        writer.save({"epoch": 1})  # the background error reaches the caller


def test_a_fine_tune_that_only_hurts_returns_the_weights_it_started_from(classifier, stripes):
    train_p, train_y, val_p, val_y = stripes
    wrong = 1 - np.asarray(train_y)  # every training label flipped: each epoch moves away from validation
    result = finetune(classifier, train_p, wrong, val_p, val_y, decision=LAST, settings=SETTINGS, seed=0,
                      progress=False)  # fmt: skip
    assert result.best_epoch == 0 and any("no epoch beat the starting weights" in n for n in result.notes)
    start, end = classifier.state_dict(), result.classifier.state_dict()
    assert all(torch.equal(start[k].cpu(), end[k]) for k in start)
    assert len(result.history) >= 1  # epochs ran; none was kept
