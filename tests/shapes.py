"""Images that are not Fashion-MNIST, drawn on the spot: coloured shapes on noisy backgrounds."""

from __future__ import annotations

from collections.abc import Sequence
from pathlib import Path

import numpy as np
from PIL import Image, ImageDraw

SHAPES = ("circle", "square", "triangle")


def draw_shapes(root: Path, per_class: int, *, seed: int, shapes: Sequence[str] = SHAPES) -> list[Path]:
    """An ImageFolder of coloured shapes on noisy backgrounds (PNG and JPEG), `per_class` images a class."""
    rng = np.random.default_rng(seed)
    written = []
    for shape in shapes:
        (root / shape).mkdir(parents=True)
        for i in range(per_class):
            background = rng.integers(0, 80, size=(48, 48, 3), dtype=np.uint8)
            image = Image.fromarray(background)
            draw = ImageDraw.Draw(image)
            x, y = (int(v) for v in rng.integers(2, 14, size=2))
            size = int(rng.integers(18, 32))
            box = (x, y, x + size, y + size)
            colour = tuple(int(c) for c in rng.integers(120, 256, size=3))
            if shape == "circle":
                draw.ellipse(box, fill=colour)
            elif shape == "square":
                draw.rectangle(box, fill=colour)
            else:
                draw.polygon([(x, y + size), (x + size // 2, y), (x + size, y + size)], fill=colour)
            path = root / shape / f"{shape}-{i:03d}.{'png' if i % 2 else 'jpg'}"
            image.save(path)
            written.append(path)
    return written
