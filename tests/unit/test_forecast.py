"""Label-budget forecast: planted learning curves are recovered, the answers follow from the curve by hand,
the stopping rule fires on a flat curve and not on a steep one, and bad inputs name the problem."""

from __future__ import annotations

import json
import math

import numpy as np
import pytest

from flywheel.catalog import Catalog
from flywheel.config import load_settings
from flywheel.errors import DataError
from flywheel.insight import after_round, forecast
from flywheel.insight.forecast import Forecast, PowerLaw, fit_power_law, make_forecast

TRUE = PowerLaw(a=0.88, b=1.2, c=0.5)
LABELS = np.array([50, 100, 150, 200, 300, 400, 500, 600], dtype=float)


def _noisy(curve: PowerLaw, sd: float, seed: int = 0) -> np.ndarray:
    return np.asarray(curve(LABELS)) + np.random.default_rng(seed).normal(0, sd, len(LABELS))


def test_labels_for_inverts_the_curve_by_hand():
    # 0.88 - 1.2 / sqrt(n) = 0.82  <=>  sqrt(n) = 1.2 / 0.06 = 20  <=>  n = 400
    assert TRUE.labels_for(0.82) == pytest.approx(400.0)
    assert TRUE(400.0) == pytest.approx(0.82)
    assert math.isinf(TRUE.labels_for(0.88)) and math.isinf(TRUE.labels_for(0.95))  # at or above the plateau


def test_fit_recovers_a_planted_curve():
    fit = fit_power_law(LABELS, TRUE(LABELS))
    assert fit.a == pytest.approx(TRUE.a, abs=1e-3)
    assert fit.b == pytest.approx(TRUE.b, rel=1e-2)
    assert fit.c == pytest.approx(TRUE.c, abs=1e-2)


def test_forecast_answers_from_the_curve():
    result = make_forecast(
        LABELS, TRUE(LABELS), current_labels=300, target=0.82, batch=100, window=500, stop_threshold=0.003,
        n_boot=50, rng=np.random.default_rng(0),
    )  # fmt: skip
    assert result.labels_to_target == pytest.approx(100, abs=2)  # 400 needed, 300 held
    assert result.batch_gain == pytest.approx(TRUE(400.0) - TRUE(300.0), abs=1e-3)
    assert result.window_gain == pytest.approx(TRUE(800.0) - TRUE(300.0), abs=1e-3)
    assert not result.stop and result.recommendation.startswith("continue")
    low, high = result.labels_to_target_band
    assert low <= result.labels_to_target <= high and result.reachable_share == 1.0
    assert all(lo <= hi for lo, hi in zip(result.band_low, result.band_high, strict=True))


def test_band_widens_with_noise():
    quiet = make_forecast(
        LABELS, _noisy(TRUE, 0.002), current_labels=600, target=0.85, batch=100, window=500, stop_threshold=0.0,
        n_boot=60, rng=np.random.default_rng(1),
    )  # fmt: skip
    loud = make_forecast(
        LABELS, _noisy(TRUE, 0.02), current_labels=600, target=0.85, batch=100, window=500, stop_threshold=0.0,
        n_boot=60, rng=np.random.default_rng(1),
    )  # fmt: skip
    width = [h - lo for lo, h in zip(quiet.band_low, quiet.band_high, strict=True)]
    wider = [h - lo for lo, h in zip(loud.band_low, loud.band_high, strict=True)]
    assert np.mean(wider) > 3 * np.mean(width)


def test_prediction_band_covers_new_measurements_about_as_often_as_it_says():
    """80% band: fresh noisy measurements at 2x the labels seen land inside it in most of 10 planted runs."""
    inside = 0
    for seed in range(10):
        rng = np.random.default_rng(seed)
        result = make_forecast(
            LABELS, _noisy(TRUE, 0.01, seed), current_labels=600, target=0.85, batch=100, window=500,
            stop_threshold=0.0, n_boot=40, rng=rng,
        )  # fmt: skip
        at = int(np.argmin(np.abs(np.asarray(result.grid) - 1200)))
        measured = float(TRUE(result.grid[at])) + rng.normal(0, 0.01)
        inside += result.band_low[at] <= measured <= result.band_high[at]
    assert 6 <= inside <= 10


def test_flat_curve_recommends_stopping():
    flat = PowerLaw(a=0.80, b=0.5, c=1.5)  # ~0.80 from a few hundred labels on
    result = make_forecast(
        LABELS, flat(LABELS), current_labels=600, target=0.9, batch=100, window=500, stop_threshold=0.003,
        n_boot=20, rng=np.random.default_rng(0),
    )  # fmt: skip
    assert result.stop and "next 500 labels are forecast to add" in result.recommendation
    assert result.labels_to_target is None  # the plateau lies below the target
    assert "not reachable" in forecast.summary_lines(result)[0]


def test_reached_target_needs_no_more_labels():
    result = make_forecast(
        LABELS, TRUE(LABELS), current_labels=600, target=0.5, batch=10, window=10, stop_threshold=0.0,
        n_boot=10, rng=np.random.default_rng(0),
    )  # fmt: skip
    assert result.labels_to_target == 0 and "reached" in forecast.summary_lines(result)[0]


def test_round_trip_through_json_and_the_plot():
    result = make_forecast(
        LABELS, _noisy(TRUE, 0.01), current_labels=600, target=0.85, batch=100, window=500, stop_threshold=0.003,
        n_boot=20, rng=np.random.default_rng(0),
    )  # fmt: skip
    again = Forecast.from_dict(json.loads(json.dumps(result.to_dict())))
    assert again == result
    figure = forecast.figure(result)
    assert len(figure.axes[0].lines) >= 4  # fit, points, target, labels now
    assert "## Label-budget forecast" in forecast.markdown(result)


def test_bad_inputs_name_the_problem():
    with pytest.raises(DataError, match="at least 4 distinct label counts, got 3"):
        fit_power_law([10, 20, 30, 30], [0.5, 0.6, 0.7, 0.7])
    with pytest.raises(DataError, match="one length"):
        fit_power_law([10, 20, 30, 40], [0.5, 0.6])
    with pytest.raises(DataError, match="label counts > 0"):
        fit_power_law([0, 20, 30, 40], [0.5, 0.6, 0.7, 0.8])
    kwargs = dict(current_labels=10, batch=1, window=1, stop_threshold=0.0, rng=np.random.default_rng(0))
    with pytest.raises(DataError, match=r"target accuracy must lie in \(0, 1\], got 1.5"):
        make_forecast(LABELS, TRUE(LABELS), target=1.5, **kwargs)
    with pytest.raises(DataError, match="batch and window"):
        make_forecast(LABELS, TRUE(LABELS), target=0.8, **{**kwargs, "batch": 0})


def test_round_points_use_test_accuracy_only_when_every_round_has_it(tmp_path):
    catalog = Catalog(f"sqlite:///{tmp_path / 'c.db'}")
    for n, holdout, test in ((100, 0.60, 0.62), (200, 0.70, 0.71), (300, 0.74, None)):
        round_id = catalog.start_round(strategy="auto", n_labels=n)
        catalog.finish_round(round_id, model_version=str(round_id), holdout_accuracy=holdout, test_accuracy=test)
    cold = catalog.start_round(strategy="auto", n_labels=0)  # no model: not a point
    catalog.finish_round(cold, model_version=None, holdout_accuracy=None, test_accuracy=None)
    now = catalog.start_round(strategy="auto", n_labels=400)
    labels, accuracy, which = after_round.learning_points(catalog, round_id=now, n_labels=400, test=0.8, holdout=0.77)
    assert which == "held-out" and labels == [100, 200, 300, 400] and accuracy == [0.60, 0.70, 0.74, 0.77]
    settings = load_settings(workspace=tmp_path, k_per_round=100)
    result, note = after_round.round_forecast(settings, catalog, round_id=now, n_labels=400, test=0.8, holdout=0.77)
    assert result is not None and result.labels == [100, 200, 300, 400] and "held-out accuracy of 4 rounds" in note
    none, why = after_round.round_forecast(
        settings, catalog, round_id=now, n_labels=400, test=0.8, holdout=float("nan")
    )
    assert none is None and "no forecast yet" in why
