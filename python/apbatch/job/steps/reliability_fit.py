"""Fitting and validating the reliability model (:mod:`apbatch.job.steps.reliability`).

Used by ``bench/fit_reliability.py`` and the tests, never by a job: an L2-penalised logistic
regression with an informative prior and bounds (scipy), a Platt recalibration of held-out
logits, and the calibration figures (reliability diagram, expected calibration error, Brier
score, ROC AUC).
"""

from __future__ import annotations

import numpy as np
import pandas as pd
from scipy import optimize

from ...errors import BadInputError
from .reliability import _sigmoid

__all__ = [
    "brier_score",
    "calibration_table",
    "expected_calibration_error",
    "fit_logistic",
    "fit_platt",
    "roc_auc",
]


def fit_logistic(
    x: np.ndarray,
    y: np.ndarray,
    l2: float = 1.0,
    weight: np.ndarray | None = None,
    prior_mean: np.ndarray | None = None,
    bounds: list[tuple[float | None, float | None]] | None = None,
) -> tuple[np.ndarray, float]:
    """L2-penalised (MAP, Gaussian prior) logistic regression by L-BFGS-B.

    Continuous columns are standardised for the fit, so their penalty ``l2 / 2 (w - m)^2``
    applies to standardised coefficients; 0/1 columns are not (a rare flag's coefficient is
    penalised in its own units, so it stays near its prior mean ``m`` unless the data say
    otherwise). The intercept is not penalised. The returned coefficients apply to raw columns.

    Parameters
    ----------
    x : `numpy.ndarray`
        ``(n, k)`` features.
    y : `numpy.ndarray`
        ``n`` labels (true / 1 = real).
    l2 : `float`
        Penalty strength (in units of the summed log-likelihood).
    weight : `numpy.ndarray`, optional
        Per-sample weights (default 1).
    prior_mean : `numpy.ndarray`, optional
        Prior mean of each raw coefficient (default 0).
    bounds : `list` [`tuple`], optional
        ``(low, high)`` per raw coefficient (``None`` = unbounded), e.g. ``(None, 0)`` for a
        flag that may never raise the score.

    Returns
    -------
    coef, intercept : `numpy.ndarray`, `float`

    Raises
    ------
    BadInputError
        Raised if the shapes disagree or ``y`` holds a single class.
    """
    x = np.asarray(x, float)
    y = np.asarray(y, float)
    k = x.shape[1] if x.ndim == 2 else -1
    if x.ndim != 2 or len(x) != len(y):
        raise BadInputError("x, y", f"shapes {x.shape} and {y.shape} do not match")
    if y.min(initial=1) == y.max(initial=0):
        raise BadInputError("y", "all labels are the same", "the sample needs real and bogus sources")
    w = np.ones(len(y)) if weight is None else np.asarray(weight, float)
    binary = ((x == 0) | (x == 1)).all(axis=0)
    mean = np.where(binary, 0.0, x.mean(axis=0))
    scale = np.where(binary, 1.0, x.std(axis=0))
    scale[scale < 1e-12] = 1.0
    xs = (x - mean) / scale
    m = np.zeros(k) if prior_mean is None else np.asarray(prior_mean, float) * scale

    def loss(theta):
        z = xs @ theta[1:] + theta[0]
        d = theta[1:] - m
        # log(1 + exp(z)) - y z, stably
        nll = (w * (np.logaddexp(0.0, z) - y * z)).sum() + 0.5 * l2 * (d * d).sum()
        r = w * (_sigmoid(z) - y)
        return nll, np.concatenate([[r.sum()], xs.T @ r + l2 * d])

    sb = [(None, None)]
    for (lo, hi), sc in zip(bounds or [(None, None)] * k, scale, strict=True):
        sb.append((None if lo is None else lo * sc, None if hi is None else hi * sc))
    start = np.concatenate(
        [
            [0.0],
            np.clip(
                m,
                [b[0] if b[0] is not None else -np.inf for b in sb[1:]],
                [b[1] if b[1] is not None else np.inf for b in sb[1:]],
            ),
        ]
    )
    res = optimize.minimize(loss, start, jac=True, method="L-BFGS-B", bounds=sb)
    coef = res.x[1:] / scale
    return coef, float(res.x[0] - (res.x[1:] * mean / scale).sum())


def fit_platt(z: np.ndarray, y: np.ndarray) -> tuple[float, float]:
    """Platt recalibration ``(a, b)``: ``sigmoid(a z + b)`` fitted to labels ``y`` on held-out logits."""
    coef, intercept = fit_logistic(np.asarray(z, float)[:, None], y, l2=1e-6)
    return float(coef[0]), intercept


def calibration_table(p: np.ndarray, y: np.ndarray, n_bins: int = 5) -> pd.DataFrame:
    """Reliability diagram: per equal-width bin of predicted probability, the count, the mean
    predicted probability and the observed fraction real (NaN for an empty bin)."""
    p, y = np.asarray(p, float), np.asarray(y, float)
    edges = np.linspace(0.0, 1.0, n_bins + 1)
    idx = np.clip(np.digitize(p, edges[1:-1]), 0, n_bins - 1)
    rows = []
    for k in range(n_bins):
        sel = idx == k
        n = int(sel.sum())
        rows.append(
            {
                "lo": edges[k],
                "hi": edges[k + 1],
                "n": n,
                "mean_predicted": float(p[sel].mean()) if n else np.nan,
                "fraction_real": float(y[sel].mean()) if n else np.nan,
            }
        )
    return pd.DataFrame(rows)


def expected_calibration_error(p: np.ndarray, y: np.ndarray, n_bins: int = 5) -> float:
    """Count-weighted mean of ``|mean predicted - fraction real|`` over :func:`calibration_table`'s bins."""
    t = calibration_table(p, y, n_bins)
    t = t[t["n"] > 0]
    return float((t["n"] * (t["mean_predicted"] - t["fraction_real"]).abs()).sum() / max(t["n"].sum(), 1))


def brier_score(p: np.ndarray, y: np.ndarray) -> float:
    """Mean squared difference between predicted probability and label."""
    return float(np.mean((np.asarray(p, float) - np.asarray(y, float)) ** 2)) if len(p) else float("nan")


def roc_auc(p: np.ndarray, y: np.ndarray) -> float:
    """Area under the ROC curve (probability that a real source outscores a bogus one; ties count half)."""
    p, y = np.asarray(p, float), np.asarray(y, bool)
    n1, n0 = int(y.sum()), int((~y).sum())
    if n1 == 0 or n0 == 0:
        return float("nan")
    ranks = pd.Series(p).rank().to_numpy()
    return float((ranks[y].sum() - n1 * (n1 + 1) / 2) / (n1 * n0))
