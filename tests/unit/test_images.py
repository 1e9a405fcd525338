"""Decoding and preprocessing."""

from __future__ import annotations

import numpy as np
import pytest
import torch
from torchvision.io import write_png

from flywheel.backbones import get_spec
from flywheel.errors import DataError
from flywheel.images import ImageDataset, load_image, preprocess

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
