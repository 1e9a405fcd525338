"""Label-budget forecast: how many more labels a target accuracy needs, and whether the next ones are worth it.

A learning curve acc(n) = a - b * n^(-c) (a power law rising to the plateau `a`) is fitted to the accuracy of
each round's model against the labels it was trained on, and bootstrapped over the rounds (pairs resampled,
refitted) for the uncertainty. The accuracy band also carries the rounds' scatter around the curve, so it says
where the next measured accuracy should fall. bench/forecast.py checks this on simulated curves: fitted to the
first half, compared with the second. It also measured the alternative, a curve from cross-validation on the
labels at hand, and found it biased by 10-14 points once a strategy picks the labels (picked labels are
harder than the test set), so rounds are the source here.
"""

from __future__ import annotations

import math
import warnings
from collections.abc import Sequence
from dataclasses import asdict, dataclass
from typing import Any, overload

import numpy as np
import numpy.typing as npt
from matplotlib.figure import Figure
from scipy.optimize import OptimizeWarning, curve_fit

from flywheel.errors import DataError

MIN_POINTS = 4  # distinct training sizes below which a three-parameter curve is not fitted
C_BOUNDS = (0.05, 3.0)  # learning-curve exponents outside this range are not seen in practice
BAND = (10.0, 90.0)  # percentiles of the bootstrap reported as the band


@dataclass(frozen=True)
class PowerLaw:
    """acc(n) = a - b * n^(-c): plateau a, rising with exponent c."""

    a: float
    b: float
    c: float

    @overload
    def __call__(self, n: float) -> float: ...
    @overload
    def __call__(self, n: npt.NDArray[np.floating[Any]]) -> npt.NDArray[np.float64]: ...
    def __call__(self, n: npt.NDArray[np.floating[Any]] | float) -> npt.NDArray[np.float64] | float:
        value: npt.NDArray[np.float64] | float = self.a - self.b * np.power(np.maximum(n, 1e-9), -self.c)
        return value

    def labels_for(self, target: float) -> float:
        """Training labels at which the curve reaches `target`; inf when the plateau lies at or below it."""
        if target >= self.a:
            return math.inf
        return float((self.b / (self.a - target)) ** (1.0 / self.c)) if self.b > 0 else 0.0


def _power_law(n: npt.NDArray[np.float64], a: float, b: float, c: float) -> npt.NDArray[np.float64]:
    value: npt.NDArray[np.float64] = a - b * np.power(n, -c)
    return value


def fit_power_law(
    labels: Sequence[float] | npt.NDArray[np.floating[Any]],
    accuracy: Sequence[float] | npt.NDArray[np.floating[Any]],
    *,
    start: PowerLaw | None = None,
) -> PowerLaw:
    """Least-squares fit (a in [0, 1], b >= 0, c in C_BOUNDS), best of a few starting exponents.

    labels: (P,) training labels per point (> 0); accuracy: (P,) in [0, 1]; repeated labels are allowed.
    start: begin from this curve only (the bootstrap refits start from the fit they perturb).
    """
    x = np.asarray(labels, dtype=np.float64)
    y = np.asarray(accuracy, dtype=np.float64)
    if x.shape != y.shape or x.ndim != 1:
        raise DataError(f"labels and accuracy must be 1-d of one length, got {x.shape} and {y.shape}")
    if len(np.unique(x)) < MIN_POINTS:
        raise DataError(f"a learning curve needs at least {MIN_POINTS} distinct label counts, got {len(np.unique(x))}")
    if (x <= 0).any() or not np.isfinite(y).all():
        raise DataError("learning-curve points need label counts > 0 and finite accuracies")
    best, best_sse = None, math.inf
    a0 = min(1.0, float(y.max()) + 0.02)
    starts = [(a0, max(1e-3, (a0 - float(y[np.argmin(x)])) * float(x.min()) ** c0), c0) for c0 in (0.3, 0.7, 1.5)]
    if start is not None:
        starts = [(min(start.a, 1.0), max(start.b, 1e-9), min(max(start.c, C_BOUNDS[0]), C_BOUNDS[1]))]
    for p0 in starts:
        try:
            with warnings.catch_warnings():
                warnings.simplefilter("ignore", OptimizeWarning)
                params, _ = curve_fit(
                    _power_law, x, y, p0=p0,
                    bounds=((0.0, 0.0, C_BOUNDS[0]), (1.0, np.inf, C_BOUNDS[1])), maxfev=5000,
                )  # fmt: skip
        except RuntimeError:  # no convergence from this start: another start may converge
            continue
        sse = float(np.sum((_power_law(x, *params) - y) ** 2))
        if sse < best_sse:
            best, best_sse = PowerLaw(*(float(p) for p in params)), sse
    if best is None:
        raise DataError(f"the learning curve did not converge on {len(x)} points ({x.min():.0f}..{x.max():.0f} labels)")
    return best


def bootstrap_fits(
    labels: npt.NDArray[np.floating[Any]],
    accuracy: npt.NDArray[np.floating[Any]],
    fit: PowerLaw,
    *,
    n_boot: int,
    rng: np.random.Generator,
) -> list[PowerLaw]:
    """Refits on points resampled with replacement (pairs bootstrap). A resample with fewer than MIN_POINTS
    distinct label counts (likely with few rounds) is replaced by the curve plus resampled residuals."""
    x, y = np.asarray(labels, dtype=np.float64), np.asarray(accuracy, dtype=np.float64)
    fitted = np.asarray(fit(x))
    residuals = y - fitted
    fits = []
    for _ in range(n_boot):
        rows = rng.choice(len(x), size=len(x), replace=True)
        bx, by = (x[rows], y[rows]) if len(np.unique(x[rows])) >= MIN_POINTS else (x, fitted + residuals[rows])
        try:
            fits.append(fit_power_law(bx, by, start=fit))
        except DataError:
            continue
    return fits


def scatter(
    labels: npt.NDArray[np.floating[Any]], accuracy: npt.NDArray[np.floating[Any]], fit: PowerLaw
) -> npt.NDArray[np.float64]:
    """The points' residuals around the fit, scaled by sqrt(P / (P - 3)) for the three fitted parameters."""
    x, y = np.asarray(labels, dtype=np.float64), np.asarray(accuracy, dtype=np.float64)
    residuals = y - np.asarray(fit(x))
    return residuals * math.sqrt(len(x) / max(len(x) - 3, 1))


def prediction_band(
    fits: Sequence[PowerLaw],
    residuals: npt.NDArray[np.floating[Any]],
    at: npt.NDArray[np.floating[Any]],
    rng: np.random.Generator,
) -> tuple[npt.NDArray[np.float64], npt.NDArray[np.float64]]:
    """BAND percentiles of (bootstrap curve + a resampled residual) at `at`: where a measurement should fall."""
    curves = np.array([f(at) for f in fits]) + rng.choice(residuals, size=(len(fits), len(at)))
    low: npt.NDArray[np.float64] = np.percentile(curves, BAND[0], axis=0)
    high: npt.NDArray[np.float64] = np.percentile(curves, BAND[1], axis=0)
    return low, high


@dataclass(frozen=True)
class Forecast:
    """Counts are labels collected; gains are accuracy differences (0.01 = 1 point); bands are BAND percentiles."""

    labels: list[float]  # observed points
    accuracy: list[float]
    fit: PowerLaw
    current_labels: int
    current_accuracy: float  # the curve's value at current_labels
    target_accuracy: float
    labels_to_target: int | None  # more labels needed (0: reached); None: the plateau lies below the target
    labels_to_target_band: tuple[int | None, int | None]  # BAND percentiles over the bootstrap (None: unreachable)
    reachable_share: float  # share of bootstrap fits whose plateau lies above the target
    batch: int
    batch_gain: float
    batch_gain_band: tuple[float, float]
    window: int
    window_gain: float
    stop_threshold: float
    stop: bool
    recommendation: str
    n_boot: int
    grid: list[float]  # labels at which the accuracy band is given (for the plot)
    band_low: list[float]  # prediction band: bootstrap curves plus the rounds' scatter
    band_high: list[float]

    def to_dict(self) -> dict[str, Any]:
        return asdict(self)

    @classmethod
    def from_dict(cls, data: dict[str, Any]) -> Forecast:
        values = dict(data)
        values["fit"] = PowerLaw(**values["fit"])
        values["labels_to_target_band"] = tuple(values["labels_to_target_band"])
        values["batch_gain_band"] = tuple(values["batch_gain_band"])
        return cls(**values)


def make_forecast(
    labels: Sequence[float] | npt.NDArray[np.floating[Any]],
    accuracy: Sequence[float] | npt.NDArray[np.floating[Any]],
    *,
    current_labels: int,
    target: float,
    batch: int,
    window: int,
    stop_threshold: float,
    n_boot: int = 200,
    rng: np.random.Generator,
) -> Forecast:
    """Fit the curve to (labels, accuracy) points, one per round, and read the forecast off it.

    current_labels: labels collected so far; target: accuracy wanted; batch: labels in the next round;
    window / stop_threshold: stop is recommended when `window` more labels are forecast to add less than
    `stop_threshold` accuracy.
    """
    _check_request(target, batch=batch, window=window)
    x = np.asarray(labels, dtype=np.float64)
    y = np.asarray(accuracy, dtype=np.float64)
    fit = fit_power_law(x, y)
    fits = bootstrap_fits(x, y, fit, n_boot=n_boot, rng=rng) or [fit]

    def at(f: PowerLaw, n: float) -> float:
        return float(f(n))

    to_target = _labels_to_target(fit, fits, target=target, current_labels=current_labels)
    now = at(fit, current_labels)
    gains = np.array([at(f, current_labels + batch) - at(f, current_labels) for f in fits])
    window_gain = at(fit, current_labels + window) - now
    stop = window_gain < stop_threshold
    grid = np.geomspace(max(1.0, float(x.min())), max(float(x.max()), current_labels) * 4 + window, 60)
    low_band, high_band = prediction_band(fits, scatter(x, y, fit), grid, rng)
    return Forecast(
        labels=x.tolist(),
        accuracy=y.tolist(),
        fit=fit,
        current_labels=int(current_labels),
        current_accuracy=now,
        target_accuracy=float(target),
        labels_to_target=to_target.labels,
        labels_to_target_band=to_target.band,
        reachable_share=to_target.reachable_share,
        batch=int(batch),
        batch_gain=at(fit, current_labels + batch) - now,
        batch_gain_band=(float(np.percentile(gains, BAND[0])), float(np.percentile(gains, BAND[1]))),
        window=int(window),
        window_gain=window_gain,
        stop_threshold=float(stop_threshold),
        stop=stop,
        recommendation=_recommendation(stop, window, window_gain, stop_threshold),
        n_boot=len(fits),
        grid=grid.tolist(),
        band_low=low_band.tolist(),
        band_high=high_band.tolist(),
    )


def _check_request(target: float, *, batch: int, window: int) -> None:
    """DataError unless the target is an accuracy in (0, 1] and batch and window are label counts."""
    if not 0 < target <= 1:
        raise DataError(f"target accuracy must lie in (0, 1], got {target}")
    if batch < 1 or window < 1:
        raise DataError(f"batch and window must be at least 1 label, got {batch} and {window}")


@dataclass(frozen=True)
class _ToTarget:
    """More labels needed to reach the target accuracy (None: unreachable), as in Forecast."""

    labels: int | None  # by the fit
    band: tuple[int | None, int | None]  # BAND percentiles over the bootstrap fits
    reachable_share: float  # share of bootstrap fits whose plateau lies above the target


def _labels_to_target(fit: PowerLaw, fits: Sequence[PowerLaw], *, target: float, current_labels: int) -> _ToTarget:
    """Labels beyond `current_labels` at which the fit, and each bootstrap fit, reaches `target` (0: reached)."""

    def more_labels(f: PowerLaw) -> float:
        return max(0.0, f.labels_for(target) - current_labels)

    boot_needed = np.array([more_labels(f) for f in fits])
    low, high = np.percentile(boot_needed, BAND, method="nearest")  # no interpolation with inf
    return _ToTarget(
        labels=_count(more_labels(fit)),
        band=(_count(float(low)), _count(float(high))),
        reachable_share=float(np.isfinite(boot_needed).mean()),
    )


def _count(value: float) -> int | None:
    return None if not math.isfinite(value) else int(math.ceil(value))


def _recommendation(stop: bool, window: int, gain: float, threshold: float) -> str:
    if stop:
        return (
            f"stop: the next {window} labels are forecast to add {100 * gain:.2f} points (< {100 * threshold:.2f}); "
            "the curve has flattened"
        )
    return f"continue: the next {window} labels are forecast to add {100 * gain:.2f} points"


def _labels_text(value: int | None) -> str:
    return "unreachable" if value is None else f"{value:,}"


def summary_lines(forecast: Forecast) -> list[str]:
    """The forecast in a few sentences: the round report, `flywheel status` and the MLflow run all print these."""
    f = forecast
    low, high = f.labels_to_target_band
    band = f"{BAND[0]:.0f}-{BAND[1]:.0f}% band {_labels_text(low)} .. {_labels_text(high)}"
    if f.labels_to_target == 0:
        target = f"target {100 * f.target_accuracy:.1f}% reached (curve at {100 * f.current_accuracy:.1f}%)"
    elif f.labels_to_target is None:
        target = (
            f"target {100 * f.target_accuracy:.1f}% not reachable: the curve levels off at {100 * f.fit.a:.1f}% "
            f"({band}; reachable in {100 * f.reachable_share:.0f}% of {f.n_boot} bootstrap fits)"
        )
    else:
        target = (
            f"labels to reach {100 * f.target_accuracy:.1f}%: {_labels_text(f.labels_to_target)} more ({band}; "
            f"reachable in {100 * f.reachable_share:.0f}% of {f.n_boot} bootstrap fits)"
        )
    return [
        target,
        f"next batch of {f.batch}: {100 * f.batch_gain:+.2f} points "
        f"({100 * f.batch_gain_band[0]:+.2f} .. {100 * f.batch_gain_band[1]:+.2f})",
        f"curve: {100 * f.fit.a:.1f}% - {f.fit.b:.3g} * n^-{f.fit.c:.2f} (plateau {100 * f.fit.a:.1f}%), "
        f"{len(f.labels)} points, now {100 * f.current_accuracy:.1f}% at {f.current_labels:,} labels",
        f.recommendation,
    ]


def markdown(forecast: Forecast) -> str:
    return "## Label-budget forecast\n\n" + "".join(f"- {line}\n" for line in summary_lines(forecast))


def figure(forecast: Forecast, title: str = "learning-curve forecast") -> Figure:
    """Observed points, the fitted curve, its bootstrap band, the target and where it is reached."""
    f = forecast
    fig = Figure(figsize=(6, 4), dpi=110)
    ax = fig.add_subplot()
    grid = np.asarray(f.grid)
    ax.fill_between(
        grid, f.band_low, f.band_high, color="tab:blue", alpha=0.2, label=f"{BAND[0]:.0f}-{BAND[1]:.0f}% band"
    )
    ax.plot(grid, f.fit(grid), color="tab:blue", label="power-law fit")
    ax.plot(f.labels, f.accuracy, "o", color="black", markersize=3, label="rounds")
    ax.axhline(f.target_accuracy, color="tab:red", linestyle="--", linewidth=1, label="target")
    ax.axvline(f.current_labels, color="grey", linestyle=":", linewidth=1, label="labels now")
    if f.labels_to_target:
        ax.axvline(f.current_labels + f.labels_to_target, color="tab:red", linestyle=":", linewidth=1)
    ax.set_xscale("log")
    ax.set_xlabel("labels")
    ax.set_ylabel("accuracy")
    ax.set_title(title, fontsize=10)
    ax.grid(alpha=0.3)
    ax.legend(fontsize=7, loc="lower right")
    fig.tight_layout()
    return fig
