"""Let no one in: servers listen on loopback only; tokens and passwords come from the environment or Prefect
Secret blocks and never show up in the CLI's output, the logs, the workspace, Prefect or MLflow."""

from __future__ import annotations

import json
import os
import subprocess
import sys
from datetime import UTC, datetime
from pathlib import Path

import httpx
import pytest
from mlflow import MlflowClient
from prefect.blocks.system import Secret
from prefect.client.orchestration import get_client
from prefect.settings import PREFECT_API_URL, temporary_settings
from pydantic import SecretStr

from flows.common import _valid_overrides, with_secret_blocks
from flywheel import labelstudio
from flywheel.catalog import Catalog
from flywheel.config import LOOPBACK, load_settings
from flywheel.devservers import services as servers
from flywheel.errors import ConfigError
from flywheel.sources.importing import import_source
from tests.conftest import REPO, TEST_PORTS, TEST_WORKSPACE, no_settings_file

pytestmark = pytest.mark.integration


def _listening(port: int) -> set[str]:
    """Local addresses (hex, as /proc/net shows them) with a socket listening on `port`."""
    found = set()
    for table in ("/proc/net/tcp", "/proc/net/tcp6"):
        for line in Path(table).read_text().splitlines()[1:]:
            local, state = line.split()[1], line.split()[3]
            address, hex_port = local.split(":")
            if state == "0A" and int(hex_port, 16) == port:  # 0A: LISTEN
                found.add(address)
    return found


def test_every_server_binds_loopback_by_default(services):
    defaults = load_settings(workspace=TEST_WORKSPACE)
    assert {defaults.label_studio.host, defaults.mlflow.host, defaults.prefect.host, defaults.webhook.host} == {
        LOOPBACK
    }
    for name in servers.SERVICES:
        argv = servers._spec(name, defaults).argv
        hosts = [argv[i + 1] for i, arg in enumerate(argv) if arg in ("--host", "--internal-host")]
        assert hosts and all(h in (LOOPBACK, f"http://{LOOPBACK}:{defaults.label_studio.port}") for h in hosts), argv
        assert "0.0.0.0" not in " ".join(argv)
    for port in TEST_PORTS.values():  # the running servers: 127.0.0.1 only, neither 0.0.0.0 nor [::]
        assert _listening(port) == {"0100007F"}, f"port {port} listens on {_listening(port)}"


def _scan(where: str, text: str | bytes, secrets: dict[str, str]) -> None:
    data = text if isinstance(text, bytes) else text.encode()
    leaked = [name for name, value in secrets.items() if value.encode() in data]
    assert not leaked, f"{', '.join(leaked)} found in {where}"


def test_a_round_through_the_cli_leaks_no_secret(settings):
    secrets = {
        "label_studio.token": settings.label_studio.token.get_secret_value(),
        "label_studio.password": settings.label_studio.password.get_secret_value(),
        "storage.access_key": "AKIA" + os.urandom(8).hex().upper(),
        "storage.secret_key": "sk-" + os.urandom(16).hex(),
    }
    catalog = Catalog(settings.catalog_url)
    import_source(catalog, settings, "fashion-mnist", pool_size=60, test_size=20)
    with catalog.transaction() as session:  # half the pool labelled: the round trains, registers and pushes
        for sample in catalog.samples()[:30]:
            catalog.upsert_label(session, sample_id=sample.id, label=sample.truth, annotator="t", ls_annotation_id=None)
    env = {k: v for k, v in os.environ.items() if not k.startswith(("FLYWHEEL_", "PREFECT_API"))}
    env.update(
        FLYWHEEL_CONFIG=no_settings_file(settings.workspace),
        FLYWHEEL_WORKSPACE=str(settings.workspace),
        FLYWHEEL_PROJECT=settings.project,
        FLYWHEEL_IMAGE_SIZE="32",
        FLYWHEEL_K_PER_ROUND="10",
        FLYWHEEL_LABEL_STUDIO__PORT=str(TEST_PORTS["label_studio"]),
        FLYWHEEL_MLFLOW__PORT=str(TEST_PORTS["mlflow"]),
        FLYWHEEL_PREFECT__PORT=str(TEST_PORTS["prefect"]),
        FLYWHEEL_LABEL_STUDIO__TOKEN=secrets["label_studio.token"],
        FLYWHEEL_LABEL_STUDIO__PASSWORD=secrets["label_studio.password"],
        FLYWHEEL_STORAGE__ACCESS_KEY=secrets["storage.access_key"],
        FLYWHEEL_STORAGE__SECRET_KEY=secrets["storage.secret_key"],
    )
    started = datetime.now(UTC)
    done = subprocess.run(
        [sys.executable, "-m", "flywheel.app.cli", "round"],
        env=env,
        cwd=REPO,
        capture_output=True,
        text=True,
        timeout=600,
    )
    assert done.returncode == 0, done.stdout[-2000:] + done.stderr[-3000:]
    assert "round 1: 30 labels" in done.stdout and "selected 10" in done.stdout
    _scan("the CLI's output", done.stdout + done.stderr, secrets)

    files = [p for p in settings.workspace.rglob("*") if p.is_file()]
    assert any(p.name == "catalog.db" for p in files) and any(p.suffix == ".npz" for p in files)  # embedding parts
    for path in files:  # catalog, embeddings, reports, persisted Prefect results, logs
        _scan(str(path), path.read_bytes(), secrets)
    for log in (TEST_WORKSPACE / "logs").glob("*.log"):  # the servers' own logs
        _scan(str(log), log.read_bytes(), secrets)

    mlflow = MlflowClient(settings.mlflow.url, registry_uri=settings.mlflow.url)
    experiment = mlflow.get_experiment_by_name(settings.experiment_name)
    (run,) = mlflow.search_runs([experiment.experiment_id])
    assert run.data.params["kind"] == "head"
    _scan("the MLflow run's params and tags", json.dumps([run.data.params, run.data.tags]), secrets)
    for version in mlflow.search_model_versions(f"name='{settings.registered_model_name}'"):
        _scan(f"model version {version.version}'s tags", json.dumps(version.tags), secrets)
    artifacts = TEST_WORKSPACE / "services" / "mlflow" / "artifacts" / experiment.experiment_id
    stored = [p for p in artifacts.rglob("*") if p.is_file()]
    assert stored  # the model and its pictures
    for path in stored:
        _scan(str(path), path.read_bytes(), secrets)

    api = settings.prefect.api_url
    runs = httpx.post(
        f"{api}/flow_runs/filter",
        json={"flow_runs": {"start_time": {"after_": started.isoformat()}}, "flows": {"name": {"any_": ["round"]}}},
    ).json()
    assert runs, "the round ran as a Prefect flow"
    _scan("Prefect flow run parameters", json.dumps([r["parameters"] for r in runs]), secrets)
    logs = httpx.post(f"{api}/logs/filter", json={"logs": {"flow_run_id": {"any_": [r["id"] for r in runs]}}})
    assert logs.json(), "the round logged to Prefect"
    _scan("Prefect logs", logs.text, secrets)


def test_secrets_come_from_prefect_secret_blocks_and_never_from_flow_parameters(settings):
    real = settings.label_studio.token.get_secret_value()
    block = f"flywheel-{settings.project}-ls-token"
    with temporary_settings({PREFECT_API_URL: settings.prefect.api_url}):
        Secret(value=SecretStr(real)).save(block, overwrite=True)
        try:
            wrong = settings.label_studio.model_copy(update={"token": SecretStr("not-the-token")})
            configured = settings.model_copy(
                update={"label_studio": wrong, "secret_blocks": {"label_studio.token": block}}
            )
            resolved = with_secret_blocks(configured)
            assert resolved.label_studio.token.get_secret_value() == real
            labelstudio.connect(resolved)  # the server accepts the token read from the block
            missing = settings.model_copy(update={"secret_blocks": {"label_studio.token": "no-such-block-zz"}})
            with pytest.raises(ConfigError, match=r"label_studio\.token names Prefect Secret block 'no-such-block-zz'"):
                with_secret_blocks(missing)
        finally:
            with get_client(sync_client=True) as client:
                client.delete_block_document(Secret.load(block)._block_document_id)
    with pytest.raises(ValueError, match=r"label_studio\.token: secrets are not flow parameters"):
        _valid_overrides({"label_studio": {"token": "hunter2"}})
    with pytest.raises(ConfigError, match=r"secret_blocks: .*\['mlflow\.port'\] are not secret settings"):
        load_settings(secret_blocks={"mlflow.port": "x"})
