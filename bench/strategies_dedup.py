"""Is DUPLICATE_COSINE (flywheel/strategies/dedup.py) where near-copies and distinct images separate?

On the Fashion-MNIST 5k pool (the embeddings bench/strategies.py uses), compares two distributions of
cosine similarity under the configured backbone:

- distinct images: each pool image's nearest other pool image (the pairs a threshold could wrongly merge),
- near-copies: a sample of pool images against altered copies of themselves (JPEG re-encodes, a small
  crop, a 1-pixel shift, a brightness change; a mirror image as a harder case), embedded the same way.

    .venv/bin/python bench/strategies_dedup.py            # 500 copies of each kind (~1 min on 2 cores)

Writes bench/results/strategies-dedup.json and bench/results/strategies-dedup.md.
"""

from __future__ import annotations

import argparse
import io
import json
import tempfile
import time
from collections.abc import Callable
from pathlib import Path

import numpy as np
from PIL import Image, ImageEnhance, ImageOps

REPO = Path(__file__).resolve().parents[1]

from flywheel.strategies.base import unit_rows  # noqa: E402
from flywheel.strategies.dedup import DUPLICATE_COSINE  # noqa: E402

THRESHOLDS = (0.90, 0.95, 0.97, 0.98, 0.99)
QUANTILES = (0.01, 0.05, 0.5, 0.95, 0.99)


def _jpeg(quality: int) -> Callable[[Image.Image], Image.Image]:
    def encode(image: Image.Image) -> Image.Image:
        buffer = io.BytesIO()
        image.save(buffer, format="JPEG", quality=quality)
        return Image.open(io.BytesIO(buffer.getvalue())).convert(image.mode)

    return encode


def _crop(image: Image.Image) -> Image.Image:
    """Central 90% (a tight re-crop), scaled back to the original size."""
    w, h = image.size
    dx, dy = round(0.05 * w), round(0.05 * h)
    return image.crop((dx, dy, w - dx, h - dy)).resize((w, h), Image.Resampling.BILINEAR)


def _shift(image: Image.Image) -> Image.Image:
    return ImageOps.expand(image, border=(1, 1, 0, 0), fill=0).crop((0, 0, *image.size))


ALTERATIONS: dict[str, Callable[[Image.Image], Image.Image]] = {
    "none (PNG re-saved)": lambda image: image,  # control: the embedding path itself must give ~1.0
    "jpeg q90": _jpeg(90),
    "jpeg q50": _jpeg(50),
    "crop 90%": _crop,
    "shift 1px": _shift,
    "brightness x0.8": lambda image: ImageEnhance.Brightness(image).enhance(0.8),
    "mirror": ImageOps.mirror,
}


def _embed(paths: list[str], settings) -> np.ndarray:
    from flywheel.features.backbones import build_body
    from flywheel.features.pipeline import Embedder
    from flywheel.features.store import embed_paths, resolve_device

    body = build_body(settings.backbone, pretrained=True)
    embedder = Embedder.configured(body, settings, device=resolve_device(settings.finetune.device))
    return embed_paths(paths, embedder, progress=False)


def _summary(sims: np.ndarray) -> dict:
    return {
        "n": len(sims),
        "quantiles": {f"{q:g}": round(float(np.quantile(sims, q)), 4) for q in QUANTILES},
        "share_above": {f"{t:g}": round(float((sims > t).mean()), 4) for t in THRESHOLDS},
    }


def main(argv: list[str] | None = None) -> int:
    parser = argparse.ArgumentParser(description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter)
    parser.add_argument("--copies", type=int, default=500, help="pool images altered, per alteration")
    parser.add_argument("--seed", type=int, default=0)
    parser.add_argument("--out", default=str(REPO / "bench" / "results" / "strategies-dedup"), help="path stem")
    args = parser.parse_args(argv)

    from flywheel.config import load_settings
    from flywheel.simulation import datasets

    began = time.perf_counter()
    settings = load_settings()
    data = datasets.embed_dataset(datasets.load_dataset("fashion-mnist", settings), settings, progress=False)
    assert data.features is not None  # embed_dataset fills them
    x = unit_rows(data.features)
    sims = x @ x.T
    np.fill_diagonal(sims, -np.inf)
    nearest = sims.max(axis=1)
    same_class = data.targets[sims.argmax(axis=1)] == data.targets
    rows = {"distinct: nearest other pool image": _summary(nearest)}

    sample = np.random.default_rng(args.seed).choice(len(data.paths), args.copies, replace=False)
    with tempfile.TemporaryDirectory() as tmp:
        for kind, (name, alter) in enumerate(ALTERATIONS.items()):
            paths = []
            for i in sample:
                path = Path(tmp) / f"{kind}-{i}.png"
                with Image.open(data.paths[i]) as image:
                    alter(image.convert("RGB") if image.mode not in ("L", "RGB") else image).save(path)
                paths.append(str(path))
            copies = unit_rows(_embed(paths, settings))
            rows[f"copy: {name}"] = _summary((copies * x[sample]).sum(axis=1))
    wall = time.perf_counter() - began

    report = {
        "dataset": "fashion-mnist",
        "n_pool": len(x),
        "backbone": settings.backbone,
        "image_size": settings.image_size,
        "duplicate_cosine": DUPLICATE_COSINE,
        "nearest_same_class_share": round(float(same_class.mean()), 4),
        "rows": rows,
        "wall_seconds": round(wall, 1),
    }
    out = Path(args.out)
    out.with_suffix(".json").write_text(json.dumps(report, indent=1) + "\n")
    head = " | ".join(f"q{q:g}" for q in QUANTILES) + " | " + " | ".join(f"> {t:g}" for t in THRESHOLDS)
    lines = [
        "## Near-duplicate threshold (bench/strategies_dedup.py)\n",
        f"Cosine similarity under {settings.backbone} ({settings.image_size} px), Fashion-MNIST {len(x)}-image pool; "
        f"copies: {args.copies} pool images per alteration. DUPLICATE_COSINE = {DUPLICATE_COSINE}. "
        f"Wall {wall:.0f} s.\n",
        f"| pairs | {head} |",
        "|---|" + "---:|" * (len(QUANTILES) + len(THRESHOLDS)),
    ]
    for name, row in rows.items():
        cells = [f"{v:.3f}" for v in row["quantiles"].values()]
        cells += [f"{100 * v:.1f}%" for v in row["share_above"].values()]
        lines.append(f"| {name} | " + " | ".join(cells) + " |")
    out.with_suffix(".md").write_text("\n".join(lines) + "\n")
    print("\n".join(lines))
    return 0


if __name__ == "__main__":
    raise SystemExit(main())
