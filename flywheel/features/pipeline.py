"""The embedding pipeline: from image files on disk to (N, D) vectors, as fast as the device allows.

CPU: DataLoader workers decode and resize (uint8, a quarter of float's bytes to pass between processes);
the main process normalises each batch and runs the body in channels_last with torch's intra-op threads.
CUDA: workers only read file bytes; JPEGs are decoded in batches on the GPU (nvJPEG), then resized and
normalised there; other files (PNG, CMYK or EXIF-rotated JPEGs) are decoded by the workers. Batches come
through pinned memory, the body runs in bf16 autocast and channels_last, optionally torch.compile'd.

Vectors are streamed out in shards (`embed_stream`), so a caller can save each one as it completes and a
crash loses at most one shard. Pixels are exactly those of `images.preprocess` (same resize on uint8,
same normalisation), so a head fitted on these vectors serves on `preprocess`'d images unchanged.
"""

from __future__ import annotations

import os
from collections.abc import Callable, Iterator, Sequence
from contextlib import nullcontext
from dataclasses import dataclass, field
from typing import TypeAlias

import numpy as np
import numpy.typing as npt
import torch
from PIL import Image
from torch import nn
from torch.utils.data import DataLoader, Dataset
from torchvision.io import ImageReadMode, decode_jpeg, read_file
from torchvision.transforms import v2

from flywheel.config import Settings
from flywheel.errors import DataError, FlywheelError
from flywheel.features.backbones import BackboneSpec, feature_dim, get_spec
from flywheel.sources.images import _normalize, check_image_size, forked_worker_init, load_image, read_header

EXIF_ORIENTATION = 0x0112  # EXIF tag; 1 = upright. nvJPEG ignores it, so rotated JPEGs decode on the CPU.
GPU_JPEG_MODES = ("RGB", "L")  # nvJPEG handles these; CMYK/YCCK JPEGs go to the CPU decoder

Forward: TypeAlias = Callable[[torch.Tensor], torch.Tensor]
"""What a batch goes through: a module, or its torch.compile'd form."""


@dataclass(frozen=True)
class EmbedOptions:
    """How the pipeline feeds the body (from `Settings.embed` and `embed_batch_size` / `torch_threads`)."""

    batch_size: int = 128
    workers: int = -1  # DataLoader worker processes; -1: auto_workers(device), 0: decode in this process
    compile: bool = False  # torch.compile the body: a one-off compile, then faster steps (CUDA mostly)
    gpu_decode: bool = True  # JPEGs decoded by nvJPEG when the device is CUDA
    shard_size: int = 8192  # rows per yielded shard: what a caller saves at once, and a crash can lose
    threads: int = 0  # torch intra-op threads on CPU; 0: leave torch's setting

    def __post_init__(self) -> None:
        for name in ("batch_size", "shard_size"):
            if getattr(self, name) < 1:
                raise DataError(f"embed options: {name} must be >= 1, got {getattr(self, name)}")
        if self.workers < -1 or self.threads < 0:
            raise DataError(f"embed options: workers must be >= -1 and threads >= 0, got {self.workers}/{self.threads}")


@dataclass(frozen=True)
class Embedder:
    """A frozen body and how to feed it: everything "image paths -> vectors" needs besides the paths."""

    body: nn.Module
    spec: BackboneSpec
    image_size: int
    device: torch.device = torch.device("cpu")
    options: EmbedOptions = EmbedOptions()

    @classmethod
    def configured(cls, body: nn.Module, settings: Settings, *, device: torch.device) -> Embedder:
        """The body fed as the settings ask (`embed.*`, `embed_batch_size`, `torch_threads`, `image_size`)."""
        embed = settings.embed
        options = EmbedOptions(
            batch_size=settings.embed_batch_size,
            workers=embed.workers,
            compile=embed.compile,
            gpu_decode=embed.gpu_decode,
            shard_size=embed.shard_size,
            threads=settings.torch_threads,
        )
        return cls(body, get_spec(settings.backbone), settings.image_size, device, options)


def auto_workers(device: torch.device) -> int:
    """Worker processes when the settings say -1.

    CUDA: up to 8, leaving a core for the main process (it only feeds the GPU). CPU: the body's forward
    already uses every core, so decode workers only pay off with cores to spare; measured on 2 cores
    (bench/embed.py), one worker beside the forward beats decoding in the main process.
    """
    cores = len(os.sched_getaffinity(0)) if hasattr(os, "sched_getaffinity") else (os.cpu_count() or 1)
    if device.type == "cuda":
        return max(1, min(8, cores - 1))
    return max(1, cores // 4)


# ----------------------------------------------------------------------------------------------- reading


def _gpu_decodable(path: str) -> bool:
    """A JPEG nvJPEG decodes as the CPU path would: RGB or grayscale, no EXIF rotation to apply. Checked
    from the header (read_header also refuses missing, empty and oversized files, naming them)."""
    header = read_header(path)
    if header.format != "JPEG" or header.mode not in GPU_JPEG_MODES:
        return False
    with Image.open(path) as im:
        orientation: int = im.getexif().get(EXIF_ORIENTATION, 1)
        return orientation == 1


@dataclass
class _Batch:
    """A collated batch: pixels decoded by workers and, on CUDA, JPEG bytes left for the GPU.

    The JPEG files travel end to end in one flat tensor: a worker shares each tensor it returns through a
    file descriptor of its own, and one tensor per file (256 a batch, 8 workers) ran out of them on an H200
    machine (EBADF in the worker's queue feeder, and the loader waited forever).
    """

    size: int
    pixels: torch.Tensor  # (P, 3, S, S) uint8
    pixel_rows: torch.Tensor  # (P,) int64: row of each in the batch
    jpeg_bytes: torch.Tensor = field(default_factory=lambda: torch.empty(0, dtype=torch.uint8))  # files end to end
    jpeg_sizes: list[int] = field(default_factory=list)  # bytes of each file in jpeg_bytes
    jpeg_rows: list[int] = field(default_factory=list)
    jpeg_paths: list[str] = field(default_factory=list)

    @property
    def jpegs(self) -> list[torch.Tensor]:
        """Each file's encoded bytes, (n,) uint8 views into jpeg_bytes."""
        return list(torch.split(self.jpeg_bytes, self.jpeg_sizes)) if self.jpeg_sizes else []

    def pin_memory(self) -> _Batch:  # called by DataLoader(pin_memory=True)
        self.pixels = self.pixels.pin_memory()
        self.jpeg_bytes = self.jpeg_bytes.pin_memory()
        return self


_FileItem: TypeAlias = tuple[str, torch.Tensor, str]  # ("pixels" or "jpeg", tensor, path)


class _Files(Dataset[_FileItem]):
    """Item i: ("pixels", uint8 (3, S, S)) decoded and resized here, or ("jpeg", bytes) for nvJPEG."""

    def __init__(self, paths: Sequence[str], image_size: int, gpu_jpeg: bool):
        self.paths = [str(p) for p in paths]
        self.resize = v2.Resize((image_size, image_size), antialias=True)  # as images.eval_transform
        self.gpu_jpeg = gpu_jpeg

    def __len__(self) -> int:
        return len(self.paths)

    def __getitem__(self, i: int) -> _FileItem:
        path = self.paths[i]
        if self.gpu_jpeg and _gpu_decodable(path):
            return "jpeg", read_file(path), path
        return "pixels", self.resize(load_image(path)), path


def _collate(items: list[_FileItem]) -> _Batch:
    rows = [i for i, (kind, _, _) in enumerate(items) if kind == "pixels"]
    jpeg_rows = [i for i, (kind, _, _) in enumerate(items) if kind == "jpeg"]
    pixels = torch.stack([items[i][1] for i in rows]) if rows else torch.empty(0, 3, 1, 1, dtype=torch.uint8)
    return _Batch(
        size=len(items),
        pixels=pixels,
        pixel_rows=torch.tensor(rows, dtype=torch.int64),
        jpeg_bytes=torch.cat([items[i][1] for i in jpeg_rows]) if jpeg_rows else torch.empty(0, dtype=torch.uint8),
        jpeg_sizes=[len(items[i][1]) for i in jpeg_rows],
        jpeg_rows=jpeg_rows,
        jpeg_paths=[items[i][2] for i in jpeg_rows],
    )


def _decode_on_gpu(batch: _Batch, size: int, device: torch.device) -> list[torch.Tensor]:
    """JPEG bytes -> uint8 (3, S, S) tensors on the device, resized per shape group; a batch nvJPEG
    rejects is decoded again on the CPU so the error names the file (or the CPU decoder copes)."""
    try:
        decoded = decode_jpeg(batch.jpegs, mode=ImageReadMode.RGB, device=device)
    except RuntimeError:
        return [v2.functional.resize(load_image(p), [size, size], antialias=True).to(device) for p in batch.jpeg_paths]
    out: list[torch.Tensor | None] = [None] * len(decoded)
    by_shape: dict[tuple[int, ...], list[int]] = {}
    for i, image in enumerate(decoded):
        by_shape.setdefault(tuple(image.shape), []).append(i)
    for members in by_shape.values():  # one resize call per distinct input size
        resized = v2.functional.resize(torch.stack([decoded[i] for i in members]), [size, size], antialias=True)
        for j, i in enumerate(members):
            out[i] = resized[j]
    return out  # type: ignore[return-value]  # every slot is filled: each image is in one shape group


def _device_batch(batch: _Batch, size: int, device: torch.device, normalize: v2.Transform) -> torch.Tensor:
    """The batch as float (B, 3, S, S) on the device, normalised, channels_last."""
    cuda = device.type == "cuda"
    if not batch.jpeg_rows:
        x = batch.pixels.to(device, non_blocking=cuda)
    else:
        x = torch.empty((batch.size, 3, size, size), dtype=torch.uint8, device=device)
        if len(batch.pixel_rows):
            x[batch.pixel_rows.to(device)] = batch.pixels.to(device, non_blocking=cuda)
        x[torch.tensor(batch.jpeg_rows, device=device)] = torch.stack(_decode_on_gpu(batch, size, device))
    normalized: torch.Tensor = normalize(x)
    return normalized.contiguous(memory_format=torch.channels_last)


# ---------------------------------------------------------------------------------------------- the loop


def prepare_body(body: nn.Module, device: torch.device, options: EmbedOptions) -> Forward:
    """The body in eval mode on the device, channels_last, compiled when asked (returns what to call)."""
    body = body.eval().to(device).to(memory_format=torch.channels_last)
    return torch.compile(body, dynamic=False) if options.compile else body


def embed_stream(
    paths: Sequence[str], embedder: Embedder, *, on_batch: Callable[[int], None] | None = None
) -> Iterator[tuple[int, npt.NDArray[np.float32]]]:
    """Yield (start, vectors (n, D) float32) for consecutive shards of `paths`, in order; one DataLoader
    (one set of workers) for the whole stream. `on_batch(n)` is called after each batch (progress)."""
    body, spec, image_size, options = embedder.body, embedder.spec, embedder.image_size, embedder.options
    device = embedder.device
    check_image_size(spec, image_size)
    if not len(paths):
        return
    cuda = device.type == "cuda"
    workers = options.workers
    if workers == -1:  # starting worker processes costs more than it saves on a couple of batches
        workers = auto_workers(device) if len(paths) > 2 * options.batch_size else 0
    if options.threads and not cuda:
        torch.set_num_threads(options.threads)
    loader = DataLoader(
        _Files(paths, image_size, gpu_jpeg=cuda and options.gpu_decode),
        batch_size=options.batch_size,
        shuffle=False,
        num_workers=workers,
        collate_fn=_collate,
        pin_memory=cuda,
        prefetch_factor=4 if workers else None,
        worker_init_fn=forked_worker_init,
    )
    model = prepare_body(body, device, options)
    width = feature_dim(body, spec)  # a StageBody gives its stage's width
    normalize = _normalize(spec)
    autocast = torch.autocast("cuda", dtype=torch.bfloat16) if cuda else nullcontext()
    shard: list[torch.Tensor] = []
    start = in_shard = 0
    with torch.inference_mode(), autocast:
        for batch in loader:
            x = _device_batch(batch, image_size, device, normalize)
            if options.compile and len(x) < options.batch_size:  # pad: one compiled shape, no recompile
                x = torch.cat([x, x.new_zeros((options.batch_size - len(x), *x.shape[1:]))])
            feats = model(x)[: batch.size].float()
            if feats.ndim != 2 or feats.shape[1] != width:
                raise FlywheelError(f"{spec.name} body gave features of shape {tuple(feats.shape)}, spec says "
                                    f"(B, {width})")  # fmt: skip
            shard.append(feats)  # kept on the device: no sync per batch
            in_shard += batch.size
            if on_batch is not None:
                on_batch(batch.size)
            while in_shard >= options.shard_size:
                vectors = torch.cat(shard).cpu().numpy()
                yield start, vectors[: options.shard_size]
                start += options.shard_size
                rest = vectors[options.shard_size :]
                shard = [torch.from_numpy(rest).to(device)] if len(rest) else []
                in_shard = len(rest)
        if shard:
            yield start, torch.cat(shard).cpu().numpy()


def embed_all(
    paths: Sequence[str], embedder: Embedder, *, on_batch: Callable[[int], None] | None = None
) -> npt.NDArray[np.float32]:
    """(N, D) float32, row i for paths[i]: `embed_stream` collected in one array."""
    out = np.empty((len(paths), feature_dim(embedder.body, embedder.spec)), dtype=np.float32)
    for start, vectors in embed_stream(paths, embedder, on_batch=on_batch):
        out[start : start + len(vectors)] = vectors
    return out
