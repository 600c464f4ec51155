"""Tests of apbatch.job.steps.reliability: features, the shipped model, fitting and calibration metrics."""

import json

import numpy as np
import pandas as pd
import pytest
from apbatch.errors import BadInputError
from apbatch.job.steps import DIA_COLUMNS
from apbatch.job.steps import reliability as rel

SIGMA = 2.0


def dia_rows(n: int = 1, snr=10.0, **overrides) -> pd.DataFrame:
    """A DIA table of ``n`` clean point sources as measure_dia_sources reports them.

    Ratios are those of the injected transients in the simulated scenes (aperture / PSF flux
    ~1, science flux ~ difference flux, moments of the PSF, footprint ~2 FWHM).
    """
    snr = np.broadcast_to(np.asarray(snr, float), (n,))
    err = 100.0
    flux = snr * err
    data = {c: np.zeros(n) for c in DIA_COLUMNS}
    data.update(
        psfFlux=flux,
        psfFluxErr=np.full(n, err),
        snr=snr,
        apFlux=flux,
        apFluxErr=np.full(n, err),
        scienceFlux=np.abs(flux),
        scienceFluxErr=np.full(n, err),
        ixx=np.full(n, SIGMA**2),
        iyy=np.full(n, SIGMA**2),
        ixy=np.zeros(n),
        trailLength=np.zeros(n),
        bboxSize=np.full(n, 9),
        isNegative=snr < 0,
    )
    for c in DIA_COLUMNS:
        if c.startswith(("is", "pixelFlags")) and c != "isNegative":
            data[c] = np.zeros(n, bool)
    for k, v in overrides.items():
        data[k] = np.broadcast_to(np.asarray(v), (n,)).copy()
    return pd.DataFrame(data)[DIA_COLUMNS]


def test_shipped_model_loads():
    model = rel.default_model()
    assert model.coef.shape == (len(rel.FEATURE_NAMES),)
    assert np.isfinite(model.coef).all() and np.isfinite(model.intercept)
    assert 0 < model.train_prior < 1
    prov = model.provenance
    assert prov["train"] and prov["heldout"]
    trained = {(r["condition"], r["seed"]) for r in prov["train"]}
    held = {(r["condition"], r["seed"]) for r in prov["heldout"]}
    assert not trained & held
    # validated on other seeds AND other conditions
    assert {r["seed"] for r in prov["train"]}.isdisjoint({r["seed"] for r in prov["heldout"]})
    assert {r["condition"] for r in prov["train"]}.isdisjoint({r["condition"] for r in prov["heldout"]})
    assert 0 <= prov["validation"]["heldout"]["ece"] <= 1
    assert rel.default_model() is model  # read once


def test_scores_in_unit_interval_and_monotone_in_snr():
    snr = np.array([5.0, 6, 8, 10, 15, 20, 40, 100, 1000])
    for sign in (1, -1):
        p = rel.score(dia_rows(len(snr), sign * snr), SIGMA)
        assert ((p >= 0) & (p <= 1)).all()
        assert (np.diff(p) >= 0).all(), p


def test_extreme_and_nan_inputs_stay_finite():
    t = dia_rows(4, snr=[np.nan, 1e9, -1e9, 7.0])
    t.loc[3, ["ixx", "iyy", "ixy", "apFlux", "scienceFlux", "trailLength"]] = np.nan
    x = rel.features(t, SIGMA)
    assert x.shape == (4, len(rel.FEATURE_NAMES))
    assert np.isfinite(x).all()
    assert x[3, rel.FEATURE_NAMES.index("moments_failed")] == 1
    p = rel.score(t, SIGMA)
    assert ((p >= 0) & (p <= 1)).all()
    assert rel.score(dia_rows(0), SIGMA).shape == (0,)


@pytest.mark.parametrize(
    "override",
    [
        {"pixelFlags_bad": True},
        {"pixelFlags_saturated": True},
        {"pixelFlags_cr": True},
        {"pixelFlags_edge": True},
        {"isDipole": True},
        {"ixx": (3 * SIGMA) ** 2, "iyy": (3 * SIGMA) ** 2},
    ],
)
def test_suspicious_source_scores_lower_than_clean(override):
    snr = np.array([6.0, 10.0, 20.0])
    clean = rel.score(dia_rows(3, snr), SIGMA)
    odd = rel.score(dia_rows(3, snr, **override), SIGMA)
    assert (odd < clean).all(), (override, odd, clean)


def test_missing_column_and_bad_sigma_are_named():
    with pytest.raises(BadInputError, match="dia.snr"):
        rel.features(dia_rows().drop(columns="snr"), SIGMA)
    with pytest.raises(BadInputError, match="psf_sigma"):
        rel.features(dia_rows(), 0.0)


def test_prior_shift():
    t = dia_rows(3, [6.0, 10.0, 30.0])
    model = rel.default_model()
    base = rel.score(t, SIGMA)
    assert rel.score(t, SIGMA, prior=model.train_prior) == pytest.approx(base)
    lower = rel.score(t, SIGMA, prior=model.train_prior / 10)
    assert (lower < base).all()


def test_json_round_trip(tmp_path):
    model = rel.ReliabilityModel(
        np.arange(len(rel.FEATURE_NAMES), dtype=float) / 7, -0.25, (0.9, 0.1), 0.8, {"date": "x", "n": [1, 2]}
    )
    path = tmp_path / "sub" / "model.json"
    rel.save_model(model, path)
    back = rel.load_model(path)
    assert back.coef == pytest.approx(model.coef)
    assert (back.intercept, back.platt, back.train_prior, back.provenance) == (
        model.intercept,
        model.platt,
        model.train_prior,
        model.provenance,
    )
    t = dia_rows(2, [7.0, 12.0])
    assert rel.score(t, SIGMA, back) == pytest.approx(rel.score(t, SIGMA, model))
    assert [p.name for p in path.parent.iterdir()] == ["model.json"]  # no temporary file left


@pytest.mark.parametrize(
    "text, problem",
    [
        ("{not json", "not valid JSON"),
        ("[1, 2]", "not a JSON object"),
        ('{"coef": [1]}', "missing key"),
        (None, "feature_names differ"),
        (None, "coefficients"),
    ],
)
def test_malformed_json_names_the_file(tmp_path, text, problem):
    path = tmp_path / "bad.json"
    if text is None:
        d = rel.model_to_dict(rel.ReliabilityModel(np.zeros(len(rel.FEATURE_NAMES)), 0.0))
        if problem.startswith("feature"):
            d["feature_names"] = d["feature_names"][::-1]
        else:
            d["coef"] = d["coef"][:-1]
        text = json.dumps(d)
    path.write_text(text)
    with pytest.raises(BadInputError, match=problem) as info:
        rel.load_model(path)
    assert str(path) in str(info.value)


def test_missing_file_names_the_file(tmp_path):
    with pytest.raises(BadInputError, match="cannot be read") as info:
        rel.load_model(tmp_path / "absent.json")
    assert "absent.json" in str(info.value)
