"""How deep to fine-tune: head-only vs last stage vs all vs the policy's pick, on Fashion-MNIST.

    .venv/bin/python bench/finetune.py                      # 10, 50, 500 labels/class, FinetuneSettings defaults
    .venv/bin/python bench/finetune.py --sizes 10,50 --epochs 3

Per size n (labels per class, drawn with a fixed seed from a 12,000-image sample of the train split):
- head:   the linear probe flywheel trains every round (head.train_head on frozen last-stage features, all
          n labels) - the negative-transfer baseline of run_finetune;
- last:   finetune() with the last stage trainable (stage7 + head_conv of EfficientNet-Lite0);
- all:    finetune() with the whole body trainable;
- policy: transfer.probe_domain on the labels, then policy.choose_depth(labels/class, far_domain=probe.far),
          fine-tuned the same way (reusing the cell above when the pick is the same configuration).
Fine-tunes start like run_finetune: a head fitted on frozen features of the training part (LP init), then
finetune() with 15% of the labels held out for best-epoch selection and early stopping. Everything is
evaluated on the same fixed 2,000-image subset of the test split at 64 px; same seeds everywhere.
Writes bench/results/finetune.json and .md and prints the table.
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

from flywheel.config import FinetuneSettings
from flywheel.features.backbones import Classifier, build_body, layer_groups
from flywheel.features.store import embed_paths, resolve_device
from flywheel.sources.importing import materialize_fashion_mnist, read_image_folder
from flywheel.sources.manifest import Record
from flywheel.training.finetune import evaluate, finetune
from flywheel.training.head import accuracy, predict_proba, train_head
from flywheel.training.policy import DepthDecision, choose_depth
from flywheel.training.transfer import probe_domain, stratified_folds

REPO = Path(__file__).resolve().parents[1]
BACKBONE, SIZE, SEED, HEAD_L2 = "efficientnet_lite0", 64, 0, 0.1
VAL_SHARE = 0.15


def _sample(targets: np.ndarray, per_class: int, seed: int) -> np.ndarray:
    rng = np.random.default_rng(seed)
    return np.sort(
        np.concatenate([rng.permutation(np.flatnonzero(targets == c))[:per_class] for c in np.unique(targets)])
    )


def _targets(records: list[Record], classes: list[str]) -> np.ndarray:
    """Each record's class index in `classes`."""
    targets = []
    for r in records:
        assert r.label is not None  # an image folder's records all carry their folder's class
        targets.append(classes.index(r.label))
    return np.array(targets)


def _features(body, paths: list[str], device: torch.device) -> np.ndarray:
    from flywheel.features.backbones import get_spec

    return embed_paths(paths, body, get_spec(BACKBONE), image_size=SIZE, batch_size=128, device=device,
                       progress=False)  # fmt: skip


def main() -> None:
    parser = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    parser.add_argument("--sizes", default="10,50,500")
    defaults = FinetuneSettings()
    parser.add_argument("--epochs", type=int, default=defaults.epochs)
    parser.add_argument("--head-epochs", type=int, default=defaults.head_epochs)
    parser.add_argument("--threads", type=int, default=2)
    parser.add_argument("--device", default="cpu", help="cpu, cuda or auto")
    parser.add_argument("--patience", type=int, default=defaults.patience)
    parser.add_argument("--head-lr", type=float, default=defaults.head_lr, help="earlier groups get 1/10 and 1/100")
    parser.add_argument("--adapt-batchnorm", action="store_true", help="re-estimate BatchNorm statistics at 'all'")
    parser.add_argument("--out", default=str(REPO / "bench" / "results" / "finetune"))
    args = parser.parse_args()
    torch.set_num_threads(args.threads)
    device = resolve_device(args.device)
    settings = FinetuneSettings(
        epochs=args.epochs, head_epochs=args.head_epochs, batch_size=64, head_lr=args.head_lr, device=str(device),
        patience=args.patience, adapt_batchnorm=args.adapt_batchnorm,
    )  # fmt: skip
    pool_root, test_root = materialize_fashion_mnist(
        REPO / ".flywheel" / "sources" / "bench-finetune", pool_size=12000, test_size=2000, seed=SEED
    )
    pool, classes = read_image_folder(pool_root)
    test, _ = read_image_folder(test_root)
    paths = [r.path for r in pool]
    targets = _targets(pool, classes)
    test_paths = [r.path for r in test]
    test_targets = _targets(test, classes)
    body = build_body(BACKBONE)
    n_groups = len(layer_groups(body, BACKBONE))
    t0 = time.perf_counter()
    test_features = _features(body, test_paths, device)
    print(f"test features: {len(test_paths)} images in {time.perf_counter() - t0:.1f}s", flush=True)

    rows = []
    for per_class in [int(s) for s in args.sizes.split(",")]:
        chosen = _sample(targets, per_class, SEED)
        y = targets[chosen]
        is_val = stratified_folds(y, round(1 / VAL_SHARE), SEED) == 0
        train, val = chosen[~is_val], chosen[is_val]
        cells: dict[str, dict] = {}

        t0 = time.perf_counter()
        feats = _features(body, [paths[i] for i in chosen], device)
        head = train_head(feats, y, len(classes), l2=HEAD_L2, seed=SEED)
        cells["head"] = {
            "test_accuracy": accuracy(predict_proba(head, test_features), test_targets),
            "seconds": time.perf_counter() - t0,
            "depth": "head (linear probe)",
        }
        print(per_class, "head", cells["head"], flush=True)
        lp_head = train_head(feats[~is_val], y[~is_val], len(classes), l2=HEAD_L2, seed=SEED)

        t0 = time.perf_counter()
        probe = probe_domain(body, BACKBONE, [paths[i] for i in chosen], y, len(classes), SIZE, l2=HEAD_L2,
                             seed=SEED, device=device)  # fmt: skip
        probe_seconds = time.perf_counter() - t0
        print(per_class, probe.reason, f"{probe_seconds:.1f}s", flush=True)
        pick = choose_depth(len(train) / len(classes), n_groups, far_domain=probe.far)

        configs = {"last": DepthDecision(2, "last", "last stage"), "all": DepthDecision(n_groups, "all", "all")}
        for name, decision in configs.items():
            cells[name] = _finetune_cell(body, classes, lp_head, paths, targets, train, val, decision, settings,
                                         test_paths, test_targets, device)  # fmt: skip
            print(per_class, name, cells[name], flush=True)
        same = next((n for n, d in configs.items() if d.trainable_groups == pick.trainable_groups), None)
        if pick.trainable_groups == 0:
            same = "head"
        if same is not None:
            cells["policy"] = {**cells[same], "same_as": same}
        else:
            cells["policy"] = _finetune_cell(body, classes, lp_head, paths, targets, train, val, pick, settings,
                                             test_paths, test_targets, device)  # fmt: skip
        cells["policy"].update(depth=f"{pick.label} ({pick.trainable_groups} groups)", reason=pick.reason)
        best = max(cells[n]["test_accuracy"] for n in ("head", "last", "all"))
        best_all = max(best, cells["policy"]["test_accuracy"])
        rows.append(
            {
                "labels_per_class": per_class,
                "n_train": int(len(train)),
                "n_val": int(len(val)),
                "cells": cells,
                "probe": probe.as_params(),
                "probe_seconds": probe_seconds,
                "policy_gap_points": 100 * (best_all - cells["policy"]["test_accuracy"]),
                "policy_within_1_point": 100 * (best_all - cells["policy"]["test_accuracy"]) <= 1.0,
            }
        )
        print(per_class, "policy", cells["policy"], flush=True)

    meta = {
        "epochs": args.epochs,
        "head_epochs": args.head_epochs,
        "patience": settings.patience,
        "head_lr": settings.head_lr,
        "adapt_batchnorm": settings.adapt_batchnorm,
        "gradual_unfreeze": settings.gradual_unfreeze,
        "threads": args.threads,
        "device": torch.cuda.get_device_name(device) if device.type == "cuda" else "CPU",
        "load_average_at_end": os.getloadavg(),
        "cpu_count": os.cpu_count(),
    }
    out = Path(args.out)
    out.parent.mkdir(parents=True, exist_ok=True)
    out.with_suffix(".json").write_text(json.dumps({"meta": meta, "rows": rows}, indent=2, default=str))
    table = _markdown(rows, meta)
    out.with_suffix(".md").write_text(table)
    print(table)


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
    }


def _markdown(rows: list[dict], meta: dict) -> str:
    lines = [
        f"Fashion-MNIST, {BACKBONE}, {SIZE} px, test = fixed 2,000-image subset of t10k; fine-tunes: "
        f"{meta['epochs']} epochs ({meta['head_epochs']} head + {meta['epochs'] - meta['head_epochs']} body), "
        f"patience {meta['patience']}, gradual unfreezing {meta['gradual_unfreeze']}, head lr "
        f"{meta['head_lr']:g}, BatchNorm re-estimated {meta['adapt_batchnorm']}; {meta['device']}, "
        f"{meta['threads']} torch threads, load average at end {meta['load_average_at_end'][0]:.1f}",
        "",
        "| labels/class | head (linear probe) | last stage | all | policy's pick | policy within 1 pt |",
        "|---|---|---|---|---|---|",
    ]
    for row in rows:
        c = row["cells"]

        def cell(name: str, c=c) -> str:
            return f"{100 * c[name]['test_accuracy']:.1f}% ({c[name]['seconds']:.0f}s)"

        pick = c["policy"]
        lines.append(
            f"| {row['labels_per_class']} | {cell('head')} | {cell('last')} | {cell('all')} | "
            f"{cell('policy')} {pick['depth']}{' = ' + pick['same_as'] if 'same_as' in pick else ''} | "
            f"{'yes' if row['policy_within_1_point'] else 'no'} ({row['policy_gap_points']:.1f} pt) |"
        )
    lines.append("")
    for row in rows:
        p = row["probe"]
        lines.append(
            f"- {row['labels_per_class']}/class probe: {p['domain_probe_middle_stage']} "
            f"{p['domain_probe_middle_acc']} vs last {p['domain_probe_last_acc']} (kNN {p['domain_probe_knn_acc']}) "
            f"-> far={p['domain_probe_far']} ({row['probe_seconds']:.0f}s)"
        )
    return "\n".join(lines) + "\n"


if __name__ == "__main__":
    main()
