"""How the benchmarks write their results: a JSON file and a Markdown page side by side, with the command
that reproduces them and the person's note."""

from __future__ import annotations

import json
from pathlib import Path


def command_line(script: str, argv: list[str]) -> str:
    """The command that reruns `script`, minus --note and its text (the note is printed on its own)."""
    kept = [a for i, a in enumerate(argv) if a != "--note" and (i == 0 or argv[i - 1] != "--note")]
    return " ".join(["python", script, *kept])


def write_results(out: Path, meta: dict, rows: list[dict], markdown: list[str]) -> None:
    """out.json holds meta and the rows; out.md the Markdown lines, then meta["note"]."""
    out.parent.mkdir(parents=True, exist_ok=True)
    out.with_suffix(".json").write_text(json.dumps({**meta, "results": rows}, indent=2) + "\n")
    out.with_suffix(".md").write_text("\n".join([*markdown, "", meta["note"], ""]))
