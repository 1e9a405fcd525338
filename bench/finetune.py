"""How deep to fine-tune: frozen heads (last stage and earlier stages) vs last stage vs all vs the policy's pick.

    .venv/bin/python -m bench.finetune                           # Fashion-MNIST, 10, 30, 50 labels/class
    .venv/bin/python -m bench.finetune --data digits --sizes 30,50
    .venv/bin/python -m bench.finetune --data /path/to/ImageFolder --out bench/results/finetune-mine

--data takes a built-in source (fashion-mnist, digits, fashion-mnist-imbalanced) or an ImageFolder. A fixed,
stratified test split (30%, at most 2,000 images) is set aside; per size n (labels per class, drawn with a
fixed seed from the rest; a class with fewer gives all it has):
- head:     the linear probe flywheel trains every round (head.train_head on frozen last-stage features);
- stage<k>: the same probe on a frozen earlier stage's pooled features (the far-domain cell's candidates);
- last:     finetune() with the last stage trainable (stage7 + head_conv of EfficientNet-Lite0);
- all:      finetune() with the whole body trainable;
- policy:   what the product does: transfer.probe_domain on the labels, then policy.choose_depth(labels/class,
            far_domain=probe.far); a head-only pick reads the stage policy.choose_features takes from
            transfer.probe_stages (the far-domain cell), a deeper one is fine-tuned (cells reused when equal).
Fine-tunes start like run_finetune: a head fitted on frozen features of the training part (LP init), then
finetune() with 15% of the labels as its validation part (policy.training_schedule decides whether that is
enough to choose an epoch on). Same seeds everywhere, 64 px. Writes <out>.json and .md and prints the table.
"""

from __future__ import annotations

import argparse
import copy
import json
import os
import time
from pathlib import Path

import numpy as np
import torch

from flywheel.config import FinetuneSettings, Settings
from flywheel.features.backbones import Classifier, build_body, layer_groups
from flywheel.features.store import resolve_device
from flywheel.simulation.datasets import load_dataset
from flywheel.training.finetune import evaluate, finetune
from flywheel.training.head import accuracy, predict_proba, train_head
from flywheel.training.policy import DepthDecision, choose_depth, choose_features
from flywheel.training.transfer import candidate_stages, probe_domain, probe_stages, stage_features, stratified_folds

REPO = Path(__file__).resolve().parents[1]
BACKBONE, SIZE, SEED, HEAD_L2 = "efficientnet_lite0", 64, 0, 0.1
VAL_SHARE = 0.15
STAGES = ("stage4", "stage5", "stage6")  # frozen earlier stages probed beside the last
MAX_TEST = 2000


def _sample(targets: np.ndarray, per_class: int, seed: int) -> np.ndarray:
    rng = np.random.default_rng(seed)
    return np.sort(
        np.concatenate([rng.permutation(np.flatnonzero(targets == c))[:per_class] for c in np.unique(targets)])
    )


def main() -> None:
    parser = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    parser.add_argument("--data", default="fashion-mnist", help="a built-in source or an ImageFolder")
    parser.add_argument("--sizes", default="10,30,50")
    defaults = FinetuneSettings()
    parser.add_argument("--epochs", type=int, default=defaults.epochs)
    parser.add_argument("--head-epochs", type=int, default=defaults.head_epochs)
    parser.add_argument("--threads", type=int, default=2)
    parser.add_argument("--device", default="cpu", help="cpu, cuda or auto")
    parser.add_argument("--patience", type=int, default=defaults.patience)
    parser.add_argument("--head-lr", type=float, default=defaults.head_lr, help="earlier groups get 1/10 and 1/100")
    parser.add_argument("--no-hflip", action="store_true", help="no horizontal flips (digits, text)")
    parser.add_argument("--min-body-steps", type=int, default=defaults.min_body_steps, help="0: the configured epochs")
    parser.add_argument(
        "--min-validation-to-select", type=int, default=defaults.min_validation_to_select,
        help="0: always pick the best validation epoch and stop early (the recipe before 2026-12-07)",
    )  # fmt: skip
    parser.add_argument("--out", default=str(REPO / "bench" / "results" / "finetune"))
    args = parser.parse_args()
    torch.set_num_threads(args.threads)
    device = resolve_device(args.device)
    settings = FinetuneSettings(
        epochs=args.epochs, head_epochs=args.head_epochs, batch_size=64, head_lr=args.head_lr, device=str(device),
        patience=args.patience, hflip=not args.no_hflip, min_body_steps=args.min_body_steps,
        min_validation_to_select=args.min_validation_to_select,
    )  # fmt: skip
    data = load_dataset(args.data, Settings(workspace=REPO / ".flywheel"), pool_size=14000)
    is_test = _test_split(data.targets)
    candidates = np.flatnonzero(~is_test)
    body = build_body(BACKBONE)
    n_groups = len(layer_groups(body, BACKBONE))
    t0 = time.perf_counter()
    test_paths = [data.paths[i] for i in np.flatnonzero(is_test)]
    test_targets = data.targets[is_test]
    test_features = stage_features(body, BACKBONE, test_paths, SIZE, STAGES, device=device)
    print(f"{data.name}: test features of {len(test_paths)} images in {time.perf_counter() - t0:.1f}s", flush=True)
    rows = [
        _row(
            int(per_class), data, candidates, test_paths, test_targets, test_features, body, n_groups, settings, device
        )  # fmt: skip
        for per_class in args.sizes.split(",")
    ]
    meta = {
        "data": data.name,
        "epochs": args.epochs,
        "head_epochs": args.head_epochs,
        "patience": settings.patience,
        "head_lr": settings.head_lr,
        "hflip": settings.hflip,
        "min_body_steps": settings.min_body_steps,
        "min_validation_to_select": settings.min_validation_to_select,
        "threads": args.threads,
        "device": torch.cuda.get_device_name(device) if device.type == "cuda" else "CPU",
        "load_average_at_end": os.getloadavg(),
        "cpu_count": os.cpu_count(),
        "n_test": len(test_paths),
    }
    out = Path(args.out)
    out.parent.mkdir(parents=True, exist_ok=True)
    out.with_suffix(".json").write_text(json.dumps({"meta": meta, "rows": rows}, indent=2, default=str))
    table = _markdown(rows, meta)
    out.with_suffix(".md").write_text(table)
    print(table)


def _test_split(targets: np.ndarray) -> np.ndarray:
    """A fixed stratified test split: 30% of the images, at most MAX_TEST."""
    folds = stratified_folds(targets, 10, SEED)
    is_test = folds < 3
    if is_test.sum() > MAX_TEST:
        keep = np.random.default_rng(SEED).permutation(np.flatnonzero(is_test))[:MAX_TEST]
        is_test = np.zeros(len(targets), dtype=bool)
        is_test[keep] = True
    return is_test


def _row(per_class, data, candidates, test_paths, test_targets, test_features, body, n_groups, settings, device):
    paths, targets, classes = data.paths, data.targets, data.classes
    chosen = candidates[_sample(targets[candidates], per_class, SEED)]
    y = targets[chosen]
    is_val = stratified_folds(y, round(1 / VAL_SHARE), SEED) == 0
    train, val = chosen[~is_val], chosen[is_val]
    cells: dict[str, dict] = {}
    t0 = time.perf_counter()
    feats = stage_features(body, BACKBONE, [paths[i] for i in chosen], SIZE, STAGES, device=device)
    for stage in ("last", *STAGES):
        head = train_head(feats[stage], y, len(classes), l2=HEAD_L2, seed=SEED)
        name = "head" if stage == "last" else stage
        cells[name] = {
            "test_accuracy": accuracy(predict_proba(head, test_features[stage]), test_targets),
            "seconds": time.perf_counter() - t0,
            "depth": f"frozen {stage} (linear probe)",
        }
    print(per_class, {k: round(v["test_accuracy"], 4) for k, v in cells.items()}, flush=True)
    lp_head = train_head(feats["last"][~is_val], y[~is_val], len(classes), l2=HEAD_L2, seed=SEED)
    t0 = time.perf_counter()
    probe = probe_domain(body, BACKBONE, [paths[i] for i in chosen], y, len(classes), SIZE, l2=HEAD_L2,
                         seed=SEED, device=device)  # fmt: skip
    probe_seconds = time.perf_counter() - t0
    print(per_class, probe.reason, f"{probe_seconds:.1f}s", flush=True)
    pick = choose_depth(len(train) / len(classes), n_groups, far_domain=probe.far)
    stage_probe = probe_stages(body, BACKBONE, candidate_stages(body, BACKBONE), [paths[i] for i in chosen], y,
                               len(classes), SIZE, l2=HEAD_L2, seed=SEED, device=device)  # fmt: skip
    features = choose_features(len(chosen) / len(classes), stage_probe)
    print(per_class, features.reason, flush=True)
    configs = {"last": DepthDecision(2, "last", "last stage"), "all": DepthDecision(n_groups, "all", "all")}
    for name, decision in configs.items():
        cells[name] = _finetune_cell(body, classes, lp_head, paths, targets, train, val, decision, settings,
                                     test_paths, test_targets, device)  # fmt: skip
        print(per_class, name, {k: v for k, v in cells[name].items() if k != "notes"}, flush=True)
    same = ("head" if features.stage == "last" else features.stage) if pick.trainable_groups == 0 else None
    same = same or next((n for n, d in configs.items() if d.trainable_groups == pick.trainable_groups), None)
    if same is not None:
        cells["policy"] = {**cells[same], "same_as": same}
    else:
        cells["policy"] = _finetune_cell(body, classes, lp_head, paths, targets, train, val, pick, settings,
                                         test_paths, test_targets, device)  # fmt: skip
    cells["policy"].update(
        depth=f"{pick.label} ({pick.trainable_groups} groups)"
        + (f" on {features.stage}" if same == features.stage else ""),
        reason=f"{pick.reason}; {features.reason}",
    )
    best = max(c["test_accuracy"] for n, c in cells.items() if n != "policy")
    frozen = max(cells[n]["test_accuracy"] for n in ("head", *STAGES))
    return {
        "labels_per_class": per_class,
        "n_train": int(len(train)),
        "n_val": int(len(val)),
        "cells": cells,
        "probe": probe.as_params(),
        "probe_seconds": probe_seconds,
        "policy_gap_points": 100 * (best - cells["policy"]["test_accuracy"]),
        "policy_within_1_point": 100 * (best - cells["policy"]["test_accuracy"]) <= 1.0,
        "finetune_over_best_frozen_points": 100
        * (max(cells["last"]["test_accuracy"], cells["all"]["test_accuracy"]) - frozen),
    }


def _finetune_cell(body, classes, lp_head, paths, targets, train, val, decision, settings, test_paths, test_targets,
                   device):  # fmt: skip
    classifier = Classifier(BACKBONE, copy.deepcopy(body), copy.deepcopy(lp_head), classes, SIZE)
    t0 = time.perf_counter()
    result = finetune(
        classifier,
        [paths[i] for i in train],
        targets[train],
        [paths[i] for i in val],
        targets[val],
        decision=decision,
        settings=settings,
        seed=SEED,
        progress=False,
    )
    seconds = time.perf_counter() - t0
    return {
        "test_accuracy": evaluate(result.classifier, test_paths, test_targets, device=device),
        "seconds": seconds,
        "depth": f"{decision.label} ({decision.trainable_groups} groups)",
        "best_epoch": result.best_epoch,
        "epochs_run": len(result.history),
        "stopped_early": result.stopped_early,
        "val_accuracy": [h["val_accuracy"] for h in result.history],
        "notes": result.notes,
    }


def _markdown(rows: list[dict], meta: dict) -> str:
    lines = [
        f"{meta['data']}, {BACKBONE}, {SIZE} px, test = fixed stratified {meta['n_test']} images; fine-tunes: "
        f"{meta['epochs']} epochs configured ({meta['head_epochs']} head), body at least {meta['min_body_steps']} "
        f"steps, epoch chosen on >= {meta['min_validation_to_select']} validation images, patience "
        f"{meta['patience']}, head lr {meta['head_lr']:g}, hflip {meta['hflip']}; {meta['device']}, "
        f"{meta['threads']} torch threads, load average at end {meta['load_average_at_end'][0]:.1f}",
        "",
        "| labels/class | head (last stage) | "
        + " | ".join(f"frozen {s}" for s in STAGES)
        + " | fine-tune last | fine-tune all | policy's pick | policy within 1 pt | fine-tune - best frozen |",
        "|---|---|" + "---|" * len(STAGES) + "---|---|---|---|---|",
    ]
    for row in rows:
        c = row["cells"]

        def cell(name: str, c=c) -> str:
            return f"{100 * c[name]['test_accuracy']:.1f}%"

        pick = c["policy"]
        lines.append(
            f"| {row['labels_per_class']} | {cell('head')} | "
            + " | ".join(cell(s) for s in STAGES)
            + f" | {cell('last')} ({c['last']['seconds']:.0f}s) | {cell('all')} ({c['all']['seconds']:.0f}s) | "
            f"{cell('policy')} {pick['depth']}{' = ' + pick['same_as'] if 'same_as' in pick else ''} | "
            f"{'yes' if row['policy_within_1_point'] else 'no'} ({row['policy_gap_points']:.1f} pt) | "
            f"{row['finetune_over_best_frozen_points']:+.1f} pt |"
        )
    lines.append("")
    for row in rows:
        p = row["probe"]
        lines.append(
            f"- {row['labels_per_class']}/class probe: {p['domain_probe_middle_stage']} "
            f"{p['domain_probe_middle_acc']} vs last {p['domain_probe_last_acc']} (kNN {p['domain_probe_knn_acc']}) "
            f"-> far={p['domain_probe_far']} ({row['probe_seconds']:.0f}s); fine-tune notes: "
            + "; ".join(row["cells"]["all"]["notes"][:1])
        )
    return "\n".join(lines) + "\n"


if __name__ == "__main__":
    main()
