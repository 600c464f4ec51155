"""Tests of apbatch.job.steps.kernel_basis (basis, fit and FFT application of the matching kernel)."""

import numpy as np
import pandas as pd
import pytest
from apbatch.image import Image
from apbatch.job.steps.kernel_basis import (
    basis_1d,
    convolve_terms,
    fit_kernel,
    kernel_image,
    select_stamps,
    spatial_terms,
)
from scipy import ndimage, signal


def test_spatial_terms_order_and_count():
    u, v = np.array([0.5, -1.0]), np.array([2.0, 0.25])
    t1 = spatial_terms(1, u, v)
    assert len(t1) == 3 and np.allclose(t1[0], 1) and np.allclose(t1[1], u) and np.allclose(t1[2], v)
    t2 = spatial_terms(2, u, v)
    assert len(t2) == 6
    np.testing.assert_allclose(t2[3:], [u * u, u * v, v * v])


def test_basis_is_normalised_and_counts_terms():
    funcs, terms = basis_1d((1.0, 2.0, 8.0), (2, 1, 0), 10)
    assert len(terms) == 6 + 3 + 1
    for f in funcs.values():
        assert len(f) == 21 and np.abs(f).sum() == pytest.approx(1.0)


def test_fft_application_equals_direct_convolution():
    rng = np.random.default_rng(1)
    img = rng.normal(size=(64, 80)).astype(np.float32)
    funcs, terms = basis_1d((1.0, 3.0), (2, 1), 7)
    coefs = rng.normal(size=(2, len(terms)))
    fshape = (64 + 8, 80 + 8)
    got = list(convolve_terms(img, coefs, funcs, terms, fshape, (slice(0, 64), slice(0, 80))))
    for c, g in zip(coefs, got, strict=True):
        expect = signal.convolve2d(img.astype(float), kernel_image(c, funcs, terms), mode="same")
        assert np.abs(g - expect).max() < 1e-4 * np.abs(expect).max()
    # a crop returns the same numbers
    part = next(convolve_terms(img, coefs[:1], funcs, terms, fshape, (slice(5, 20), slice(7, 30))))
    np.testing.assert_allclose(part, got[0][5:20, 7:30], atol=1e-6)


def test_fit_recovers_a_gaussian_kernel_from_a_padded_template():
    rng = np.random.default_rng(3)
    pad, n = 12, 300
    tmpl = np.zeros((n + 2 * pad, n + 2 * pad))
    xs, ys = rng.uniform(20, n - 20, 60), rng.uniform(20, n - 20, 60)
    for x, y in zip(xs, ys, strict=False):
        tmpl[int(y) + pad, int(x) + pad] += rng.uniform(1e4, 1e5)
    tmpl = ndimage.gaussian_filter(tmpl, 1.2)
    sci = ndimage.gaussian_filter(tmpl, 1.5)[pad:-pad, pad:-pad] + 3.0  # kernel: Gaussian sigma 1.5
    t = Image(tmpl.astype(np.float32), np.ones_like(tmpl, np.float32))
    s = Image(sci.astype(np.float32), np.ones_like(sci, np.float32))
    src = pd.DataFrame({"x": xs, "y": ys, "snr": 100.0, "flag": 0, "masked": False})
    stamps = select_stamps(src, s, t, 8, pad, 40, 3, 30.0)
    assert len(stamps) >= 20
    funcs, terms = basis_1d((0.75, 1.5, 3.0), (2, 2, 1), 8)
    coef, chi2, n_used, _, profile = fit_kernel(s, t, stamps, funcs, terms, 8, pad, 3, 1, 3.0, 2)
    k = kernel_image(coef[0, :-1], funcs, terms)
    y, x = np.mgrid[-8:9, -8:9]
    g = np.exp(-(x * x + y * y) / (2 * 1.5**2))
    assert k.sum() == pytest.approx(1.0, abs=1e-3)
    assert np.abs(k - g / g.sum()).max() < 2e-3
    assert coef[0, -1] == pytest.approx(3.0, abs=0.05)  # the background
    assert np.abs(coef[1:, :-1]).max() < 1e-3  # no spatial variation to find
    # an exact kernel leaves no residual beyond the noise: the profile is negligible
    assert profile.shape == (8 + 3 + 1,) and (profile >= 0).all()
    assert (1e5**2 * profile).max() < 0.1


def test_select_stamps_isolation():
    img = Image(np.zeros((200, 200), np.float32), np.ones((200, 200), np.float32))
    src = pd.DataFrame({"x": [60.0, 72.0, 140.0], "y": [100.0, 100.0, 100.0], "snr": 100.0, "flag": 0,
                        "masked": False})
    # stamp half-size 8 + 5 = 13: the pair 12 px apart is not isolated, unless 6.5 px is enough
    assert select_stamps(src, img, img, 8, 0, 10, 5, 30.0) == [(140, 100)]
    assert len(select_stamps(src, img, img, 8, 0, 10, 5, 30.0, isolation=6.5)) == 3
