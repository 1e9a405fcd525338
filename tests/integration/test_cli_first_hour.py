"""What a new user meets in the first hour, through the CLI as they type it: a wrong token or port, an unreachable
database, a one-class folder, a pool with nothing left. Each is one line saying what is wrong, at once."""

from __future__ import annotations

import os
import subprocess
import sys
import time
from pathlib import Path

import pytest

from tests.conftest import TEST_PORTS, no_settings_file
from tests.shapes import draw_shapes

pytestmark = pytest.mark.integration

CLI = str(Path(sys.executable).parent / "flywheel")
RETRY_DELAY_S = 120.0


class User:
    """Runs `flywheel ...` in a fresh process with the environment a user would have set."""

    def __init__(self, workspace: Path, **env: str):
        self.env = {k: v for k, v in os.environ.items() if not k.startswith(("FLYWHEEL_", "PREFECT_API"))}
        self.env.update(
            FLYWHEEL_CONFIG=no_settings_file(workspace),
            FLYWHEEL_WORKSPACE=str(workspace),
            FLYWHEEL_PROJECT="fh" + os.urandom(3).hex(),
            FLYWHEEL_IMAGE_SIZE="32",
            FLYWHEEL_K_PER_ROUND="6",
            FLYWHEEL_LABEL_STUDIO__PORT=str(TEST_PORTS["label_studio"]),
            FLYWHEEL_MLFLOW__PORT=str(TEST_PORTS["mlflow"]),
            FLYWHEEL_PREFECT__PORT=str(TEST_PORTS["prefect"]),
            COLUMNS="200",
        )
        self.env.update(env)

    def run(self, *args: str) -> tuple[int, str, float]:
        began = time.monotonic()
        done = subprocess.run([CLI, *args], env=self.env, capture_output=True, text=True, timeout=600)
        return done.returncode, done.stdout + done.stderr, time.monotonic() - began

    def ok(self, *args: str) -> str:
        code, output, _ = self.run(*args)
        assert code == 0, f"flywheel {' '.join(args)}: {output[-3000:]}"
        return output


def _one_line_error(output: str) -> str:
    lines = [line for line in output.splitlines() if line.strip()]
    assert "Traceback" not in output and len(lines) == 1, output[-3000:]
    return lines[0]


def test_a_wrong_token_or_port_is_one_line_at_once(tmp_path: Path, services: object):
    draw_shapes(tmp_path / "shapes", per_class=4, seed=0)
    broken = next((tmp_path / "shapes").iterdir())
    (broken / "empty.png").write_bytes(b"")
    (broken / "notes.png").write_text("not an image at all")
    user = User(tmp_path / "ws")
    imported = user.ok("import", str(tmp_path / "shapes"))
    assert "2 kept out" in imported and "kept out of the pool: 2 files (" in imported  # what and why, not just a count
    assert f"{broken / 'empty.png'}: empty file (0 bytes)" in imported and "notes.png: not an image" in imported
    assert "kept out of the pool: 2 files" in user.ok("status")

    # A first retry would wait RETRY_DELAY_S, a second twice that: a run that ends well before shows none happened
    # (however slowly a busy machine imports torch).
    slow_retries = {"FLYWHEEL_PREFECT__RETRY_DELAY_S": str(RETRY_DELAY_S)}
    code, output, seconds = User(tmp_path / "ws", FLYWHEEL_LABEL_STUDIO__TOKEN="wrong-token-123", **slow_retries).run(
        "round"
    )
    line = _one_line_error(output)
    assert code == 1 and "refused the API token (HTTP 401)" in line and "FLYWHEEL_LABEL_STUDIO__TOKEN" in line
    assert seconds < RETRY_DELAY_S  # not retried: a refused token stays refused

    code, output, seconds = User(tmp_path / "ws", FLYWHEEL_MLFLOW__PORT="1", **slow_retries).run("round")
    line = _one_line_error(output)
    assert code == 1 and "MLflow is not reachable at http://127.0.0.1:1" in line and "ConnectError" in line
    assert seconds < RETRY_DELAY_S

    database = "postgresql+psycopg://flywheel@127.0.0.1:1/flywheel"
    code, output, _ = User(tmp_path / "ws", FLYWHEEL_CATALOG_URL=database).run("status")
    line = _one_line_error(output)
    assert code == 1 and f"the catalog database is not reachable at {database}" in line and "refused" in line


def test_one_class_says_two_are_needed_and_status_shows_the_champion(tmp_path: Path, services: object):
    draw_shapes(tmp_path / "one", per_class=8, seed=0, shapes=["circle"])
    draw_shapes(tmp_path / "two", per_class=8, seed=1, shapes=["square"])
    user = User(tmp_path / "ws", FLYWHEEL_K_PER_ROUND="16")
    imported = user.ok("import", str(tmp_path / "one"), "--trust-labels")
    assert "classes (1): circle" in imported and "a classifier needs at least 2 classes" in imported
    first = user.ok("round")
    assert "model version -" in first and "no model: the project has one class (circle)" in first
    assert "champion: none yet" in user.ok("status")

    user.ok("import", str(tmp_path / "two"), "--trust-labels")
    second = user.ok("round")
    assert "round 2: 16 labels" in second and "selected nothing (nothing left to select)" in second
    assert "no model" not in second
    status = user.ok("status")
    assert "champion: version 1 of flywheel-" in status and "(head, held-out" in status
