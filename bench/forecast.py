"""Does the label-budget forecast hold? Fit on the first half of a simulated learning curve, check the second.

Each (data set, strategy, seed) curve comes from `flywheel.simulation.simulate` (the loop behind `flywheel
simulate`): a 30% test split, 2 labels per class to start, then `--batch-size` labels per round chosen by the
strategy, up to `--budget-per-class`. At the half-way budget two forecasts are made with flywheel.insight.forecast:

- history: what `flywheel round` does: the power law fitted to the curve's own first-half points (the test
  accuracy of each round's model);
- cv: the alternative we measured and rejected: cross-validation on the labels held at half-way
  (flywheel.training.crossval), the curve fitted to heads trained on subsets of those labels, judged on the folds
  they did not see.

Both are compared with the second half of the curve: mean absolute error in accuracy points, the share of
second-half points inside the 10-90% prediction band, and labels-to-target: for the accuracy the curve reaches
at 75% and at 100% of the budget (3-point running mean), the labels the forecast says it takes against the
labels it took.

    .venv/bin/python bench/forecast.py            # fashion-mnist 5k and digits, random and auto, 3 seeds
    .venv/bin/python bench/forecast.py --quick    # smoke run: digits, random, 1 seed, short curve

Writes bench/results/forecast.json and bench/results/forecast.md.
"""

from __future__ import annotations

import os

for _var in ("OMP_NUM_THREADS", "OPENBLAS_NUM_THREADS", "MKL_NUM_THREADS"):
    os.environ.setdefault(_var, "1")

import argparse  # noqa: E402
import json  # noqa: E402
import multiprocessing  # noqa: E402
import time  # noqa: E402
from concurrent.futures import ProcessPoolExecutor  # noqa: E402
from dataclasses import dataclass  # noqa: E402
from pathlib import Path  # noqa: E402

import numpy as np  # noqa: E402
import numpy.typing as npt  # noqa: E402

REPO = Path(__file__).resolve().parents[1]

from flywheel.strategies import PoolView, Selection, get_strategy  # noqa: E402

TARGET_AT = (0.75, 1.0)  # targets: the accuracy the curve reached at these shares of the full budget
N_BOOT = 200


@dataclass(frozen=True)
class Config:
    seeds: int
    initial_per_class: int
    budget_per_class: int
    batch_size: int
    pool_size: int
    folds: int


class Recording:
    """A strategy that keeps every batch it picks, so the labels held at half-way can be rebuilt per seed."""

    def __init__(self, name: str):
        self.strategy = get_strategy(name)
        self.picks: list[npt.NDArray[np.int64]] = []

    def __call__(self, pool: PoolView, n: int, *, rng: np.random.Generator) -> Selection:
        selection = self.strategy(pool, n, rng=rng)
        self.picks.append(np.asarray(selection.positions, dtype=np.int64))
        return selection


def running_mean(values: np.ndarray, width: int = 3) -> np.ndarray:
    """Centred running mean (shorter windows at the ends): one noisy round does not decide a crossing."""
    out = np.empty(len(values))
    for i in range(len(values)):
        lo, hi = max(0, i - width // 2), min(len(values), i + width // 2 + 1)
        out[i] = values[lo:hi].mean()
    return out


def evaluate(points_x, points_y, budgets, accuracy, half: int, rng) -> dict:
    """One forecast (fitted to the given points at budget index `half`) against the observed second half."""
    from flywheel.insight.forecast import bootstrap_fits, fit_power_law, make_forecast, prediction_band, scatter

    x, y = np.asarray(points_x, dtype=np.float64), np.asarray(points_y, dtype=np.float64)
    fit = fit_power_law(x, y)
    fits = bootstrap_fits(x, y, fit, n_boot=N_BOOT, rng=rng) or [fit]
    later = np.asarray(budgets[half + 1 :], dtype=np.float64)
    observed = np.asarray(accuracy[half + 1 :])
    predicted = np.asarray(fit(later))
    low, high = prediction_band(fits, scatter(x, y, fit), later, rng)
    smooth = running_mean(np.asarray(accuracy))
    targets = []
    for share in TARGET_AT:
        at = int(np.searchsorted(budgets, share * budgets[-1], side="right")) - 1
        target = float(smooth[at])
        true = int(budgets[int(np.argmax(smooth >= target))])
        forecast = make_forecast(
            points_x, points_y, current_labels=int(budgets[half]), target=target, batch=1, window=1,
            stop_threshold=0.0, n_boot=20, rng=rng,
        )  # fmt: skip
        said = None if forecast.labels_to_target is None else forecast.labels_to_target + int(budgets[half])
        targets.append({"share": share, "target": target, "true_labels": true, "forecast_labels": said})
    return {
        "fit": [fit.a, fit.b, fit.c],
        "mae_points": float(100 * np.mean(np.abs(predicted - observed))),
        "bias_points": float(100 * np.mean(predicted - observed)),
        "final_error_points": float(100 * (predicted[-1] - observed[-1])),
        "band_coverage": float(np.mean((observed >= low) & (observed <= high))),
        "targets": targets,
    }


def run_job(dataset: str, strategy: str, config: Config) -> dict:
    """All seeds of one (data set, strategy): simulate, then forecast each seed's curve from its first half."""
    from flywheel.config import load_settings
    from flywheel.simulation import datasets, make_split, simulate
    from flywheel.training.crossval import cross_validate

    settings = load_settings()
    data = datasets.embed_dataset(
        datasets.load_dataset(dataset, settings, pool_size=config.pool_size), settings, progress=False
    )
    assert data.features is not None  # embed_dataset fills them
    recording = Recording(strategy)
    began = time.perf_counter()
    report = simulate(
        data.features, data.targets, data.classes, strategies={strategy: recording}, seeds=config.seeds,
        initial_per_class=config.initial_per_class, budget_per_class=config.budget_per_class,
        batch_size=config.batch_size, l2=settings.head_l2, dataset=dataset,
    )  # fmt: skip
    curve = report["strategies"][strategy]
    budgets = curve["budgets"]
    steps = len(budgets) - 1
    half = int(np.searchsorted(budgets, budgets[-1] / 2, side="right")) - 1
    seeds = []
    for i, seed in enumerate(report["seeds"]):
        accuracy = curve["accuracy_per_seed"][i]
        rng = np.random.default_rng([seed, 7])
        split = make_split(data.targets, seed, initial_per_class=config.initial_per_class)
        held = np.concatenate([split.initial, *recording.picks[i * steps : i * steps + half]])
        assert len(held) == budgets[half], (len(held), budgets[half])
        rows = split.train[held]
        cv = cross_validate(
            data.features[rows], data.targets[rows], len(data.classes), folds=config.folds, n_sizes=8,
            l2=settings.head_l2, seed=seed,
        )  # fmt: skip
        seeds.append(
            {
                "seed": seed,
                "accuracy": accuracy,
                "history": evaluate(budgets[: half + 1], accuracy[: half + 1], budgets, accuracy, half, rng),
                "cv": evaluate(np.repeat(cv.sizes, config.folds), cv.accuracy.ravel(), budgets, accuracy, half, rng),
            }
        )
    return {
        "dataset": dataset,
        "strategy": strategy,
        "budgets": budgets,
        "half_budget": int(budgets[half]),
        "full_label_accuracy": report["full_label_accuracy"],
        "seeds": seeds,
        "seconds": round(time.perf_counter() - began, 1),
    }


def summarize(job: dict, method: str) -> dict:
    rows = [s[method] for s in job["seeds"]]
    out: dict[str, object] = {
        "mae_points": float(np.mean([r["mae_points"] for r in rows])),
        "bias_points": float(np.mean([r["bias_points"] for r in rows])),
        "final_error_points": float(np.mean([abs(r["final_error_points"]) for r in rows])),
        "band_coverage": float(np.mean([r["band_coverage"] for r in rows])),
    }
    for share in TARGET_AT:
        pairs = [t for r in rows for t in r["targets"] if t["share"] == share]
        reached = [t for t in pairs if t["forecast_labels"] is not None]
        errors = [t["forecast_labels"] - t["true_labels"] for t in reached]
        out[f"labels_to_target_{share}"] = {
            "true_mean": float(np.mean([t["true_labels"] for t in pairs])),
            "mean_abs_error": float(np.mean(np.abs(errors))) if errors else None,
            "mean_rel_error": float(np.mean([abs(e) / t["true_labels"] for e, t in zip(errors, reached, strict=True)]))
            if errors else None,
            "median_error": float(np.median(errors)) if errors else None,
            "unreachable": len(pairs) - len(reached),
        }  # fmt: skip
    return out


def table(jobs: list[dict]) -> str:
    lines = [
        "| data set | strategy | method | half -> full labels | MAE 2nd half (points) | bias | |error| at end | "
        "band coverage | labels to 75%-point target: true / mean abs error (rel) | labels to end target: "
        "true / mean abs error (rel) |",
        "|---|---|---|---|---:|---:|---:|---:|---|---|",
    ]

    def labels_cell(entry: dict) -> str:
        if entry["mean_abs_error"] is None:
            return f"{entry['true_mean']:.0f} / unreachable in all"
        miss = f", {entry['unreachable']} unreachable" if entry["unreachable"] else ""
        return f"{entry['true_mean']:.0f} / {entry['mean_abs_error']:.0f} ({100 * entry['mean_rel_error']:.0f}%){miss}"

    for job in jobs:
        for method in ("history", "cv"):
            s = job["summary"][method]
            lines.append(
                f"| {job['dataset']} | {job['strategy']} | {method} | {job['half_budget']} -> {job['budgets'][-1]} | "
                f"{s['mae_points']:.2f} | {s['bias_points']:+.2f} | {s['final_error_points']:.2f} | "
                f"{100 * s['band_coverage']:.0f}% | {labels_cell(s['labels_to_target_0.75'])} | "
                f"{labels_cell(s['labels_to_target_1.0'])} |"
            )
    return "\n".join(lines) + "\n"


def main(argv: list[str] | None = None) -> int:
    parser = argparse.ArgumentParser(description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter)
    parser.add_argument("--datasets", default="fashion-mnist,digits")
    parser.add_argument("--strategies", default="random,auto")
    parser.add_argument("--seeds", type=int, default=3)
    parser.add_argument("--initial-per-class", type=int, default=2)
    parser.add_argument("--budget-per-class", type=int, default=60)
    parser.add_argument("--batch-size", type=int, default=20)
    parser.add_argument("--pool-size", type=int, default=5000)
    parser.add_argument("--folds", type=int, default=5)
    parser.add_argument("--workers", type=int, default=os.cpu_count() or 1)
    parser.add_argument("--quick", action="store_true", help="digits, random, 1 seed, up to 20 labels per class")
    parser.add_argument("--out", default=str(REPO / "bench" / "results" / "forecast"), help="path stem")
    args = parser.parse_args(argv)
    if args.quick:
        args.datasets, args.strategies, args.seeds, args.budget_per_class, args.batch_size = (
            "digits", "random", 1, 20, 10,
        )  # fmt: skip
    config = Config(
        args.seeds, args.initial_per_class, args.budget_per_class, args.batch_size, args.pool_size, args.folds
    )
    jobs = [(d, s) for d in args.datasets.split(",") if d for s in args.strategies.split(",") if s]
    began = time.perf_counter()
    with ProcessPoolExecutor(args.workers, mp_context=multiprocessing.get_context("spawn")) as pool:
        results = list(pool.map(run_job, *zip(*jobs, strict=True), [config] * len(jobs)))
    total = time.perf_counter() - began
    for job in results:
        job["summary"] = {method: summarize(job, method) for method in ("history", "cv")}
        print(f"{job['dataset']} {job['strategy']}: {job['seconds']:.0f} s", flush=True)
    markdown = (
        "## Label-budget forecast: first half of a simulated curve vs the second (bench/forecast.py)\n\n"
        f"{args.seeds} seeds; {args.initial_per_class} labels per class to start, {args.batch_size} per round, up to "
        f"{args.budget_per_class} per class; power law acc(n) = a - b n^-c; band = 10-90% prediction band "
        f"({N_BOOT} pairs-bootstrap fits plus the first half's scatter). `history`: fitted to the first half of "
        "the curve itself (what `flywheel round` does, with its rounds); `cv`: fitted to "
        f"{args.folds}-fold cross-validation on the labels held at half-way (the rejected alternative). "
        "MAE and bias: forecast minus observed test accuracy over the second half, in points, mean over seeds; "
        "labels to target: the accuracy the curve reached (3-round running mean) at 75% and 100% of the budget, "
        "the labels the half-way forecast says it takes vs the labels it took. "
        f"Total wall {total:.0f} s on {os.cpu_count()} CPU cores ({args.workers} worker processes).\n\n"
        + table(results)
    )
    out = Path(args.out)
    out.parent.mkdir(parents=True, exist_ok=True)
    meta = {"config": vars(args), "wall_seconds": round(total, 1), "cpu_count": os.cpu_count()}
    out.with_suffix(".json").write_text(json.dumps({"meta": meta, "jobs": results}, indent=1) + "\n")
    out.with_suffix(".md").write_text(markdown)
    print("\n" + markdown)
    print(f"wrote {out.with_suffix('.json')} and {out.with_suffix('.md')}")
    return 0


if __name__ == "__main__":
    raise SystemExit(main())
