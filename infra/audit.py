"""Known vulnerabilities in the locked packages: pip-audit over each lock file (PyPI's advisory data).

    .venv/bin/python infra/audit.py infra/lock/project.txt infra/lock/label-studio.txt [--strict]

Fails (exit 1) on a vulnerability that a newer release fixes, and on one without a fix unless its ID is
waived in WAIVED below, each with the reason it does not reach us (the README lists them too). pip-audit asks
PyPI about each pinned version; where that service cannot be reached, packages come back unaudited: this
says how many, loudly, and fails only with --strict (a machine without the service cannot audit at all).
"""

from __future__ import annotations

import argparse
import json
import subprocess
import sys
from dataclasses import dataclass, field
from pathlib import Path
from typing import Any

# Vulnerability ID -> why it does not reach us. Only for vulnerabilities with no fixed release.
WAIVED: dict[str, str] = {}


@dataclass
class Findings:
    fixable: list[str] = field(default_factory=list)  # "name version: ID (fixed in ...)"
    unfixed: list[str] = field(default_factory=list)  # no fixed release, not waived
    waived: list[str] = field(default_factory=list)
    unaudited: list[str] = field(default_factory=list)  # "name version"
    audited: int = 0


def classify(report: dict[str, Any], waived: dict[str, str]) -> Findings:
    """pip-audit's JSON report sorted into what fails the check and what does not."""
    found = Findings()
    for dep in report["dependencies"]:
        name = f"{dep['name']} {dep.get('version', '')}".strip()
        if "skip_reason" in dep:
            found.unaudited.append(name)
            continue
        found.audited += 1
        for vuln in dep.get("vulns", []):
            vid, fixes = vuln["id"], vuln.get("fix_versions") or []
            if fixes:
                found.fixable.append(f"{name}: {vid} (fixed in {', '.join(fixes)})")
            elif vid in waived:
                found.waived.append(f"{name}: {vid} ({waived[vid]})")
            else:
                found.unfixed.append(f"{name}: {vid} (no fixed release; waive it here and in the README, or drop it)")
    return found


def audit(lock: Path) -> dict[str, Any]:
    done = subprocess.run(
        [sys.executable, "-m", "pip_audit", "--progress-spinner", "off", "--disable-pip", "--require-hashes",
         "--format", "json", "-r", str(lock)],
        capture_output=True, text=True, check=False,
    )  # fmt: skip
    if not done.stdout.strip():
        raise SystemExit(f"pip-audit failed on {lock}: {done.stderr.strip()[-2000:]}")
    report: dict[str, Any] = json.loads(done.stdout)
    return report


def main(argv: list[str] | None = None) -> int:
    parser = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    parser.add_argument("locks", nargs="+", type=Path)
    parser.add_argument("--strict", action="store_true", help="also fail when packages could not be audited")
    args = parser.parse_args(argv)
    status = 0
    for lock in args.locks:
        found = classify(audit(lock), WAIVED)
        print(f"{lock}: {found.audited} packages audited, {len(found.unaudited)} could not be")
        for line in found.fixable + found.unfixed:
            print(f"  VULNERABLE {line}")
        for line in found.waived:
            print(f"  waived     {line}")
        if found.fixable or found.unfixed:
            status = 1
        if found.unaudited and not found.audited:
            print(f"  WARNING: nothing in {lock} could be audited: PyPI's per-version vulnerability data is not "
                  f"reachable from here ({found.unaudited[0]}, ...)")  # fmt: skip
            status = status or int(args.strict)
    return status


if __name__ == "__main__":
    sys.exit(main())
