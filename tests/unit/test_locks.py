"""What is installed is what the lock files name: every package, transitive ones included, at its locked
version, and nothing else (a fresh machine gets the set CI tested). Also the audit's verdicts."""

from __future__ import annotations

import importlib.util
import json
import os
import re
import subprocess
import sys
from importlib import metadata
from pathlib import Path

import pytest
from packaging.markers import Marker
from packaging.utils import canonicalize_name

from tests.conftest import REPO

# `make upgrade-check` points these at its throwaway locks and venvs.
LOCKS = Path(os.environ.get("FLYWHEEL_TEST_LOCKS", REPO / "infra" / "lock"))
VENVS = {
    "project.txt": Path(sys.prefix),
    "label-studio.txt": Path(os.environ.get("FLYWHEEL_TEST_LS_VENV", REPO / ".ls-venv")),
}
PIN = re.compile(r"^([A-Za-z0-9][A-Za-z0-9._-]*)==([^\s;\\]+)\s*(?:;\s*([^\\]+?))?\s*\\?$")


def locked(lock: Path, environment: dict[str, str]) -> dict[str, str]:
    """name -> version of the lock's packages whose markers apply in `environment` (PEP 508 values)."""
    pins = {}
    for line in lock.read_text().splitlines():
        match = PIN.match(line)
        if match and (match[3] is None or Marker(match[3]).evaluate(environment)):
            pins[str(canonicalize_name(match[1]))] = match[2]
    return pins


def installed(python: Path) -> tuple[dict[str, str], dict[str, str]]:
    """name -> version of every distribution in the venv of `python`, and that interpreter's marker values."""
    script = (
        "import json, importlib.metadata as m, packaging.markers as k;"
        "print(json.dumps([{d.metadata['Name']: d.version for d in m.distributions()}, k.default_environment()]))"
    )
    found, environment = json.loads(subprocess.check_output([str(python), "-c", script], text=True))
    return {str(canonicalize_name(name)): version for name, version in found.items()}, environment


@pytest.mark.parametrize("lock", sorted(VENVS))
def test_each_venv_holds_exactly_its_lock(lock: str):
    found, environment = installed(VENVS[lock] / "bin" / "python")
    found.pop("flywheel", None)  # the project itself, installed editable from the working tree
    assert found == locked(LOCKS / lock, environment)


def test_flywheel_itself_is_the_working_tree():
    assert metadata.version("flywheel") == "0.1.0"
    assert Path(metadata.distribution("flywheel").locate_file("")).exists()
    import flywheel

    assert Path(flywheel.__file__).resolve().is_relative_to(REPO)


def _audit_module():
    spec = importlib.util.spec_from_file_location("infra_audit", REPO / "infra" / "audit.py")
    assert spec is not None and spec.loader is not None
    module = importlib.util.module_from_spec(spec)
    sys.modules[spec.name] = module  # its dataclass resolves annotations through sys.modules
    spec.loader.exec_module(module)
    return module


def test_the_audit_fails_on_a_fixable_or_unwaived_vulnerability_and_counts_what_it_could_not_audit():
    audit = _audit_module()
    report = {
        "dependencies": [
            {"name": "django", "version": "5.2.0", "vulns": [{"id": "GHSA-1", "fix_versions": ["5.2.1"]}]},
            {"name": "jinja2", "version": "3.1.6", "vulns": [{"id": "PYSEC-2", "fix_versions": []}]},
            {"name": "pyyaml", "version": "6.0", "vulns": [{"id": "PYSEC-3", "fix_versions": []}]},
            {"name": "numpy", "version": "2.2.6", "vulns": []},
            {"name": "uv", "skip_reason": "Dependency not found on PyPI and could not be audited: uv (0.13.9)"},
        ]
    }
    found = audit.classify(report, {"PYSEC-3": "only reached through a parser we never call"})
    assert found.fixable == ["django 5.2.0: GHSA-1 (fixed in 5.2.1)"]
    assert [line.split(" (")[0] for line in found.unfixed] == ["jinja2 3.1.6: PYSEC-2"]
    assert found.waived == ["pyyaml 6.0: PYSEC-3 (only reached through a parser we never call)"]
    assert (found.audited, found.unaudited) == (4, ["uv"])
