"""A run killed while it holds the project slot does not freeze the next one: the run that waits sees the recorded
holder is gone and releases its slot, and says what it waited for and who held it (a real Prefect server)."""

from __future__ import annotations

import os
import signal
import subprocess
import sys
import time

import pytest
from prefect.client.orchestration import get_client
from prefect.exceptions import PrefectHTTPStatusError

from flows import deploy
from flows.common import project_slot
from flows.worker import prefect_api
from flywheel.config import Settings
from tests.conftest import REPO

pytestmark = pytest.mark.integration

HOLD = """
import time
from flows.common import project_slot
from flows.worker import prefect_api
from flywheel.config import load_settings
settings = load_settings()
with prefect_api(settings), project_slot(settings):
    print("holding", flush=True)
    time.sleep(600)
"""


def _slot_is_taken(settings: Settings) -> bool:
    with get_client(sync_client=True) as client:
        try:
            response = client.increment_concurrency_slots_with_lease(
                [f"flywheel-{settings.project}"], 1, "concurrency", 60
            )
        except PrefectHTTPStatusError as exc:
            return exc.response.status_code == 423
        client.release_concurrency_slots_with_lease(response.json()["lease_id"])
        return False


def test_a_slot_held_by_a_killed_run_is_free_within_30_seconds(
    settings: Settings, capsys: pytest.CaptureFixture[str]
) -> None:
    env = {**os.environ, **deploy.settings_env(settings)}
    holder = subprocess.Popen(
        [sys.executable, "-c", HOLD], cwd=REPO, env=env, stdout=subprocess.PIPE, text=True, start_new_session=True
    )
    try:
        assert holder.stdout is not None and holder.stdout.readline().strip() == "holding"
        with prefect_api(settings):
            time.sleep(settings.prefect.slot_lease_s + 20)  # past a lease and a 15 s sweep: renewal keeps it held
            assert _slot_is_taken(settings)
    finally:
        os.killpg(holder.pid, signal.SIGKILL)
        holder.wait()
    killed = time.monotonic()
    with prefect_api(settings), project_slot(settings):
        waited = time.monotonic() - killed
    assert waited < 30
    said = capsys.readouterr().err
    assert f"the project slot flywheel-{settings.project} was held by flow run" in said
    assert f"(pid {holder.pid} on" in said and "which is gone: releasing it" in said
    assert not _slot_is_taken(settings)  # and released again on leaving
