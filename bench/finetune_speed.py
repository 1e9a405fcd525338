"""Fine-tune throughput: flywheel.training.finetune.finetune against a plain torch training loop, same files, model
and device.

Both train every layer of the same classifier (ResNet-50 by default; random weights when ImageNet's are not
cached, the throughput is the same) for the same epochs over the same JPEG files on disk: batch --batch-size,
AdamW, bf16 autocast and channels_last on CUDA, the same augmentation, the same DataLoader worker count and
pinned memory. The plain loop is the textbook one and does nothing else. Ours is the product's call
(`finetune`, depth "all", head_epochs 0 so both train the same layers from the first step) and also does
what a real run needs: warmup + cosine schedule, learning-rate groups, a validation pass after every epoch
(on --val extra images the plain loop never sees) and, with --checkpoints, an atomic checkpoint per epoch.
img/s counts training images only, so the extra work of ours is all overhead. Goal: ratio >= 0.9.

Also printed: the model-bound ceiling, the same plain step on one batch already on the device, which says
whether the data path or the GPU limits both.

    .venv/bin/python bench/finetune_speed.py [--device cuda] [--model resnet50] [--n 8192] [--val 512]
        [--epochs 2] [--size 224] [--batch-size 128] [--repeats 2] [--compile] [--out bench/results/finetune-speed]
"""

from __future__ import annotations

import argparse
import copy
import platform
import sys
import tempfile
import time
from contextlib import nullcontext
from pathlib import Path

import numpy as np
import torch
from torch import nn
from torch.utils.data import DataLoader

from bench.embed import write_jpegs
from bench.results_files import command_line, write_results
from flywheel.config import FinetuneSettings
from flywheel.errors import WeightsUnavailableError
from flywheel.features.backbones import get_spec, layer_groups, new_classifier
from flywheel.features.pipeline import auto_workers
from flywheel.features.store import resolve_device
from flywheel.sources.images import Augmentation, ImageDataset, forked_worker_init
from flywheel.sources.importing import FASHION_MNIST_DIR, _read_idx
from flywheel.training.finetune import finetune
from flywheel.training.policy import DepthDecision

HEAD_LR, WEIGHT_DECAY = 1e-3, 1e-4


def _sync(device: torch.device) -> None:
    if device.type == "cuda":
        torch.cuda.synchronize()


def _autocast(device: torch.device):
    return torch.autocast("cuda", dtype=torch.bfloat16) if device.type == "cuda" else nullcontext()


def _plain_model(classifier, args, device: torch.device):
    """(forward, optimizer) of the plain loop: a copy of the classifier on the device, AdamW over everything."""
    model = copy.deepcopy(classifier).to(device, memory_format=torch.channels_last).train()
    forward = torch.compile(model) if args.compile else model
    return forward, torch.optim.AdamW(model.parameters(), lr=HEAD_LR, weight_decay=WEIGHT_DECAY)


def _plain_step(forward, optimizer, x: torch.Tensor, y: torch.Tensor, device: torch.device) -> None:
    with _autocast(device):
        loss = nn.functional.cross_entropy(forward(x).float(), y)
    optimizer.zero_grad(set_to_none=True)
    loss.backward()
    optimizer.step()


def plain_loop(classifier, paths, targets, aug: Augmentation, args, device: torch.device) -> float:
    """The textbook loop; returns seconds for args.epochs epochs over paths."""
    _sync(device)
    started = time.perf_counter()
    forward, optimizer = _plain_model(classifier, args, device)
    loader = DataLoader(
        ImageDataset(paths, get_spec(args.model), args.size, targets, augment=aug),
        batch_size=args.batch_size,
        shuffle=True,
        num_workers=args.workers,
        worker_init_fn=forked_worker_init,
        pin_memory=device.type == "cuda",
    )
    for _ in range(args.epochs):
        for x, y in loader:
            x = x.to(device, non_blocking=True, memory_format=torch.channels_last)
            _plain_step(forward, optimizer, x, y.to(device, non_blocking=True), device)
    _sync(device)
    return time.perf_counter() - started


def ours(classifier, paths, targets, val_paths, val_targets, aug: Augmentation, args, checkpoints: bool) -> float:
    """flywheel.training.finetune.finetune at depth "all" for args.epochs epochs; returns its wall seconds (and prints
    the epochs' own share: training and validation, without the set-up and the final copy back)."""
    settings = FinetuneSettings(
        epochs=args.epochs, head_epochs=0, batch_size=args.batch_size, head_lr=HEAD_LR, weight_decay=WEIGHT_DECAY,
        patience=0, gradual_unfreeze=False, compile=args.compile, device=args.device,
    )  # fmt: skip
    n_groups = len(layer_groups(classifier.body, args.model))
    decision = DepthDecision(n_groups, "all", "bench: every layer")
    with tempfile.TemporaryDirectory(prefix="flywheel-bench-ckpt-") as ckpt:
        started = time.perf_counter()
        result = finetune(classifier, paths, targets, val_paths, val_targets, decision=decision, settings=settings,
                          seed=0, progress=False, augmentation=aug,
                          checkpoint_dir=Path(ckpt) if checkpoints else None)  # fmt: skip
        seconds = time.perf_counter() - started
    in_epochs = sum(h["seconds"] for h in result.history)
    print(f"    epochs {in_epochs:.2f} s of {seconds:.2f} s ({len(result.history) * len(paths) / in_epochs:.0f} img/s)")
    return seconds


def ceiling(classifier, args, device: torch.device, steps: int = 30) -> float:
    """img/s of the plain training step on one batch already on the device: no data path at all."""
    forward, optimizer = _plain_model(classifier, args, device)
    x = torch.randn(args.batch_size, 3, args.size, args.size, device=device).to(memory_format=torch.channels_last)
    y = torch.randint(0, len(classifier.classes), (args.batch_size,), device=device)
    for i in range(steps + 5):  # the first 5: kernel choice, allocator
        if i == 5:
            _sync(device)
            started = time.perf_counter()
        _plain_step(forward, optimizer, x, y, device)
    _sync(device)
    return steps * args.batch_size / (time.perf_counter() - started)


def main() -> None:
    parser = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    parser.add_argument("--device", default="cpu")
    parser.add_argument("--model", default="resnet50")
    parser.add_argument("--n", type=int, default=8192, help="training images")
    parser.add_argument("--val", type=int, default=512, help="validation images (ours only)")
    parser.add_argument("--epochs", type=int, default=2)
    parser.add_argument("--size", type=int, default=224)
    parser.add_argument("--batch-size", type=int, default=128)
    parser.add_argument("--workers", type=int, default=-1, help="DataLoader workers for both; -1: as finetune")
    parser.add_argument("--repeats", type=int, default=2, help="timed runs of each, alternating")
    parser.add_argument("--compile", action="store_true")
    parser.add_argument("--data-dir", type=Path)
    parser.add_argument(
        "--out", type=Path, help="results path without suffix; default bench/results/finetune-speed[-cuda]"
    )
    args = parser.parse_args()
    device = resolve_device(args.device)
    if args.workers == -1:
        args.workers = auto_workers(device) if device.type == "cuda" else 0  # what finetune's loaders use
    tmp = None
    if args.data_dir is None:
        tmp = tempfile.TemporaryDirectory(prefix="flywheel-bench-finetune-")
        args.data_dir = Path(tmp.name)
    paths = write_jpegs(args.data_dir, args.n + args.val, args.size)
    labels = _read_idx(FASHION_MNIST_DIR, "train")[1]
    targets = np.array([labels[i % len(labels)] for i in range(len(paths))], dtype=np.int64)
    train, val = paths[: args.n], paths[args.n :]
    classes = [str(c) for c in range(10)]
    try:
        classifier, weights = new_classifier(args.model, classes, args.size), "pretrained"
    except WeightsUnavailableError:
        classifier = new_classifier(args.model, classes, args.size, pretrained=False)
        weights = "random init (weights not cached; same throughput)"
    aug = Augmentation(hflip=True, colour_jitter=False, reason="bench")
    device_name = (
        torch.cuda.get_device_name(device) if device.type == "cuda" else f"CPU, {torch.get_num_threads()} threads"
    )
    print(f"{args.model} ({weights}) on {device_name}: {args.n} training JPEGs at {args.size} px, batch "
          f"{args.batch_size}, {args.epochs} epochs, {args.workers} loader workers", flush=True)  # fmt: skip

    contenders = {
        "plain": lambda: plain_loop(classifier, train, targets[: args.n], aug, args, device),
        "ours": lambda: ours(classifier, train, targets[: args.n], val, targets[args.n :], aug, args, False),
        "ours+checkpoints": lambda: ours(classifier, train, targets[: args.n], val, targets[args.n :], aug, args, True),
    }
    warm = args.epochs, args.n
    args.epochs = 1
    for fn in contenders.values():  # first calls: cuDNN kernel choice, allocator, worker start, compile
        fn()
    args.epochs = warm[0]
    seconds: dict[str, list[float]] = {name: [] for name in contenders}
    for r in range(args.repeats):  # alternating order: drifting load hits every contender alike
        for name in contenders if r % 2 == 0 else reversed(list(contenders)):
            seconds[name].append(contenders[name]())
            print(f"  {name}: {args.epochs * args.n / seconds[name][-1]:.0f} img/s", flush=True)
    img_s = {name: args.epochs * args.n / float(np.median(s)) for name, s in seconds.items()}
    bound = ceiling(classifier, args, device)
    rows = [
        {
            "contender": name,
            "img_s": img_s[name],
            "ratio_to_plain": img_s[name] / img_s["plain"],
            "seconds": seconds[name],
        }
        for name in contenders
    ]
    for row in rows:
        print(f"{row['contender']:18s} {row['img_s']:8.0f} img/s  ratio {row['ratio_to_plain']:.2f}", flush=True)
    print(f"model-bound ceiling (one batch on the device, no data path): {bound:.0f} img/s", flush=True)
    meta = {
        "device": device.type, "device_name": device_name, "host": platform.node(), "torch": torch.__version__,
        "model": args.model, "weights": weights, "images": args.n, "val_images": args.val, "size": args.size,
        "batch_size": args.batch_size, "epochs": args.epochs, "workers": args.workers, "repeats": args.repeats,
        "compile": args.compile, "ceiling_img_s": bound, "note": "",
        "command": command_line("bench/finetune_speed.py", sys.argv[1:]),
    }  # fmt: skip
    md = [
        f"# Fine-tune throughput ({device_name})",
        "",
        f"{args.model} ({weights}), every layer trained, {args.n} JPEGs ({args.size} px, Fashion-MNIST upscaled) "
        f"from disk, batch {args.batch_size}, {args.epochs} epochs, {args.workers} loader workers, torch.compile "
        f"{args.compile}; median of {args.repeats} alternating runs. Ours also validates on {args.val} images "
        f"after every epoch. Command: `{meta['command']}`",
        "",
        "| contender | training img/s | ratio to plain |",
        "|---|---:|---:|",
        *[f"| {r['contender']} | {r['img_s']:.0f} | {r['ratio_to_plain']:.2f} |" for r in rows],
        "",
        f"Model-bound ceiling (the plain step on one batch already on the device): {bound:.0f} img/s.",
    ]
    write_results(
        args.out or Path("bench/results") / ("finetune-speed" if device.type == "cpu" else "finetune-speed-cuda"),
        meta,
        rows,
        md,
    )
    if tmp is not None:
        tmp.cleanup()


if __name__ == "__main__":
    main()
