"""Decoding and preprocessing."""

from __future__ import annotations

import numpy as np
import pytest
import torch
from PIL import Image, ImageOps
from torchvision.io import write_png

from flywheel.errors import BadImageError, DataError
from flywheel.features.backbones import get_spec
from flywheel.sources.images import ImageDataset, load_image, preprocess, read_header

SPEC = get_spec("efficientnet_lite0")


def test_missing_file_names_the_path(tmp_path):
    path = str(tmp_path / "nope.png")
    with pytest.raises(DataError, match="nope.png"):
        load_image(path)


def test_corrupt_file_names_the_path(tmp_path):
    path = tmp_path / "broken.jpg"
    path.write_bytes(b"\xff\xd8\xff garbage, not a jpeg")
    with pytest.raises(DataError, match="broken.jpg"):
        load_image(str(path))


def test_grayscale_png_becomes_three_equal_channels(tmp_path):
    gray = torch.arange(20, dtype=torch.uint8).reshape(1, 4, 5) * 10
    write_png(gray, str(tmp_path / "g.png"))
    img = load_image(str(tmp_path / "g.png"))
    assert img.shape == (3, 4, 5) and img.dtype == torch.uint8
    assert torch.equal(img[0], gray[0]) and torch.equal(img[1], img[2])


def test_preprocess_resizes_and_normalises():
    white = torch.full((2, 3, 10, 30), 255, dtype=torch.uint8)
    x = preprocess(white, SPEC, 16)
    assert x.shape == (2, 3, 16, 16) and x.dtype == torch.float32
    assert torch.allclose(x, torch.full_like(x, (255 - 127) / 128), atol=1e-5)
    assert preprocess(white[0], SPEC, 8).shape == (1, 3, 8, 8)


def test_preprocess_rejects_float_input():
    with pytest.raises(DataError, match="uint8"):
        preprocess(torch.zeros(1, 3, 8, 8), SPEC, 8)


def test_vit_requires_its_fixed_size():
    with pytest.raises(DataError, match="224"):
        preprocess(torch.zeros(1, 3, 8, 8, dtype=torch.uint8), get_spec("vit_b_16"), 64)


def test_dataset_items_with_and_without_targets_and_augmentation(tmp_path):
    paths = []
    for i in range(3):
        paths.append(str(tmp_path / f"{i}.png"))
        write_png(torch.full((3, 20, 24), 40 * i, dtype=torch.uint8), paths[-1])
    plain = ImageDataset(paths, SPEC, 12)
    assert len(plain) == 3 and plain[1].shape == (3, 12, 12)
    labelled = ImageDataset(paths, SPEC, 12, np.array([0, 1, 0]), augment=True)
    x, y = labelled[1]
    assert x.shape == (3, 12, 12) and y == 1
    # a constant image stays constant under crop + flip
    assert torch.allclose(x, torch.full_like(x, (40 - 127) / 128), atol=1e-5)
    with pytest.raises(DataError, match="3 paths but 2 targets"):
        ImageDataset(paths, SPEC, 12, [0, 1])


# --- awkward and bad files: each decodes to the right RGB pixels or fails with a short reason ------------
RGB = (np.arange(24 * 32 * 3).reshape(24, 32, 3) * 7 % 256).astype(np.uint8)


def _save(path, image: Image.Image, **kwargs) -> str:
    image.save(path, **kwargs)
    return str(path)


def test_cmyk_jpeg_becomes_the_same_rgb_pil_gives(tmp_path):
    path = _save(tmp_path / "cmyk.jpg", Image.fromarray(RGB).convert("CMYK"), quality=100)
    expected = np.asarray(Image.open(path).convert("RGB")).transpose(2, 0, 1)
    assert np.abs(load_image(path).numpy().astype(int) - expected).max() <= 1


def test_exif_rotation_is_applied(tmp_path):
    exif = Image.Exif()
    exif[0x0112] = 6  # rotate 90 degrees clockwise to display
    path = _save(tmp_path / "rotated.jpg", Image.fromarray(RGB), exif=exif, quality=100)
    image = load_image(path)
    assert image.shape == (3, 32, 24)  # height and width swapped
    upright = np.asarray(ImageOps.exif_transpose(Image.open(path))).transpose(2, 0, 1)
    assert np.array_equal(image.numpy(), upright)


def test_sixteen_bit_png_keeps_the_high_byte(tmp_path):
    deep = (np.arange(24 * 32).reshape(24, 32) * 85).astype(np.uint16)
    path = _save(tmp_path / "deep.png", Image.fromarray(deep))
    image = load_image(path)
    assert image.dtype == torch.uint8 and image.shape == (3, 24, 32)
    assert np.array_equal(image[0].numpy(), (deep >> 8).astype(np.uint8)) and torch.equal(image[0], image[2])


def test_sixteen_bit_tiff_goes_through_pil_and_keeps_the_high_byte(tmp_path):
    deep = (np.arange(6 * 8).reshape(6, 8) * 1300).astype(np.uint16)
    path = _save(tmp_path / "deep.tiff", Image.fromarray(deep))
    assert np.array_equal(load_image(path)[1].numpy(), (deep >> 8).astype(np.uint8))


def test_transparency_is_composited_over_white(tmp_path):
    rgba = np.zeros((4, 4, 4), np.uint8)
    rgba[..., 0] = 200  # red channel under the alpha
    rgba[:2, :, 3] = 255  # top half opaque, bottom half fully transparent
    path = _save(tmp_path / "alpha.png", Image.fromarray(rgba, "RGBA"))
    image = load_image(path)
    assert image.shape == (3, 4, 4)
    assert image[:, :2].tolist() == [[[200] * 4] * 2, [[0] * 4] * 2, [[0] * 4] * 2]
    assert (image[:, 2:] == 255).all()


@pytest.mark.parametrize("mode", ["P", "L", "LA", "RGB"])
def test_palette_grayscale_and_plain_images_match_pil(tmp_path, mode):
    source = Image.fromarray(RGB).convert(mode) if mode != "P" else Image.fromarray(RGB).quantize(16)
    path = _save(tmp_path / f"{mode}.png", source)
    expected = np.asarray(Image.open(path).convert("RGB")).transpose(2, 0, 1)
    assert np.array_equal(load_image(path).numpy(), expected)


@pytest.mark.parametrize("suffix", [".bmp", ".tiff", ".webp", ".gif"])
def test_other_formats_decode(tmp_path, suffix):
    path = _save(tmp_path / f"x{suffix}", Image.fromarray(RGB), **({"lossless": True} if suffix == ".webp" else {}))
    image = load_image(path)
    assert image.shape == (3, 24, 32)
    if suffix != ".gif":  # GIF quantises colours
        assert np.array_equal(image.numpy(), RGB.transpose(2, 0, 1))


def _written(path, data: bytes) -> str:
    path.write_bytes(data)
    return str(path)


def _truncated(tmp_path, suffix: str) -> str:
    whole = tmp_path / f"whole{suffix}"
    Image.fromarray(RGB).save(whole)
    return _written(tmp_path / f"truncated{suffix}", whole.read_bytes()[: whole.stat().st_size // 2])


@pytest.mark.parametrize(
    ("make", "reason"),
    [
        (lambda d: _written(d / "empty.jpg", b""), "empty file"),
        (lambda d: _written(d / "text.png", b"hello, not an image"), "not an image"),
        (lambda d: _truncated(d, ".jpg"), "truncated or corrupt"),
        (lambda d: _truncated(d, ".png"), "truncated or corrupt"),
        (lambda d: str(d / "absent.png"), "missing file"),
    ],
    ids=["zero-byte", "not-an-image", "truncated-jpeg", "truncated-png", "missing"],
)
def test_bad_files_fail_with_a_short_reason_naming_the_file(tmp_path, make, reason):
    path = make(tmp_path)
    with pytest.raises(BadImageError, match=reason) as caught:
        load_image(path)
    assert caught.value.reason == reason and caught.value.path == path and path in str(caught.value)


def test_decompression_bomb_is_refused_from_its_header(tmp_path):
    path = _save(tmp_path / "bomb.png", Image.new("1", (12000, 12000)))  # 144 Mpx, a 20 kB file
    with pytest.raises(BadImageError, match=r"too many pixels.*12000 x 12000.*1,000,000") as caught:
        read_header(path, max_pixels=1_000_000)
    assert caught.value.reason == "too many pixels"
    assert read_header(path).width == 12000  # below the hard limit the header alone is fine
    big = _save(tmp_path / "bigger.png", Image.new("1", (14000, 14000)))  # 196 Mpx: above PIL's hard limit
    with pytest.raises(BadImageError, match="too many pixels"):
        load_image(big)
