"""Shared fixtures. Integration tests talk to real servers started (or reused) on test ports.

The test servers live in their own workspace (`.flywheel-test/` at the repo root, or
FLYWHEEL_TEST_WORKSPACE) on ports that do not clash with the demo's, so `make test` can run while the
demo's servers are up (FLYWHEEL_TEST_PORT_OFFSET moves them all, for a second set beside the first).

FLYWHEEL_TEST_DB=postgres runs the session on PostgreSQL (a local cluster on 127.0.0.1:15432,
flywheel.devservers.postgres): each test's catalog is a database of its own, and the session has its own MLflow and
Prefect servers whose stores are databases there (ports 15001 and 14201, workspace `<test workspace>/postgres`).
Label Studio is shared.
"""

from __future__ import annotations

import os
from collections.abc import Iterator
from pathlib import Path

import pytest

from flywheel.config import PostgresSettings, Settings, load_settings

REPO = Path(__file__).resolve().parents[1]
TEST_DB = os.environ.get("FLYWHEEL_TEST_DB", "sqlite")
if TEST_DB not in ("sqlite", "postgres"):
    raise ValueError(f"FLYWHEEL_TEST_DB={TEST_DB!r}: choose sqlite or postgres")
ON_POSTGRES = TEST_DB == "postgres"
_BASE_WORKSPACE = Path(os.environ.get("FLYWHEEL_TEST_WORKSPACE", REPO / ".flywheel-test"))
POSTGRES_WORKSPACE = _BASE_WORKSPACE / "postgres"  # the cluster's data, and the PostgreSQL pass's servers
TEST_WORKSPACE = POSTGRES_WORKSPACE if ON_POSTGRES else _BASE_WORKSPACE
_PORT_OFFSET = int(os.environ.get("FLYWHEEL_TEST_PORT_OFFSET", "0"))  # `make upgrade-check`: servers of its own
TEST_PORTS = {
    "label_studio": 18080 + _PORT_OFFSET,
    "mlflow": (15001 if ON_POSTGRES else 15000) + _PORT_OFFSET,
    "prefect": (14201 if ON_POSTGRES else 14200) + _PORT_OFFSET,
}
TEST_POSTGRES = PostgresSettings(port=15432)


def settings_for(workspace: Path, **overrides: object) -> Settings:
    """Settings pointing at the shared test servers, with a private catalog and data under `workspace`."""
    mlflow: dict[str, object] = {"port": TEST_PORTS["mlflow"]}
    prefect: dict[str, object] = {"port": TEST_PORTS["prefect"]}
    if ON_POSTGRES:
        mlflow["backend_store_uri"] = TEST_POSTGRES.url("mlflow")
        prefect["database_url"] = TEST_POSTGRES.url("prefect", driver="asyncpg")
    return load_settings(
        workspace=workspace,
        label_studio={"port": TEST_PORTS["label_studio"]},
        mlflow=mlflow,
        prefect=prefect,
        postgres={"port": TEST_POSTGRES.port},
        **overrides,
    )


def no_settings_file(workspace: Path) -> str:
    """An empty settings file for FLYWHEEL_CONFIG: a child process then reads no flywheel.toml of the repository."""
    path = workspace / "empty-flywheel.toml"
    path.parent.mkdir(parents=True, exist_ok=True)
    path.write_text("")
    return str(path)


def pytest_collection_modifyitems(config: pytest.Config, items: list[pytest.Item]) -> None:
    """Each pass runs its own tests (`make test` runs both): postgres_pass needs the PostgreSQL pass's servers,
    sqlite_pass adds nothing on PostgreSQL that the other tests there do not cover. Left out, never skipped."""
    other_pass = "sqlite_pass" if ON_POSTGRES else "postgres_pass"
    left_out = [item for item in items if item.get_closest_marker(other_pass)]
    if left_out:
        config.hook.pytest_deselected(items=left_out)
        items[:] = [item for item in items if not item.get_closest_marker(other_pass)]


@pytest.fixture(scope="session")
def server_settings() -> Settings:
    """Settings whose workspace holds the servers' state and logs (shared by the whole session)."""
    return settings_for(TEST_WORKSPACE)


@pytest.fixture(scope="session")
def services(server_settings: Settings) -> Settings:
    """Start (or reuse) real Label Studio, MLflow and Prefect servers on 127.0.0.1 for this session."""
    from flywheel.devservers import services as svc

    svc.start(server_settings)
    return server_settings


@pytest.fixture
def settings(tmp_path: Path, services: Settings) -> Iterator[Settings]:
    """Per-test settings: the shared servers, a fresh catalog and workspace, a unique project name."""
    project = "t" + os.urandom(4).hex()
    if not ON_POSTGRES:
        yield settings_for(tmp_path / "ws", project=project)
        return
    from flywheel.devservers import postgres

    database = f"catalog_{project}"
    postgres.create_database(TEST_POSTGRES, database)
    yield settings_for(tmp_path / "ws", project=project, catalog_url=TEST_POSTGRES.url(database))
    postgres.drop_database(TEST_POSTGRES, database)
