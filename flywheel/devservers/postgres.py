"""A local PostgreSQL cluster on loopback (Debian's `postgresql` package) for development and the test suite.

`start` initialises the cluster under `<workspace>/services/postgres` on first use (initdb: UTF-8, C collation,
passwordless for local connections, listening on 127.0.0.1 only, no Unix socket), starts it with pg_ctl unless it
already answers, and creates the databases that the catalog, MLflow and Prefect URLs name on it (one database per
service). PostgreSQL refuses to run as root, so under root the server runs as the `postgres` system user. `stop`
ends only a cluster whose data lives in this workspace. A server run by others (compose, a managed service) is
never started here: point the URLs at it (docs/operations.md).
"""

from __future__ import annotations

import argparse
import hashlib
import os
import pwd
import shutil
import subprocess
import sys
import time
from collections.abc import Sequence
from pathlib import Path

from sqlalchemy.engine import make_url

from flywheel.config import PostgresSettings, Settings, load_settings
from flywheel.devservers import log_tail
from flywheel.errors import ConfigError, FlywheelError, ServiceUnavailableError
from flywheel.locking import waiting_lock

SERVER_USER = "postgres"  # Debian's system user, used when flywheel runs as root
MAX_CONNECTIONS = 300  # every Catalog holds a small pool; the test suite opens many at once


def data_dir(settings: Settings) -> Path:
    """The cluster's files: `<workspace>/services/postgres`; under root, when the server user cannot reach the
    workspace (a home folder closed to others), `~postgres/flywheel/<workspace hash>/data` instead."""
    if os.geteuid() != 0 or _server_user_reaches(settings.workspace):
        return settings.workspace / "services" / "postgres"
    key = hashlib.sha256(str(settings.workspace).encode()).hexdigest()[:12]
    return Path(pwd.getpwnam(SERVER_USER).pw_dir) / "flywheel" / key / "data"


def log_file(settings: Settings) -> Path:
    """Written by the server: beside the data when that had to leave the workspace."""
    data = data_dir(settings)
    inside = data.is_relative_to(settings.workspace)
    return settings.dirs.logs / "postgres.log" if inside else data.parent / "server.log"


def _server_user_reaches(path: Path) -> bool:
    existing = next(p for p in (path, *path.parents) if p.exists())  # folders made below it are world-searchable
    return subprocess.run(["runuser", "-u", SERVER_USER, "--", "test", "-x", str(existing)]).returncode == 0


def bin_dir(pg: PostgresSettings) -> Path:
    """Folder holding initdb and pg_ctl: the setting, else the newest Debian version, else found on PATH."""
    if pg.bin_dir:
        found = Path(pg.bin_dir)
    else:
        versions = sorted(Path("/usr/lib/postgresql").glob("*/bin"), key=lambda p: int(p.parent.name))
        on_path = shutil.which("pg_ctl")
        found = versions[-1] if versions else Path(on_path).resolve().parent if on_path else Path("/usr/lib/postgresql")
    if not (found / "initdb").is_file() or not (found / "pg_ctl").is_file():
        raise ConfigError(
            f"no initdb/pg_ctl in {found}: install Debian's `postgresql` package (`make setup` does) "
            "or set FLYWHEEL_POSTGRES__BIN_DIR"
        )
    return found


def _run_as_server_user(argv: list[str]) -> list[str]:
    return ["runuser", "-u", SERVER_USER, "--", *argv] if os.geteuid() == 0 else argv


def _own(path: Path) -> None:
    """Under root, hand `path` to the server user (initdb refuses a data folder it cannot own)."""
    if os.geteuid() == 0:
        user = pwd.getpwnam(SERVER_USER)
        os.chown(path, user.pw_uid, user.pw_gid)


def admin_dsn(pg: PostgresSettings, database: str = "postgres") -> str:
    """libpq connection string for `database` on the local cluster."""
    return f"host={pg.host} port={pg.port} user={pg.user} dbname={database} connect_timeout=3"


def problem(pg: PostgresSettings) -> str:
    """Empty when the cluster accepts connections, else why not."""
    import psycopg

    try:
        with psycopg.connect(admin_dsn(pg), autocommit=True) as conn:
            conn.execute("SELECT 1")
    except psycopg.Error as exc:
        return f"{type(exc).__name__}: {str(exc).strip().splitlines()[0] if str(exc).strip() else ''}"
    return ""


def local_databases(settings: Settings) -> dict[str, str]:
    """service -> database name, for the configured URLs that point at the local cluster."""
    pg, found = settings.postgres, {}
    urls = {"catalog": settings.catalog_url, "mlflow": settings.mlflow.backend_store_uri}
    urls["prefect"] = settings.prefect.database_url
    for service, url in urls.items():
        if url.startswith("postgresql"):
            parsed = make_url(url)
            if (parsed.host, parsed.port or 5432) == (pg.host, pg.port) and parsed.database:
                found[service] = parsed.database
    return found


def start(settings: Settings, *, timeout: float = 60) -> str:
    """Initialise (first time) and start the local cluster unless it answers; create the configured databases.
    Returns the libpq connection string of the maintenance database."""
    pg, data, log = settings.postgres, data_dir(settings), log_file(settings)
    with waiting_lock(settings.workspace / "run" / "postgres.lock"):
        if problem(pg):
            binaries = bin_dir(pg)
            for folder in (data.parent, log.parent):
                folder.mkdir(parents=True, exist_ok=True)
            if not (data / "PG_VERSION").is_file():
                data.mkdir(mode=0o700, exist_ok=True)
                _own(data)
                _pg_command(
                    [str(binaries / "initdb"), "-D", str(data), "-U", pg.user, "--auth=trust", "--encoding=UTF8",
                     "--locale=C", "--no-sync"], log, timeout,
                )  # fmt: skip
            log.touch()
            _own(log)
            options = f"-c listen_addresses={pg.host} -p {pg.port} -c unix_socket_directories='' "
            options += f"-c max_connections={MAX_CONNECTIONS} -c timezone=UTC"
            start_argv = [str(binaries / "pg_ctl"), "-D", str(data), "-l", str(log), "-w", "-t", str(int(timeout))]
            _pg_command([*start_argv, "-o", options, "start"], log, timeout + 10)
            _wait(pg, log, timeout)
        for database in sorted(set(local_databases(settings).values())):
            create_database(pg, database)
    return admin_dsn(pg)


def _pg_command(argv: list[str], log: Path, timeout: float) -> None:
    result = subprocess.run(
        _run_as_server_user(argv), capture_output=True, text=True, timeout=timeout, stdin=subprocess.DEVNULL
    )
    if result.returncode != 0:
        raise FlywheelError(
            f"{Path(argv[0]).name} failed (exit {result.returncode}): {(result.stderr or result.stdout).strip()}; "
            f"{log_tail(log)}"
        )


def _wait(pg: PostgresSettings, log: Path, timeout: float) -> None:
    deadline = time.monotonic() + timeout
    while why := problem(pg):
        if time.monotonic() > deadline:
            raise ServiceUnavailableError("postgres", f"{pg.host}:{pg.port}", f"{why}; {log_tail(log)}")
        time.sleep(0.3)


def stop(settings: Settings, *, timeout: float = 30) -> bool:
    """Stop the cluster whose data is in this workspace (fast shutdown); False when it was not running."""
    data = data_dir(settings)
    if not (data / "postmaster.pid").is_file():
        return False
    argv = [str(bin_dir(settings.postgres) / "pg_ctl"), "-D", str(data), "-m", "fast", "-w", "-t", str(int(timeout))]
    result = subprocess.run(_run_as_server_user([*argv, "stop"]), capture_output=True, text=True, timeout=timeout + 10)
    return result.returncode == 0


def create_database(pg: PostgresSettings, name: str) -> bool:
    """Create `name` on the local cluster unless it exists; True when created."""
    import psycopg
    from psycopg import sql

    with psycopg.connect(admin_dsn(pg), autocommit=True) as conn:
        if conn.execute("SELECT 1 FROM pg_database WHERE datname = %s", (name,)).fetchone():
            return False
        try:
            conn.execute(sql.SQL("CREATE DATABASE {}").format(sql.Identifier(name)))
        except psycopg.errors.UniqueViolation:  # created by a concurrent caller
            return False
    return True


def drop_database(pg: PostgresSettings, name: str) -> None:
    """Drop `name` from the local cluster, closing its open connections."""
    import psycopg
    from psycopg import sql

    with psycopg.connect(admin_dsn(pg), autocommit=True) as conn:
        conn.execute(sql.SQL("DROP DATABASE IF EXISTS {} WITH (FORCE)").format(sql.Identifier(name)))


def main(argv: Sequence[str] | None = None) -> int:
    parser = argparse.ArgumentParser(prog="python -m flywheel.devservers.postgres", description=__doc__.splitlines()[0])
    parser.add_argument("command", choices=("start", "stop", "status"))
    args = parser.parse_args(argv)
    try:
        settings = load_settings()
        pg = settings.postgres
        if args.command == "start":
            start(settings)
            print(f"postgres ready at {pg.host}:{pg.port} (data {data_dir(settings)})")
        elif args.command == "stop":
            print("postgres stopped" if stop(settings) else f"postgres: none running from {data_dir(settings)}")
        else:
            why = problem(pg)
            print(f"postgres at {pg.host}:{pg.port}: {why or 'healthy'}")
            return 1 if why else 0
    except FlywheelError as exc:
        print(f"error: {exc}", file=sys.stderr)
        return 1
    return 0


if __name__ == "__main__":
    sys.exit(main())
