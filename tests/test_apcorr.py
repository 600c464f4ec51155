"""Tests of apbatch.job.steps.apcorr (aperture correction of PSF fluxes)."""

import numpy as np
import pandas as pd
import pytest
from apbatch.image import Image, MaskBits
from apbatch.job.steps import detect_sources, psf_flux
from apbatch.job.steps.apcorr import (
    ApertureCorrection,
    aperture_ratios,
    apply_aperture_correction,
    measure_aperture_correction,
)
from apbatch.job.steps.psf import PsfModel, _moment_sigma

N = 1400
SKY_SIGMA = 10.0
CORE, WING_A, WING_BETA, WING_FRACTION, R_MAX = 1.6, 6.0, 11.0 / 6.0, 0.15, 28


def _profile(h, dx=0.0, dy=0.0, wing_fraction=WING_FRACTION):
    """Gaussian core + r^-11/3 wing (15% of the light), cut at R_MAX px: all light within R_MAX."""
    y, x = np.mgrid[-h : h + 1, -h : h + 1]
    r2 = (x - dx) ** 2 + (y - dy) ** 2
    core = np.exp(-r2 / (2 * CORE**2)) / (2 * np.pi * CORE**2)
    wing = (WING_BETA - 1) / (np.pi * WING_A**2) * (1 + r2 / WING_A**2) ** -WING_BETA
    p = (1 - wing_fraction) * core + wing_fraction * wing
    p[r2 > R_MAX**2] = 0.0
    return p / p.sum()


def _model() -> PsfModel:
    """The 25-px model a PSF measurement gives: the stamp misses the wing beyond 12 px."""
    img = _profile(12)
    img /= img.sum()
    return PsfModel(img, _moment_sigma(img), 0)


def _image(xs, ys, fluxes, seed=0, wing=lambda x: WING_FRACTION) -> Image:
    """Stars on noise; ``wing(x)`` is the wing's fraction of the light at column ``x``."""
    rng = np.random.default_rng(seed)
    img = rng.normal(0.0, SKY_SIGMA, (N, N)).astype(np.float32)
    h = R_MAX + 1
    for x, y, f in zip(xs, ys, fluxes, strict=True):
        xi, yi = int(round(x)), int(round(y))
        st = f * _profile(h, x - xi, y - yi, wing(x))
        img[yi - h : yi + h + 1, xi - h : xi + h + 1] += st.astype(np.float32)
    return Image(img, np.full((N, N), SKY_SIGMA**2, np.float32), np.zeros((N, N), np.int32))


def _grid(n, seed, step=110):
    rng = np.random.default_rng(seed)
    g = np.arange(80, N - 80, step, dtype=float)
    xx, yy = np.meshgrid(g, g)
    k = rng.permutation(xx.size)[:n]
    return xx.ravel()[k] + rng.uniform(-0.5, 0.5, n), yy.ravel()[k] + rng.uniform(-0.5, 0.5, n)


def test_corrected_psf_flux_equals_the_truth_within_one_percent():
    psf = _model()
    xs, ys = _grid(100, 1)
    sci = _image(xs, ys, np.exp(np.random.default_rng(2).uniform(np.log(2e4), np.log(3e5), len(xs))), seed=3)
    corr = measure_aperture_correction(sci, psf, detect_sources(sci))
    assert not corr.fallback and corr.n_stars >= 60
    assert corr.scatter < 0.02
    # the "transients": other point sources of the same PSF, measured the way DIA sources are
    tx, ty = _grid(60, 4)
    truth = np.full(len(tx), 3e4)
    diff = _image(tx, ty, truth, seed=5)
    flux, err = psf_flux(diff, psf, tx, ty)
    raw = np.median(flux / truth)
    assert raw < 0.96  # the 2-FWHM PSF fit misses > 4% of the light: the test means something
    dia = pd.DataFrame({"x": tx, "y": ty, "psfFlux": flux, "psfFluxErr": err, "snr": flux / err})
    out = apply_aperture_correction(dia, corr)
    assert np.median(out["psfFlux"] / truth) == pytest.approx(1.0, abs=0.01)
    assert np.allclose(out["psfFluxErr"] / dia["psfFluxErr"], corr.value)
    assert np.allclose(out["snr"], dia["snr"])  # S/N is not changed
    assert out.attrs["apcorr"] == corr.value
    summary = corr.to_dict()
    assert summary["n_stars"] == corr.n_stars and summary["fallback"] is False


def test_curve_of_growth_reaches_the_truth_at_the_profiles_edge():
    psf = _model()
    xs, ys = _grid(40, 6)
    sci = _image(xs, ys, np.full(len(xs), 2e5), seed=7)
    ratio, err = aperture_ratios(sci, psf, xs, ys, [8, 16, R_MAX])
    med = np.nanmedian(ratio, axis=1)
    assert med[0] < med[1] < med[2]  # grows while the aperture gains wing light
    flux, _ = psf_flux(sci, psf, xs, ys)
    assert med[2] == pytest.approx(np.median(2e5 / flux), rel=0.005)
    assert np.all(err[np.isfinite(err)] > 0)


def test_too_few_stars_fall_back_to_one_and_say_so():
    psf = _model()
    xs, ys = _grid(30, 8)
    fluxes = np.where(np.arange(30) < 4, 1e5, 3000.0)  # 4 bright stars, 26 too faint to be used
    sci = _image(xs, ys, fluxes, seed=9)
    sources = detect_sources(sci)
    assert len(sources) >= 10
    corr = measure_aperture_correction(sci, psf, sources)
    assert corr.fallback and corr.value == 1.0 and corr.n_stars == 4
    assert "4 usable stars, fewer than 10" in corr.reason and corr.to_dict()["reason"] == corr.reason
    assert corr.to_dict()["scatter"] is None
    dia = pd.DataFrame({"x": [10.0], "y": [20.0], "psfFlux": [5.0], "psfFluxErr": [1.0]})
    assert apply_aperture_correction(dia, corr)["psfFlux"].tolist() == [5.0]


def test_no_sources_fall_back():
    sci = _image([], [], [])
    corr = measure_aperture_correction(sci, _model(), detect_sources(sci).iloc[:0])
    assert corr.fallback and corr.value == 1.0 and corr.n_stars == 0
    assert corr.reason == "0 sources, fewer than 10 stars"


def test_masked_apertures_and_outliers_are_not_used():
    psf = _model()
    xs, ys = _grid(60, 10)
    sci = _image(xs, ys, np.full(len(xs), 1e5), seed=11)
    ref = measure_aperture_correction(sci, psf, detect_sources(sci))
    # a bad column through some apertures (but > 2 px from the stars) and a few stars with a
    # bright companion in the aperture (not detected apart: added after detection)
    sources = detect_sources(sci)
    sci.mask[:, int(xs[0]) + 10] = MaskBits.BAD
    for x, y in zip(xs[1:6], ys[1:6], strict=True):
        sci.image[int(y) + 18, int(x) - 3 : int(x) + 3] += 3000.0
    ratio, _ = aperture_ratios(sci, psf, xs[:1], ys[:1], [20])
    assert np.isnan(ratio).all()
    corr = measure_aperture_correction(sci, psf, sources)
    assert corr.value == pytest.approx(ref.value, abs=0.003)
    assert corr.n_stars <= ref.n_stars - 5


def test_a_plane_follows_a_wing_that_varies_over_the_ccd():
    """The stars' wing holds 5% of the light at the left edge, 25% at the right; the (varying
    but wingless) PSF model does not follow it, the correction's plane does."""
    model = _model()
    psf = PsfModel(model.image, model.sigma, 0, coeffs=np.stack([model.image, 0 * model.image,
                   0 * model.image]), degree=1, ccd_shape=(N, N))

    def wing(x):
        return 0.05 + 0.2 * x / N

    xs, ys = _grid(100, 12)
    sci = _image(xs, ys, np.full(len(xs), 2e5), seed=13, wing=wing)
    corr = measure_aperture_correction(sci, psf, detect_sources(sci))
    assert corr.plane is not None and corr.plane[1] > 0.02 and abs(corr.plane[2]) < 0.01
    tx, ty = np.array([150.0, 700.0, 1250.0] * 3), np.repeat([300.0, 700.0, 1100.0], 3)
    diff = _image(tx, ty, np.full(len(tx), 5e4), seed=14, wing=wing)
    flux, _ = psf_flux(diff, psf, tx, ty)
    corrected = flux * corr.at(tx, ty) / 5e4
    assert np.abs(corrected - 1.0).max() < 0.01
    assert np.ptp(flux / 5e4) > 0.04  # uncorrected, left and right differ by more than 4%
    # a constant model gets a constant correction: the plane needs a varying PSF
    assert measure_aperture_correction(sci, model, detect_sources(sci)).plane is None


def test_a_plane_follows_a_correction_that_varies_over_the_ccd():
    corr = ApertureCorrection(1.05, 50, 0.01, 30.0, plane=(1.05, 0.02, -0.01), ccd_shape=(100, 200))
    assert corr.at(np.array([100.0, 200.0, 0.0]), np.array([50.0, 100.0, 0.0])) == pytest.approx(
        [1.05, 1.06, 1.04])
    assert corr.to_dict()["plane"] == [1.05, 0.02, -0.01]
    flat = ApertureCorrection(1.02, 12, 0.01, 30.0)
    assert flat.at(np.array([1.0, 2.0]), np.array([3.0, 4.0])).tolist() == [1.02, 1.02]
    empty = apply_aperture_correction(pd.DataFrame({"x": [], "y": [], "psfFlux": []}), flat)
    assert len(empty) == 0 and empty.attrs["apcorr"] == 1.02
