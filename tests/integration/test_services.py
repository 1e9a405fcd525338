"""The dev servers: started or reused by the session fixture, stopped only from their own workspace."""

from __future__ import annotations

import os
import socket
import time
from collections.abc import Iterator
from pathlib import Path

import httpx
import pytest

from flywheel.config import Settings, load_settings
from flywheel.devservers import services as svc
from flywheel.errors import ConfigError, FlywheelError, ServiceUnavailableError
from tests.conftest import TEST_PORTS

pytestmark = pytest.mark.integration


def _free_port() -> int:
    with socket.socket() as sock:
        sock.bind(("127.0.0.1", 0))
        return sock.getsockname()[1]


def _pids(settings: Settings) -> dict[str, str | None]:
    run = settings.workspace / "run"
    return {n: (run / f"{n}.pid").read_text() if (run / f"{n}.pid").exists() else None for n in svc.SERVICES}


@pytest.fixture
def scratch(tmp_path: Path) -> Iterator[Settings]:
    """A throwaway workspace on free ports; whatever it started is stopped afterwards."""
    settings = load_settings(
        workspace=tmp_path / "ws",
        label_studio={"port": _free_port()},
        mlflow={"port": _free_port()},
        prefect={"port": _free_port()},
    )
    yield settings
    svc.stop(settings)


def test_all_three_report_healthy(services: Settings) -> None:
    assert svc.health(services) == {name: True for name in svc.SERVICES}


def test_label_studio_accepts_the_token_and_refuses_others(services: Settings) -> None:
    url, token = services.label_studio.url, services.label_studio.token.get_secret_value()
    with httpx.Client(base_url=url, trust_env=False, timeout=30) as client:
        ok = client.get("/api/projects", headers={"Authorization": f"Token {token}"})
        wrong = client.get("/api/projects", headers={"Authorization": "Token not-the-token"})
    assert ok.status_code == 200 and "results" in ok.json()
    assert wrong.status_code == 401


def test_second_start_reuses_the_running_servers(services: Settings) -> None:
    before = _pids(services)
    began = time.monotonic()
    urls = svc.start(services)
    assert time.monotonic() - began < 15
    assert urls == {name: f"http://127.0.0.1:{port}" for name, port in TEST_PORTS.items()}
    assert _pids(services) == before


def test_stop_and_start_one_service_in_its_own_workspace(scratch: Settings) -> None:
    ws = scratch.workspace
    assert svc.start(scratch, ["mlflow"], timeout=120) == {"mlflow": scratch.mlflow.url}
    pid = int((ws / "run" / "mlflow.pid").read_text())
    assert svc.health(scratch)["mlflow"]
    assert (ws / "logs" / "mlflow.log").stat().st_size > 0
    assert (ws / "services" / "mlflow" / "mlflow.db").exists()

    assert svc.stop(scratch, ["mlflow"]) == ["mlflow"]
    assert not svc.health(scratch)["mlflow"]
    with pytest.raises(ProcessLookupError):
        os.killpg(pid, 0)  # the whole process group is gone, uvicorn included
    assert not (ws / "run" / "mlflow.pid").exists()
    assert svc.stop(scratch, ["mlflow"]) == []  # nothing left to stop

    svc.start(scratch, ["mlflow"], timeout=120)
    assert int((ws / "run" / "mlflow.pid").read_text()) != pid
    assert (ws / "logs" / "mlflow.log").read_text().count("=== ") == 2  # one header per start


def test_port_held_by_a_plain_socket_is_reported(scratch: Settings) -> None:
    with socket.socket() as squatter:
        squatter.bind(("127.0.0.1", scratch.mlflow.port))
        squatter.listen()
        with pytest.raises(FlywheelError, match=f"port {scratch.mlflow.port} .* not a usable mlflow"):
            svc.start(scratch, ["mlflow"], timeout=30)
    assert not (scratch.workspace / "run" / "mlflow.pid").exists()


def test_closed_ports_are_unhealthy(scratch: Settings) -> None:
    assert svc.health(scratch) == {name: False for name in svc.SERVICES}


def test_a_server_not_up_in_time_names_its_url_and_log(scratch: Settings) -> None:
    with pytest.raises(ServiceUnavailableError) as caught:
        svc.start(scratch, ["mlflow"], timeout=0.1)
    message = str(caught.value)
    assert scratch.mlflow.url in message
    assert str(scratch.workspace / "logs" / "mlflow.log") in message


def test_missing_label_studio_executable_names_the_path(tmp_path: Path) -> None:
    missing = tmp_path / "nope" / "label-studio"
    settings = load_settings(workspace=tmp_path / "ws", label_studio={"port": _free_port(), "executable": str(missing)})
    with pytest.raises(ConfigError, match="make setup") as caught:
        svc.start(settings, ["label_studio"])
    assert str(missing) in str(caught.value)
