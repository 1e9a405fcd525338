"""The catalog's schema history, as alembic revisions in `versions/`.

A Catalog brings its database to the newest revision when it opens (`upgrade`); `flywheel db upgrade` does the
same by hand. Parallel openers (Dask workers, flows, the webhook receiver) are serialised: an advisory lock on
PostgreSQL, a lock file beside a SQLite catalog. A catalog made before alembic (tables from create_all, no
alembic_version) is adopted by the first revision: missing tables and columns are added, rows kept.
"""

from __future__ import annotations

import functools
from collections.abc import Iterator
from contextlib import contextmanager
from pathlib import Path
from typing import Any

from alembic import command
from alembic.autogenerate import compare_metadata
from alembic.config import Config
from alembic.runtime.migration import MigrationContext
from alembic.script import ScriptDirectory
from sqlalchemy import text
from sqlalchemy.engine import Connection, Engine

from flywheel.catalog.models import Base
from flywheel.errors import DataError
from flywheel.locking import waiting_lock

SCRIPTS = Path(__file__).resolve().parent
_PG_LOCK_KEY = 0x666C7977  # "flyw": one advisory lock id for catalog migrations


def config(url: str = "") -> Config:
    """Alembic's configuration for our scripts (no alembic.ini needed); `url` when not given a connection."""
    cfg = Config()
    cfg.set_main_option("script_location", str(SCRIPTS))
    if url:
        cfg.set_main_option("sqlalchemy.url", url.replace("%", "%%"))
    return cfg


@functools.cache
def _scripts() -> ScriptDirectory:
    return ScriptDirectory.from_config(config())


def head() -> str:
    """The newest revision this flywheel knows."""
    found = _scripts().get_current_head()
    assert found is not None, f"no revisions in {SCRIPTS / 'versions'}"
    return found


def current(connection: Connection) -> str | None:
    """The catalog's revision; None for an empty database or a catalog from before alembic."""
    return MigrationContext.configure(connection).get_current_revision()


def upgrade(engine: Engine) -> bool:
    """Bring the catalog to the newest revision; False when it already was there (the usual case: one query).

    Raises DataError for a revision this flywheel does not know (a catalog written by a newer version)."""
    with engine.connect() as conn:
        before = current(conn)
    if before == head():
        return False
    _check_known(engine, before)
    with _exclusive(engine) as conn:
        before = current(conn)  # another process may have migrated while we waited
        conn.commit()  # end that read: alembic runs (and commits) its own transaction only on an idle connection
        _check_known(engine, before)
        if before == head():
            return False
        cfg = config()
        cfg.attributes["connection"] = conn
        command.upgrade(cfg, "head")
    return True


def differences(engine: Engine) -> list[Any]:
    """What alembic autogenerate finds between the models and the database (empty when they agree)."""
    with engine.connect() as conn:
        context = MigrationContext.configure(conn, opts={"compare_type": True})
        return list(compare_metadata(context, Base.metadata))


def _check_known(engine: Engine, revision: str | None) -> None:
    if revision is not None and revision not in {s.revision for s in _scripts().walk_revisions()}:
        raise DataError(
            f"the catalog at {engine.url.render_as_string(hide_password=True)} is at schema revision {revision!r}, "
            f"which this flywheel does not know (its newest is {head()!r}): it was written by a newer flywheel; "
            "upgrade flywheel, or point catalog_url at another database"
        )


@contextmanager
def _exclusive(engine: Engine) -> Iterator[Connection]:
    """A connection for migrating, held by one process at a time."""
    if engine.dialect.name == "postgresql":
        with engine.connect() as conn:
            conn.execute(text("SELECT pg_advisory_lock(:key)"), {"key": _PG_LOCK_KEY})
            conn.commit()  # the lock is the session's: it outlives this transaction; alembic begins its own
            try:
                yield conn
            finally:
                conn.rollback()
                conn.execute(text("SELECT pg_advisory_unlock(:key)"), {"key": _PG_LOCK_KEY})
                conn.commit()
        return
    database = engine.url.database if engine.dialect.name == "sqlite" else None
    if database and database != ":memory:":
        with waiting_lock(Path(f"{database}.migrate.lock")), engine.connect() as conn:
            yield conn
        return
    with engine.connect() as conn:
        yield conn
