"""The negative-transfer guard against the real MLflow server: a challenger trained on shuffled labels never
takes the champion alias; it is registered as `challenger` with the reason, and the fine-tune run carries the
domain probe, the policy's choice, a confusion matrix and a per-class report."""

from __future__ import annotations

import numpy as np
import pytest

from flywheel import loop
from flywheel.loop import finetune as finetune_step
from flywheel.loop import state
from flywheel.registry import tracking
from tests.integration.catalog_support import labelled_catalog

pytestmark = pytest.mark.integration


def test_shuffled_label_challenger_does_not_move_the_champion(settings, monkeypatch):
    settings = settings.model_copy(
        update={
            "image_size": 32,
            "finetune": settings.finetune.model_copy(
                update={
                    "epochs": 2,
                    "head_epochs": 1,
                    "batch_size": 32,
                    "depth": "last",
                    "patience": 0,
                    "backbones": ["efficientnet_lite0"],  # backbone picking: test_backbone_pick.py
                }
            ),
        }
    )
    catalog = labelled_catalog(settings)
    mlflow_client = tracking.connect(settings)
    first = loop.run_round(settings, catalog, None, mlflow_client, select=False, progress=False)
    assert first.promoted and first.holdout_accuracy > 0.4
    champion = tracking.champion_version(mlflow_client, settings)
    assert champion == first.model_version

    real_split, shuffled = state.split_labels, []

    def shuffled_split(pool, labels, classes, holdout_fraction):
        split = real_split(pool, labels, classes, holdout_fraction)
        targets = split.targets.copy()
        targets[split.train] = np.random.default_rng(0).permutation(targets[split.train])  # held-out stays true
        shuffled.append(len(split.train))
        return loop.LabelledSplit(train=split.train, holdout=split.holdout, targets=targets)

    for module in (state, finetune_step):  # every step that splits the labels: the fine-tune must train on noise
        monkeypatch.setattr(module, "split_labels", shuffled_split)
    report = loop.run_finetune(settings, catalog, mlflow_client, progress=False)
    assert shuffled  # the fine-tune trained on the shuffled split (its own, when it switched backbone)

    assert not report.promoted and report.holdout_accuracy < first.holdout_accuracy
    assert tracking.champion_version(mlflow_client, settings) == champion  # the champion did not move
    name = settings.registered_model_name
    challenger = mlflow_client.get_model_version_by_alias(name, "challenger")
    assert challenger.version == report.model_version
    assert challenger.tags["promotion"] == report.promotion_reason
    assert "does not beat" in report.promotion_reason

    run = mlflow_client.get_run(challenger.run_id)
    params = run.data.params
    assert params["depth"] == "last" and params["depth_setting"] == "last"
    assert params["domain_setting"] == "auto" and params["far_domain"] in ("True", "False")
    assert "domain_probe_middle_acc" in params and params["domain_probe_middle_stage"] == "stage4"
    assert float(params["lr_head"]) == pytest.approx(10 * float(params["lr_head_conv"]))
    assert "domain_probe_last_acc" in run.data.metrics
    # the paired comparison behind the decision, comparable across runs in the MLflow UI
    guard_metrics = {f"vs_{m}_{k}" for m in ("baseline", "champion") for k in ("difference", "low", "high")}
    assert guard_metrics <= set(run.data.metrics)
    assert (
        run.data.metrics["vs_champion_low"]
        <= run.data.metrics["vs_champion_difference"]
        <= (run.data.metrics["vs_champion_high"])
    )
    assert "interval" in report.promotion_reason
    artifacts = {a.path for a in mlflow_client.list_artifacts(challenger.run_id)}
    assert {"confusion_holdout.png", "per_class_holdout.json"} <= artifacts
    assert report.domain_probe is not None and report.domain_reason == report.domain_probe.reason
    assert not list(settings.dirs.checkpoints.rglob("*.pt"))  # the completed run cleaned its checkpoint
