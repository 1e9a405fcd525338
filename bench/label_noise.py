"""How well does the label review find wrong labels, and how much accuracy does fixing them give back?

Per data set and seed: a stratified 30% test split (flywheel.simulation.make_split), `--labels` labels drawn at
random from the rest, answered by the simulated annotator's rule (flywheel.labelstudio.annotator.careless: with
probability `--noise` another class, uniformly). The review's confident-learning pass
(flywheel.insight.review.confident_learning on out-of-sample probabilities from 5-fold cross-validation,
flywheel.training.crossval) flags labels; a reviewer then replaces each flagged label with the truth, as in Label
Studio. Reported: precision and recall of the flagged set against the labels the annotator got wrong, and the test
accuracy of the linear head trained on the noisy labels, on the reviewed labels, and on clean labels (the ceiling),
with the share of the lost accuracy the review recovered.

    .venv/bin/python bench/label_noise.py              # fashion-mnist 5k and digits, 10% and 20% noise, 3 seeds
    .venv/bin/python bench/label_noise.py --quick      # smoke run: digits, 10%, 1 seed

Writes bench/results/label-noise.json and bench/results/label-noise.md.
"""

from __future__ import annotations

import argparse
import json
import os
import time
from pathlib import Path

import numpy as np

REPO = Path(__file__).resolve().parents[1]

from flywheel.config import load_settings  # noqa: E402
from flywheel.insight.review import confident_learning  # noqa: E402
from flywheel.labelstudio.annotator import careless  # noqa: E402
from flywheel.simulation import datasets, make_split  # noqa: E402
from flywheel.simulation.core import single_threaded_torch  # noqa: E402
from flywheel.training.crossval import cross_validate  # noqa: E402
from flywheel.training.head import predict_proba, train_head  # noqa: E402


def test_accuracy(features, targets, rows, labels, test, n_classes, l2, seed) -> float:
    head = train_head(features[rows], labels, n_classes, l2=l2, seed=seed)
    return float((predict_proba(head, features[test]).argmax(1) == targets[test]).mean())


def one_run(data, n_labels: int, noise: float, seed: int, folds: int, l2: float, max_self_confidence: float) -> dict:
    n_classes = len(data.classes)
    split = make_split(data.targets, seed, initial_per_class=1)
    rng = np.random.default_rng([seed, int(1000 * noise), 11])
    rows = np.sort(rng.choice(split.train, size=min(n_labels, len(split.train)), replace=False))
    truth = data.targets[rows]
    noisy = np.array(
        [data.classes.index(careless(data.classes[t], data.classes, noise, rng)) for t in truth], dtype=np.int64
    )
    wrong = noisy != truth
    began = time.perf_counter()
    cv = cross_validate(data.features[rows], noisy, n_classes, folds=folds, n_sizes=1, l2=l2, seed=seed)
    flagged = np.zeros(len(rows), dtype=bool)
    flagged[confident_learning(noisy, cv.probs, max_self_confidence=max_self_confidence)] = True
    seconds = time.perf_counter() - began
    reviewed = np.where(flagged, truth, noisy)  # the reviewer answers flagged labels with the truth
    with single_threaded_torch():
        before, after, clean = (
            test_accuracy(data.features, data.targets, rows, labels, split.test, n_classes, l2, seed)
            for labels in (noisy, reviewed, truth)
        )
    hits = int((flagged & wrong).sum())
    return {
        "seed": seed,
        "labels": len(rows),
        "wrong": int(wrong.sum()),
        "flagged": int(flagged.sum()),
        "true_positives": hits,
        "precision": hits / max(int(flagged.sum()), 1),
        "recall": hits / max(int(wrong.sum()), 1),
        "right_flagged_share": int((flagged & ~wrong).sum()) / max(int((~wrong).sum()), 1),
        "wrong_after_review": int((reviewed != truth).sum()),
        "accuracy_noisy": before,
        "accuracy_reviewed": after,
        "accuracy_clean": clean,
        "recovered_share": (after - before) / (clean - before) if clean > before else None,
        "review_seconds": round(seconds, 2),
    }


def main(argv: list[str] | None = None) -> int:
    parser = argparse.ArgumentParser(description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter)
    parser.add_argument("--datasets", default="fashion-mnist,digits")
    parser.add_argument("--noise", default="0,0.1,0.2", help="comma-separated annotator noise rates")
    parser.add_argument("--labels", type=int, default=1000)
    parser.add_argument("--seeds", type=int, default=3)
    parser.add_argument("--folds", type=int, default=5)
    parser.add_argument("--pool-size", type=int, default=5000)
    parser.add_argument("--quick", action="store_true", help="digits, 10%% noise, 1 seed")
    parser.add_argument("--out", default=str(REPO / "bench" / "results" / "label-noise"), help="path stem")
    args = parser.parse_args(argv)
    if args.quick:
        args.datasets, args.noise, args.seeds = "digits", "0.1", 1
    settings = load_settings()
    began = time.perf_counter()
    results = []
    for dataset in [d for d in args.datasets.split(",") if d]:
        data = datasets.embed_dataset(
            datasets.load_dataset(dataset, settings, pool_size=args.pool_size), settings, progress=False
        )
        for noise in [float(x) for x in args.noise.split(",") if x]:
            runs = [
                one_run(
                    data, args.labels, noise, seed, args.folds, settings.head_l2, settings.review.max_self_confidence
                )
                for seed in range(args.seeds)
            ]
            mean = {k: float(np.mean([r[k] for r in runs])) for k in runs[0] if k != "seed" and runs[0][k] is not None}
            results.append({"dataset": dataset, "noise": noise, "runs": runs, "mean": mean})
            print(f"{dataset} noise {noise:.0%}: precision {mean['precision']:.3f} recall {mean['recall']:.3f} "
                  f"accuracy {mean['accuracy_noisy']:.4f} -> {mean['accuracy_reviewed']:.4f} "
                  f"(clean {mean['accuracy_clean']:.4f})", flush=True)  # fmt: skip
    total = time.perf_counter() - began
    lines = [
        "## Label review at simulated annotator noise (bench/label_noise.py)\n",
        f"{args.labels} random labels per run, {args.seeds} seeds, the simulated annotator's noise rule; confident "
        f"learning (cleanlab find_label_issues, ranked by self-confidence) on {args.folds}-fold out-of-sample "
        f"probabilities of the linear head, kept where the label's probability is at most "
        f"{settings.review.max_self_confidence} (review.max_self_confidence); flagged labels replaced by the truth "
        "(the reviewer). Test accuracy of "
        f"the head on a 30% stratified test split. Means over seeds. Total wall {total:.0f} s on "
        f"{os.cpu_count()} CPU cores.\n",
        "| data set | noise | wrong labels | flagged | right labels flagged | precision | recall | "
        "wrong after review | test acc noisy | reviewed | clean | recovered |",
        "|---|---:|---:|---:|---:|---:|---:|---:|---:|---:|---:|---:|",
    ]
    for r in results:
        m = r["mean"]
        recovered = f"{100 * m['recovered_share']:.0f}%" if "recovered_share" in m else "n/a"
        precision, recall = (
            (f"{100 * m['precision']:.1f}%", f"{100 * m['recall']:.1f}%") if m["wrong"] else ("n/a", "n/a")
        )
        lines.append(
            f"| {r['dataset']} | {100 * r['noise']:.0f}% | {m['wrong']:.0f} | {m['flagged']:.0f} | "
            f"{100 * m['right_flagged_share']:.1f}% | {precision} | {recall} | {m['wrong_after_review']:.0f} | "
            f"{100 * m['accuracy_noisy']:.2f}% | {100 * m['accuracy_reviewed']:.2f}% | "
            f"{100 * m['accuracy_clean']:.2f}% | {recovered} |"
        )
    markdown = "\n".join(lines) + "\n"
    out = Path(args.out)
    out.parent.mkdir(parents=True, exist_ok=True)
    meta = {"config": vars(args), "wall_seconds": round(total, 1), "cpu_count": os.cpu_count()}
    out.with_suffix(".json").write_text(json.dumps({"meta": meta, "results": results}, indent=1) + "\n")
    out.with_suffix(".md").write_text(markdown)
    print("\n" + markdown)
    return 0


if __name__ == "__main__":
    raise SystemExit(main())
