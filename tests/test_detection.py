"""Tests of apbatch.job.steps.background and apbatch.job.steps.detection (sep)."""

import numpy as np
import pytest
from apbatch.errors import BadInputError
from apbatch.image import Image, MaskBits
from apbatch.job.steps import detect_sources, subtract_background
from steps_scene import _add_stars


def _field(seed=0, n=40, sigma=1.8):
    rng = np.random.default_rng(seed)
    ny, nx = 400, 500
    y, x = np.mgrid[0:ny, 0:nx]
    sky = (300.0 + 0.2 * x + 0.1 * y).astype(np.float32)
    xs, ys = rng.uniform(30, nx - 30, n), rng.uniform(30, ny - 30, n)
    fl = rng.uniform(5e3, 5e4, n)
    img = sky.copy()
    _add_stars(img, xs, ys, fl, "gauss", sigma)
    var = img + 25.0
    img = img + rng.normal(0, np.sqrt(var)).astype(np.float32)
    return Image(img, var.astype(np.float32)), sky, xs, ys, fl


def test_background_removes_gradient():
    img, sky, *_ = _field()
    res = subtract_background(img, box=64)
    assert res.level == pytest.approx(sky.mean(), rel=0.05)
    assert res.rms == pytest.approx(np.sqrt(sky.mean() + 25), rel=0.1)
    # residual sky, away from stars, is within a small fraction of the noise
    assert abs(np.median(img.image)) < 0.1 * res.rms


def test_detect_positions_and_fluxes():
    img, sky, xs, ys, fl = _field(1)
    subtract_background(img, box=64)
    img.mask[10, 10] = MaskBits.SAT
    src = detect_sources(img, threshold=5.0, psf_sigma=1.8, aperture=8.0)
    d = np.hypot(src["x"].to_numpy()[:, None] - xs[None], src["y"].to_numpy()[:, None] - ys[None])
    nearest = d.min(axis=0)
    matched = nearest < 0.5
    assert matched.mean() >= 0.9  # a few may be blended pairs
    j = d.argmin(axis=0)[matched]
    # an 8-px aperture holds ~99.998% of a sigma=1.8 Gaussian
    ratio = src["flux"].to_numpy()[j] / fl[matched]
    assert np.median(ratio) == pytest.approx(1.0, abs=0.02)
    assert set(src.columns) >= {"x", "y", "flux", "fluxErr", "snr", "peak", "flag", "masked", "ixx"}
    assert (src["snr"] > 5).all()
    assert src["flux"].is_monotonic_decreasing


def test_pure_noise_has_few_detections():
    rng = np.random.default_rng(2)
    img = Image(rng.normal(0, 10, (400, 400)).astype(np.float32), np.full((400, 400), 100, np.float32))
    assert len(detect_sources(img, threshold=5.0)) <= 2


def test_nan_outside_nodata_is_refused():
    img, *_ = _field()
    img.image[5, 5] = np.nan
    with pytest.raises(BadInputError, match="non-finite"):
        subtract_background(img)
    img.mask[5, 5] = MaskBits.NO_DATA
    subtract_background(img)


def test_bright_sources_for_astrometry():
    from apbatch.job.steps import detect_bright_sources

    img, sky, xs, ys, fl = _field(3)
    subtract_background(img, box=64)
    img.mask[:, :40] |= MaskBits.NO_DATA
    img.image[:, :40] = 1e6  # nothing is found where there is no data
    src = detect_bright_sources(img, threshold=20.0, psf_sigma=1.8)
    assert list(src.columns) == ["x", "y", "flux"] and src["flux"].is_monotonic_decreasing
    assert (src["x"] > 40).all()
    d = np.hypot(src["x"].to_numpy()[:, None] - xs[None], src["y"].to_numpy()[:, None] - ys[None])
    assert (d.min(axis=1) < 3).all() and np.median(d.min(axis=1)) < 0.15  # real stars (or blended pairs)
    # every bright (peak > 60 sigma per pixel), isolated star outside the no-data strip is found
    peak = fl / (2 * np.pi * 1.8**2)
    sep_nn = np.sort(np.hypot(xs[:, None] - xs[None], ys[:, None] - ys[None]), axis=1)[:, 1]
    bright = (peak > 60 * np.sqrt(sky.mean())) & (xs > 50) & (sep_nn > 12)
    assert bright.sum() >= 8
    assert (d.min(axis=0)[bright] < 0.3).all()


def test_bright_sources_without_variance_is_empty():
    from apbatch.job.steps import detect_bright_sources

    assert len(detect_bright_sources(Image(np.ones((50, 50), np.float32)))) == 0
