"""Sources of samples: an ImageFolder tree, a CSV/JSONL manifest (flywheel.sources.manifest), or the built-in
Fashion-MNIST files.

Each reader returns plain records (absolute path, claimed label); `import_source` hashes the files, reads
each image's header, and writes them into the catalog in one transaction. Files that are empty, not images
or too large (settings.max_image_pixels) and exact duplicates go to the quarantine instead of the pool.
"""

from __future__ import annotations

import gzip
from collections.abc import Sequence
from pathlib import Path

import numpy as np
import numpy.typing as npt

from flywheel.atomic import file_sha256
from flywheel.catalog import POOL, TEST, Catalog, ImportResult, NewSample, Quarantined
from flywheel.config import Settings
from flywheel.errors import BadImageError, DataError
from flywheel.locking import locked
from flywheel.sources.images import read_header
from flywheel.sources.manifest import Record, Roots, read_manifest

IMAGE_SUFFIXES = (".png", ".jpg", ".jpeg", ".bmp", ".gif", ".webp", ".tif", ".tiff")
FASHION_MNIST_DIR = Path("/usr/share/datasets/fashion-mnist")
FASHION_MNIST_CLASSES = (
    "t-shirt", "trouser", "pullover", "dress", "coat", "sandal", "shirt", "sneaker", "bag", "ankle-boot",
)  # fmt: skip
BUILTIN_SOURCES = ("fashion-mnist",)


def read_image_folder(root: Path, *, allowed_roots: Sequence[str | Path] = ()) -> tuple[list[Record], list[str]]:
    """`root/<class>/<image>`: classes are the sub-folder names, sorted. A symlink resolving outside `root`
    (and `allowed_roots`) is refused, naming it."""
    if not root.is_dir():
        raise DataError(f"data path {root} does not exist or is not a folder")
    classes = sorted(p.name for p in root.iterdir() if p.is_dir() and not p.name.startswith("."))
    if not classes:
        raise DataError(f"{root} has no class sub-folders (expected {root}/<class>/<image>)")
    roots = Roots.build([root, *allowed_roots])
    records = [
        Record(str(roots.check_path(path, f"{root}: image")), cls)
        for cls in classes
        for path in sorted((root / cls).rglob("*"))
        if path.is_file() and path.suffix.lower() in IMAGE_SUFFIXES
    ]
    if not records:
        raise DataError(f"{root} has no images with suffixes {', '.join(IMAGE_SUFFIXES)}")
    return records, classes


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


def _read_idx(source_dir: Path, prefix: str) -> tuple[npt.NDArray[np.uint8], npt.NDArray[np.uint8]]:
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
    """Hash every file and read its header first (a file that cannot be opened at all aborts before the
    catalog is touched; a bad image is quarantined with its reason), then insert in one transaction."""
    records, classes = tidy_labels(records, classes, [*catalog.classes(), *settings.classes], source=source)
    samples, quarantined = [], []
    for record in records:
        try:
            digest = file_sha256(record.path)
        except OSError as exc:
            raise DataError(f"cannot read {record.path}: {exc.strerror}") from exc
        try:
            read_header(record.path, max_pixels=settings.max_image_pixels)
        except BadImageError as exc:
            quarantined.append(Quarantined(record.path, exc.reason, exc.detail, digest))
            continue
        samples.append(NewSample(uri=record.path, content_hash=digest, truth=record.label))
    return catalog.add_samples(
        samples,
        source=source,
        split=split,
        classes=classes,
        trust_labels=trust_labels,
        allowed_classes=settings.classes,
        quarantined=quarantined,
    )


def tidy_labels(
    records: Sequence[Record], classes: Sequence[str], known: Sequence[str], *, source: str
) -> tuple[list[Record], list[str]]:
    """Labels and class names trimmed of surrounding spaces (an empty label is no label); the classes in their
    given order, then any label they lack.

    Two names that differ only in case (`Circle`, `circle`), within the source or against the classes the
    project already knows (`known`), are refused with where each came from: merging them would guess, and
    keeping both would split one class in two without a word."""
    tidy = [Record(r.path, (r.label or "").strip() or None) for r in records]
    seen: dict[str, tuple[str, str]] = {name.casefold(): (name, "the project's classes") for name in known}
    named = [(name.strip(), f"{source}: class list") for name in classes]
    for name, where in named + [(r.label, r.path) for r in tidy if r.label is not None]:
        first = seen.setdefault(name.casefold(), (name, where))
        if first[0] != name:
            raise DataError(
                f"{source}: classes {first[0]!r} ({first[1]}) and {name!r} ({where}) differ only in case; "
                "class names are case-sensitive: rename one so both say the same"
            )
    ordered = list(dict.fromkeys(name for name, _ in named))
    return tidy, ordered + sorted({r.label for r in tidy if r.label is not None} - set(ordered))


@locked
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
    """Import an ImageFolder tree, a manifest file or a built-in source; returns results per split.

    Entries of a manifest must lie in its folder, the workspace or settings.allowed_roots (see manifest.py).
    """
    if source == "fashion-mnist":
        pool_root, test_root = materialize_fashion_mnist(
            settings.dirs.sources / "fashion-mnist",
            pool_size=pool_size,
            test_size=test_size,
            seed=settings.seed,
        )
        results = {}
        for name, root in ((POOL, pool_root), (TEST, test_root)):
            records, _ = read_image_folder(root)
            results[name] = import_records(
                catalog, settings, records, FASHION_MNIST_CLASSES, source=source, split=name, trust_labels=trust_labels
            )
        return results
    path = Path(source).expanduser()
    extra_roots: list[str | Path] = [settings.workspace, *settings.allowed_roots]
    if path.is_dir():
        records, classes = read_image_folder(path, allowed_roots=extra_roots)
    elif path.is_file():
        records, classes = read_manifest(path, settings.dirs.sources / "remote", allowed_roots=extra_roots)
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
