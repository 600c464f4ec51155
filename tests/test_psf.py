"""Tests of apbatch.job.steps.psf."""

import numpy as np
import pytest
from apbatch.errors import BadInputError
from apbatch.image import Image, MaskBits
from apbatch.job.steps import detect_sources, gaussian_psf, measure_psf, subtract_background
from steps_scene import _add_stars


def _stars(sigma, n=60, seed=0, kind="gauss"):
    rng = np.random.default_rng(seed)
    img = np.full((600, 600), 200.0, np.float32)
    xs, ys = rng.uniform(20, 580, n), rng.uniform(20, 580, n)
    _add_stars(img, xs, ys, rng.uniform(2e4, 2e5, n), kind, sigma)
    var = img + 25
    img = img + rng.normal(0, np.sqrt(var)).astype(np.float32)
    im = Image(img, var.astype(np.float32))
    subtract_background(im, box=64)
    return im


@pytest.mark.parametrize("sigma", [1.3, 2.2])
def test_gaussian_size_recovered(sigma):
    im = _stars(sigma)
    psf = measure_psf(im, detect_sources(im, psf_sigma=sigma))
    assert psf.sigma == pytest.approx(sigma, rel=0.04)
    assert psf.image.sum() == pytest.approx(1.0)
    assert psf.n_stars >= 20
    h = psf.image.shape[0] // 2
    assert np.unravel_index(psf.image.argmax(), psf.image.shape) == (h, h)
    # the model matches a Gaussian of that size
    ref = gaussian_psf(sigma, psf.image.shape[0]).image
    assert np.abs(psf.image - ref).max() < 0.05 * ref.max()


def test_shifted_stamp_moves_centroid():
    psf = gaussian_psf(1.7)
    st = psf.stamp(0.4, -0.3, 15)
    y, x = np.mgrid[-7:8, -7:8]
    assert (st * x).sum() == pytest.approx(0.4, abs=0.02)
    assert (st * y).sum() == pytest.approx(-0.3, abs=0.02)


def test_masked_and_saturated_stars_excluded():
    im = _stars(1.6, seed=3)
    src = detect_sources(im, psf_sigma=1.6)
    # mark every star but a few as saturated: too few PSF stars remain
    for x, y in src[["x", "y"]].to_numpy()[:-3]:
        im.mask[int(y), int(x)] = MaskBits.SAT
    src = detect_sources(im, psf_sigma=1.6)
    with pytest.raises(BadInputError, match="PSF stars"):
        measure_psf(im, src)


def test_no_sources():
    im = _stars(1.6)
    with pytest.raises(BadInputError, match="no sources"):
        measure_psf(im, detect_sources(im).iloc[:0])


def test_stamp_pads_when_asked_for_more_than_the_model():
    """Bad seeing: psf_flux asks for 2 ceil(2 FWHM) + 1 pixels, more than the 25-px model."""
    from apbatch.job.steps.psf import gaussian_psf

    psf = gaussian_psf(3.0, size=25)
    big = psf.stamp(0.3, -0.2, 31)
    assert big.shape == (31, 31)
    assert abs(big.sum() - 1.0) < 1e-6
    np.testing.assert_allclose(big[3:28, 3:28], psf.stamp(0.3, -0.2, 25), atol=1e-7)


def test_psf_flux_with_a_wide_psf():
    from apbatch.image import Image
    from apbatch.job.steps.measure import psf_flux
    from apbatch.job.steps.psf import gaussian_psf

    psf = gaussian_psf(3.0, size=25)  # FWHM 7 px -> psf_flux uses a 29 px box
    img = Image(np.zeros((100, 100), np.float32), np.ones((100, 100), np.float32))
    img.image[38:63, 38:63] += 1000.0 * psf.stamp(0.0, 0.0, 25).astype(np.float32)
    flux, err = psf_flux(img, psf, np.array([50.0]), np.array([50.0]))
    assert abs(flux[0] - 1000.0) < 1.0 and err[0] > 0


def test_moffat_model_sigma_matches_what_stars_measure():
    from apbatch.job.steps import moffat_psf
    from apbatch.sim.camera import _profiles

    model = moffat_psf(3.0, 3.5)
    assert model.image.sum() == pytest.approx(1.0)
    # a Moffat's moment sigma is larger than FWHM / 2.3548, and equals that of a rendered star
    assert model.sigma > 3.0 / 2.3548 * 1.1
    star = _profiles(np.array([0.0]), np.array([0.0]), np.array([3.0]), 12, 3.5)[0]
    from apbatch.job.steps.psf import _moment_sigma

    assert model.sigma == pytest.approx(_moment_sigma(star), rel=0.01)


@pytest.mark.parametrize("fwhm, beta", [(0.0, 3.5), (3.0, 1.0), (-1.0, 2.0)])
def test_moffat_model_refuses_impossible_parameters(fwhm, beta):
    from apbatch.errors import BadInputError
    from apbatch.job.steps import moffat_psf

    with pytest.raises(BadInputError, match="psf"):
        moffat_psf(fwhm, beta)
