"""One error tree: every failure a user can cause names the file, field, URL or choice at fault."""

from __future__ import annotations

import functools
import sys
from collections.abc import Callable
from typing import ParamSpec

P = ParamSpec("P")


class FlywheelError(Exception):
    """Base of every error flywheel raises on purpose; the CLI prints these without a traceback.

    `retryable`: whether the same call can succeed after a wait (a server restarting, a busy project); a bad
    setting, a refused token or bad data fails the same way again, so it is not retried."""

    retryable = False


class ConfigError(FlywheelError):
    """A setting has a value flywheel cannot use."""


class DataError(FlywheelError):
    """A data path, manifest line or image cannot be used."""


class UnknownChoiceError(FlywheelError):
    """A name (backbone, strategy, class) is not one of the allowed values."""

    def __init__(self, kind: str, value: str, allowed: list[str] | tuple[str, ...]):
        self.kind, self.value, self.allowed = kind, value, list(allowed)
        super().__init__(f"unknown {kind} {value!r}; choose one of: {', '.join(sorted(self.allowed))}")


class ServiceUnavailableError(FlywheelError):
    """A server (Label Studio, MLflow, Prefect) does not answer at its URL.

    `retryable` is False when nothing listens at the address (connection refused, unknown host): a wrong
    port or a stopped server, which a retry a few seconds later would only report again."""

    def __init__(
        self,
        service: str,
        url: str,
        detail: str = "",
        *,
        retryable: bool = True,
        hint: str = "start it with `make services` or `flywheel services start`",
    ):
        self.service, self.url, self.detail, self.retryable = service, url, detail, retryable
        super().__init__(f"{service} is not reachable at {url}{': ' + detail if detail else ''} ({hint})")


class WorkspaceWriteError(FlywheelError):
    """A file could not be written: the disk is full, read-only or not ours. Nothing was half written."""

    def __init__(self, path: str, reason: str, free_bytes: int | None):
        self.path, self.reason, self.free_bytes = path, reason, free_bytes
        free = f"{free_bytes / 2**20:.1f} MiB free there" if free_bytes is not None else "free space unknown"
        super().__init__(
            f"cannot write {path}: {reason} ({free}); nothing was changed: free some space, or make the folder "
            "writable, and run the command again"
        )


class WeightsUnavailableError(FlywheelError):
    """Pretrained weights are neither cached nor downloadable."""


class PoolExhaustedError(FlywheelError):
    """A strategy was asked for more samples than there are candidates."""

    def __init__(self, available: int, requested: int):
        super().__init__(f"pool exhausted: {available} candidates available / {requested} requested")


class CorruptFileError(DataError):
    """A stored file (embeddings, index, checkpoint) does not match its recorded checksum."""


class BadImageError(DataError):
    """An image that cannot be used: `reason` is a short category for reports, the message has the details."""

    def __init__(self, path: str, reason: str, detail: str = ""):
        self.path, self.reason, self.detail = path, reason, detail
        super().__init__(f"{reason}: {path}{': ' + detail if detail else ''}")


class ProjectBusyError(FlywheelError):
    """Another process is running a step of the same project (see flywheel.locking)."""

    retryable = True


def exit_code_on_error(main: Callable[P, int]) -> Callable[P, int]:
    """A `python -m` entry point that prints a FlywheelError as one line on stderr and returns 1."""

    @functools.wraps(main)
    def wrapper(*args: P.args, **kwargs: P.kwargs) -> int:
        try:
            return main(*args, **kwargs)
        except FlywheelError as exc:
            print(f"error: {exc}", file=sys.stderr)
            return 1

    return wrapper
