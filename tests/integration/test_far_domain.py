"""The far-domain cell against the real servers: on digits (far from ImageNet) with 30 labels per class, a
round's head reads the earlier stage that probes best, says so in its report and MLflow run, and the
registered model reads images end to end; promotion by hand keeps the project's body."""

from __future__ import annotations

import numpy as np
import pytest

from flywheel import labelstudio, loop
from flywheel.catalog import Catalog
from flywheel.config import Settings
from flywheel.features import embedded
from flywheel.features.backbones import StageBody
from flywheel.loop.state import load
from flywheel.registry import tracking
from flywheel.simulation.datasets import materialize_builtin
from flywheel.sources.importing import import_source
from flywheel.training.finetune import predict_proba

pytestmark = pytest.mark.integration


def _label(catalog: Catalog, per_class: int, seed: int = 0) -> None:
    """Give `per_class` samples of each class their true label, as annotators would."""
    samples = catalog.samples()
    truths = np.array([s.truth for s in samples])
    rng = np.random.default_rng(seed)
    with catalog.transaction() as session:
        for cls in np.unique(truths):
            for i in rng.permutation(np.flatnonzero(truths == cls))[:per_class]:
                catalog.upsert_label(
                    session, sample_id=samples[i].id, label=str(cls), annotator="t", ls_annotation_id=None
                )


def test_a_far_domain_round_reads_the_stage_that_probes_best(settings: Settings) -> None:
    settings = settings.model_copy(update={"k_per_round": 20})
    catalog = Catalog(settings.catalog_url)
    import_source(catalog, settings, str(materialize_builtin("digits", settings.dirs.sources / "simulate")))
    _label(catalog, 30)
    ls, client = labelstudio.connect(settings), tracking.connect(settings)

    report = loop.run_round(settings, catalog, ls, client, progress=False)
    assert report.run_id is not None and report.model_version is not None
    assert report.features in ("stage4", "stage5", "stage6"), report.features_reason
    assert "far domain" in report.features_reason
    assert report.features_probe[report.features] > report.features_probe["last"] + 0.02
    run = client.get_run(report.run_id)
    assert run.data.params["features"] == report.features and run.data.params["body_version"] == "imagenet"
    assert float(run.data.params[f"stage_probe_{report.features}"]) == pytest.approx(
        report.features_probe[report.features], abs=1e-4
    )
    assert tracking.model_version(client, settings, report.model_version).tags["features"] == report.features

    # The registered model reads images itself: its answers agree with the round's from the cached stage vectors.
    model = load(client, settings, report.model_version)
    assert isinstance(model.body, StageBody) and model.body.stage == report.features
    by_id = {int(s["sample_id"]): s["predicted"] for s in report.selected}
    samples = {s.id: s.uri for s in catalog.samples()}
    ids = sorted(by_id)
    from_images = predict_proba(model, [samples[i] for i in ids], device="cpu").argmax(1)
    agree = np.mean([model.classes[p] == by_id[i] for p, i in zip(from_images, ids, strict=True)])
    assert agree >= 0.95 and report.promoted

    # Promoting it by hand keeps the project's body; open tasks are refreshed from the stage's cached vectors.
    assert loop.promote(settings, catalog, client, report.model_version, progress=False) == embedded.IMAGENET
    assert embedded.body_version(settings, catalog) == embedded.IMAGENET
    assert loop.refresh_open_tasks(settings, catalog, ls, client, report.model_version, progress=False) == 0
    # A near domain by setting: the head reads the last stage, and the champion (the stage head) still
    # pre-annotates this round's tasks.
    near = settings.model_copy(update={"finetune": settings.finetune.model_copy(update={"domain": "near"})})
    _label(catalog, 31, seed=1)
    second = loop.run_round(near, catalog, ls, client, progress=False)
    assert second.features == "last" and "near" in second.features_reason
    assert all(s["predicted"] for s in second.selected)
