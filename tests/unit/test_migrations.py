"""The catalog's alembic migrations on SQLite: the models and the revisions agree, a catalog from before alembic is
adopted with its rows, a newer catalog is refused, parallel openers migrate once. (PostgreSQL:
tests/integration/test_postgres.py.)"""

from __future__ import annotations

import sqlite3
import subprocess
import sys
from concurrent.futures import ProcessPoolExecutor
from datetime import datetime
from multiprocessing import get_context
from pathlib import Path

import pytest
from sqlalchemy import create_engine, inspect, text
from typer.testing import CliRunner

from flywheel.catalog import Catalog, Quarantined, migrations
from flywheel.errors import DataError

REPO = Path(__file__).resolve().parents[2]
PRE_ALEMBIC = REPO / "tests" / "data" / "catalog_62d1109.sql"


def _revision(url: str) -> str | None:
    engine = create_engine(url)
    try:
        with engine.connect() as conn:
            return migrations.current(conn)
    finally:
        engine.dispose()


def test_one_line_of_revisions_and_a_new_catalog_matches_the_models(tmp_path):
    assert len(migrations._scripts().get_heads()) == 1  # no branches left unmerged
    catalog = Catalog(f"sqlite:///{tmp_path / 'new.db'}")
    assert _revision(catalog.url) == migrations.head()
    assert migrations.differences(catalog.engine) == []  # autogenerate would write an empty revision
    assert migrations.upgrade(catalog.engine) is False  # reopening is one query, no migration


def test_a_catalog_from_before_alembic_is_adopted_with_its_rows(tmp_path):
    path = tmp_path / "old.db"
    with sqlite3.connect(path) as conn:
        conn.executescript(PRE_ALEMBIC.read_text())
    assert _revision(f"sqlite:///{path}") is None
    catalog = Catalog(f"sqlite:///{path}")
    assert _revision(catalog.url) == migrations.head()
    assert migrations.differences(catalog.engine) == []
    assert [(s.id, s.truth) for s in catalog.samples()] == [(1, "cat"), (2, "dog"), (3, "dog")]
    assert catalog.labels() == {1: "cat"} and catalog.get_meta("ls_project_id") == "7"
    assert catalog.sent_sample_ids() == {1, 2}
    (old,) = catalog.rounds()
    assert old.finished_at == old.started_at == datetime(2025, 3, 1, 10, 0)  # a round from then counts as finished
    assert catalog.start_round(strategy="auto", n_labels=1) == 2  # so a new round is not mistaken for a resume
    assert catalog.quarantine_samples({3: Quarantined("file:///data/dog/1.png", "duplicate")}, stage="select") == 1
    assert [s.id for s in catalog.samples()] == [1, 2]  # the table the old catalog lacked works
    columns = {c["name"] for c in inspect(catalog.engine).get_columns("annotations")}
    assert "ls_user_id" in columns


def test_a_catalog_written_by_a_newer_flywheel_is_refused(tmp_path):
    url = f"sqlite:///{tmp_path / 'newer.db'}"
    Catalog(url)
    engine = create_engine(url)
    with engine.begin() as conn:
        conn.execute(text("UPDATE alembic_version SET version_num = 'f00d'"))
    engine.dispose()
    with pytest.raises(DataError, match=r"newer\.db is at schema revision 'f00d'.*newest is '0001'.*upgrade flywheel"):
        Catalog(url)


def _open(url: str) -> str | None:
    return _revision(Catalog(url).url)


def test_parallel_openers_of_a_new_catalog_all_succeed(tmp_path):
    url = f"sqlite:///{tmp_path / 'shared.db'}"
    with ProcessPoolExecutor(4, mp_context=get_context("spawn")) as pool:
        revisions = list(pool.map(_open, [url] * 4))
    assert revisions == [migrations.head()] * 4
    assert migrations.differences(create_engine(url)) == []


def test_db_upgrade_command_and_the_alembic_command_line(tmp_path, monkeypatch):
    from flywheel.app.cli import app

    old = tmp_path / "old.db"
    with sqlite3.connect(old) as conn:
        conn.executescript(PRE_ALEMBIC.read_text())
    monkeypatch.setenv("FLYWHEEL_CATALOG_URL", f"sqlite:///{old}")
    monkeypatch.setenv("FLYWHEEL_WORKSPACE", str(tmp_path / "ws"))
    result = CliRunner().invoke(app, ["db", "upgrade"])
    assert result.exit_code == 0, result.output
    assert "from (none: made before alembic) to 0001" in result.output
    again = CliRunner().invoke(app, ["db", "upgrade"])
    assert again.exit_code == 0 and "already at 0001" in again.output

    fresh = f"sqlite:///{tmp_path / 'cli.db'}"
    ini = REPO / "flywheel" / "catalog" / "migrations" / "alembic.ini"
    alembic = [str(Path(sys.executable).parent / "alembic"), "-c", str(ini)]
    for args in (["upgrade", "head"], ["check"]):  # check: autogenerate finds nothing to write
        done = subprocess.run([*alembic, "-x", f"url={fresh}", *args], cwd=tmp_path, capture_output=True, text=True)
        assert done.returncode == 0, done.stderr
    assert _revision(fresh) == migrations.head()
    offline = [*alembic, "-x", "url=postgresql+psycopg://flywheel@db.example/flywheel", "upgrade", "head", "--sql"]
    script = subprocess.run(offline, cwd=tmp_path, capture_output=True, text=True)  # for a DBA: no server needed
    assert script.returncode == 0, script.stderr
    assert "CREATE TABLE samples" in script.stdout and "CREATE INDEX ix_annotations_sample_id" in script.stdout
    assert "INSERT INTO alembic_version (version_num) VALUES ('0001')" in script.stdout
