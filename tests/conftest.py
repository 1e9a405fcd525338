"""Shared fixtures. Integration tests talk to real servers started (or reused) on test ports.

The test servers live in their own workspace (`.flywheel-test/` at the repo root, or
FLYWHEEL_TEST_WORKSPACE) on ports that do not clash with the demo's, so `make test` can run while the
demo's servers are up.
"""

from __future__ import annotations

import os
from pathlib import Path

import pytest

from flywheel.config import Settings, load_settings

REPO = Path(__file__).resolve().parents[1]
TEST_WORKSPACE = Path(os.environ.get("FLYWHEEL_TEST_WORKSPACE", REPO / ".flywheel-test"))
TEST_PORTS = {"label_studio": 18080, "mlflow": 15000, "prefect": 14200}


def settings_for(workspace: Path, **overrides: object) -> Settings:
    """Settings pointing at the shared test servers, with a private catalog and data under `workspace`."""
    return load_settings(
        workspace=workspace,
        label_studio={"port": TEST_PORTS["label_studio"]},
        mlflow={"port": TEST_PORTS["mlflow"]},
        prefect={"port": TEST_PORTS["prefect"]},
        **overrides,
    )


@pytest.fixture(scope="session")
def server_settings() -> Settings:
    """Settings whose workspace holds the servers' state and logs (shared by the whole session)."""
    return settings_for(TEST_WORKSPACE)


@pytest.fixture(scope="session")
def services(server_settings: Settings) -> Settings:
    """Start (or reuse) real Label Studio, MLflow and Prefect servers on 127.0.0.1 for this session."""
    from flywheel import services as svc

    svc.start(server_settings)
    return server_settings


@pytest.fixture
def settings(tmp_path: Path, services: Settings) -> Settings:
    """Per-test settings: the shared servers, a fresh catalog and workspace, a unique project name."""
    project = "t" + os.urandom(4).hex()
    return settings_for(tmp_path / "ws", project=project)
