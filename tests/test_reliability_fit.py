"""Tests of apbatch.job.steps.reliability_fit: logistic fit, Platt recalibration, calibration metrics."""

import numpy as np
import pytest
from apbatch.errors import BadInputError
from apbatch.job.steps import reliability_fit as relfit


def synthetic_sample(n, coef, intercept, seed):
    rng = np.random.default_rng(seed)
    x = rng.normal(size=(n, len(coef))) * np.array([1.0, 3.0, 0.5])[: len(coef)] + 2.0
    p = 1 / (1 + np.exp(-(x @ coef + intercept)))
    return x, rng.uniform(size=n) < p


def test_fit_recovers_known_coefficients_and_is_calibrated():
    coef, intercept = np.array([1.5, -0.7, 2.0]), -1.0
    x, y = synthetic_sample(40_000, coef, intercept, seed=3)
    fitted, icpt = relfit.fit_logistic(x, y, l2=1e-3)
    assert fitted == pytest.approx(coef, abs=0.08)
    assert icpt == pytest.approx(intercept, abs=0.25)
    # calibration on a fresh sample of the same model
    x2, y2 = synthetic_sample(40_000, coef, intercept, seed=4)
    p = 1 / (1 + np.exp(-(x2 @ fitted + icpt)))
    assert relfit.expected_calibration_error(p, y2) < 0.05
    assert relfit.brier_score(p, y2) < relfit.brier_score(np.full(len(y2), y2.mean()), y2)
    table = relfit.calibration_table(p, y2)
    assert len(table) == 5 and table["n"].sum() == len(y2)
    assert ((table["mean_predicted"] - table["fraction_real"]).abs() < 0.05).all()


def test_penalty_shrinks_and_single_class_is_refused():
    x, y = synthetic_sample(2000, np.array([1.5, -0.7, 2.0]), -1.0, seed=5)
    loose, _ = relfit.fit_logistic(x, y, l2=1e-3)
    tight, _ = relfit.fit_logistic(x, y, l2=1e4)
    assert np.abs(tight).sum() < 0.5 * np.abs(loose).sum()
    with pytest.raises(BadInputError, match="same"):
        relfit.fit_logistic(x, np.ones(len(x), bool))


def test_platt_corrects_an_overconfident_logit():
    rng = np.random.default_rng(6)
    z = rng.normal(0, 2, 50_000)
    y = rng.uniform(size=z.size) < 1 / (1 + np.exp(-(0.5 * z + 0.8)))
    a, b = relfit.fit_platt(z, y)
    assert a == pytest.approx(0.5, abs=0.03)
    assert b == pytest.approx(0.8, abs=0.05)
    raw = 1 / (1 + np.exp(-z))
    fixed = 1 / (1 + np.exp(-(a * z + b)))
    assert relfit.expected_calibration_error(fixed, y) < 0.02 < relfit.expected_calibration_error(raw, y)


def test_metrics_on_known_cases():
    y = np.array([0, 0, 1, 1], bool)
    assert relfit.roc_auc(np.array([0.1, 0.2, 0.8, 0.9]), y) == 1.0
    assert relfit.roc_auc(np.array([0.9, 0.8, 0.2, 0.1]), y) == 0.0
    assert relfit.roc_auc(np.full(4, 0.5), y) == 0.5
    assert np.isnan(relfit.roc_auc(np.full(4, 0.5), np.ones(4, bool)))
    assert relfit.brier_score(np.array([1.0, 0.0]), np.array([1, 0])) == 0.0
    # two bins: predicted 0.1 (observed 0.0) and 0.9 (observed 0.5): ECE = (2*0.1 + 2*0.4) / 4
    p = np.array([0.1, 0.1, 0.9, 0.9])
    assert relfit.expected_calibration_error(p, np.array([0, 0, 1, 0])) == pytest.approx(0.25)
