"""Query provenance and the label-budget forecast against the real servers: five rounds on a small Fashion-MNIST
project; every label traces back to its round, strategy, model, score, rank, annotator and time to label, in
the catalog, in each registered model's training_set.csv and in `flywheel explain`; the forecast reaches the
round report (a Prefect artifact), the MLflow run and `flywheel status`."""

from __future__ import annotations

import csv
import re
from collections import Counter

import numpy as np
import pytest
from prefect.client.orchestration import get_client
from prefect.client.schemas.filters import ArtifactFilter, ArtifactFilterKey
from prefect.settings import PREFECT_API_URL, temporary_settings
from typer.testing import CliRunner

from flows.common import artifact_key, publish_round_report
from flywheel import labelstudio, loop
from flywheel.app import cli
from flywheel.catalog import Catalog
from flywheel.insight import provenance
from flywheel.insight.after_round import FORECAST_ARTIFACT, FORECAST_PLOT
from flywheel.labelstudio import annotator
from flywheel.registry import tracking
from flywheel.sources.importing import import_source
from tests.integration.labelstudio_support import with_section

pytestmark = pytest.mark.integration
K = 20


def _cli(monkeypatch, settings, *args: str) -> str:
    """Run the CLI as a user would, with the test's settings in the environment."""
    for key, value in {
        "FLYWHEEL_WORKSPACE": str(settings.workspace),
        "FLYWHEEL_CATALOG_URL": settings.catalog_url,  # PostgreSQL in the PostgreSQL pass
        "FLYWHEEL_PROJECT": settings.project,
        "FLYWHEEL_LABEL_STUDIO__PORT": str(settings.label_studio.port),
        "FLYWHEEL_MLFLOW__PORT": str(settings.mlflow.port),
        "FLYWHEEL_PREFECT__PORT": str(settings.prefect.port),
    }.items():
        monkeypatch.setenv(key, value)
    monkeypatch.setattr(cli.console, "width", 250)
    result = CliRunner().invoke(cli.app, list(args))
    assert result.exit_code == 0, result.output
    return result.output


def _training_set(mlflow_client, run_id: str) -> list[dict[str, str]]:
    path = mlflow_client.download_artifacts(run_id, provenance.TRAINING_SET_ARTIFACT)
    with open(path) as fh:
        return list(csv.DictReader(fh))


def test_every_label_is_traced_and_the_forecast_is_published(settings, monkeypatch):
    settings = settings.model_copy(update={"image_size": 32, "k_per_round": K})
    settings = with_section(with_section(settings, "review", enabled=False), "forecast", bootstrap=30)
    catalog = Catalog(settings.catalog_url)
    import_source(catalog, settings, "fashion-mnist", pool_size=160, test_size=100)
    ls_client, mlflow_client = labelstudio.connect(settings), tracking.connect(settings)
    project_id = labelstudio.ensure_project(ls_client, settings, catalog, catalog.classes())

    reports = []
    for step in range(5):
        reports.append(loop.run_round(settings, catalog, ls_client, mlflow_client, select=step < 4, progress=False))
        if step < 4:
            rng = np.random.default_rng(step)
            assert annotator.annotate_open_tasks(ls_client, catalog, project_id, rng=rng) == K
            loop.run_sync(settings, catalog, ls_client)
    first, last = reports[0], reports[-1]
    assert first.model_version is None and all(r.model_version for r in reports[1:])
    assert [r.n_labels for r in reports] == [0, 20, 40, 60, 80]

    # The catalog: why each label was asked for and how it was answered.
    labels = catalog.labels()
    records = provenance.provenance_of(catalog, labels)
    assert len(records) == 80
    for report in reports[:4]:
        picked = [r for r in records.values() if r.round_id == report.round_id]
        assert sorted(r.rank for r in picked) == list(range(1, K + 1))
        assert {r.model_version for r in picked} == {report.model_version}  # None for the cold start
        assert {r.strategy for r in picked} == {"auto"}
        assert all(r.params["description"] == report.description and r.params["k_per_round"] == K for r in picked)
        by_score = {s["sample_id"]: s["score"] for s in report.selected}
        assert all(r.score == pytest.approx(by_score[r.sample_id]) for r in picked)
    me = settings.label_studio.username
    assert all(r.annotators == [me] and r.label == labels[r.sample_id] for r in records.values())
    assert all(r.first_annotated_at is not None and r.time_to_label_s >= 0 for r in records.values())
    assert all(len(r.annotations) == 1 and r.annotations[0]["choices"] == [r.label] for r in records.values())

    # Each registered model carries the training set it saw, with that provenance.
    rows = _training_set(mlflow_client, last.run_id)
    assert {int(r["sample_id"]) for r in rows} == set(labels)
    assert Counter(r["role"] for r in rows) == {"train": last.n_train, "holdout": last.n_holdout}
    for row in rows:
        record = records[int(row["sample_id"])]
        assert (row["label"], int(row["round_id"]), int(row["rank"])) == (record.label, record.round_id, record.rank)
        assert row["annotators"] == me and row["content_hash"] == record.content_hash
    earlier = _training_set(mlflow_client, reports[1].run_id)  # round 2's model: the first 20 labels only
    assert {int(r["round_id"]) for r in earlier} == {first.round_id} and len(earlier) == 20
    version = mlflow_client.get_model_version(settings.registered_model_name, last.model_version)
    assert version.run_id == last.run_id and f"{last.n_train} train" in version.tags["training_set"]

    # The forecast: four rounds with a model make the first one, on the run and in the round report.
    assert reports[3].after_training is not None and reports[3].after_training.forecast is None
    assert "no forecast yet" in reports[3].after_training.forecast_note
    assert last.after_training is not None
    forecast = last.after_training.forecast
    assert forecast is not None and forecast.labels == [20.0, 40.0, 60.0, 80.0]
    assert forecast.accuracy[-1] == pytest.approx(last.test_accuracy)
    artifacts = {a.path for a in mlflow_client.list_artifacts(last.run_id)}
    assert {FORECAST_PLOT, FORECAST_ARTIFACT} <= artifacts
    run = mlflow_client.get_run(last.run_id)
    assert run.data.metrics["forecast_next_batch_gain"] == pytest.approx(forecast.batch_gain)
    assert forecast.recommendation in run.data.tags["forecast"]
    with temporary_settings({PREFECT_API_URL: settings.prefect.api_url}):
        publish_round_report(settings, last, catalog.rounds())
        with get_client(sync_client=True) as client:
            key = artifact_key(settings, "round-report")
            (artifact,) = client.read_artifacts(
                artifact_filter=ArtifactFilter(key=ArtifactFilterKey(any_=[key])), limit=1
            )
    assert "## Label-budget forecast" in artifact.data and forecast.recommendation in artifact.data

    status = _cli(monkeypatch, settings, "status")
    assert f"forecast (round {last.round_id})" in status and forecast.recommendation in status

    # `flywheel explain`: one sample's record, as a person reads it.
    sample = next(r for r in records.values() if r.round_id == reports[2].round_id and r.rank == 3)
    text = _cli(monkeypatch, settings, "explain", str(sample.sample_id))

    def row(key: str, value: str) -> bool:
        return re.search(rf"{re.escape(key)}\s*│\s*{re.escape(value)}", text) is not None

    assert row("round", str(reports[2].round_id)) and row("strategy", "auto") and row("annotators", me)
    assert row("scored by model version", reports[2].model_version) and row(
        "score / rank", f"{sample.score:.4g} / 3 of {K}"
    )
    assert sample.uri in text and "from sending the task to its first standing answer" in text
    missing = CliRunner().invoke(cli.app, ["explain", "999999"])
    assert missing.exit_code == 1 and "sample 999999 is not in the catalog" in missing.output
