"""A user's own images, the way the README tells it: `flywheel import` of an ImageFolder, then bootstrap, round,
simulated annotations, sync and another round, each a CLI command as a person types it. The project must hold
exactly that folder's images and classes: nothing of the demo's Fashion-MNIST."""

from __future__ import annotations

import os
import re
import subprocess
import sys
from pathlib import Path

import pytest

from flywheel import labelstudio
from flywheel.catalog import POOL, TEST, Catalog
from tests.conftest import TEST_PORTS, settings_for
from tests.shapes import SHAPES, draw_shapes

pytestmark = pytest.mark.e2e


def test_own_image_folder_through_the_readme_commands(tmp_path: Path, services):
    pool_files = draw_shapes(tmp_path / "shapes", per_class=12, seed=0)
    test_files = draw_shapes(tmp_path / "shapes-test", per_class=4, seed=1)
    workspace, project = tmp_path / "ws", "own" + os.urandom(3).hex()
    env = {
        **os.environ,
        "FLYWHEEL_WORKSPACE": str(workspace),
        "FLYWHEEL_PROJECT": project,
        "FLYWHEEL_LABEL_STUDIO__PORT": str(TEST_PORTS["label_studio"]),
        "FLYWHEEL_MLFLOW__PORT": str(TEST_PORTS["mlflow"]),
        "FLYWHEEL_PREFECT__PORT": str(TEST_PORTS["prefect"]),
        "FLYWHEEL_IMAGE_SIZE": "32",
        "FLYWHEEL_K_PER_ROUND": "9",
    }
    cli = str(Path(sys.executable).parent / "flywheel")

    def flywheel(*args: str) -> str:
        done = subprocess.run([cli, *args], env=env, cwd=tmp_path, capture_output=True, text=True, timeout=600)
        assert done.returncode == 0, f"flywheel {' '.join(args)}:\n{done.stdout[-3000:]}{done.stderr[-3000:]}"
        return done.stdout

    assert "36 added" in flywheel("import", str(tmp_path / "shapes"))
    assert "12 added" in flywheel("import", str(tmp_path / "shapes-test"), "--split", "test")
    assert "imported nothing" in flywheel("bootstrap")
    first = flywheel("round")
    assert "selected 9 by auto" in first and "model version -" in first  # no labels yet: no model
    assert "annotated 9 tasks" in flywheel("annotate-sim")
    flywheel("sync")
    second = flywheel("round")
    assert re.search(r"round 2: 9 labels, test \d+\.\d%, selected 9 by auto", second), second
    status = flywheel("status")
    assert f"project {project}: 36 pool / 12 test samples, 9 labels, 18 sent" in status

    settings = settings_for(workspace, project=project)
    catalog = Catalog(settings.catalog_url)
    assert catalog.classes() == list(SHAPES)
    catalogued = {Path(s.uri).resolve() for split in (POOL, TEST) for s in catalog.samples(split)}
    assert catalogued == {p.resolve() for p in pool_files + test_files}  # that folder's images, nothing else
    assert not (workspace / "sources" / "fashion-mnist").exists()
    ls_client = labelstudio.connect(settings)
    project_id = labelstudio.ensure_project(ls_client, settings, catalog, catalog.classes())
    config = str(ls_client.projects.get(project_id).label_config)
    assert re.findall(r'<Choice value="([^"]+)"', config) == list(SHAPES)
    tasks = labelstudio.list_tasks(ls_client, project_id, fields="all")
    pool_ids = {s.id for s in catalog.samples(POOL)}
    assert len(tasks) == 18 and {labelstudio.task_sample_id(t.data) for t in tasks} <= pool_ids
