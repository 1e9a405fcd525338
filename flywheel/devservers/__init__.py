"""Local development servers (Label Studio, MLflow, Prefect, PostgreSQL): start, stop, health."""

from pathlib import Path


def log_tail(path: Path, lines: int = 25) -> str:
    """The end of a server's log, for an error that says why the server did not come up."""
    try:
        text = path.read_text(errors="replace").splitlines()
    except OSError:
        return f"(no log at {path})"
    return f"last lines of {path}:\n" + "\n".join(text[-lines:])
