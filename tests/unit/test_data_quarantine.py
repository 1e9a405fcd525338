"""Bad images are quarantined with a reason and the rest goes on; duplicates are caught; stored files carry
checksums; a crashed round is resumed, not repeated; one run of a project at a time."""

from __future__ import annotations

import csv
import os
import re
import signal
import subprocess
import sys
import time
from pathlib import Path

import numpy as np
import pytest
import torch
from PIL import Image
from sqlalchemy import create_engine, text
from typer.testing import CliRunner

from flywheel import atomic, loop
from flywheel.app import cli
from flywheel.catalog import POOL, Base, Catalog, Quarantined
from flywheel.config import IndexSettings, load_settings
from flywheel.errors import CorruptFileError, ProjectBusyError
from flywheel.features import embedded
from flywheel.features.backbones import build_body
from flywheel.index.sharded import build_vector_index
from flywheel.locking import lock_path, project_lock
from flywheel.sources.importing import import_source
from flywheel.sources.quarantine import near_duplicates, report_path, write_report
from flywheel.training.finetune import _load_checkpoint, _save_atomic

REPO = Path(__file__).resolve().parents[2]
RGB = (np.arange(40 * 48 * 3).reshape(40, 48, 3) * 11 % 256).astype(np.uint8)


def _awkward_tree(root: Path) -> dict[str, Path]:
    """One folder of every awkward-but-valid image and every bad file; returns name -> path."""
    cls = root / "thing"
    cls.mkdir(parents=True)
    files: dict[str, Path] = {}

    def save(name: str, image: Image.Image, **kw) -> None:
        files[name] = cls / name
        image.save(files[name], **kw)

    exif = Image.Exif()
    exif[0x0112] = 6
    save("plain.png", Image.fromarray(RGB))
    save("cmyk.jpg", Image.fromarray(RGB[::-1]).convert("CMYK"))
    save("deep16.png", Image.fromarray((np.arange(40 * 48).reshape(40, 48) * 30).astype(np.uint16)))
    save("alpha.png", Image.fromarray(np.dstack([RGB[:, ::-1], np.full((40, 48), 90, np.uint8)])))
    save("palette.png", Image.fromarray(RGB[:, :, ::-1]).quantize(32))
    save("rotated.jpg", Image.fromarray(RGB.transpose(1, 0, 2).copy()), exif=exif)
    save("gray.jpg", Image.fromarray(RGB[:, :, 1]))
    save("big.png", Image.new("L", (300, 300), 7))  # above the test's max_image_pixels
    save("whole.jpg", Image.fromarray(RGB[5:, 7:]), quality=95)
    files["truncated.jpg"] = cls / "truncated.jpg"  # header intact, scan data cut: fails only when decoded
    files["truncated.jpg"].write_bytes(files["whole.jpg"].read_bytes()[:-300])
    files["whole.jpg"].unlink()
    del files["whole.jpg"]
    files["empty.png"] = cls / "empty.png"
    files["empty.png"].write_bytes(b"")
    files["notes.png"] = cls / "notes.png"
    files["notes.png"].write_text("not an image at all")
    files["zcopy.png"] = cls / "zcopy.png"  # the same bytes as plain.png
    files["zcopy.png"].write_bytes(files["plain.png"].read_bytes())
    return files


def test_bad_images_are_quarantined_with_reasons_and_the_rest_is_embedded(tmp_path):
    settings = load_settings(workspace=tmp_path / "ws", max_image_pixels=50_000, image_size=32)
    catalog = Catalog(settings.catalog_url)
    _awkward_tree(tmp_path / "tree")
    result = import_source(catalog, settings, str(tmp_path / "tree"))[POOL]
    assert (result.added, result.quarantined, result.skipped) == (8, 4, 0)
    held = {Path(q.uri).name: q for q in catalog.quarantined()}
    assert {name: q.reason for name, q in held.items()} == {
        "empty.png": "empty file",
        "notes.png": "not an image",
        "big.png": "too many pixels",
        "zcopy.png": "duplicate",
    }
    plain_id = next(s.id for s in catalog.samples() if s.uri.endswith("plain.png"))
    assert held["zcopy.png"].duplicate_of == plain_id and "300 x 300" in held["big.png"].detail

    # embedding: the truncated JPEG fails to decode, is quarantined, and the other seven are embedded
    body = build_body("efficientnet_lite0", pretrained=False)
    pool = embedded.split_features(settings, catalog, POOL, body, "imagenet", progress=False)
    assert sorted(Path(p).name for p in pool.paths) == sorted(
        ["plain.png", "cmyk.jpg", "deep16.png", "alpha.png", "palette.png", "rotated.jpg", "gray.jpg"]
    )
    assert pool.vectors.shape == (7, 1280) and np.isfinite(pool.vectors).all()
    truncated = {Path(q.uri).name: q for q in catalog.quarantined()}["truncated.jpg"]
    assert (truncated.reason, truncated.stage) == ("truncated or corrupt", "embed")
    assert catalog.count_samples() == 7 and len(catalog.samples()) == 7

    summary = write_report(settings, catalog)
    assert summary.total == 5 and summary.by_reason["duplicate"] == 1 and summary.report == str(report_path(settings))
    with open(summary.report) as fh:
        rows = list(csv.DictReader(fh))
    assert {Path(r["uri"]).name: r["reason"] for r in rows}["truncated.jpg"] == "truncated or corrupt"

    again = import_source(catalog, settings, str(tmp_path / "tree"))[POOL]
    assert (again.added, again.quarantined, again.skipped) == (0, 0, 12)  # known files, good or bad, stay put


def test_near_duplicates_of_known_or_better_ranked_picks_are_found():
    rng = np.random.default_rng(0)
    vectors = rng.normal(size=(6, 32)).astype(np.float32)
    vectors[4] = vectors[1] + 1e-3  # 4 nearly duplicates 1 (labelled)
    vectors[5] = vectors[2] * 3  # 5 duplicates 2 (a better-ranked pick)
    ids = np.array([10, 11, 12, 13, 14, 15])
    index = build_vector_index(vectors, ids, IndexSettings(kind="flat", shard_size=4))  # two shards
    picked = [12, 14, 5 + 10, 13]  # ranked best first
    twins = near_duplicates(index, vectors[[2, 4, 5, 3]], picked, known={11}, min_cosine=0.99)
    assert set(twins) == {14, 15}
    assert twins[14][0] == 11 and twins[15][0] == 12 and twins[15][1] == pytest.approx(1.0, abs=1e-5)


def test_the_round_asks_the_saved_pool_index(tmp_path):
    """Near-duplicates are looked up in the index bootstrap saved: new samples are added to it, quarantined ones
    stay (no rebuild), and a damaged shard is rebuilt rather than trusted."""
    settings = load_settings(workspace=tmp_path, index={"kind": "flat", "shard_size": 8})
    catalog = Catalog(f"sqlite:///{tmp_path / 'catalog.db'}")
    rng = np.random.default_rng(1)
    vectors = rng.normal(size=(20, 16)).astype(np.float32)

    def pool(rows: slice) -> embedded.SplitFeatures:
        ids = np.arange(100, 120)[rows]
        return embedded.SplitFeatures(ids, [f"{i}.png" for i in ids], [None] * len(ids), ids % 100, vectors[rows])

    path = embedded.rebuild_index(settings, pool(slice(0, 12)), embedded.body_version(settings, catalog))
    saved = (path / "shard-00000.faiss").stat().st_mtime_ns
    index = embedded.pool_index(settings, catalog, pool(slice(2, 20)))  # 2 quarantined, 8 imported since
    assert sorted(index.ids.tolist()) == list(range(100, 120))
    assert (path / "shard-00000.faiss").stat().st_mtime_ns == saved  # only the changed shards were written
    assert index.radius_search(vectors[[15]], 0.999)[0][0].tolist() == [115]

    shard = path / "shard-00001.faiss"
    shard.write_bytes(shard.read_bytes()[:-8] + b"damaged!")
    rebuilt = embedded.pool_index(settings, catalog, pool(slice(2, 20)))
    assert sorted(rebuilt.ids.tolist()) == list(range(102, 120))


def test_old_catalogs_gain_the_new_column_and_a_crashed_round_is_resumed(tmp_path):
    path = tmp_path / "old.db"
    engine = create_engine(f"sqlite:///{path}")
    Base.metadata.create_all(engine)  # today's tables, then back to a catalog from before rounds had finished_at
    with engine.begin() as db:
        db.execute(text("ALTER TABLE rounds DROP COLUMN finished_at"))
        db.execute(text("DROP TABLE IF EXISTS alembic_version"))
        db.execute(
            text(
                "INSERT INTO rounds (id, strategy, n_labels, n_selected, started_at) "
                "VALUES (1, 'random', 0, 10, '2026-01-01 00:00:00')"
            )  # fmt: skip
        )
    engine.dispose()
    catalog = Catalog(f"sqlite:///{path}")
    assert [r.finished_at is not None for r in catalog.rounds()] == [True]  # backfilled: round 1 is done
    second = catalog.start_round(strategy="auto", n_labels=5)
    assert second == 2
    assert catalog.start_round(strategy="auto", n_labels=7) == 2  # unfinished: resumed, not repeated
    catalog.finish_round(2, n_selected=3)
    assert catalog.start_round(strategy="auto", n_labels=9) == 3
    assert Catalog(f"sqlite:///{path}").rounds()[1].n_labels == 7  # reopening migrates nothing twice


# --- checksums ------------------------------------------------------------------------------------------
@pytest.mark.parametrize(
    ("target", "nth", "survivor"),
    [("f.bin.sha256", 1, b"old"), ("f.bin", 1, b"old"), ("f.bin.sha256", 2, b"new")],
    ids=["before-the-intent", "before-the-data", "before-the-final-sidecar"],
)
def test_a_crash_at_any_step_of_a_checksummed_write_leaves_a_verifiable_file(
    tmp_path, monkeypatch, target, nth, survivor
):
    path = tmp_path / "f.bin"
    with atomic.atomic_path(path, checksum=True) as tmp:
        Path(tmp).write_bytes(b"old")
    real_replace, seen = os.replace, []

    def killed_at_the_nth_rename_of_target(src, dst):
        seen.append(Path(dst).name)
        if seen.count(target) == nth and Path(dst).name == target:
            raise KeyboardInterrupt("killed")
        real_replace(src, dst)

    monkeypatch.setattr(os, "replace", killed_at_the_nth_rename_of_target)
    with pytest.raises(KeyboardInterrupt), atomic.atomic_path(path, checksum=True) as tmp:
        Path(tmp).write_bytes(b"new")
    monkeypatch.setattr(os, "replace", real_replace)
    assert path.read_bytes() == survivor
    atomic.verify_checksum(path)  # whichever content survived, it is recognised as whole
    path.write_bytes(b"evil")
    with pytest.raises(CorruptFileError, match=r"f\.bin is corrupt"):
        atomic.verify_checksum(path)


def test_a_damaged_checkpoint_is_refused_with_how_to_start_over(tmp_path):
    ckpt = tmp_path / "run" / "last.pt"
    _save_atomic({"epoch": 3, "model": {"w": torch.ones(4)}}, ckpt)
    assert _load_checkpoint(ckpt)["epoch"] == 3
    blob = bytearray(ckpt.read_bytes())
    blob[len(blob) // 2] ^= 0x01
    ckpt.write_bytes(bytes(blob))
    with pytest.raises(CorruptFileError, match=r"checkpoint refused: .*last\.pt is corrupt.*finetune\.resume=false"):
        _load_checkpoint(ckpt)


def test_model_files_are_loaded_with_weights_only():
    """Every torch.load in our code passes weights_only=True (a pickled checkpoint cannot run code)."""
    offenders = []
    for path in [*(REPO / "flywheel").rglob("*.py"), *(REPO / "flows").rglob("*.py"), *(REPO / "bench").rglob("*.py")]:
        for call in re.findall(r"torch\.load\((?:[^()]|\([^()]*\))*\)", path.read_text()):
            if "weights_only=True" not in call:
                offenders.append(f"{path.relative_to(REPO)}: {call}")
    assert offenders == []


# --- one run of a project at a time ---------------------------------------------------------------------
def test_a_second_run_of_the_project_is_refused_naming_the_holder(tmp_path):
    settings = load_settings(workspace=tmp_path / "ws", project="busy")
    holder = subprocess.Popen(
        [sys.executable, "-c", "import sys, time\nfrom flywheel.config import load_settings\n"
         "from flywheel.locking import project_lock\n"
         f"with project_lock(load_settings(workspace={str(settings.workspace)!r}, project='busy')):\n"
         "    print('held', flush=True); time.sleep(60)"],
        stdout=subprocess.PIPE, text=True, cwd=REPO,
    )  # fmt: skip
    try:
        assert holder.stdout.readline().strip() == "held"
        with pytest.raises(ProjectBusyError, match=rf"another process \(pid {holder.pid} since .*\); wait"):
            import_source(Catalog(settings.catalog_url), settings, "fashion-mnist", pool_size=10, test_size=10)
        assert not (settings.workspace / "catalog.db").exists() or Catalog(settings.catalog_url).count_samples() == 0
        steps = [
            lambda: loop.bootstrap(settings, None, None),
            lambda: loop.run_round(settings, None, None, None),
            lambda: loop.run_sync(settings, None, None),
            lambda: loop.run_finetune(settings, None, None),
            lambda: loop.promote(settings, None, None, "1"),
        ]
        for step in steps:  # refused before doing anything (no catalog or client is even looked at)
            with pytest.raises(ProjectBusyError, match=f"pid {holder.pid}"):
                step()
        other = load_settings(workspace=tmp_path / "ws", project="other")
        with project_lock(other):  # another project of the same workspace is not blocked
            pass
    finally:
        holder.send_signal(signal.SIGKILL)  # a killed holder never leaves the project locked
        holder.wait()
    deadline = time.monotonic() + 5
    while True:
        try:
            with project_lock(settings), project_lock(settings):  # re-entrant within a process
                assert f"pid {os.getpid()}" in lock_path(settings).read_text()
            break
        except ProjectBusyError:
            assert time.monotonic() < deadline
            time.sleep(0.1)
    assert lock_path(settings).read_text() == ""  # released: nobody named as holder


def test_a_person_lets_quarantined_files_back(tmp_path: Path, monkeypatch: pytest.MonkeyPatch) -> None:
    settings = load_settings(workspace=tmp_path / "ws", max_image_pixels=50_000, image_size=32)
    catalog = Catalog(settings.catalog_url)
    _awkward_tree(tmp_path / "tree")
    import_source(catalog, settings, str(tmp_path / "tree"))
    plain = next(s for s in catalog.samples() if s.uri.endswith("plain.png"))
    catalog.quarantine_samples({plain.id: Quarantined(plain.uri, "near-duplicate", "cosine 0.99")}, stage="select")
    held = {Path(q.uri).name: q for q in catalog.quarantined()}
    monkeypatch.setenv("FLYWHEEL_WORKSPACE", str(settings.workspace))
    listed = CliRunner().invoke(cli.app, ["quarantine", "list", "--reason", "empty file"])
    assert listed.exit_code == 0 and "empty.png" in listed.output and "notes.png" not in listed.output

    released = CliRunner().invoke(
        cli.app, ["quarantine", "release", str(held["plain.png"].id), str(held["empty.png"].id)]
    )
    assert released.exit_code == 0, released.output
    assert "plain.png is back in the pool" in released.output and "empty.png is tried again" in released.output
    assert plain.id in {s.id for s in catalog.samples()} and catalog.released_duplicates() == {plain.id}
    assert {Path(q.uri).name for q in catalog.quarantined()} == {"notes.png", "big.png", "zcopy.png"}
    again = import_source(catalog, settings, str(tmp_path / "tree"))[POOL]
    assert again.quarantined == 1  # the released empty file was tried again, and is still empty
    unknown = CliRunner().invoke(cli.app, ["quarantine", "release", "999"])
    assert unknown.exit_code != 0 and "no quarantine entry 999" in unknown.output
