"""Embedding throughput: our pipeline (flywheel.features.pipeline) vs a plain torch loop, same JPEG files on disk,
same model, same device, same batch size; images/s of each and their ratio (goal: >= 0.9).

The plain loop is what one writes first: decode each file (torchvision), resize and normalise it
(images.eval_transform), stack a batch, forward. It gets the same model numerics as the pipeline
(channels_last; bf16 autocast on CUDA), so the ratio measures the data path, not a precision change.
ResNet-50 runs with random weights when its ImageNet weights are not cached (the throughput is the same).

    .venv/bin/python bench/embed.py [--device cpu|cuda] [--n 2000] [--size 224] [--batch-size 64]
        [--models efficientnet_lite0,resnet50] [--workers -1] [--compile] [--chunk 256] [--out bench/results/embed]

JPEGs: Fashion-MNIST training images upscaled to --size px (RGB, quality 90), written to a temp dir
(or --data-dir, reused when it holds enough files).
"""

from __future__ import annotations

import argparse
import platform
import sys
import tempfile
import time
from pathlib import Path

import numpy as np
import torch
from torchvision.io import encode_jpeg
from torchvision.transforms import v2

from bench.results_files import command_line, write_results
from flywheel.errors import WeightsUnavailableError
from flywheel.features.backbones import build_body, get_spec
from flywheel.features.pipeline import Embedder, EmbedOptions, auto_workers, embed_all
from flywheel.features.store import resolve_device
from flywheel.sources.images import eval_transform, load_image
from flywheel.sources.importing import FASHION_MNIST_DIR, _read_idx


def write_jpegs(root: Path, n: int, size: int) -> list[str]:
    """n Fashion-MNIST images as size x size RGB JPEGs under root (reused when already there)."""
    root.mkdir(parents=True, exist_ok=True)
    paths = [str(root / f"{i:06d}.jpg") for i in range(n)]
    if all(Path(p).exists() for p in paths):
        return paths
    images, _ = _read_idx(FASHION_MNIST_DIR, "train")
    resize = v2.Resize((size, size), antialias=True)
    tint = torch.tensor([1.0, 0.9, 0.8]).view(3, 1, 1)  # a colour image, so every channel is encoded
    for i, path in enumerate(paths):
        grey = torch.from_numpy(images[i % len(images)].copy())[None].expand(3, -1, -1)
        rgb = (resize(grey).float() * tint).round().clamp(0, 255).to(torch.uint8)
        Path(path).write_bytes(encode_jpeg(rgb, quality=90).numpy().tobytes())
    return paths


def plain_loop(paths: list[str], body, spec, *, size: int, batch_size: int, device: torch.device) -> np.ndarray:
    """The baseline: decode, transform and stack in the loop, then forward."""
    cuda = device.type == "cuda"
    transform = eval_transform(spec, size)
    body = body.eval().to(device, memory_format=torch.channels_last)
    autocast = torch.autocast("cuda", dtype=torch.bfloat16) if cuda else torch.autocast("cpu", enabled=False)
    out = []
    with torch.inference_mode(), autocast:
        for start in range(0, len(paths), batch_size):
            x = torch.stack([transform(load_image(p)) for p in paths[start : start + batch_size]])
            x = x.to(device, memory_format=torch.channels_last)
            out.append(body(x).float().cpu())
    return torch.cat(out).numpy()


def timed(fn, device: torch.device) -> tuple[float, np.ndarray]:
    if device.type == "cuda":
        torch.cuda.synchronize()
    t = time.perf_counter()
    result = fn()
    if device.type == "cuda":
        torch.cuda.synchronize()
    return time.perf_counter() - t, result


def bench_model(name: str, paths: list[str], args, device: torch.device) -> dict:
    spec = get_spec(name)
    try:
        body, weights = build_body(name, pretrained=True), "pretrained"
    except WeightsUnavailableError:
        body, weights = build_body(name, pretrained=False), "random init (weights not cached; same throughput)"
    options = EmbedOptions(batch_size=args.batch_size, workers=args.workers, compile=args.compile)
    ours = lambda p: embed_all(p, Embedder(body, spec, args.size, device, options))  # noqa: E731
    plain = lambda p: plain_loop(p, body, spec, size=args.size, batch_size=args.batch_size, device=device)  # noqa: E731
    warm = paths[: 2 * args.batch_size]
    plain(warm), ours(warm)  # first calls: allocator, oneDNN/cuDNN kernel choice, compile
    # Interleaved in chunks, alternating which goes first: on a shared machine load drifts, and both
    # contenders must see the same drift. Each pipeline call pays its worker start-up again (conservative).
    seconds = {"plain": 0.0, "pipeline": 0.0}
    outputs: dict[str, list[np.ndarray]] = {"plain": [], "pipeline": []}
    pair_ratios = []  # plain seconds / pipeline seconds on the same chunk, back to back
    chunks = [paths[i : i + args.chunk] for i in range(0, len(paths), args.chunk)]
    for c, chunk in enumerate(chunks):
        took = {}
        for which in ("plain", "pipeline") if c % 2 == 0 else ("pipeline", "plain"):
            took[which], result = timed(lambda w=which, ch=chunk: (plain if w == "plain" else ours)(ch), device)
            seconds[which] += took[which]
            outputs[which].append(result)
        pair_ratios.append(took["plain"] / took["pipeline"])
    diff = float(np.abs(np.concatenate(outputs["plain"]) - np.concatenate(outputs["pipeline"])).max())
    plain_img_s, pipeline_img_s = len(paths) / seconds["plain"], len(paths) / seconds["pipeline"]
    row = {
        "model": name,
        "weights": weights,
        "images": len(paths),
        "plain_img_s": plain_img_s,
        "pipeline_img_s": pipeline_img_s,
        "max_abs_diff": diff,
        "ratio": pipeline_img_s / plain_img_s,
    }
    row["median_pair_ratio"] = float(np.median(pair_ratios))  # robust to load swings between chunks
    row["pair_ratios"] = pair_ratios
    print(f"{name:18s} plain {row['plain_img_s']:8.1f} img/s | pipeline {row['pipeline_img_s']:8.1f} img/s | "
          f"ratio {row['ratio']:.2f} (median per chunk {row['median_pair_ratio']:.2f}) | max |diff| {diff:.2e}",
          flush=True)  # fmt: skip
    return row


def markdown(meta: dict, rows: list[dict]) -> list[str]:
    return [
        f"# Embedding throughput ({meta['device_name']})",
        "",
        f"{meta['images']} JPEGs ({meta['size']} px, Fashion-MNIST upscaled) from disk, batch {meta['batch_size']}, "
        f"pipeline workers {meta['workers']}, torch.compile {meta['compile']}; timed in chunks of {meta['chunk']} "
        f"images, the two contenders alternating. Command: `{meta['command']}`",
        "",
        "| model | weights | plain loop img/s | pipeline img/s | ratio | median ratio per chunk | max abs diff |",
        "|---|---|---:|---:|---:|---:|---:|",
        *[
            f"| {r['model']} | {r['weights']} | {r['plain_img_s']:.1f} | {r['pipeline_img_s']:.1f} | "
            f"{r['ratio']:.2f} | {r['median_pair_ratio']:.2f} | {r['max_abs_diff']:.1e} |"
            for r in rows
        ],
    ]


def main() -> None:
    parser = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    parser.add_argument("--device", default="cpu")
    parser.add_argument("--n", type=int, default=2000)
    parser.add_argument("--size", type=int, default=224)
    parser.add_argument("--batch-size", type=int, default=64)
    parser.add_argument("--models", default="efficientnet_lite0,resnet50")
    parser.add_argument("--workers", type=int, default=-1)
    parser.add_argument("--compile", action="store_true")
    parser.add_argument("--chunk", type=int, default=256, help="images per timed call; the two alternate per chunk")
    parser.add_argument("--data-dir", type=Path)
    parser.add_argument("--note", default="", help="free text for the results file (machine load, ...)")
    parser.add_argument("--out", type=Path, help="results path without suffix; default bench/results/embed[-cuda]")
    args = parser.parse_args()
    device = resolve_device(args.device)
    tmp = None
    if args.data_dir is None:
        tmp = tempfile.TemporaryDirectory(prefix="flywheel-bench-embed-")
        args.data_dir = Path(tmp.name)
    paths = write_jpegs(args.data_dir, args.n, args.size)
    for p in paths:  # page cache warm for both contenders
        Path(p).read_bytes()
    device_name = (
        torch.cuda.get_device_name(device) if device.type == "cuda" else f"CPU, {torch.get_num_threads()} threads"
    )
    workers = auto_workers(device) if args.workers == -1 else args.workers
    print(f"{args.n} JPEGs at {args.size} px in {args.data_dir}; {device_name}; batch {args.batch_size}; "
          f"pipeline workers {workers}", flush=True)  # fmt: skip
    rows = [bench_model(name, paths, args, device) for name in args.models.split(",")]
    meta = {
        "device": device.type,
        "device_name": device_name,
        "host": platform.node(),
        "torch": torch.__version__,
        "images": args.n,
        "size": args.size,
        "batch_size": args.batch_size,
        "workers": workers,
        "compile": args.compile,
        "chunk": args.chunk,
        "command": command_line("bench/embed.py", sys.argv[1:]),
        "note": args.note,
    }
    write_results(
        args.out or Path("bench/results") / ("embed" if device.type == "cpu" else "embed-cuda"),
        meta,
        rows,
        markdown(meta, rows),
    )
    if tmp is not None:
        tmp.cleanup()


if __name__ == "__main__":
    main()
