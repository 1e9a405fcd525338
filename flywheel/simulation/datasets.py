"""Data for `flywheel simulate`: ImageFolder trees and built-in sources, embedded once and cached on disk.

Built-in sources are written as PNG ImageFolder trees under `settings.dirs.sources / "simulate"`, so every
source goes through the same path as a user's folder: read_image_folder -> embed -> cache. The cache is
an EmbeddingStore keyed by backbone, weights and image size plus a hash of the dataset's file list, so a
repeated run embeds nothing.
"""

from __future__ import annotations

import hashlib
from dataclasses import dataclass
from pathlib import Path
from typing import Any

import numpy as np
import numpy.typing as npt

from flywheel.config import Settings
from flywheel.errors import DataError
from flywheel.features.backbones import build_body, get_spec
from flywheel.features.pipeline import Embedder
from flywheel.features.store import EmbeddingStore, embed_samples, resolve_device
from flywheel.sources.importing import FASHION_MNIST_CLASSES, FASHION_MNIST_DIR, _read_idx, read_image_folder

BUILTIN = ("fashion-mnist", "digits", "fashion-mnist-imbalanced")
IMBALANCED_LARGEST, IMBALANCED_SMALLEST = 1000, 20
SOURCE_SEED = 0  # built-in subsets are fixed: the same images on every machine and run
WEIGHTS_VERSION = "imagenet"


@dataclass(frozen=True)
class Dataset:
    """A labelled image set, row i = paths[i] with class index targets[i]; features (N, D) once embedded."""

    name: str
    paths: list[str]
    targets: npt.NDArray[np.int64]
    classes: list[str]
    features: npt.NDArray[np.float32] | None = None


def imbalanced_sizes(
    n_classes: int, largest: int = IMBALANCED_LARGEST, smallest: int = IMBALANCED_SMALLEST
) -> list[int]:
    """Geometric class sizes from `largest` down to `smallest` (a long tail)."""
    ratio = (smallest / largest) ** (1 / (n_classes - 1))
    return [int(round(largest * ratio**i)) for i in range(n_classes)]


def _write_pngs(
    root: Path,
    images: npt.NDArray[np.uint8],
    labels: npt.NDArray[np.integer[Any]],
    classes: list[str],
    names: list[str],
) -> Path:
    """images: (N, H, W) uint8 -> root/<class>/<name>.png; idempotent (a `.complete` marker ends a tree)."""
    if (root / ".complete").exists():
        return root
    import torch
    from torchvision.io import encode_png

    for image, label, name in zip(images, labels, names, strict=True):
        folder = root / classes[int(label)]
        folder.mkdir(parents=True, exist_ok=True)
        png = encode_png(torch.from_numpy(np.ascontiguousarray(image)[None]))
        (folder / f"{name}.png").write_bytes(png.numpy().tobytes())
    root.mkdir(parents=True, exist_ok=True)
    (root / ".complete").touch()
    return root


def materialize_builtin(name: str, dest: Path, *, pool_size: int = 5000, source_dir: Path = FASHION_MNIST_DIR) -> Path:
    """Write a built-in source as an ImageFolder tree under dest; returns its root."""
    rng = np.random.default_rng(SOURCE_SEED)
    if name == "digits":
        from sklearn.datasets import load_digits

        digits = load_digits()
        images = np.round(digits.images * (255 / 16)).astype(np.uint8)  # 0..16 -> 0..255
        names = [f"digit-{i:04d}" for i in range(len(images))]
        return _write_pngs(dest / "digits", images, digits.target, [str(d) for d in range(10)], names)
    if name not in ("fashion-mnist", "fashion-mnist-imbalanced"):
        raise DataError(f"unknown built-in source {name!r}; choose one of: {', '.join(BUILTIN)}")
    images, labels = _read_idx(source_dir, "train")
    if name == "fashion-mnist":
        chosen = np.sort(rng.permutation(len(labels))[: min(pool_size, len(labels))])
        root = dest / f"fashion-mnist-{len(chosen)}-seed{SOURCE_SEED}"
    else:
        # Which class gets which size is drawn (seeded), so the tail is not hand-picked.
        sizes = dict(zip(rng.permutation(len(FASHION_MNIST_CLASSES)).tolist(), imbalanced_sizes(10), strict=True))
        chosen = np.sort(
            np.concatenate([rng.choice(np.flatnonzero(labels == c), size=sizes[c], replace=False) for c in range(10)])
        )
        root = dest / f"fashion-mnist-imbalanced-{IMBALANCED_LARGEST}to{IMBALANCED_SMALLEST}-seed{SOURCE_SEED}"
    names = [f"train-{i:05d}" for i in chosen]
    return _write_pngs(root, images[chosen], labels[chosen], list(FASHION_MNIST_CLASSES), names)


def load_dataset(data: str, settings: Settings, *, pool_size: int = 5000) -> Dataset:
    """A built-in source name or an ImageFolder path -> paths, targets, classes (not embedded yet)."""
    if data in BUILTIN:
        root, name = materialize_builtin(data, settings.dirs.sources / "simulate", pool_size=pool_size), data
    else:
        root = Path(data).expanduser()
        if not root.is_dir():
            raise DataError(f"--data {data}: not a folder and not one of the built-in sources: {', '.join(BUILTIN)}")
        name = root.resolve().name
    records, classes = read_image_folder(root)
    index: dict[str | None, int] = {c: i for i, c in enumerate(classes)}  # looked up by Record.label; all are set here
    return Dataset(
        name=name,
        paths=[r.path for r in records],
        targets=np.array([index[r.label] for r in records], dtype=np.int64),
        classes=classes,
    )


def file_list_digest(paths: list[str]) -> str:
    """Hash of the file list (path and size of each file, in order): a different set -> a different cache."""
    digest = hashlib.sha256()
    for path in paths:
        digest.update(f"{path}\t{Path(path).stat().st_size}\n".encode())
    return digest.hexdigest()[:16]


def embed_dataset(dataset: Dataset, settings: Settings, *, progress: bool = True) -> Dataset:
    """The dataset with features (N, D) float32 from the configured backbone, cached on disk."""
    spec = get_spec(settings.backbone)
    key = (
        f"{EmbeddingStore.key_for(spec, WEIGHTS_VERSION, settings.image_size)}__files-{file_list_digest(dataset.paths)}"
    )
    store = EmbeddingStore(settings.dirs.embeddings / "simulate", key)
    ids = list(range(len(dataset.paths)))
    if store.missing(ids):
        body = build_body(settings.backbone, pretrained=True)
        embedder = Embedder.configured(body, settings, device=resolve_device(settings.finetune.device))
        vectors = embed_samples(store, ids, dataset.paths, embedder, progress=progress)
    else:
        vectors = store.get(ids)
    return Dataset(dataset.name, dataset.paths, dataset.targets, dataset.classes, np.asarray(vectors, np.float32))
