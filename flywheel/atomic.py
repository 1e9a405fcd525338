"""Atomic file writes with optional checksums: a reader (or a crash) never sees half a file, and a file
damaged afterwards (disk, copy, hand edit) is recognised instead of being trusted.

A checksummed file `f` has a sidecar `f.sha256` listing the sha256 digests `f` may have. A write first adds
the new digest to the sidecar, then replaces `f`, then drops the old digest, each step an atomic rename: a
crash at any point leaves `f` matching one of the listed digests.
"""

from __future__ import annotations

import errno
import hashlib
import os
import shutil
import tempfile
from collections.abc import Callable, Iterator
from contextlib import contextmanager
from pathlib import Path
from typing import TextIO

from flywheel.errors import CorruptFileError, WorkspaceWriteError

SIDECAR_SUFFIX = ".sha256"


def sidecar(path: Path | str) -> Path:
    path = Path(path)
    return path.with_name(path.name + SIDECAR_SUFFIX)


def file_sha256(path: Path | str) -> str:
    digest = hashlib.sha256()
    with open(path, "rb") as fh:
        for chunk in iter(lambda: fh.read(1 << 20), b""):
            digest.update(chunk)
    return digest.hexdigest()


def _recorded(path: Path) -> list[str]:
    """The digests the sidecar allows (sha256sum format: '<hex>  <name>' per line); empty when absent."""
    try:
        lines = sidecar(path).read_text().splitlines()
    except (FileNotFoundError, UnicodeDecodeError):
        return []
    return [line.split()[0] for line in lines if line.strip()]


WRITE_ERRNOS = {errno.ENOSPC: "the disk is full", errno.EDQUOT: "the disk quota is used up",
                errno.EROFS: "the file system is read-only", errno.EACCES: "permission denied",
                errno.EPERM: "permission denied"}  # fmt: skip


@contextmanager
def writes_to(path: Path | str) -> Iterator[None]:
    """Turn a full or read-only disk under `path` into a WorkspaceWriteError that names it and its free space."""
    try:
        yield
    except OSError as exc:
        if exc.errno not in WRITE_ERRNOS:
            raise
        folder = Path(path).parent
        while not folder.exists() and folder != folder.parent:
            folder = folder.parent
        try:
            free: int | None = shutil.disk_usage(folder).free
        except OSError:
            free = None
        raise WorkspaceWriteError(str(path), WRITE_ERRNOS[exc.errno], free) from exc


def _replace_with(path: Path, write: Callable[[TextIO], object]) -> None:
    with writes_to(path):
        _replace_now(path, write)


def _replace_now(path: Path, write: Callable[[TextIO], object]) -> None:
    fd, tmp = tempfile.mkstemp(dir=path.parent, prefix=path.name, suffix=".partial")
    try:
        with os.fdopen(fd, "w") as fh:
            write(fh)
            fh.flush()
            os.fsync(fh.fileno())
        os.replace(tmp, path)
    except BaseException:
        Path(tmp).unlink(missing_ok=True)
        raise


def _write_sidecar(path: Path, digests: list[str]) -> None:
    unique = list(dict.fromkeys(digests))
    _replace_with(sidecar(path), lambda fh: fh.write("".join(f"{d}  {path.name}\n" for d in unique)))


@contextmanager
def atomic_path(path: Path | str, *, checksum: bool = False) -> Iterator[str]:
    """Yield a temporary path beside `path` to write to; it replaces `path` only if the block succeeds.

    With `checksum`, the new content's sha256 is recorded in the sidecar (see the module docstring), so
    `verify_checksum` can tell a damaged file from a good one.
    """
    path = Path(path)
    with writes_to(path):
        path.parent.mkdir(parents=True, exist_ok=True)
        fd, tmp = tempfile.mkstemp(dir=path.parent, prefix=path.name, suffix=".partial")
        os.close(fd)
    try:
        with writes_to(path):
            yield tmp
        if checksum:
            with open(tmp, "rb") as fh:
                os.fsync(fh.fileno())
            digest = file_sha256(tmp)
            _write_sidecar(path, [digest, *_recorded(path)])
            with writes_to(path):
                os.replace(tmp, path)
            _write_sidecar(path, [digest])
        else:
            with writes_to(path):
                os.replace(tmp, path)
    except BaseException:
        Path(tmp).unlink(missing_ok=True)
        raise


def verify_checksum(path: Path | str) -> None:
    """Raise CorruptFileError naming the file unless its sha256 is one its sidecar lists."""
    path = Path(path)
    allowed = _recorded(path)
    if not allowed:
        raise CorruptFileError(f"{path} has no checksum file {sidecar(path).name} (written by an interrupted run?)")
    actual = file_sha256(path)
    if actual not in allowed:
        raise CorruptFileError(
            f"{path} is corrupt: its sha256 is {actual[:16]}…, {sidecar(path).name} expects {allowed[0][:16]}…"
        )


def remove_with_sidecar(path: Path | str) -> None:
    """Delete a checksummed file and its sidecar (missing ones are fine)."""
    Path(path).unlink(missing_ok=True)
    sidecar(path).unlink(missing_ok=True)
