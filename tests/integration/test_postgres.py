"""PostgreSQL: the local Debian cluster (flywheel.devservers.postgres), the catalog and its migrations on it, and (in
the PostgreSQL pass) MLflow's and Prefect's stores there. The loop, Label Studio sync, provenance and deployment tests
also run against it: `make test` repeats them with FLYWHEEL_TEST_DB=postgres."""

from __future__ import annotations

import os
import shutil
from collections.abc import Iterator
from concurrent.futures import ProcessPoolExecutor
from datetime import UTC, datetime, timedelta
from multiprocessing import get_context
from pathlib import Path

import psycopg
import pytest
from sqlalchemy import create_engine, inspect, text

from flywheel.catalog import POOL, Base, Catalog, NewSample, Quarantined, migrations
from flywheel.config import Settings, load_settings
from flywheel.devservers import postgres
from tests.conftest import POSTGRES_WORKSPACE, TEST_POSTGRES

pytestmark = pytest.mark.integration


@pytest.fixture(scope="module")
def cluster() -> Settings:
    """The test cluster on 127.0.0.1:15432, started (or reused) here: the SQLite pass runs these tests too."""
    settings = load_settings(workspace=POSTGRES_WORKSPACE, postgres=TEST_POSTGRES.model_dump())
    postgres.start(settings)
    return settings


@pytest.fixture
def database(cluster: Settings) -> Iterator[str]:
    """A new, empty database on the cluster; its SQLAlchemy URL."""
    name = "scratch_" + os.urandom(4).hex()
    assert postgres.create_database(cluster.postgres, name)
    yield cluster.postgres.url(name)
    postgres.drop_database(cluster.postgres, name)


def _query(settings: Settings, sql: str, database: str = "postgres") -> list[tuple]:
    with psycopg.connect(postgres.admin_dsn(settings.postgres, database)) as conn:
        return conn.execute(sql).fetchall()


def test_the_cluster_starts_once_listens_on_loopback_only_and_runs_unprivileged(cluster):
    pid_file = postgres.data_dir(cluster) / "postmaster.pid"
    pid = int(pid_file.read_text().split()[0])
    assert postgres.start(cluster) == postgres.admin_dsn(cluster.postgres)  # healthy: reused, not restarted
    assert int(pid_file.read_text().split()[0]) == pid
    assert _query(cluster, "SHOW listen_addresses") == [("127.0.0.1",)]
    assert _query(cluster, "SHOW unix_socket_directories") == [("",)]
    status = Path(f"/proc/{pid}/status").read_text().splitlines()
    uid = next(line.split()[1] for line in status if line.startswith("Uid:"))
    assert uid != "0"  # PostgreSQL refuses root: under root it runs as the postgres system user
    assert not postgres.problem(cluster.postgres)


def test_a_cluster_for_a_workspace_closed_to_the_server_user_starts_and_stops(tmp_path):
    """Under root, pytest's private (0700) temporary folders are such a workspace: the data goes elsewhere."""
    settings = load_settings(workspace=tmp_path / "ws", postgres={"port": TEST_POSTGRES.port + 1})
    data = postgres.data_dir(settings)
    if os.geteuid() == 0:
        assert not data.is_relative_to(tmp_path) and data.name == "data"
    else:
        assert data == tmp_path / "ws" / "services" / "postgres"
    try:
        postgres.start(settings)
        assert not postgres.problem(settings.postgres) and (data / "PG_VERSION").is_file()
    finally:
        assert postgres.stop(settings)
        if os.geteuid() == 0:
            shutil.rmtree(data.parent)
    assert postgres.problem(settings.postgres)  # stopped: nothing answers any more


def test_only_urls_on_the_local_cluster_get_databases_there(cluster):
    local = cluster.model_copy(
        update={
            "catalog_url": TEST_POSTGRES.url("flywheel_catalog"),
            "mlflow": cluster.mlflow.model_copy(
                update={"backend_store_uri": "postgresql+psycopg://u@db.example:5432/m"}
            ),
            "prefect": cluster.prefect.model_copy(update={"database_url": TEST_POSTGRES.url("pf", driver="asyncpg")}),
        }
    )
    assert postgres.local_databases(local) == {"catalog": "flywheel_catalog", "prefect": "pf"}
    assert postgres.local_databases(cluster) == {}  # SQLite everywhere: nothing to start


def test_catalog_on_postgres_matches_the_models_and_stores_utc_whatever_the_session_zone(database):
    catalog = Catalog(database)
    assert migrations.differences(catalog.engine) == []
    with catalog.engine.connect() as conn:
        assert migrations.current(conn) == migrations.head()

    # A session in New York: timestamps must still be stored (and read back) as UTC.
    eastern = Catalog(f"{database}?options=-c%20timezone%3DAmerica/New_York")
    with eastern.engine.connect() as conn:
        assert conn.execute(text("SHOW timezone")).scalar() == "America/New_York"
    new = [NewSample(f"file:///p/{i}.png", f"{i:064x}", "cat" if i % 2 else "dog") for i in range(5)]
    result = eastern.add_samples(new, source="/p", split=POOL, classes=["cat", "dog"], trust_labels=True)
    assert (result.added, result.labelled) == (5, 5)
    round_id = eastern.start_round(strategy="auto", n_labels=5)
    eastern.finish_round(round_id, n_selected=2, holdout_accuracy=0.5)
    (row,) = catalog.rounds()
    assert abs(row.finished_at - datetime.now(UTC).replace(tzinfo=None)) < timedelta(minutes=1)
    assert row.started_at <= row.finished_at and row.n_selected == 2

    eastern.set_meta("ls_project_id", "3")
    eastern.set_meta("ls_project_id", "4")  # merge: an update, not a second row
    assert catalog.get_meta("ls_project_id") == "4"
    with eastern.transaction() as s:
        eastern.record_tasks(s, ls_project_id=4, task_ids={1: 11, 2: 12}, round_id=round_id, model_version="1",
                             scores={1: 0.9})  # fmt: skip
    assert catalog.sent_sample_ids() == {1, 2} and catalog.round_task_count(round_id) == 2
    assert catalog.quarantine_samples({3: Quarantined("file:///p/2.png", "truncated or corrupt")}, stage="embed") == 1
    assert [s.id for s in catalog.samples()] == [1, 2, 4, 5] and catalog.count_samples() == 4
    assert catalog.labels() == {i + 1: "cat" if i % 2 else "dog" for i in range(5)}


def test_a_catalog_made_on_postgres_before_alembic_is_adopted(database):
    """The way create_all left a PostgreSQL catalog: no quarantine table, no rounds.finished_at."""
    engine = create_engine(database)
    Base.metadata.create_all(engine)
    with engine.begin() as conn:
        conn.execute(text("DROP TABLE quarantine"))
        conn.execute(text("ALTER TABLE rounds DROP COLUMN finished_at"))
        conn.execute(
            text("INSERT INTO rounds (strategy, n_labels, n_selected, started_at) VALUES ('random', 0, 4, now())")
        )
    engine.dispose()

    catalog = Catalog(database)
    assert migrations.differences(catalog.engine) == []
    (old,) = catalog.rounds()
    assert old.finished_at == old.started_at and old.n_selected == 4
    assert catalog.start_round(strategy="auto", n_labels=0) == 2  # the old round is finished, not resumed
    assert inspect(catalog.engine).has_table("quarantine")


def _open(url: str) -> str | None:
    catalog = Catalog(url)
    with catalog.engine.connect() as conn:
        return migrations.current(conn)


def test_parallel_openers_of_a_new_postgres_catalog_all_succeed(database):
    with ProcessPoolExecutor(4, mp_context=get_context("spawn")) as pool:
        assert list(pool.map(_open, [database] * 4)) == [migrations.head()] * 4
    assert migrations.differences(create_engine(database)) == []


@pytest.mark.postgres_pass
def test_mlflow_and_prefect_keep_their_state_in_postgres(services):
    """The session's MLflow and Prefect servers write to their databases on the cluster, not to SQLite."""
    from mlflow import MlflowClient
    from prefect.client.orchestration import get_client
    from prefect.settings import PREFECT_API_URL, temporary_settings

    assert services.mlflow.backend_store_uri.startswith("postgresql+psycopg://")
    assert services.prefect.database_url.startswith("postgresql+asyncpg://")
    name = "pg-" + os.urandom(4).hex()
    experiment_id = MlflowClient(services.mlflow.url).create_experiment(name)
    assert _query(services, f"SELECT experiment_id FROM experiments WHERE name = '{name}'", "mlflow") == [
        (int(experiment_id),)
    ]
    with temporary_settings({PREFECT_API_URL: services.prefect.api_url}), get_client(sync_client=True) as client:
        flow_id = client.create_flow_from_name(name)
    assert _query(services, f"SELECT id::text FROM flow WHERE name = '{name}'", "prefect") == [(str(flow_id),)]
    assert not (services.workspace / "services" / "mlflow" / "mlflow.db").exists()
    assert not (services.workspace / "services" / "prefect" / "prefect.db").exists()
