"""Generated requests against every HTTP endpoint the flywheel serves (the webhook receiver and the ML backend),
with and without the secret: never a 5xx, every 4xx says what was wrong in `error`, and an unauthenticated
or malformed request changes nothing in the catalog. Bodies: random JSON (deeply nested, unicode in every
field, wrong types), bytes that are not JSON, and oversized ones. A bounded, derandomised slice runs in
`make test`; FUZZ_EXAMPLES raises the count."""

from __future__ import annotations

import json
import os
from collections.abc import Iterator
from pathlib import Path
from typing import Any

import pytest
from fastapi.testclient import TestClient
from hypothesis import HealthCheck, given, settings
from hypothesis import strategies as st
from pydantic import SecretStr
from sqlalchemy import func, select

from flywheel.app.webhook import create_app
from flywheel.catalog import Catalog, Label, WebhookEvent
from flywheel.labelstudio import META_PROJECT_ID, SECRET_HEADER
from tests.conftest import settings_for

SECRET = "fuzz-secret"
PROJECT = 424242
EXAMPLES = int(os.environ.get("FUZZ_EXAMPLES", "150"))
ENDPOINTS = ("/webhook", "/predict", "/setup")
COUNT: dict[str, int] = {"requests": 0, "server_errors": 0}

text = st.text(st.characters(codec="utf-8"), max_size=40)
scalars = st.none() | st.booleans() | st.integers() | st.floats(allow_nan=False) | text
json_values = st.recursive(
    scalars, lambda inner: st.lists(inner, max_size=4) | st.dictionaries(text, inner, max_size=4), max_leaves=30
)
actions = st.sampled_from(["ANNOTATION_CREATED", "ANNOTATIONS_CREATED", "ANNOTATION_UPDATED",
                           "ANNOTATIONS_DELETED", "START_TRAINING", "PROJECT_UPDATED"]) | text  # fmt: skip
# Shapes close to what Label Studio sends, with every field free to be wrong: they get past the first checks.
near_miss = st.fixed_dictionaries(
    {"action": actions, "project": st.fixed_dictionaries({"id": st.integers() | text}) | json_values},
    optional={"annotation": json_values, "annotations": st.lists(json_values, max_size=3), "task": json_values,
              "tasks": st.lists(st.fixed_dictionaries({"id": st.integers() | text, "data": json_values}), max_size=3)},
)  # fmt: skip
bodies = near_miss.map(json.dumps) | json_values.map(json.dumps) | st.binary(max_size=200).map(bytes.hex)
auth = st.sampled_from([None, SECRET, "wrong"])


@pytest.fixture(scope="module")
def app(tmp_path_factory: pytest.TempPathFactory) -> Iterator[tuple[TestClient, Catalog]]:
    workspace = tmp_path_factory.mktemp("fuzz")
    config = settings_for(workspace / "ws")
    nobody = {"port": 9}  # MLflow and Prefect: nobody answers there, as when the servers are down
    config = config.model_copy(
        update={
            "webhook": config.webhook.model_copy(update={"secret": SecretStr(SECRET), "emit_events": False}),
            "mlflow": config.mlflow.model_copy(update=nobody),
            "prefect": config.prefect.model_copy(update=nobody),
        }
    )
    catalog = Catalog(config.catalog_url)
    catalog.set_meta(META_PROJECT_ID, str(PROJECT))
    with TestClient(create_app(config, catalog), raise_server_exceptions=False) as client:
        yield client, catalog
    assert COUNT["server_errors"] == 0
    print(f"fuzz: {COUNT['requests']} requests, {COUNT['server_errors']} server errors")


def _state(catalog: Catalog) -> tuple[int, int]:
    with catalog.transaction() as s:
        return s.scalar(select(func.count()).select_from(WebhookEvent)) or 0, s.scalar(
            select(func.count()).select_from(Label)
        ) or 0


def _send(client: TestClient, path: str, body: str, secret: str | None) -> Any:
    headers = {"content-type": "application/json"} | ({SECRET_HEADER: secret} if secret is not None else {})
    COUNT["requests"] += 1
    response = client.post(path, content=body.encode(), headers=headers)
    COUNT["server_errors"] += response.status_code >= 500 and response.status_code != 503
    return response


@settings(max_examples=EXAMPLES, derandomize=True, deadline=None, suppress_health_check=[HealthCheck.too_slow])
@given(path=st.sampled_from(ENDPOINTS), body=bodies, secret=auth)
def test_no_server_error_and_every_refusal_says_why(app: tuple[TestClient, Catalog], path: str, body: str,
                                                    secret: str | None) -> None:  # fmt: skip
    client, catalog = app
    before = _state(catalog)
    response = _send(client, path, body, secret)
    assert response.status_code < 500 or response.status_code == 503, (path, body, response.text)
    if response.status_code >= 400:
        assert isinstance(response.json().get("error"), str) and response.json()["error"], response.text
    if secret != SECRET:
        assert response.status_code == 401 and _state(catalog) == before  # nothing recorded, nothing applied
    elif response.status_code >= 400:
        assert _state(catalog)[1] == before[1]  # a refused request applies no label


def test_oversized_and_wrong_content_type(app: tuple[TestClient, Catalog], tmp_path: Path) -> None:
    client, catalog = app
    before = _state(catalog)
    huge = "x" * (60 * 1024 * 1024)
    for path in ("/webhook", "/predict"):
        assert _send(client, path, huge, SECRET).status_code == 413
    for path in ENDPOINTS[:2]:
        response = client.post(path, content=b"<xml/>", headers={SECRET_HEADER: SECRET, "content-type": "text/xml"})
        COUNT["requests"] += 1
        assert response.status_code == 400 and "error" in response.json()
    deep = "[" * 5000 + "]" * 5000
    assert _send(client, "/webhook", deep, SECRET).status_code == 400
    assert _state(catalog)[1] == before[1]
