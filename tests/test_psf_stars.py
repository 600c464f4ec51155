"""Tests of apbatch.job.steps.psf_stars (PSF candidates, flux-independent sizes, the stellar locus)."""

import numpy as np
import pytest
from apbatch.job.steps.psf_stars import centred_stamp, encircled, stellar_locus, weighted_sizes


def _gauss(sigma, h, dx=0.0, dy=0.0):
    y, x = np.mgrid[-h : h + 1, -h : h + 1]
    p = np.exp(-((x - dx) ** 2 + (y - dy) ** 2) / (2 * sigma * sigma))
    return p / p.sum()


def test_weighted_sizes_do_not_depend_on_flux_or_weight():
    img = np.zeros((80, 200))
    xs, ys = np.array([30.3, 100.0, 160.6]), np.array([40.2, 39.7, 40.5])
    for x, y, f in zip(xs, ys, [1e3, 1e5, 1e7], strict=True):
        xi, yi = int(round(x)), int(round(y))
        img[yi - 20 : yi + 21, xi - 20 : xi + 21] += f * _gauss(1.8, 20, x - xi, y - yi)
    for w in (2.0, 3.0, 5.0):
        np.testing.assert_allclose(weighted_sizes(img, xs, ys, w), 1.8, rtol=0.01)
    assert np.isnan(weighted_sizes(img, np.array([2.0]), np.array([40.0]), 3.0)[0])  # too near the edge


def test_stellar_locus_is_the_smallest_populated_peak_and_follows_a_drift():
    rng = np.random.default_rng(2)
    n_star, n_gal = 60, 240
    u, v = rng.uniform(-1, 1, n_star + n_gal), rng.uniform(-1, 1, n_star + n_gal)
    star = 1.6 * (1 + 0.12 * u[:n_star]) * (1 + rng.normal(0, 0.01, n_star))  # seeing drifts 24% in x
    gal = rng.uniform(2.4, 6.0, n_gal)
    junk = np.array([0.6, 0.65])  # two hot-pixel-like detections: a peak, but not a populated one
    size = np.r_[star, gal, junk]
    uu, vv = np.r_[u, 0.0, 0.0], np.r_[v, 0.0, 0.0]
    member = stellar_locus(size, uu, vv)
    assert member[:n_star].mean() > 0.95
    assert member[n_star:].sum() <= 3
    assert not member[-2:].any()
    # the median of all candidates is a galaxy's size
    assert np.median(size) > 2.0


def test_encircled_and_centred_stamp():
    ee = encircled(_gauss(4.0, 30))
    r = np.arange(31) + 0.5  # pixels binned to the nearest integer radius
    np.testing.assert_allclose(ee[3:25], 1 - np.exp(-r[3:25] ** 2 / 32.0), atol=0.03)
    assert ee[-1] == pytest.approx(1.0)
    img = np.zeros((40, 40))
    img[10:31, 10:31] = _gauss(1.5, 10, 0.3, -0.2)
    st = centred_stamp(img, 20.3, 19.8, 8)
    y, x = np.mgrid[-8:9, -8:9]
    assert (st * x).sum() / st.sum() == pytest.approx(0.0, abs=0.02)
    assert (st * y).sum() / st.sum() == pytest.approx(0.0, abs=0.02)
