"""Tests of apbatch.job.steps.kernel_residual (the kernel's measured residual around bright stars)."""

import numpy as np
import pytest
from apbatch.job.steps.kernel_residual import (
    add_measured_variance,
    add_star_variance,
    box_fluxes,
    residual_profile,
)
from apbatch.job.steps.psf import gaussian_psf


def _stamps(n=60, half=15, frac=0.0, seed=0):
    """Noise stamps (variance 100) plus, if ``frac``, a quadrupole residual of ``frac`` x the star."""
    rng = np.random.default_rng(seed)
    yy, xx = np.mgrid[-half : half + 1, -half : half + 1].astype(float)
    star = np.exp(-(xx**2 + yy**2) / (2 * 2.0**2))
    star /= star.sum()
    quad = star * (xx**2 - yy**2) / 4.0  # a shape mismatch: zero at the centre, lobes a few px out
    flux = rng.uniform(5e4, 2e5, n)
    var = np.full((n, 2 * half + 1, 2 * half + 1), 100.0)
    res = rng.normal(0, 10.0, var.shape) + frac * flux[:, None, None] * quad
    return res, var, flux, quad


def test_noise_only_gives_a_negligible_profile():
    res, var, flux, _ = _stamps()
    prof = residual_profile(res, var * 1.1, flux)  # a variance 10% off is calibrated away
    assert prof.shape == (16,)
    assert (prof >= 0).all()
    # added around a 2e5 star it stays well below the noise variance of 100 per pixel
    assert (2e5**2 * prof).max() < 20.0 and (2e5**2 * prof[4:]).max() < 10.0


def test_a_shape_mismatch_is_measured_where_its_lobes_are():
    res, var, flux, quad = _stamps(frac=0.05)
    prof = residual_profile(res, var, flux)
    assert np.all(np.diff(prof) <= 0)  # non-increasing outwards
    yy, xx = np.mgrid[-15:16, -15:16]
    r = np.clip(np.rint(np.hypot(xx, yy)).astype(int), 1, None)  # the centre pixel is in ring 1
    n = np.array([(r == k).sum() for k in range(16)])
    expect = np.array([np.mean((0.05 * quad[r == k]) ** 2) if n[k] else 0.0 for k in range(16)])
    # outside the lobes' peak the measured level is the true one within the noise
    np.testing.assert_allclose(prof[4:6], expect[4:6], rtol=0.1)
    # inside it (a quadrupole is zero at the centre) the rings are pooled: their mean level
    inner = (expect[1:4] * n[1:4]).sum() / n[1:4].sum()
    assert prof[0] == prof[1] == pytest.approx(inner, rel=0.1)
    assert prof[1] > prof[4] > prof[6]


def test_faint_stamps_are_left_out_and_no_stamp_is_no_profile():
    res, var, flux, _ = _stamps(frac=0.05)
    flux[:30] = 1.0  # their residual, divided by so small a flux, would swamp the profile
    bright_only = residual_profile(res[30:], var[30:], flux[30:])
    np.testing.assert_allclose(residual_profile(res, var, flux), bright_only, rtol=0.05, atol=1e-12)
    assert (residual_profile(res[:0], var[:0], flux[:0]) == 0).all()


def test_add_star_variance_around_bright_stars_only():
    var = np.full((100, 120), 100.0, np.float32)
    prof = np.array([1e-8, 1e-8, 5e-9, 1e-9, 0.0])
    n = add_star_variance(var, np.array([50.0, 80.0, 2.0]), np.array([40.0, 60.0, 98.0]),
                          np.array([1e5, 1e3, 1e5]), prof)
    assert n == 2  # the 1e3 star's residual (1e-2) is below 5% of the noise
    assert var[40, 50] == pytest.approx(100 + 1e10 * 1e-8)
    assert var[40, 53] == pytest.approx(100 + 1e10 * 1e-9)
    assert var[40, 55] == pytest.approx(100.0)  # beyond the profile
    assert var[60, 80] == pytest.approx(100.0)
    assert var[98, 2] == pytest.approx(200.0)  # a star at the border: its box is cut, not skipped
    assert add_star_variance(var, np.array([50.0]), np.array([40.0]), np.array([1e5]), np.zeros(5)) == 0


def test_box_fluxes_cut_by_the_border():
    img = np.ones((50, 60))
    np.testing.assert_allclose(box_fluxes(img, np.array([30.0, 0.0, 200.0]), np.array([25.0, 0.0, 10.0]), 3),
                               [49.0, 16.0, 0.0])


def _difference(residual=None, transient=None, variable=0.0, seed=3, shape=(120, 120), star=(60, 60)):
    """Noise (variance 100) around a star at ``star`` with an optional residual pattern, a
    transient (dx, dy, flux) beside it and a change of the star's flux ``variable``."""
    rng = np.random.default_rng(seed)
    diff = rng.normal(0.0, 10.0, shape)
    yy, xx = np.mgrid[0 : shape[0], 0 : shape[1]].astype(float)
    dx, dy = xx - star[0], yy - star[1]
    r2 = dx * dx + dy * dy
    if residual == "quadrupole":  # a shape mismatch: lobes of both signs 2-4 px out
        diff += 400.0 * np.exp(-r2 / 8.0) * (dx * dx - dy * dy) / 4.0
    elif residual == "ring":  # a width mismatch: a positive ring 5 px out
        diff += 60.0 * np.exp(-((np.sqrt(r2) - 5.0) ** 2) / 2.0)
    if transient is not None:
        tx, ty, f = transient
        diff += f * np.exp(-((xx - star[0] - tx) ** 2 + (yy - star[1] - ty) ** 2) / 8.0) / (8 * np.pi)
    diff += variable * np.exp(-r2 / 8.0) / (8 * np.pi)
    return diff.astype(np.float32), np.full(shape, 100.0, np.float32)


def _measured(diff, var):
    n = add_measured_variance(diff, var, np.zeros(diff.shape, bool), np.array([60.0]), np.array([60.0]),
                              gaussian_psf(2.0, 21), 15, coherence=np.pi * 4.0)
    return n, var


@pytest.mark.parametrize("pattern", ["quadrupole", "ring"])
def test_measured_mismatch_is_added_where_it_is(pattern):
    n, var = _measured(*_difference(pattern))
    assert n == 1
    assert var[60, 63] > 1000.0  # the lobes / ring: many times the noise variance
    assert var[60, 60] >= var[60, 63]  # non-increasing outwards
    assert var[60, 78] == pytest.approx(100.0) and var[10, 10] == pytest.approx(100.0)


def test_noise_a_variable_star_and_a_transient_beside_it_add_nothing():
    # a change of the star's own flux is fitted out; a transient 6 px away sits in one eighth
    # of its rings; noise alone is not significant
    for kwargs in ({}, {"variable": 2e4}, {"transient": (6.0, 0.0, 3000.0)}):
        diff, var = _difference(**kwargs)
        n, var = _measured(diff, var)
        assert n == 0, kwargs
        assert (var == 100.0).all(), kwargs


def test_stars_at_the_border_or_mostly_masked_are_skipped():
    diff, var = _difference("quadrupole")
    bad = np.zeros(diff.shape, bool)
    bad[40:80, 40:80] = True
    assert add_measured_variance(diff, var, bad, np.array([60.0, 5.0]), np.array([60.0, 60.0]),
                                 gaussian_psf(2.0, 21), 15, coherence=10.0) == 0
    assert (var == 100.0).all()


def test_a_star_with_a_masked_core_is_measured_on_its_other_rings(recwarn):
    # a saturated or bad core leaves its inner rings without a usable pixel: no 0/0 there
    diff, var = _difference("quadrupole")
    bad = np.zeros(diff.shape, bool)
    bad[59:62, 59:62] = True
    n = add_measured_variance(diff, var, bad, np.array([60.0]), np.array([60.0]),
                              gaussian_psf(2.0, 31), 15, coherence=10.0)
    assert n == 1 and var[60, 63] > 1000.0
    assert not [w for w in recwarn if issubclass(w.category, RuntimeWarning)]
