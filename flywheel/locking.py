"""One run of a project at a time: the steps that write (import, bootstrap, round, sync, fine-tune, promote)
hold an exclusive lock on `<workspace>/locks/<project>.lock`.

A second process asking for it is refused at once with ProjectBusyError naming the holder's pid and
command, rather than waiting behind a fine-tune that may take an hour; the caller (a person, a Prefect
retry, the next scheduled run) tries again later. The lock is `fcntl.flock`, so the kernel releases it
when the holder dies, SIGKILL included: a crash never leaves the project locked. Within one process the
lock is re-entrant (a sync flow that starts a fine-tune holds it once).
"""

from __future__ import annotations

import fcntl
import functools
import os
import sys
import threading
import time
from collections.abc import Callable, Iterator
from contextlib import contextmanager
from pathlib import Path
from typing import ParamSpec, TypeVar

from flywheel.config import Settings
from flywheel.errors import ProjectBusyError

P = ParamSpec("P")
R = TypeVar("R")

_held: dict[Path, tuple[int, int]] = {}  # lock file -> (fd, depth) held by this process
_guard = threading.Lock()


def lock_path(settings: Settings) -> Path:
    return settings.workspace / "locks" / f"{settings.project}.lock"


@contextmanager
def project_lock(settings: Settings) -> Iterator[None]:
    """Hold the project's lock for the block; ProjectBusyError when another process holds it."""
    path = lock_path(settings)
    with _guard:
        if path in _held:
            fd, depth = _held[path]
            _held[path] = (fd, depth + 1)
        else:
            _held[path] = (_acquire(path), 1)
    try:
        yield
    finally:
        with _guard:
            fd, depth = _held[path]
            if depth > 1:
                _held[path] = (fd, depth - 1)
            else:
                del _held[path]
                os.ftruncate(fd, 0)
                fcntl.flock(fd, fcntl.LOCK_UN)
                os.close(fd)


def _acquire(path: Path) -> int:
    path.parent.mkdir(parents=True, exist_ok=True)
    fd = os.open(path, os.O_RDWR | os.O_CREAT, 0o600)
    try:
        fcntl.flock(fd, fcntl.LOCK_EX | fcntl.LOCK_NB)
    except BlockingIOError as exc:
        holder = os.pread(fd, 4096, 0).decode(errors="replace").strip() or "a process that has not said who it is"
        os.close(fd)
        raise ProjectBusyError(
            f"this project is being run by another process ({holder}); wait for it to finish, "
            f"or stop it (lock file {path})"
        ) from exc
    command = " ".join(os.path.basename(a) if i == 0 else a for i, a in enumerate(sys.argv))[:200]
    os.ftruncate(fd, 0)
    os.pwrite(fd, f"pid {os.getpid()} since {time.strftime('%Y-%m-%d %H:%M:%S')}: {command}\n".encode(), 0)
    return fd


@contextmanager
def waiting_lock(path: Path) -> Iterator[None]:
    """Hold an exclusive flock on `path` for the block, waiting for other processes: serialises check-then-act
    steps (starting a server, migrating a database) that parallel processes may attempt at once."""
    path.parent.mkdir(parents=True, exist_ok=True)
    with open(path, "w") as handle:
        fcntl.flock(handle, fcntl.LOCK_EX)
        try:
            yield
        finally:
            fcntl.flock(handle, fcntl.LOCK_UN)


def locked(fn: Callable[P, R]) -> Callable[P, R]:
    """Run `fn` under the project lock of the Settings among its arguments."""

    @functools.wraps(fn)
    def wrapper(*args: P.args, **kwargs: P.kwargs) -> R:
        settings = next((a for a in (*args, *kwargs.values()) if isinstance(a, Settings)), None)
        if settings is None:
            raise TypeError(f"{fn.__name__}: @locked needs a Settings argument")
        with project_lock(settings):
            return fn(*args, **kwargs)

    return wrapper
