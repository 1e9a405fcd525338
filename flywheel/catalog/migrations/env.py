"""Alembic's entry point for the catalog: migrates the connection flywheel hands over (flywheel.catalog.migrations), or,
from the alembic command line, the URL given by `-x url=...`, alembic.ini's sqlalchemy.url or the settings'
catalog_url. `--sql` (offline) writes the SQL instead of running it."""

from __future__ import annotations

from typing import Any

from alembic import context
from sqlalchemy import create_engine
from sqlalchemy.engine import Connection

from flywheel.catalog.models import Base, UtcDateTime


def _render_item(kind: str, obj: Any, _autogen_context: Any) -> str | bool:
    """Revisions must not import the models: our UTC timestamp type is written as the plain DateTime it stores."""
    return "sa.DateTime()" if kind == "type" and isinstance(obj, UtcDateTime) else False


OPTIONS: dict[str, Any] = {
    "target_metadata": Base.metadata,
    "compare_type": True,
    "render_as_batch": True,  # SQLite alters a table by copying it: later revisions work there too
    "render_item": _render_item,
}


def _url() -> str:
    url = context.get_x_argument(as_dictionary=True).get("url") or context.config.get_main_option("sqlalchemy.url")
    if url:
        return url
    from flywheel.config import load_settings

    return load_settings().catalog_url


def _migrate(connection: Connection) -> None:
    context.configure(connection=connection, **OPTIONS)
    with context.begin_transaction():
        context.run_migrations()


def main() -> None:
    if context.is_offline_mode():
        context.configure(url=_url(), literal_binds=True, **OPTIONS)
        with context.begin_transaction():
            context.run_migrations()
        return
    handed = context.config.attributes.get("connection")
    if handed is not None:
        _migrate(handed)
        return
    engine = create_engine(_url())
    try:
        with engine.connect() as connection:
            _migrate(connection)
    finally:
        engine.dispose()


main()
