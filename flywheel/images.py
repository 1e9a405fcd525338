"""Image decoding and preprocessing: one path from a file on disk to the tensor a body expects.

Embedding, prediction and fine-tuning all go through `preprocess`, so the features a head was fitted on
and the features it sees at serving time come from identical pixels.
"""

from __future__ import annotations

import os
from collections.abc import Sequence

import numpy as np
import torch
from torch.utils.data import Dataset
from torchvision.io import ImageReadMode, decode_image
from torchvision.transforms import v2

from flywheel.backbones import BackboneSpec
from flywheel.errors import DataError

# Train-time augmentation (TRANSFER.md: augmentation is one answer to label scarcity). Mild crops only:
# the crop must keep the object, and pretrained features expect objects at roughly their usual scale.
CROP_SCALE = (0.7, 1.0)


def load_image(path: str) -> torch.Tensor:
    """Decode a file to RGB uint8 (3, H, W); grayscale and RGBA become RGB. DataError names a bad file."""
    if not os.path.isfile(path):
        raise DataError(f"image file not found: {path}")
    try:
        image = decode_image(path, mode=ImageReadMode.RGB, apply_exif_orientation=True)
    except (RuntimeError, ValueError) as exc:
        raise DataError(f"cannot decode image {path}: {exc}") from None
    return image[0] if image.ndim == 4 else image  # an animated GIF decodes to frames: keep the first


def _normalize(spec: BackboneSpec) -> v2.Transform:
    return v2.Compose([v2.ToDtype(torch.float32, scale=True), v2.Normalize(list(spec.mean), list(spec.std))])


def eval_transform(spec: BackboneSpec, image_size: int) -> v2.Transform:
    """uint8 (…, 3, H, W) -> float (…, 3, S, S): antialiased resize to S x S, then the spec's normalisation."""
    return v2.Compose([v2.Resize((image_size, image_size), antialias=True), _normalize(spec)])


def train_transform(spec: BackboneSpec, image_size: int) -> v2.Transform:
    """eval_transform with a random resized crop (scale 0.7-1) and a horizontal flip."""
    return v2.Compose(
        [
            v2.RandomResizedCrop((image_size, image_size), scale=CROP_SCALE, antialias=True),
            v2.RandomHorizontalFlip(),
            _normalize(spec),
        ]
    )


def check_image_size(spec: BackboneSpec, image_size: int) -> None:
    """Fail fast when a body needs a fixed input size (ViT) and another is asked for."""
    if spec.input_size is not None and image_size != spec.input_size:
        raise DataError(f"backbone {spec.name} needs image_size {spec.input_size}, got {image_size}")


def preprocess(batch_uint8: torch.Tensor, spec: BackboneSpec, image_size: int) -> torch.Tensor:
    """uint8 (B, 3, H, W) or (3, H, W) -> float32 normalised (B, 3, S, S) (a batch dim is added if absent)."""
    if batch_uint8.dtype != torch.uint8:
        raise DataError(f"preprocess expects uint8 pixels, got {batch_uint8.dtype}")
    if batch_uint8.ndim == 3:
        batch_uint8 = batch_uint8.unsqueeze(0)
    if batch_uint8.ndim != 4 or batch_uint8.shape[1] != 3:
        raise DataError(f"preprocess expects (B, 3, H, W), got {tuple(batch_uint8.shape)}")
    check_image_size(spec, image_size)
    return eval_transform(spec, image_size)(batch_uint8)


class ImageDataset(Dataset):
    """Preprocessed images from absolute paths; items are x (3, S, S), or (x, target) when targets given.

    `augment=True` applies the fine-tuning augmentation; randomness comes from torch's RNG (seeded by the
    caller, and per DataLoader worker from the loader's generator), so runs are reproducible.
    """

    def __init__(
        self,
        paths: Sequence[str],
        spec: BackboneSpec,
        image_size: int,
        targets: Sequence[int] | np.ndarray | None = None,
        *,
        augment: bool = False,
    ):
        check_image_size(spec, image_size)
        if targets is not None and len(targets) != len(paths):
            raise DataError(f"{len(paths)} paths but {len(targets)} targets")
        self.paths = [str(p) for p in paths]
        self.targets = None if targets is None else np.asarray(targets, dtype=np.int64)
        self.transform = train_transform(spec, image_size) if augment else eval_transform(spec, image_size)

    def __len__(self) -> int:
        return len(self.paths)

    def __getitem__(self, i: int) -> torch.Tensor | tuple[torch.Tensor, int]:
        x = self.transform(load_image(self.paths[i]))
        if self.targets is None:
            return x
        return x, int(self.targets[i])
