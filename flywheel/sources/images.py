"""Image decoding and preprocessing: one path from a file on disk to the tensor a body expects.

Embedding, prediction and fine-tuning all go through `preprocess`, so the features a head was fitted on
and the features it sees at serving time come from identical pixels.
"""

from __future__ import annotations

import os
import threading
import warnings
from collections.abc import Sequence
from dataclasses import dataclass
from typing import Any, TypeAlias

import numpy as np
import numpy.typing as npt
import torch
from PIL import Image, ImageOps, UnidentifiedImageError
from torch.utils.data import Dataset
from torchvision.io import ImageReadMode, decode_image
from torchvision.transforms import v2

from flywheel.errors import BadImageError, DataError
from flywheel.features.backbones import BackboneSpec

# Train-time augmentation (docs/transfer.md: augmentation is one answer to label scarcity). Mild crops only:
# the crop must keep the object, and pretrained features expect objects at roughly their usual scale.
CROP_SCALE = (0.7, 1.0)


# Pixels above which an image is refused unreadable: PIL's own decompression-bomb limit (it refuses twice
# its warning threshold outright). The configurable, lower limit (settings.max_image_pixels) is checked at import.
HARD_MAX_PIXELS = 2 * 89_478_485
TORCHVISION_FORMATS = ("JPEG", "PNG", "GIF", "WEBP")  # decoded by torchvision (libjpeg-turbo, libpng); others by PIL
ALPHA_FORMATS = ("PNG", "WEBP")  # torchvision decodes their alpha channel (RGB_ALPHA mode)


@dataclass(frozen=True)
class ImageHeader:
    """What the file's header says, read without decoding the pixels."""

    format: str
    mode: str  # PIL's: RGB, L, P, RGBA, LA, CMYK, I;16, ...
    width: int
    height: int
    has_alpha: bool


def read_header(path: str, *, max_pixels: int = HARD_MAX_PIXELS) -> ImageHeader:
    """The image's format, mode and size from its header; BadImageError (with a short reason) when the file is
    missing, empty, not an image, or larger than `max_pixels` (a decompression bomb costs nothing here)."""
    if not os.path.isfile(path):
        raise BadImageError(path, "missing file")
    if os.path.getsize(path) == 0:
        raise BadImageError(path, "empty file", "0 bytes")
    try:
        with warnings.catch_warnings():
            warnings.simplefilter("ignore", Image.DecompressionBombWarning)
            with Image.open(path) as im:
                header = ImageHeader(str(im.format), im.mode, im.width, im.height, bool(im.has_transparency_data))
    except Image.DecompressionBombError as exc:
        raise BadImageError(path, "too many pixels", str(exc)) from exc
    except UnidentifiedImageError as exc:
        raise BadImageError(path, "not an image", "no known image format") from exc
    except (OSError, SyntaxError, ValueError) as exc:
        raise BadImageError(path, "truncated or corrupt", f"header: {exc}") from exc
    if header.width * header.height > max_pixels:
        raise BadImageError(
            path, "too many pixels", f"{header.width} x {header.height} is above the limit of {max_pixels:,} pixels"
        )
    return header


def load_image(path: str) -> torch.Tensor:
    """Decode a file to RGB uint8 (3, H, W), upright per its EXIF orientation.

    Grayscale, palette and CMYK become RGB; 16-bit samples keep their 8 high bits; transparency is composited
    over white (what an annotator sees); an animated GIF keeps its first frame. BadImageError names the file
    and a short reason (empty, not an image, too many pixels, truncated or corrupt).
    """
    header = read_header(path)
    try:
        if header.format in TORCHVISION_FORMATS:
            alpha = header.has_alpha and header.format in ALPHA_FORMATS
            mode = ImageReadMode.RGB_ALPHA if alpha else ImageReadMode.RGB
            image: torch.Tensor = decode_image(path, mode=mode, apply_exif_orientation=True)
            image = image[0] if image.ndim == 4 else image  # an animated GIF decodes to frames: keep the first
        else:
            image = _decode_with_pil(path)
    except (RuntimeError, ValueError, OSError, SyntaxError) as exc:
        raise BadImageError(path, "truncated or corrupt", _decoder_message(exc)) from exc
    if image.dtype == torch.uint16:  # 16-bit PNG: keep the high byte
        image = (image.to(torch.int32) >> 8).to(torch.uint8)
    if image.shape[0] == 4:
        image = _over_white(image)
    return image


def _decoder_message(exc: Exception) -> str:
    """torchvision prefixes its C++ source location ("decode_png, /…/decode_png.cpp:79, Out of …"): drop it."""
    text = str(exc).strip()
    _, sep, rest = text.partition(".cpp:")
    return rest.partition(", ")[2] if sep and ", " in rest else text


def _decode_with_pil(path: str) -> torch.Tensor:
    """Formats torchvision does not read (BMP, TIFF, ...): RGB, or RGBA when transparent, as uint8/uint16."""
    with Image.open(path) as file:
        im = ImageOps.exif_transpose(file)
        if im.mode in ("I;16", "I;16B", "I;16L", "I"):  # PIL's RGB conversion would clip, not scale
            plane = torch.from_numpy(np.asarray(im).astype(np.int64) >> 8).clamp(0, 255).to(torch.uint8)
            return plane.expand(3, *plane.shape).clone()
        im = im.convert("RGBA" if im.has_transparency_data else "RGB")
        return torch.from_numpy(np.asarray(im).copy()).permute(2, 0, 1).contiguous()


def _over_white(rgba: torch.Tensor) -> torch.Tensor:
    """uint8 (4, H, W) -> (3, H, W): alpha-composite over a white background."""
    rgb, alpha = rgba[:3].to(torch.int32), rgba[3:].to(torch.int32)
    return ((rgb * alpha + 255 * (255 - alpha) + 127) // 255).to(torch.uint8)


def forked_worker_init(_worker_id: int) -> None:
    """`worker_init_fn` for DataLoaders with workers: a forked worker inherits the parent's thread-exit hooks
    (Prefect's background services register some once a flow or the API was used), which fail in the worker
    when it ends, so the worker exits 1 and the DataLoader fails the whole embedding. The worker has no
    threads of its own to drain: drop them."""
    threading._threading_atexits.clear()  # type: ignore[attr-defined]  # private: not in typeshed


def _normalize(spec: BackboneSpec) -> v2.Transform:
    return v2.Compose([v2.ToDtype(torch.float32, scale=True), v2.Normalize(list(spec.mean), list(spec.std))])


def eval_transform(spec: BackboneSpec, image_size: int) -> v2.Transform:
    """uint8 (…, 3, H, W) -> float (…, 3, S, S): antialiased resize to S x S, then the spec's normalisation."""
    return v2.Compose([v2.Resize((image_size, image_size), antialias=True), _normalize(spec)])


@dataclass(frozen=True)
class Augmentation:
    """Train-time augmentation chosen for the domain (see `choose_augmentation`)."""

    hflip: bool = True
    colour_jitter: bool = False
    crop_scale: tuple[float, float] = CROP_SCALE
    reason: str = "default: random resized crop and horizontal flip"

    def as_params(self) -> dict[str, object]:
        return {"augment_hflip": self.hflip, "augment_colour_jitter": self.colour_jitter,
                "augment_crop_scale": f"{self.crop_scale[0]:g}-{self.crop_scale[1]:g}"}  # fmt: skip


def is_grayscale(paths: Sequence[str], *, sample: int = 32) -> bool:
    """True when every one of the first `sample` images has identical R, G and B planes."""
    for path in list(paths)[:sample]:
        image = load_image(path)
        if not (torch.equal(image[0], image[1]) and torch.equal(image[1], image[2])):
            return False
    return bool(len(paths))


def choose_augmentation(paths: Sequence[str], *, hflip: bool = True) -> Augmentation:
    """Keep it simple and safe: crops always (scale 0.7-1: the object stays in frame, at a familiar size);
    horizontal flips unless the settings turn them off (text, digits, oriented data); colour jitter only for
    colour images (on grayscale images it would only add a tint the test images never have); never vertical
    flips or rotations (most photos have an up)."""
    grey = is_grayscale(paths)
    reason = (
        ("grayscale images: no colour jitter" if grey else "colour images: mild colour jitter")
        + ("; horizontal flips" if hflip else "; no flips (settings)")
        + f"; random resized crop {CROP_SCALE[0]:g}-{CROP_SCALE[1]:g}"
    )
    return Augmentation(hflip=hflip, colour_jitter=not grey, reason=reason)


def train_transform(spec: BackboneSpec, image_size: int, augmentation: Augmentation | None = None) -> v2.Transform:
    """eval_transform with a random resized crop, and per `augmentation` a horizontal flip and colour jitter."""
    aug = augmentation or Augmentation()
    steps: list[v2.Transform] = [v2.RandomResizedCrop((image_size, image_size), scale=aug.crop_scale, antialias=True)]
    if aug.hflip:
        steps.append(v2.RandomHorizontalFlip())
    if aug.colour_jitter:
        steps.append(v2.ColorJitter(brightness=0.2, contrast=0.2, saturation=0.2))
    return v2.Compose([*steps, _normalize(spec)])


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
    x: torch.Tensor = eval_transform(spec, image_size)(batch_uint8)
    return x


ImageItem: TypeAlias = torch.Tensor | tuple[torch.Tensor, int]
"""An ImageDataset item: x, or (x, target) when the dataset has targets."""


class ImageDataset(Dataset[ImageItem]):
    """Preprocessed images from absolute paths; items are x (3, S, S), or (x, target) when targets given.

    `augment=True` (or an Augmentation) applies the fine-tuning augmentation; randomness comes from torch's
    RNG (seeded by the caller, and per DataLoader worker from the loader's generator), so runs are reproducible.
    """

    def __init__(
        self,
        paths: Sequence[str],
        spec: BackboneSpec,
        image_size: int,
        targets: Sequence[int] | npt.NDArray[np.integer[Any]] | None = None,
        *,
        augment: bool | Augmentation = False,
    ):
        check_image_size(spec, image_size)
        if targets is not None and len(targets) != len(paths):
            raise DataError(f"{len(paths)} paths but {len(targets)} targets")
        self.paths = [str(p) for p in paths]
        self.targets = None if targets is None else np.asarray(targets, dtype=np.int64)
        if augment:
            aug = augment if isinstance(augment, Augmentation) else None
            self.transform = train_transform(spec, image_size, aug)
        else:
            self.transform = eval_transform(spec, image_size)

    def __len__(self) -> int:
        return len(self.paths)

    def __getitem__(self, i: int) -> ImageItem:
        x: torch.Tensor = self.transform(load_image(self.paths[i]))
        if self.targets is None:
            return x
        return x, int(self.targets[i])
