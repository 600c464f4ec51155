"""Calibrated reliability of DIA sources: the probability that a detection is a real transient.

The score is a logistic regression on features of the DIA table's own columns
(:data:`FEATURE_NAMES`, computed by :func:`features`), followed by a Platt recalibration
``p = 1 / (1 + exp(-(a z + b)))`` of its logit ``z``. Coefficients and provenance live in the
package data file ``apbatch/data/reliability.json``, written by ``bench/fit_reliability.py``:
the model is fitted on injected transients (real) and every other detection (artifacts:
saturated-star residuals, cosmic rays, bad columns, noise peaks, PSF mismatch) of simulated
scenes under TRAIN conditions, Platt-recalibrated on leave-one-scene-out logits of those
scenes, and validated on HELD-OUT conditions and seeds; the JSON carries the figures
(reliability diagram, expected calibration error, Brier score, precision/recall at 0.5).

How it is calibrated, and its limits (details and figures in the JSON's ``provenance``):

- labels: real = within 2.5 px of an injected transient, bogus = every other detection;
- the probability is calibrated for the mix of real and bogus detections of the training
  scenes (``train_prior``, the fraction real, ~0.99: the simulated scenes hold 300
  transients and a few artifacts per CCD); :func:`score`'s ``prior`` moves it to another
  mix by Bayes' rule (a shift of the logit by ``logit(prior) - logit(train_prior)``);
- the scenes hold no real negative (fading) source, so the sign is not a feature: a
  negative source scores like a positive one of the same S/N and shape;
- the pixel flags and ``isDipole`` have an informative prior (the old hand-set penalties)
  and may only lower the score, ``log_snr`` may only raise it: the scenes hold too few
  flagged artifacts to learn them, so their effect is a prior, not a measurement.

Scoring is vectorised (well under a millisecond per hundred sources). The default model is
read once per process and is immutable: safe to share between threads.
"""

from __future__ import annotations

import dataclasses
import functools
import importlib.resources
import json
import os
from pathlib import Path
from typing import Any

import numpy as np
import pandas as pd

from ...atomic import write_atomic
from ...errors import BadInputError

__all__ = [
    "FEATURE_NAMES",
    "ReliabilityModel",
    "default_model",
    "features",
    "load_model",
    "model_from_dict",
    "model_to_dict",
    "save_model",
    "score",
]

FEATURE_NAMES = (
    "log_snr",
    "ln_size",
    "ln_size_sq",
    "moments_failed",
    "trail",
    "ln_ap_psf",
    "ln_ap_psf_sq",
    "ln_science_diff",
    "ln_bbox",
    "isDipole",
    "pixelFlags_bad",
    "pixelFlags_saturated",
    "pixelFlags_cr",
    "pixelFlags_edge",
    "pixelFlags_interpolated",
    "pixelFlags_suspect",
)
_FLAGS = FEATURE_NAMES[FEATURE_NAMES.index("isDipole") :]
_FWHM_PER_SIGMA = 2.3548


@dataclasses.dataclass(frozen=True)
class ReliabilityModel:
    """Coefficients of the reliability score; immutable, safe to share between threads.

    Attributes
    ----------
    coef : `numpy.ndarray`
        One coefficient per :data:`FEATURE_NAMES` entry.
    intercept : `float`
        Logistic intercept.
    platt : `tuple` [`float`, `float`]
        Recalibration ``(a, b)`` of the logit: ``p = sigmoid(a z + b)``.
    train_prior : `float`
        Fraction of real sources among the training detections.
    provenance : `dict`
        Conditions, seeds, date and validation figures of the fit (free form).
    """

    coef: np.ndarray
    intercept: float
    platt: tuple[float, float] = (1.0, 0.0)
    train_prior: float = 0.5
    provenance: dict = dataclasses.field(default_factory=dict)


def _col(dia: pd.DataFrame, name: str) -> np.ndarray:
    if name not in dia.columns:
        raise BadInputError(
            f"dia.{name}", "column missing from the DIA table", "pass measure_dia_sources' table"
        )
    return pd.to_numeric(dia[name], errors="coerce").to_numpy(dtype=float, na_value=np.nan)


def features(dia: pd.DataFrame, psf_sigma: float) -> np.ndarray:
    """Feature matrix (rows: sources; columns: :data:`FEATURE_NAMES`) from a DIA table's own columns.

    Parameters
    ----------
    dia : `pandas.DataFrame`
        DIA sources with the columns of :data:`apbatch.job.steps.measure.COLUMNS`.
    psf_sigma : `float`
        Gaussian-equivalent sigma (px) of the difference image's PSF.

    Returns
    -------
    x : `numpy.ndarray`
        ``(len(dia), len(FEATURE_NAMES))`` floats, all finite: logs of ratios are clipped, and a
        failed measurement (NaN) takes the value of a typical point source (0) with, for the
        moments, an indicator feature.

    Raises
    ------
    BadInputError
        Raised if a needed column is missing or ``psf_sigma`` is not positive.
    """
    if not (np.isfinite(psf_sigma) and psf_sigma > 0):
        raise BadInputError("psf_sigma", f"{psf_sigma!r} is not a positive number")
    fwhm = _FWHM_PER_SIGMA * psf_sigma
    snr = np.abs(_col(dia, "snr"))
    log_snr = np.log(np.clip(np.nan_to_num(snr, nan=1.0), 1.0, 1e3))
    ixx, iyy, ixy = _col(dia, "ixx"), _col(dia, "iyy"), _col(dia, "ixy")
    det = ixx * iyy - ixy**2
    with np.errstate(invalid="ignore", divide="ignore"):
        ln_size = 0.25 * np.log(det) - np.log(psf_sigma)
    failed = ~np.isfinite(ln_size)
    ln_size = np.clip(np.where(failed, 0.0, ln_size), -1.5, 1.5)
    trail = np.clip(np.nan_to_num(_col(dia, "trailLength") / fwhm, nan=0.0), 0.0, 5.0)
    psf_flux, ap_flux = _col(dia, "psfFlux"), _col(dia, "apFlux")
    with np.errstate(invalid="ignore", divide="ignore"):
        ratio = ap_flux / psf_flux
        ln_ap = np.where(ratio > 0, np.log(np.abs(ratio)), -2.0)
        sci = np.abs(_col(dia, "scienceFlux")) / np.abs(psf_flux)
        ln_sci = np.log(np.clip(sci, 0.1, 1e3))
    ln_ap = np.clip(np.where(np.isfinite(ratio), ln_ap, 0.0), -2.0, 2.0)
    ln_sci = np.nan_to_num(ln_sci, nan=0.0)
    ln_bbox = np.log(np.clip(np.nan_to_num(_col(dia, "bboxSize"), nan=fwhm) / fwhm, 0.1, 20.0))
    flags = [np.nan_to_num(_col(dia, name), nan=0.0) != 0 for name in _FLAGS]
    cols = [log_snr, ln_size, ln_size**2, failed, trail, ln_ap, ln_ap**2, ln_sci, ln_bbox, *flags]
    return np.column_stack([np.asarray(c, dtype=float) for c in cols]).reshape(len(dia), len(FEATURE_NAMES))


def _sigmoid(z: np.ndarray) -> np.ndarray:
    return 0.5 * (1.0 + np.tanh(0.5 * z))


def _logit(p: float) -> float:
    p = min(max(p, 1e-9), 1 - 1e-9)
    return float(np.log(p / (1 - p)))


def score(
    dia: pd.DataFrame, psf_sigma: float, model: ReliabilityModel | None = None, prior: float | None = None
) -> np.ndarray:
    """Calibrated probability that each DIA source is real.

    Parameters
    ----------
    dia : `pandas.DataFrame`
        DIA sources (columns of :data:`apbatch.job.steps.measure.COLUMNS`).
    psf_sigma : `float`
        Gaussian-equivalent PSF sigma (px) of the difference image.
    model : `ReliabilityModel`, optional
        Default: the shipped model (:func:`default_model`).
    prior : `float`, optional
        Expected fraction of real sources among detections, if it differs from the training
        scenes' (``model.train_prior``).

    Returns
    -------
    p : `numpy.ndarray`
        Probabilities in [0, 1], one per row of ``dia``.
    """
    model = model or default_model()
    z = features(dia, psf_sigma) @ model.coef + model.intercept
    a, b = model.platt
    z = a * z + b
    if prior is not None:
        z = z + _logit(prior) - _logit(model.train_prior)
    return _sigmoid(z)


def model_to_dict(model: ReliabilityModel) -> dict[str, Any]:
    """JSON-ready dict of ``model`` (see :func:`model_from_dict`)."""
    return {
        "model": "logistic+platt",
        "feature_names": list(FEATURE_NAMES),
        "coef": [float(c) for c in model.coef],
        "intercept": float(model.intercept),
        "platt": [float(v) for v in model.platt],
        "train_prior": float(model.train_prior),
        "provenance": model.provenance,
    }


def model_from_dict(d: Any, source: str = "reliability model") -> ReliabilityModel:
    """Validate and build a model from :func:`model_to_dict`'s form.

    Raises
    ------
    BadInputError
        Raised (naming ``source``) if a key is missing, a value has the wrong type or length,
        or the feature names differ from :data:`FEATURE_NAMES` (a model fitted for other code).
    """
    fix = "rerun bench/fit_reliability.py"
    if not isinstance(d, dict):
        raise BadInputError(source, "top level is not a JSON object", fix)
    missing = [k for k in ("feature_names", "coef", "intercept", "platt", "train_prior") if k not in d]
    if missing:
        raise BadInputError(source, f"missing key(s) {', '.join(missing)}", fix)
    if list(d["feature_names"]) != list(FEATURE_NAMES):
        raise BadInputError(source, "feature_names differ from this code's FEATURE_NAMES", fix)
    try:
        coef = np.asarray(d["coef"], dtype=float)
        platt = tuple(float(v) for v in d["platt"])
        intercept, prior = float(d["intercept"]), float(d["train_prior"])
    except (TypeError, ValueError) as exc:
        raise BadInputError(source, f"non-numeric coefficient ({exc})", fix) from None
    if coef.shape != (len(FEATURE_NAMES),) or len(platt) != 2:
        raise BadInputError(source, f"{coef.size} coefficients and {len(platt)} Platt terms", fix)
    if not (np.isfinite(coef).all() and np.isfinite([intercept, *platt]).all() and 0 < prior < 1):
        raise BadInputError(source, "non-finite coefficient or train_prior outside (0, 1)", fix)
    coef.setflags(write=False)
    return ReliabilityModel(coef, intercept, (platt[0], platt[1]), prior, dict(d.get("provenance", {})))


def load_model(path: str | os.PathLike | None = None) -> ReliabilityModel:
    """Read a model JSON file (default: the packaged ``apbatch/data/reliability.json``).

    Raises
    ------
    BadInputError
        Raised, naming the file, if it cannot be read, is not valid JSON or is not a model.
    """
    res = importlib.resources.files("apbatch") / "data" / "reliability.json"
    name = str(path) if path is not None else str(res)
    try:
        text = Path(path).read_text(encoding="utf-8") if path is not None else res.read_text(encoding="utf-8")
        d = json.loads(text)
    except OSError as exc:
        fix = "rerun bench/fit_reliability.py"
        raise BadInputError(name, f"cannot be read ({exc.strerror or exc})", fix) from None
    except (json.JSONDecodeError, UnicodeDecodeError) as exc:
        raise BadInputError(name, f"not valid JSON ({exc})", "rerun bench/fit_reliability.py") from None
    return model_from_dict(d, name)


@functools.cache
def default_model() -> ReliabilityModel:
    """The packaged model, read once per process."""
    return load_model()


def save_model(model: ReliabilityModel, path: str | os.PathLike) -> None:
    """Write ``model`` as JSON, atomically (temporary file then rename)."""
    write_atomic(path, json.dumps(model_to_dict(model), indent=1) + "\n")
