"""The flywheel as Label Studio's ML backend, against the real servers: connected on the project's Model page,
Label Studio's own "Retrieve predictions" fills 50 tasks (pool samples from their cached vectors, hand-imported
images through the champion's body) with the champion's version, an annotation reaches the catalog through
the backend's webhook, and Start Training asks for a fine-tune with the threshold's Prefect event."""

from __future__ import annotations

import base64
from collections.abc import Iterator
from datetime import UTC, datetime, timedelta
from pathlib import Path
from typing import cast

import httpx
import numpy as np
import pytest
from label_studio_sdk import ImportApiRequest
from pydantic import SecretStr

from bench.webhook_burst import serving
from flywheel import labelstudio, loop
from flywheel.app import mlbackend
from flywheel.app.serve import create_app as create_serve_app
from flywheel.app.webhook import THRESHOLD_REACHED, create_app
from flywheel.catalog import Catalog
from flywheel.config import Settings
from flywheel.labelstudio.interface import choice_result, result_choices
from flywheel.labelstudio.media import image_url
from flywheel.labelstudio.sync import users_by_id
from flywheel.loop.state import load
from flywheel.registry import tracking
from flywheel.serving.champion import ChampionSource, predict
from flywheel.simulation.datasets import materialize_builtin
from flywheel.sources.importing import import_source
from flywheel.training.finetune import predict_proba as finetune_predict_proba
from tests.integration.labelstudio_support import prefect_events, with_section
from tests.integration.test_far_domain import _label
from tests.integration.test_webhook import wait_for

pytestmark = pytest.mark.integration
SECRET = "ml-backend-test-secret"


@pytest.fixture
def served(settings: Settings) -> Iterator[tuple[Settings, Catalog, int, str]]:
    """A project after one round (a champion, its tasks), with the receiver and ML backend on a free port."""
    settings = with_section(settings.model_copy(update={"k_per_round": 10}), "webhook", secret=SecretStr(SECRET))
    catalog = Catalog(settings.catalog_url)
    import_source(catalog, settings, str(materialize_builtin("digits", settings.dirs.sources / "simulate")))
    _label(catalog, 3)
    ls, client = labelstudio.connect(settings), tracking.connect(settings)
    report = loop.run_round(settings, catalog, ls, client, progress=False)
    assert report.promoted and report.model_version is not None
    with serving(create_app(settings, catalog, users=lambda: users_by_id(ls))) as port:
        settings = with_section(settings, "webhook", url=f"http://127.0.0.1:{port}/webhook")
        yield settings, catalog, port, report.model_version


def test_label_studio_uses_the_flywheel_as_its_ml_backend(served: tuple[Settings, Catalog, int, str]) -> None:
    settings, catalog, port, champion = served
    ls = labelstudio.connect(settings)
    project_id = int(catalog.get_meta("ls_project_id") or 0)
    labelstudio.ensure_webhook(ls, settings, project_id)  # as `flywheel webhook` does before it connects
    mlbackend.connect_when_up(settings, ls, project_id).join(60)

    (backend,) = ls.ml.list(project=project_id)  # the Model page: connected, interactive, the champion's version
    assert backend.url == f"http://127.0.0.1:{port}" and backend.is_interactive and backend.auth_method == "BASIC_AUTH"
    assert backend.model_version == champion and backend.state == "CO", backend.error_message
    assert [h.url for h in ls.webhooks.list(project=str(project_id))] == [settings.webhook.endpoint]  # no 2nd hook

    # 50 tasks nobody pushed predictions for: 25 pool samples (cached vectors), 25 images Label Studio only knows.
    samples = [s for s in catalog.samples() if s.id not in catalog.sent_sample_ids()][:50]
    data = [
        {"image": image_url(s.uri, settings), **({"sample_id": s.id} if k < 25 else {})} for k, s in enumerate(samples)
    ]
    request = cast(list[ImportApiRequest], data)  # the SDK sends dicts as they are
    imported = ls.projects.import_tasks(project_id, request=request, return_task_ids=True)
    task_ids = [int(t) for t in getattr(imported, "task_ids", None) or []]
    assert len(task_ids) == 50
    ls.actions.create(
        id="retrieve_tasks_predictions", project=project_id, selected_items={"all": False, "included": task_ids}
    )
    by_task = {int(p.task): p for p in ls.predictions.list(project=project_id) if int(p.task) in set(task_ids)}
    assert sorted(by_task) == sorted(task_ids) and {p.model_version for p in by_task.values()} == {champion}

    # The same answers as the champion gives: from cached vectors for pool samples, from the images otherwise.
    source = ChampionSource(settings)
    loaded = source.current()
    assert loaded is not None and loaded.version == champion
    expected = predict(loaded, [s.id for s in samples], [s.uri for s in samples])
    labels = [result_choices(by_task[t].result)[0] for t in task_ids]
    agree = np.mean([loaded.classes[int(row.argmax())] == label for row, label in zip(expected, labels, strict=True)])
    assert agree >= 0.96, agree  # pool samples exactly; a fresh forward pass may differ on a near tie

    # Refused without the secret; a malformed request says what is wrong.
    url = f"http://127.0.0.1:{port}"
    assert httpx.post(f"{url}/predict", json={"tasks": []}, trust_env=False).status_code == 401
    auth = {"authorization": "Basic " + base64.b64encode(f"flywheel:{SECRET}".encode()).decode()}
    bad = httpx.post(f"{url}/predict", json={"tasks": [{"id": 1}]}, headers=auth, trust_env=False)
    assert bad.status_code == 400 and "data" in bad.json()["error"]

    # An annotation made in Label Studio reaches the catalog through the backend's webhook.
    sample = samples[0]
    ls.annotations.create(id=task_ids[0], result=choice_result(sample.truth or "0"))
    wait_for(lambda: catalog.labels().get(sample.id) == sample.truth)
    assert catalog.labels().get(sample.id) == sample.truth

    # Start Training on the Model page asks for a fine-tune with the threshold's event, once.
    since = datetime.now(UTC) - timedelta(seconds=5)
    ls.ml.train(id=int(backend.id or 0))
    (event,) = prefect_events(settings, THRESHOLD_REACHED, since, want=1)
    assert event.payload == {"requested_by": "Label Studio: Start Training"}
    assert mlbackend.disconnect(settings, ls, project_id) == 1 and not ls.ml.list(project=project_id)


def test_predict_refuses_an_image_outside_the_document_root(tmp_path: Path) -> None:
    from flywheel.errors import DataError
    from flywheel.labelstudio.mlbackend import task_images

    with pytest.raises(DataError, match=r"tasks\[0\].*data"):
        task_images([{"id": 1}], document_root=tmp_path)
    with pytest.raises(DataError, match="not a file below the document root"):
        task_images([{"id": 1, "data": {"image": "/data/local-files/?d=../../etc/passwd"}}], document_root=tmp_path)
    (image,) = task_images(
        [{"id": 7, "data": {"image": "/data/local-files/?d=a/b.png", "sample_id": 3}}], document_root=tmp_path
    )
    assert (image.task_id, image.sample_id, image.location) == (7, 3, str(tmp_path / "a" / "b.png"))


def test_flywheel_serve_answers_as_the_champion_and_follows_its_alias(
    served: tuple[Settings, Catalog, int, str],
) -> None:
    settings, catalog, _, champion = served
    settings = with_section(settings, "serve", recheck_s=0.0, token=SecretStr("serve-token"))
    samples = catalog.samples()[:4]
    paths = [s.uri for s in samples]
    model = load(tracking.connect(settings), settings, champion)
    expected = finetune_predict_proba(model, paths, device="cpu")
    bearer = {"authorization": "Bearer serve-token"}
    with serving(create_serve_app(settings, ChampionSource(settings, recheck_s=0.0))) as port:
        url = f"http://127.0.0.1:{port}/predict"
        raw = httpx.post(url, content=Path(paths[0]).read_bytes(), headers={**bearer, "content-type": "image/png"})
        encoded = [base64.b64encode(Path(p).read_bytes()).decode() for p in paths[1:]]
        batch = httpx.post(url, json={"images": [f"data:image/png;base64,{encoded[0]}", *encoded[1:]]}, headers=bearer)
        assert raw.status_code == 200 and batch.status_code == 200, (raw.text, batch.text)
        answers = [*raw.json()["predictions"], *batch.json()["predictions"]]
        assert {raw.json()["model_version"], batch.json()["model_version"]} == {champion}
        got = np.array([[a["probabilities"][c] for c in model.classes] for a in answers])
        np.testing.assert_allclose(got, expected, atol=1e-4)  # the champion's own answers on the same images
        assert [a["label"] for a in answers] == [model.classes[int(k)] for k in expected.argmax(1)]

        assert httpx.post(url, content=b"x").status_code == 401  # the token is required once set
        broken = httpx.post(url, json={"images": ["not base64!"]}, headers=bearer)
        assert broken.status_code == 400 and "images[0]" in broken.json()["error"]
        garbage = httpx.post(url, content=b"not an image", headers={**bearer, "content-type": "image/png"})
        assert garbage.status_code == 400 and garbage.json()["error"].startswith("images[0]: not an image")

        # A promotion moves the alias: the next answer comes from the new champion, without a restart.
        _label(catalog, 8, seed=1)
        ls, client = labelstudio.connect(settings), tracking.connect(settings)
        second = loop.run_round(settings, catalog, ls, client, progress=False)
        assert second.promoted and second.model_version != champion, second.promotion_reason
        again = httpx.post(url, content=Path(paths[0]).read_bytes(), headers={**bearer, "content-type": "image/png"})
        assert again.json()["model_version"] == second.model_version
