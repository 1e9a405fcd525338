"""Sources of samples: an ImageFolder tree, a CSV/JSONL manifest, or the built-in Fashion-MNIST files.

Each reader returns plain records (absolute path, claimed label); `import_source` hashes the files and
writes them into the catalog in one transaction.
"""

from __future__ import annotations

import csv
import gzip
import hashlib
import json
from collections.abc import Sequence
from dataclasses import dataclass
from pathlib import Path
from urllib.parse import unquote, urlparse

import httpx
import numpy as np

from flywheel.catalog import POOL, TEST, Catalog, ImportResult, NewSample
from flywheel.config import Settings
from flywheel.errors import DataError

IMAGE_SUFFIXES = (".png", ".jpg", ".jpeg", ".bmp", ".gif", ".webp", ".tif", ".tiff")
FASHION_MNIST_DIR = Path("/usr/share/datasets/fashion-mnist")
FASHION_MNIST_CLASSES = (
    "t-shirt", "trouser", "pullover", "dress", "coat", "sandal", "shirt", "sneaker", "bag", "ankle-boot",
)  # fmt: skip
BUILTIN_SOURCES = ("fashion-mnist",)


@dataclass(frozen=True)
class Record:
    path: str  # absolute local path
    label: str | None


def read_image_folder(root: Path) -> tuple[list[Record], list[str]]:
    """`root/<class>/<image>`: classes are the sub-folder names, sorted."""
    if not root.is_dir():
        raise DataError(f"data path {root} does not exist or is not a folder")
    classes = sorted(p.name for p in root.iterdir() if p.is_dir() and not p.name.startswith("."))
    if not classes:
        raise DataError(f"{root} has no class sub-folders (expected {root}/<class>/<image>)")
    records = [
        Record(str(path.resolve()), cls)
        for cls in classes
        for path in sorted((root / cls).rglob("*"))
        if path.is_file() and path.suffix.lower() in IMAGE_SUFFIXES
    ]
    if not records:
        raise DataError(f"{root} has no images with suffixes {', '.join(IMAGE_SUFFIXES)}")
    return records, classes


def read_manifest(manifest: Path, cache_dir: Path) -> tuple[list[Record], list[str]]:
    """CSV (header with `path` or `uri`, optional `label`) or JSONL (same keys), one sample per row.

    Relative paths are resolved against the manifest's folder; http(s) URIs are fetched into `cache_dir`.
    """
    if not manifest.is_file():
        raise DataError(f"manifest {manifest} does not exist")
    rows = _manifest_rows(manifest)
    records = []
    for line, row in rows:
        where = f"{manifest}:{line}"
        location = row.get("path") or row.get("uri")
        if not location:
            raise DataError(f"{where}: needs a 'path' or 'uri' field, got keys {sorted(row)}")
        label = row.get("label") or None
        records.append(Record(_localize(str(location), manifest.parent, cache_dir, where), label))
    classes = sorted({r.label for r in records if r.label is not None})
    return records, classes


def _manifest_rows(manifest: Path) -> list[tuple[int, dict[str, str]]]:
    text = manifest.read_text(encoding="utf-8")
    if manifest.suffix.lower() in (".jsonl", ".ndjson"):
        rows = []
        for line, raw in enumerate(text.splitlines(), start=1):
            if not raw.strip():
                continue
            try:
                row = json.loads(raw)
            except json.JSONDecodeError as exc:
                raise DataError(f"{manifest}:{line}:{exc.colno}: invalid JSON: {exc.msg}") from None
            if not isinstance(row, dict):
                raise DataError(f"{manifest}:{line}: expected a JSON object, got {type(row).__name__}")
            rows.append((line, row))
        return rows
    if manifest.suffix.lower() == ".csv":
        reader = csv.DictReader(text.splitlines())
        if not reader.fieldnames or not {"path", "uri"} & set(reader.fieldnames):
            raise DataError(f"{manifest}:1: the CSV header needs a 'path' or 'uri' column, got {reader.fieldnames}")
        return [(line, row) for line, row in enumerate(reader, start=2)]
    raise DataError(f"manifest {manifest}: unsupported suffix {manifest.suffix!r} (use .csv or .jsonl)")


def _localize(location: str, base: Path, cache_dir: Path, where: str) -> str:
    parsed = urlparse(location)
    if parsed.scheme in ("http", "https"):
        target = cache_dir / (hashlib.sha256(location.encode()).hexdigest()[:32] + Path(parsed.path).suffix)
        if not target.exists():
            try:
                response = httpx.get(location, timeout=30, follow_redirects=True)
                response.raise_for_status()
            except httpx.HTTPError as exc:
                raise DataError(f"{where}: cannot fetch {location}: {exc}") from None
            cache_dir.mkdir(parents=True, exist_ok=True)
            tmp = target.with_suffix(target.suffix + ".tmp")
            tmp.write_bytes(response.content)
            tmp.replace(target)
        return str(target)
    if parsed.scheme == "file":
        path = Path(unquote(parsed.path))
    elif parsed.scheme == "":
        path = Path(location) if Path(location).is_absolute() else base / location
    else:
        raise DataError(
            f"{where}: unsupported URI scheme {parsed.scheme!r} in {location} (use a path, file:// or http(s)://)"
        )
    if not path.is_file():
        raise DataError(f"{where}: image {path} does not exist")
    return str(path.resolve())


def materialize_fashion_mnist(
    dest: Path, *, pool_size: int, test_size: int, seed: int, source_dir: Path = FASHION_MNIST_DIR
) -> tuple[Path, Path]:
    """Write a stratified random subset of Fashion-MNIST as PNG ImageFolder trees (train -> pool, t10k -> test).

    Label Studio serves images from files, so the pool must exist as files; a subset keeps the demo fast.
    Returns (pool_root, test_root). Idempotent: an existing complete tree is reused.
    """
    import torch
    from torchvision.io import encode_png

    roots = []
    for split, prefix, size in (("pool", "train", pool_size), ("test", "t10k", test_size)):
        root = dest / f"{split}-{size}-seed{seed}"
        roots.append(root)
        if (root / ".complete").exists():
            continue
        images, labels = _read_idx(source_dir, prefix)
        rng = np.random.default_rng(seed)
        chosen = np.sort(rng.permutation(len(labels))[: min(size, len(labels))])
        for index in chosen:
            folder = root / FASHION_MNIST_CLASSES[labels[index]]
            folder.mkdir(parents=True, exist_ok=True)
            png = encode_png(torch.from_numpy(images[index][None].copy()))
            (folder / f"{prefix}-{index:05d}.png").write_bytes(png.numpy().tobytes())
        (root / ".complete").touch()
    return roots[0], roots[1]


def _read_idx(source_dir: Path, prefix: str) -> tuple[np.ndarray, np.ndarray]:
    images_file = source_dir / f"{prefix}-images-idx3-ubyte.gz"
    labels_file = source_dir / f"{prefix}-labels-idx1-ubyte.gz"
    for file in (images_file, labels_file):
        if not file.is_file():
            raise DataError(f"{file} is missing: install the Debian package dataset-fashion-mnist (make setup)")
    with gzip.open(labels_file) as fh:
        labels = np.frombuffer(fh.read(), dtype=np.uint8, offset=8)
    with gzip.open(images_file) as fh:
        images = np.frombuffer(fh.read(), dtype=np.uint8, offset=16).reshape(-1, 28, 28)
    return images, labels


def hash_file(path: str) -> str:
    digest = hashlib.sha256()
    with open(path, "rb") as fh:
        for chunk in iter(lambda: fh.read(1 << 20), b""):
            digest.update(chunk)
    return digest.hexdigest()


def import_records(
    catalog: Catalog,
    settings: Settings,
    records: Sequence[Record],
    classes: Sequence[str],
    *,
    source: str,
    split: str = POOL,
    trust_labels: bool = False,
) -> ImportResult:
    """Hash every file first (any unreadable file aborts before the catalog is touched), then insert."""
    samples = []
    for record in records:
        try:
            samples.append(NewSample(uri=record.path, content_hash=hash_file(record.path), truth=record.label))
        except OSError as exc:
            raise DataError(f"cannot read {record.path}: {exc.strerror}") from None
    return catalog.add_samples(
        samples,
        source=source,
        split=split,
        classes=classes,
        trust_labels=trust_labels,
        allowed_classes=settings.classes,
    )


def import_source(
    catalog: Catalog,
    settings: Settings,
    source: str,
    *,
    split: str = POOL,
    trust_labels: bool = False,
    pool_size: int = 5000,
    test_size: int = 10000,
) -> dict[str, ImportResult]:
    """Import an ImageFolder tree, a manifest file or a built-in source; returns results per split."""
    if source == "fashion-mnist":
        pool_root, test_root = materialize_fashion_mnist(
            settings.sources_dir / "fashion-mnist",
            pool_size=pool_size,
            test_size=test_size,
            seed=settings.seed,
        )
        results = {}
        for name, root in ((POOL, pool_root), (TEST, test_root)):
            records, _ = read_image_folder(root)
            results[name] = import_records(catalog, settings, records, FASHION_MNIST_CLASSES, source=source, split=name)
        return results
    path = Path(source).expanduser()
    if path.is_dir():
        records, classes = read_image_folder(path)
    elif path.is_file():
        records, classes = read_manifest(path, settings.sources_dir / "remote")
    else:
        raise DataError(
            f"data path {path} does not exist (give an ImageFolder tree, a .csv/.jsonl manifest, "
            f"or one of: {', '.join(BUILTIN_SOURCES)})"
        )
    result = import_records(
        catalog,
        settings,
        records,
        classes,
        source=str(path.resolve()),
        split=split,
        trust_labels=trust_labels,
    )
    return {split: result}
