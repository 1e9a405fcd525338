"""Start, check, reuse and stop the local dev servers (Label Studio, MLflow, Prefect) on loopback.

Each server runs detached in its own session so it outlives the command that started it; its data lives
in `<workspace>/services/<name>/`, its output in `<workspace>/logs/<name>.log` and its pid (which is
also its process group) in `<workspace>/run/<name>.pid`, so `stop` only ever touches servers this
workspace started. A healthy server already on the configured port is reused, whoever started it.
"""

from __future__ import annotations

import argparse
import os
import shutil
import signal
import socket
import subprocess
import sys
import time
from collections.abc import Iterator, Sequence
from concurrent.futures import ThreadPoolExecutor
from contextlib import contextmanager
from dataclasses import dataclass
from pathlib import Path

import httpx

from flywheel.config import Settings, load_settings
from flywheel.devservers import log_tail, postgres
from flywheel.errors import ConfigError, FlywheelError, ServiceUnavailableError
from flywheel.locking import waiting_lock

SERVICES: tuple[str, ...] = ("label_studio", "mlflow", "prefect")
REPO = Path(__file__).resolve().parents[2]
_BIN = Path(sys.executable).parent  # the venv running flywheel also holds mlflow and prefect
_PROBE_TIMEOUT = 5.0


@dataclass(frozen=True)
class _Spec:
    """Everything needed to start and probe one server."""

    name: str
    host: str
    port: int
    url: str
    health_path: str
    argv: list[str]
    env: dict[str, str]
    token: str = ""  # Label Studio only: the API must accept it, not just answer /health

    def data_dir(self, settings: Settings) -> Path:
        return settings.workspace / "services" / self.name

    def log_file(self, settings: Settings) -> Path:
        return settings.dirs.logs / f"{self.name}.log"

    def pid_file(self, settings: Settings) -> Path:
        return settings.workspace / "run" / f"{self.name}.pid"


def label_studio_executable(settings: Settings) -> str:
    """Label Studio lives in its own venv (its pins clash with Prefect's), so find it there first."""
    configured = settings.label_studio.executable
    candidate = configured or str(REPO / ".ls-venv" / "bin" / "label-studio")
    found = shutil.which(candidate) or (None if configured else shutil.which("label-studio"))
    if not found:
        raise ConfigError(
            f"Label Studio executable not found at {candidate}"
            + ("" if configured else " nor as `label-studio` on PATH")
            + ": run `make setup` (creates .ls-venv) or set FLYWHEEL_LABEL_STUDIO__EXECUTABLE"
        )
    return found


def _base_env(**extra: str) -> dict[str, str]:
    env = {k: v for k, v in os.environ.items() if k not in ("PREFECT_API_URL", "PYTHONPATH")}
    env.update(extra)
    return env


def _spec(name: str, settings: Settings) -> _Spec:
    data = settings.workspace / "services" / name
    if name == "label_studio":
        ls = settings.label_studio
        token = ls.token.get_secret_value()
        env = _base_env(
            LABEL_STUDIO_BASE_DATA_DIR=str(data),
            LABEL_STUDIO_USERNAME=ls.username,
            LABEL_STUDIO_PASSWORD=ls.password.get_secret_value(),
            LABEL_STUDIO_USER_TOKEN=token,
            LABEL_STUDIO_ENABLE_LEGACY_API_TOKEN="true",
            LABEL_STUDIO_DISABLE_SIGNUP_WITHOUT_LINK="true",
            LABEL_STUDIO_LOCAL_FILES_SERVING_ENABLED="true",
            LABEL_STUDIO_LOCAL_FILES_DOCUMENT_ROOT=str(ls.document_root),
            LABEL_STUDIO_SSRF_PROTECTION_ENABLED="false",
            ML_BLOCK_LOCAL_IP="false",  # the flywheel's ML backend answers on loopback
            LABEL_STUDIO_COLLECT_ANALYTICS="false",
            LABEL_STUDIO_LATEST_VERSION_CHECK="false",
        )
        argv = ["start", "--no-browser", "--internal-host", ls.host, "--port", str(ls.port)]
        argv += ["--host", ls.url, "--enable-legacy-api-token"]
        return _Spec(name, ls.host, ls.port, ls.url, "/health", ["<label-studio>", *argv], env, token)
    if name == "mlflow":
        ml = settings.mlflow
        argv = [str(_BIN / "mlflow"), "server", "--host", ml.host, "--port", str(ml.port), "--workers", "1"]
        argv += ["--backend-store-uri", ml.backend_store_uri or f"sqlite:///{data / 'mlflow.db'}"]
        argv += ["--artifacts-destination", str(data / "artifacts")]
        env = _base_env(
            MLFLOW_DISABLE_TELEMETRY="true", DO_NOT_TRACK="true", MLFLOW_SERVER_ENABLE_JOB_EXECUTION="false"
        )
        return _Spec(name, ml.host, ml.port, ml.url, "/health", argv, env)
    if name == "prefect":
        pf = settings.prefect
        url = f"http://{pf.host}:{pf.port}"
        argv = [str(_BIN / "prefect"), "server", "start", "--host", pf.host, "--port", str(pf.port)]
        env = _base_env(
            PREFECT_HOME=str(data),
            PREFECT_SERVER_ANALYTICS_ENABLED="false",
            DO_NOT_TRACK="1",
            PREFECT_UI_API_URL=f"{url}/api",  # else the UI calls port 4200 whatever --port says
        )
        if pf.database_url:  # else Prefect's SQLite in PREFECT_HOME
            env["PREFECT_SERVER_DATABASE_CONNECTION_URL"] = pf.database_url
        return _Spec(name, pf.host, pf.port, url, "/api/health", argv, env)
    raise FlywheelError(f"unknown service {name!r}; choose from {', '.join(SERVICES)}")


def urls(settings: Settings, names: Sequence[str] = SERVICES) -> dict[str, str]:
    """Base URL of each server (Prefect's API is at `<url>/api`)."""
    return {name: _spec(name, settings).url for name in names}


# --- probing -------------------------------------------------------------------------------------


def _port_open(host: str, port: int) -> bool:
    with socket.socket(socket.AF_INET, socket.SOCK_STREAM) as sock:
        sock.settimeout(1.0)
        return sock.connect_ex((host, port)) == 0


def _probe(spec: _Spec) -> str:
    """Empty when the server is healthy, else why not (for error messages)."""
    # trust_env=False: a proxy from the environment must never see loopback traffic.
    try:
        with httpx.Client(base_url=spec.url, timeout=_PROBE_TIMEOUT, trust_env=False) as client:
            response = client.get(spec.health_path)
            if response.status_code != 200:
                return f"GET {spec.health_path} answered {response.status_code}"
            if spec.token:
                response = client.get("/api/projects", headers={"Authorization": f"Token {spec.token}"})
                if response.status_code != 200:
                    return f"the API refused the configured token (GET /api/projects: {response.status_code})"
    except httpx.HTTPError as exc:
        return f"GET {spec.health_path} failed: {type(exc).__name__} {exc}".strip()
    return ""


def health(settings: Settings) -> dict[str, bool]:
    """Whether each server answers its health check (and, for Label Studio, accepts the token)."""
    return {name: not _probe(_spec(name, settings)) for name in SERVICES}


# --- processes -----------------------------------------------------------------------------------


def alive(pid: int) -> bool:
    """A process with that pid exists here (the check that reaps our own exited children first)."""
    try:  # reap it first if it is our own exited child, else it lingers as a zombie that looks alive
        if os.waitpid(pid, os.WNOHANG)[0] == pid:
            return False
    except ChildProcessError:
        pass
    try:
        os.kill(pid, 0)
    except ProcessLookupError:
        return False
    except PermissionError:
        return True
    return True


def running_pid(pid_file: Path, *markers: str) -> int | None:
    """The pid in `pid_file` if that process still runs with every marker in its command line (guards pid
    reuse); None otherwise."""
    try:
        pid = int(pid_file.read_text().strip())
    except (OSError, ValueError):
        return None
    if not alive(pid):
        return None
    try:
        cmdline = Path(f"/proc/{pid}/cmdline").read_bytes().replace(b"\0", b" ").decode(errors="replace")
    except OSError:
        return pid  # no /proc: trust the pid file
    return pid if all(marker in cmdline for marker in markers) else None


def _read_pid(spec: _Spec, settings: Settings) -> int | None:
    """The pid recorded by this workspace, if that process still runs this server."""
    marker = {"label_studio": "label-studio", "mlflow": "mlflow", "prefect": "prefect"}[spec.name]
    return running_pid(spec.pid_file(settings), marker, f" {spec.port}")


@contextmanager
def _locked(spec: _Spec, settings: Settings) -> Iterator[None]:
    """Serialise check-then-spawn across processes (parallel pytest sessions share the test servers)."""
    with waiting_lock(spec.pid_file(settings).with_suffix(".lock")):
        yield


def _launch(spec: _Spec, settings: Settings) -> subprocess.Popen[bytes] | None:
    """Start the server unless it is healthy or already starting; None when nothing was spawned."""
    with _locked(spec, settings):
        problem = _probe(spec)
        if not problem or _read_pid(spec, settings):
            return None
        if _port_open(spec.host, spec.port):
            raise FlywheelError(
                f"port {spec.port} on {spec.host} is taken by something that is not a usable {spec.name} "
                f"({problem}); stop it or choose another port, e.g. "
                f"FLYWHEEL_{spec.name.upper()}__PORT=<free port>"
            )
        argv = spec.argv
        if spec.name == "label_studio":  # resolved only now, so health() works without Label Studio installed
            argv = [label_studio_executable(settings), *argv[1:]]
        data = spec.data_dir(settings)
        data.mkdir(parents=True, exist_ok=True)
        return spawn_detached(argv, spec.env, data, spec.log_file(settings), spec.pid_file(settings))


def spawn_detached(
    argv: Sequence[str], env: dict[str, str], cwd: Path, log: Path, pid_file: Path
) -> subprocess.Popen[bytes]:
    """Start `argv` in its own session, so it outlives the caller; output appended to `log`, pid (= process
    group) written to `pid_file` for kill_group."""
    log.parent.mkdir(parents=True, exist_ok=True)
    pid_file.parent.mkdir(parents=True, exist_ok=True)
    with open(log, "ab") as out:
        out.write(f"\n=== {time.strftime('%Y-%m-%d %H:%M:%S')} {' '.join(argv)}\n".encode())
        out.flush()
        proc = subprocess.Popen(
            list(argv), env=env, cwd=cwd, stdin=subprocess.DEVNULL, stdout=out, stderr=subprocess.STDOUT,
            start_new_session=True,  # own process group: survives the caller, stopped as a whole
        )  # fmt: skip
    pid_file.write_text(f"{proc.pid}\n")
    return proc


def wait_healthy(
    name: str, settings: Settings, timeout: float = 180, proc: subprocess.Popen[bytes] | None = None
) -> str:
    """Poll until the server is healthy; fail early with the log's tail if the process we started exits."""
    spec = _spec(name, settings)
    deadline = time.monotonic() + timeout
    while True:
        problem = _probe(spec)
        if not problem:
            return spec.url
        if proc is not None and proc.poll() is not None:
            detail = f"the server exited with code {proc.returncode}; {log_tail(spec.log_file(settings))}"
            raise ServiceUnavailableError(name, spec.url, detail)
        if time.monotonic() > deadline:
            detail = f"not healthy after {timeout:.0f} s ({problem}); {log_tail(spec.log_file(settings))}"
            raise ServiceUnavailableError(name, spec.url, detail)
        time.sleep(0.5)


def start(settings: Settings, names: Sequence[str] = SERVICES, *, timeout: float = 180) -> dict[str, str]:
    """Reuse healthy servers, start the others detached and in parallel, and wait until all are healthy.
    The local PostgreSQL cluster (flywheel.devservers.postgres) comes first when a configured database URL points
    at it."""
    if postgres.local_databases(settings):
        postgres.start(settings, timeout=timeout)
    specs = [_spec(name, settings) for name in names]
    procs = {spec.name: _launch(spec, settings) for spec in specs}
    with ThreadPoolExecutor(max_workers=len(specs) or 1) as pool:
        futures = {name: pool.submit(wait_healthy, name, settings, timeout, p) for name, p in procs.items()}
        return {name: future.result() for name, future in futures.items()}


def stop(settings: Settings, names: Sequence[str] = SERVICES, *, grace: float = 20) -> list[str]:
    """Stop the servers this workspace started (whole process group: TERM, then KILL after `grace`)."""
    stopped = []
    for name in names:
        spec = _spec(name, settings)
        with _locked(spec, settings):
            pid = _read_pid(spec, settings)
            if pid is not None:
                kill_group(pid, grace)
                stopped.append(name)
            spec.pid_file(settings).unlink(missing_ok=True)
    return stopped


def kill_group(pgid: int, grace: float) -> None:
    """TERM the process group, KILL it if it is still there after `grace` seconds."""

    def group_alive() -> bool:
        alive(pgid)  # reaps the leader if it is our child
        try:
            os.killpg(pgid, 0)
        except ProcessLookupError:
            return False
        return True

    for sig, wait in ((signal.SIGTERM, grace), (signal.SIGKILL, 5.0)):
        try:
            os.killpg(pgid, sig)
        except ProcessLookupError:
            return
        deadline = time.monotonic() + wait
        while time.monotonic() < deadline:
            if not group_alive():
                return
            time.sleep(0.2)


# --- the deployments' worker (flows/worker.py starts it) --------------------------------------------


def worker_files(settings: Settings) -> tuple[Path, Path]:
    """The pid file and log of this workspace's Prefect worker for settings.prefect.work_pool."""
    pool = settings.prefect.work_pool
    return settings.workspace / "run" / f"worker-{pool}.pid", settings.dirs.logs / f"worker-{pool}.log"


def deployed_marker(settings: Settings) -> Path:
    """Written by `make deploy` (flows.deploy): this workspace's deployments need a running worker."""
    return settings.workspace / "run" / f"deployed-{settings.prefect.work_pool}"


def worker_pid(settings: Settings) -> int | None:
    """The pid of this workspace's worker for the pool, if it runs."""
    return running_pid(worker_files(settings)[0], "worker", "--pool", settings.prefect.work_pool)


def worker_state(settings: Settings) -> str | None:
    """One line on the worker when this workspace has deployments (None when it has none): without a worker,
    schedules and triggers create runs that nobody runs."""
    if not deployed_marker(settings).exists():
        return None
    pid = worker_pid(settings)
    if pid is not None:
        return f"worker for pool {settings.prefect.work_pool}: running (pid {pid})"
    return (
        f"worker for pool {settings.prefect.work_pool}: DOWN: scheduled and triggered runs wait for it "
        "(`make services` or `python -m flows.worker start`)"
    )


# --- command line --------------------------------------------------------------------------------


def _print_table(settings: Settings, names: Sequence[str]) -> bool:
    """Print one row per server; True when all of them are healthy."""
    from rich.console import Console
    from rich.table import Table

    states = health(settings)
    table = Table(title="flywheel services", caption=f"logs: {settings.dirs.logs}/<service>.log")
    for column in ("service", "url", "state", "pid"):
        table.add_column(column, no_wrap=True)
    for name in names:
        spec = _spec(name, settings)
        state = "[green]healthy[/]" if states[name] else "[red]down[/]"
        table.add_row(name, spec.url, state, str(_read_pid(spec, settings) or "-"))
    console = Console()
    console.print(table)
    worker = worker_state(settings)
    if worker is not None:
        console.print(worker, highlight=False)
    return all(states[name] for name in names) and (worker is None or worker_pid(settings) is not None)


def main(argv: Sequence[str] | None = None) -> int:
    parser = argparse.ArgumentParser(prog="python -m flywheel.devservers.services", description=__doc__.splitlines()[0])
    parser.add_argument("command", choices=("start", "stop", "status"))
    parser.add_argument("names", nargs="*", metavar="NAME", help=f"{', '.join(SERVICES)} (default: all)")
    parser.add_argument("--timeout", type=float, default=180, help="seconds to wait for health (start)")
    args = parser.parse_args(argv)
    names = args.names or list(SERVICES)
    try:
        settings = load_settings()
        if args.command == "start":
            began = time.monotonic()
            start(settings, names, timeout=args.timeout)
            print(f"ready in {time.monotonic() - began:.1f} s")
        elif args.command == "stop":
            stopped = ", ".join(stop(settings, names)) or "nothing (none started from this workspace)"
            print(f"stopped in {settings.workspace}: {stopped}")
            return 0
        return 0 if _print_table(settings, names) or args.command == "start" else 1
    except FlywheelError as exc:
        print(f"error: {exc}", file=sys.stderr)
        return 1


if __name__ == "__main__":
    sys.exit(main())
