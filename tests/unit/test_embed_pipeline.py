"""The embedding pipeline: same pixels as images.preprocess, shards in order, resumable, GPU-decode routing."""

from __future__ import annotations

import numpy as np
import pytest
import torch
from PIL import Image
from torch import nn
from torchvision.io import decode_jpeg, encode_jpeg, write_png

from flywheel.config import load_settings
from flywheel.errors import BadImageError, DataError, FlywheelError
from flywheel.features.backbones import BackboneSpec, build_body, get_spec
from flywheel.features.pipeline import (
    EXIF_ORIENTATION,
    Embedder,
    EmbedOptions,
    _collate,
    _device_batch,
    _Files,
    _gpu_decodable,
    auto_workers,
    embed_all,
    embed_stream,
)
from flywheel.features.store import EmbeddingStore, embed_samples
from flywheel.sources.images import _normalize, load_image, preprocess

CPU = torch.device("cpu")
FAKE = BackboneSpec("fake", 3, (0.5, 0.5, 0.5), (0.25, 0.25, 0.25), "fake/v1")


class Pool(nn.Module):
    """A stand-in body: per-channel means (B, 3); counts images and can fail after a number of calls."""

    def __init__(self, fail_after: int | None = None):
        super().__init__()
        self.seen, self.calls, self.fail_after = 0, 0, fail_after

    def forward(self, x: torch.Tensor) -> torch.Tensor:
        self.calls += 1
        if self.fail_after is not None and self.calls > self.fail_after:
            raise RuntimeError("simulated crash")
        self.seen += len(x)
        return x.mean(dim=(2, 3))


@pytest.fixture
def images(tmp_path):
    """Nine files of mixed formats and sizes: RGB JPEGs, grayscale PNGs, a colour PNG; image i is unique."""
    gen = torch.Generator().manual_seed(0)
    paths = []
    for i in range(9):
        size = (3, 20 + 4 * i, 24)
        img = torch.randint(0, 256, size, dtype=torch.uint8, generator=gen)
        if i % 3 == 0:
            paths.append(str(tmp_path / f"{i}.jpg"))
            (tmp_path / f"{i}.jpg").write_bytes(encode_jpeg(img, quality=90).numpy().tobytes())
        else:
            paths.append(str(tmp_path / f"{i}.png"))
            write_png(img[:1] if i % 3 == 1 else img, paths[-1])
    return paths


def reference(paths, body, spec, size):
    """What one image at a time through images.preprocess gives: the pixels a head is served."""
    with torch.inference_mode():
        return torch.cat([body(preprocess(load_image(p), spec, size)) for p in paths]).numpy()


@pytest.fixture(scope="module")
def lite0() -> nn.Module:
    return build_body("efficientnet_lite0")


@pytest.mark.parametrize("workers", [0, 2])
def test_same_vectors_as_preprocess_one_image_at_a_time(images, workers, lite0):
    body, spec = lite0, get_spec("efficientnet_lite0")
    out = embed_all(images, Embedder(body, spec, 32, CPU, EmbedOptions(batch_size=4, workers=workers)))
    assert out.shape == (9, 1280) and out.dtype == np.float32
    np.testing.assert_allclose(out, reference(images, body, spec, 32), rtol=1e-4, atol=1e-4)


def test_shards_come_in_order_with_progress_per_batch(images: list[str]) -> None:
    seen: list[int] = []
    shards = list(
        embed_stream(images, Embedder(Pool(), FAKE, 8, CPU, EmbedOptions(2, 0, shard_size=4)), on_batch=seen.append)
    )
    assert [start for start, _ in shards] == [0, 4, 8] and [len(v) for _, v in shards] == [4, 4, 1]
    assert seen == [2, 2, 2, 2, 1]
    together = np.concatenate([v for _, v in shards])
    np.testing.assert_array_equal(together, embed_all(images, Embedder(Pool(), FAKE, 8, CPU)))
    assert list(embed_stream([], Embedder(Pool(), FAKE, 8, CPU))) == []


def test_a_crash_loses_at_most_one_shard_and_the_rerun_embeds_only_the_rest(tmp_path, images):
    store = EmbeddingStore(tmp_path / "store", "k")
    ids = list(range(100, 109))
    opts = EmbedOptions(batch_size=2, workers=0, shard_size=4)
    failing = Embedder(Pool(fail_after=3), FAKE, 8, CPU, opts)
    with pytest.raises(RuntimeError, match="simulated crash"):
        embed_samples(store, ids, images, failing, progress=False)  # dies in the second shard
    assert EmbeddingStore(tmp_path / "store", "k").missing(ids) == ids[4:]  # the first shard was saved
    body = Pool()
    vectors = embed_samples(store, ids, images, Embedder(body, FAKE, 8, CPU, opts), progress=False)
    assert body.seen == 5  # only the missing five
    np.testing.assert_array_equal(vectors, embed_all(images, Embedder(Pool(), FAKE, 8, CPU)))


def test_compiled_body_pads_the_last_batch_and_gives_the_same_vectors(images):
    body = nn.Sequential(nn.Conv2d(3, 4, 3), nn.AdaptiveAvgPool2d(1), nn.Flatten())
    spec = BackboneSpec("tiny", 4, (0.5, 0.5, 0.5), (0.25, 0.25, 0.25), "tiny/v1")
    plain = embed_all(images, Embedder(body, spec, 16, CPU, EmbedOptions(batch_size=4, workers=0)))
    compiled = embed_all(
        images, Embedder(body, spec, 16, CPU, EmbedOptions(batch_size=4, workers=0, compile=True))
    )  # 9 images: the third batch of 1 is padded to 4 so one compiled shape serves every batch
    np.testing.assert_allclose(compiled, plain, rtol=1e-4, atol=1e-5)


def test_jpegs_are_routed_to_the_gpu_decoder_only_when_it_decodes_them_as_the_cpu_would(tmp_path, images):
    assert _gpu_decodable(images[0]) and not _gpu_decodable(images[1])  # RGB JPEG yes, PNG no
    rotated = tmp_path / "rotated.jpg"
    exif = Image.Exif()
    exif[EXIF_ORIENTATION] = 6
    Image.new("RGB", (8, 6), "red").save(rotated, exif=exif)
    cmyk = tmp_path / "cmyk.jpg"
    Image.new("CMYK", (8, 6)).save(cmyk)
    assert not _gpu_decodable(str(rotated)) and not _gpu_decodable(str(cmyk))
    with pytest.raises(BadImageError, match="empty file"):
        (tmp_path / "empty.jpg").write_bytes(b"")
        _gpu_decodable(str(tmp_path / "empty.jpg"))
    items = [_Files(images[:3], 16, gpu_jpeg=True)[i] for i in range(3)]
    assert [kind for kind, _, _ in items] == ["jpeg", "pixels", "pixels"]
    assert items[0][1].ndim == 1 and items[1][1].shape == (3, 16, 16)  # bytes vs decoded, resized pixels


def test_a_mixed_batch_is_assembled_in_order(images):
    """The CUDA assembly path (bytes decoded in a batch, resized per shape group, scattered into place) runs
    on the CPU too, through decode_jpeg(device="cpu"): it must give the CPU path's pixels, in order."""
    normalize = _normalize(FAKE)
    files = _Files(images[:6], 16, gpu_jpeg=True)
    batch = _collate([files[i] for i in range(6)])
    assert batch.jpeg_rows == [0, 3] and batch.pixel_rows.tolist() == [1, 2, 4, 5]
    assert batch.jpeg_bytes.ndim == 1 and batch.jpeg_sizes == [len(files[0][1]), len(files[3][1])]
    assert torch.equal(batch.jpegs[1], files[3][1])  # the files travel end to end in one tensor, split here
    mixed = _device_batch(batch, 16, CPU, normalize)
    decoded_here = _Files(images[:6], 16, gpu_jpeg=False)
    cpu_only = _device_batch(_collate([decoded_here[i] for i in range(6)]), 16, CPU, normalize)
    assert mixed.shape == (6, 3, 16, 16) and mixed.is_contiguous(memory_format=torch.channels_last)
    torch.testing.assert_close(mixed, cpu_only, atol=1 / 255 / 0.25 + 1e-6, rtol=0)  # one grey level at most
    assert decode_jpeg([files[0][1]], device="cpu")[0].shape[0] == 3


def test_options_errors_and_settings(images, tmp_path):
    with pytest.raises(DataError, match="batch_size must be >= 1"):
        EmbedOptions(batch_size=0)
    with pytest.raises(DataError, match="workers must be >= -1"):
        EmbedOptions(workers=-2)
    with pytest.raises((BadImageError, RuntimeError), match="missing.png"):  # raised in a worker, names the file
        embed_all([*images[:2], str(tmp_path / "missing.png")], Embedder(Pool(), FAKE, 8, CPU, EmbedOptions(2, 1)))
    with pytest.raises(FlywheelError, match=r"features of shape \(2, 3\), spec says \(B, 5\)"):
        wrong = BackboneSpec("wrong", 5, (0.0,) * 3, (1.0,) * 3, "w")
        embed_all(images[:2], Embedder(Pool(), wrong, 8, CPU, EmbedOptions(workers=0)))
    settings = load_settings(workspace=tmp_path, embed_batch_size=32, torch_threads=1,
                             embed={"workers": 0, "compile": True, "shard_size": 100})  # fmt: skip
    configured = Embedder.configured(Pool(), settings, device=CPU)
    assert configured.options == EmbedOptions(32, 0, True, True, 100, 1) and configured.image_size == 64
    assert auto_workers(CPU) >= 1 and auto_workers(torch.device("cuda")) >= 1
