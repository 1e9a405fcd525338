"""A full or read-only disk: a clear error naming the path and the free space, and nothing half written. The
catalog meets a really full database (SQLite's page limit, the same error a full disk gives); files meet
ENOSPC and EROFS injected where the kernel would raise them (a test cannot fill this machine's disk, and
root ignores a read-only mode bit)."""

from __future__ import annotations

import errno
import os
from pathlib import Path

import numpy as np
import pytest
from sqlalchemy import event

from flywheel import atomic
from flywheel.catalog import Catalog, NewSample
from flywheel.errors import WorkspaceWriteError


@pytest.mark.parametrize(("code", "reason"), [(errno.ENOSPC, "the disk is full"), (errno.EROFS, "read-only")])
def test_a_file_write_that_fails_names_the_file_and_changes_nothing(
    tmp_path: Path, monkeypatch: pytest.MonkeyPatch, code: int, reason: str
) -> None:
    target = tmp_path / "store" / "vectors.npy"
    with atomic.atomic_path(target, checksum=True) as tmp, open(tmp, "wb") as f:
        np.save(f, np.arange(4))
    before = target.read_bytes()

    def refuse(*_: object) -> None:
        raise OSError(code, os.strerror(code))

    monkeypatch.setattr(os, "replace", refuse)  # what atomic.py calls to put a file in place
    failed = rf"cannot write {target}(\.sha256)?: .*{reason}.*MiB free there"  # the file or its checksum sidecar
    with (
        pytest.raises(WorkspaceWriteError, match=failed) as caught,
        atomic.atomic_path(target, checksum=True) as tmp,
        open(tmp, "wb") as f,
    ):
        np.save(f, np.arange(8))
    assert caught.value.free_bytes is not None and caught.value.free_bytes > 0
    monkeypatch.undo()
    assert target.read_bytes() == before  # the old content, still verified by its checksum
    atomic.verify_checksum(target)
    assert not list(target.parent.glob("*.partial"))  # no half-written leftovers


def test_a_full_catalog_database_says_so_and_keeps_what_it_had(tmp_path: Path) -> None:
    catalog = Catalog(f"sqlite:///{tmp_path}/catalog.db")
    catalog.add_samples([NewSample("/a.png", "0" * 64, "cat")], source="t", split="pool", classes=["cat"])

    @event.listens_for(catalog.engine, "connect")
    def tiny(dbapi_connection, _record) -> None:
        dbapi_connection.execute("PRAGMA max_page_count = 12")  # the database may not grow: a full disk

    catalog.engine.dispose()  # new connections get the limit
    many = [NewSample(f"/{i}.png", f"{i:064x}", "cat") for i in range(1, 5000)]
    with pytest.raises(WorkspaceWriteError, match=r"cannot write sqlite:///.*catalog.db: the disk is full"):
        catalog.add_samples(many, source="t", split="pool", classes=["cat"])
    assert [s.uri for s in catalog.samples()] == ["/a.png"]  # the failed import left nothing behind
