"""infra/compose.yaml and the kubernetes work-pool job template, validated without a Docker daemon or a cluster.

compose: variables interpolated as docker compose does, then parsed by compose-spec (a strict Compose
Specification parser: unknown keys, bad ports and durations fail) plus the references it leaves unchecked
(depends_on targets, health conditions, named volumes); `docker compose config` too where the plugin exists.
The flywheel containers' FLYWHEEL_* variables must build valid settings. kubernetes: the job the Prefect
kubernetes worker would submit, rendered by prefect-kubernetes itself, validated against the Kubernetes
schemas in strict mode (unknown fields fail).
"""

from __future__ import annotations

import asyncio
import json
import os
import re
import shutil
import subprocess
import uuid
from pathlib import Path

import kubernetes_validate
import pytest
import yaml
from compose_spec import PyCompose

from flywheel.config import load_settings

INFRA = Path(__file__).resolve().parents[2] / "infra"
COMPOSE = INFRA / "compose.yaml"
ENV_EXAMPLE = INFRA / "compose.env.example"
_VARIABLE = re.compile(r"\$(?:(\$)|\{([A-Za-z_][A-Za-z0-9_]*)(?:(:?[-?])([^}]*))?\}|([A-Za-z_][A-Za-z0-9_]*))")


class MissingVariable(Exception):
    pass


def interpolate(text: str, env: dict[str, str]) -> str:
    """Compose's rules: $$ is a literal $; ${V:-d} / ${V-d} default when unset-or-empty / unset;
    ${V:?msg} / ${V?msg} fail with msg when unset-or-empty / unset; ${V} and $V are V or ""."""

    def one(match: re.Match) -> str:
        escaped, name, op, arg, bare = match.groups()
        if escaped:
            return "$"
        name = name or bare
        value = env.get(name)
        empty = value is None or (value == "" and op and op.startswith(":"))
        if op in (":-", "-"):
            return arg if empty else (value or "")
        if op in (":?", "?") and empty:
            raise MissingVariable(f"{name}: {arg}")
        return value or ""

    return _VARIABLE.sub(one, text)


def example_env() -> dict[str, str]:
    lines = [ln.strip() for ln in ENV_EXAMPLE.read_text().splitlines()]
    return dict(ln.split("=", 1) for ln in lines if ln and not ln.startswith("#"))


@pytest.fixture(scope="module")
def compose() -> dict:
    """The compose file as docker compose sees it with the example .env (merge keys resolved)."""
    return yaml.safe_load(interpolate(COMPOSE.read_text(), example_env()))


def test_compose_parses_under_the_compose_spec_and_its_references_resolve(compose):
    parsed = PyCompose.from_json(json.dumps(compose))  # strict: raises ValueError on any bad key
    parsed.validate()  # networks, volumes, configs, secrets used by services are declared
    services = compose["services"]
    assert set(parsed.service_names()) == set(services)
    assert {"postgres", "minio", "prefect-server", "prefect-worker", "mlflow", "label-studio", "webhook"} <= set(
        services
    )
    for name, service in services.items():
        deps = service.get("depends_on") or {}
        for target, rule in (deps if isinstance(deps, dict) else dict.fromkeys(deps, {})).items():
            assert target in services, f"{name} depends on unknown {target}"
            if rule.get("condition") == "service_healthy":
                assert "healthcheck" in services[target], f"{name} waits for {target} to be healthy: no healthcheck"
        for volume in service.get("volumes", []):
            source = volume.split(":")[0]
            assert source.startswith(".") or source in compose["volumes"], f"{name}: undeclared volume {source}"
            if source.startswith("."):
                assert (INFRA / source).is_file(), f"{name} mounts missing file {source}"
    if shutil.which("docker") and subprocess.run(["docker", "compose", "version"], capture_output=True).returncode == 0:
        env_file = ["--env-file", str(ENV_EXAMPLE)]
        done = subprocess.run(["docker", "compose", "-f", str(COMPOSE), *env_file, "config", "-q"], capture_output=True)
        assert done.returncode == 0, done.stderr.decode()


def test_compose_refuses_to_start_without_its_secrets():
    env = example_env()
    del env["POSTGRES_PASSWORD"]
    with pytest.raises(MissingVariable, match="POSTGRES_PASSWORD: set POSTGRES_PASSWORD in infra/.env"):
        interpolate(COMPOSE.read_text(), env)
    assert interpolate("a $$b ${X:-d} ${Y-e} ${Z}", {"Y": ""}) == "a $b d  "


def test_postgres_backs_prefect_mlflow_and_label_studio_and_minio_holds_the_artifacts(compose):
    services = compose["services"]
    init = (INFRA / "compose" / "postgres-init.sql").read_text()
    databases = set(re.findall(r"CREATE DATABASE (\w+);", init))
    assert databases == {"prefect", "mlflow", "labelstudio", "flywheel"}
    prefect_db = services["prefect-server"]["environment"]["PREFECT_API_DATABASE_CONNECTION_URL"]
    assert prefect_db == "postgresql+asyncpg://flywheel:CHANGE-ME-postgres@postgres:5432/prefect"
    mlflow_args = services["mlflow"]["command"]
    assert "--backend-store-uri=postgresql+psycopg://flywheel:CHANGE-ME-postgres@postgres:5432/mlflow" in mlflow_args
    assert "--artifacts-destination=s3://mlflow/" in mlflow_args
    assert services["mlflow"]["environment"]["MLFLOW_S3_ENDPOINT_URL"] == "http://minio:9000"
    assert "local/mlflow" in services["minio-init"]["command"][0]  # the bucket MLflow writes to exists
    ls = services["label-studio"]["environment"]
    assert (ls["DJANGO_DB"], ls["POSTGRE_HOST"], ls["POSTGRE_NAME"]) == ("default", "postgres", "labelstudio")
    for name in ("prefect-server", "mlflow", "label-studio"):
        assert services[name]["depends_on"]["postgres"]["condition"] == "service_healthy"


def test_published_ports_listen_on_loopback_only(compose):
    published = [(n, p) for n, s in compose["services"].items() for p in s.get("ports", [])]
    assert published and all(str(p).startswith("127.0.0.1:") for _, p in published), published


def test_flywheel_containers_get_valid_settings(compose, monkeypatch, tmp_path):
    for name in ("prefect-worker", "webhook", "deploy", "dask-worker"):
        env = compose["services"][name]["environment"]
        for key in [k for k in os.environ if k.startswith("FLYWHEEL_")]:
            monkeypatch.delenv(key)
        monkeypatch.chdir(tmp_path)  # no flywheel.toml here
        for key, value in env.items():
            monkeypatch.setenv(key, str(value))
        settings = load_settings()  # a misspelt FLYWHEEL_* variable fails here
        assert settings.workspace == Path("/data/flywheel") and settings.label_studio.url == "http://label-studio:8080"
        assert settings.mlflow.url == "http://mlflow:5000" and settings.prefect.api_url == env["PREFECT_API_URL"]
        assert settings.webhook.secret.get_secret_value() == "CHANGE-ME-webhook-secret"
        assert settings.storage.endpoint == "http://minio:9000"
        # the catalog in PostgreSQL's `flywheel` database; its password only in libpq's PGPASSWORD
        assert settings.catalog_url == "postgresql+psycopg://flywheel@postgres:5432/flywheel"
        assert env["PGPASSWORD"] == "CHANGE-ME-postgres"


@pytest.mark.integration
def test_kubernetes_work_pool_job_is_a_valid_kubernetes_job(services):
    """The job prefect-kubernetes builds from infra/work-pools/kubernetes.json for a flow run, strictly valid."""
    from prefect.client.schemas.objects import FlowRun
    from prefect_kubernetes.worker import KubernetesWorkerJobConfiguration

    from flows.deploy import prefect_api

    template = json.loads((INFRA / "work-pools" / "kubernetes.json").read_text())
    values = {"name": "flywheel-round", "workspace_claim": "flywheel-workspace", "service_account_name": "flywheel"}
    with prefect_api(services):  # resolving the template may call the API (blocks, variables)
        config = asyncio.run(KubernetesWorkerJobConfiguration.from_template_and_values(template, values))
    config.prepare_for_flow_run(FlowRun(flow_id=uuid.uuid4(), name="a-flow-run"))
    job = config.job_manifest
    kubernetes_validate.validate(job, kubernetes_validate.latest_version(), strict=True)
    pod = job["spec"]["template"]["spec"]
    container = pod["containers"][0]
    env = {e["name"]: e.get("value") for e in container["env"]}
    assert env["FLYWHEEL_WORKSPACE"] == "/data/flywheel" and "PREFECT__FLOW_RUN_ID" in env
    assert container["volumeMounts"][0]["mountPath"] == "/data/flywheel"
    assert pod["volumes"][0]["persistentVolumeClaim"]["claimName"] == "flywheel-workspace"
    bad = json.loads(json.dumps(job))
    bad["spec"]["template"]["spec"]["parallelism"] = 1  # a Job field in the pod spec: strict validation catches it
    with pytest.raises(kubernetes_validate.ValidationError, match="parallelism"):
        kubernetes_validate.validate(bad, kubernetes_validate.latest_version(), strict=True)
