"""Tests for apbatch.job.forced: DiaForcedSource fluxes measured with the CCD's PSF model and
aperture correction, so that they agree with the DIA fluxes (the Gaussian weighting did not)."""

import numpy as np
import pytest
from apbatch.image import Image, MaskBits
from apbatch.job.apdb import forced_photometry
from apbatch.job.forced import DIFF_NOISE_SCALE, ForcedPhotometry
from apbatch.job.steps.apcorr import ApertureCorrection
from apbatch.job.steps.psf import moffat_psf

FWHM, BETA = 4.0, 3.0


def moffat_field(truth, shape=(120, 160), seed=4):
    """Noise (sigma 1) plus Moffat stars drawn out to r = 60 px at (x, y, flux) ``truth``."""
    rng = np.random.default_rng(seed)
    ny, nx = shape
    yy, xx = np.mgrid[:ny, :nx]
    alpha = FWHM / (2 * np.sqrt(2 ** (1 / BETA) - 1))
    norm = (BETA - 1) / (np.pi * alpha**2)  # the Moffat's integral to infinity is 1
    img = rng.normal(0.0, 1.0, shape)
    for x, y, f in truth:
        img += f * norm * (1 + ((xx - x) ** 2 + (yy - y) ** 2) / alpha**2) ** -BETA
    return Image(img.astype(np.float32), np.ones(shape, np.float32), np.zeros(shape, np.int32))


TRUTH = [(40.3, 50.7, 20000.0), (110.0, 70.2, 5000.0), (80.6, 30.1, 12000.0)]


def test_psf_model_photometry_with_aperture_correction_recovers_the_truth():
    img = moffat_field(TRUTH)
    psf = moffat_psf(FWHM, BETA)
    x, y, f = (np.array(c) for c in zip(*TRUTH, strict=True))
    # the model's 25-px stamp holds only part of a beta=3 Moffat's light: that part is measured
    within = 1 - (1 + 12.5**2 / (FWHM / (2 * np.sqrt(2 ** (1 / BETA) - 1))) ** 2) ** (1 - BETA)
    flux, err = ForcedPhotometry(psf)(img, x, y)
    np.testing.assert_allclose(flux / f, within, rtol=0.02)
    corrected, cerr = ForcedPhotometry(psf, ApertureCorrection(value=1 / within, n_stars=50, scatter=0.01,
                                                                radius=30.0, fallback=False))(img, x, y)
    np.testing.assert_allclose(corrected / f, 1.0, rtol=0.02)
    np.testing.assert_allclose(cerr / err, 1 / within)
    # what the Gaussian weighting gave (the old DiaForcedSource): far below
    gauss, _ = forced_photometry(img, x, y, ForcedPhotometry(psf).fwhm)
    assert np.all(gauss / f < 0.95)


def test_masked_and_empty_positions():
    img = moffat_field(TRUTH[:1])
    img.mask[:] = MaskBits.NO_DATA
    flux, err = ForcedPhotometry(moffat_psf(FWHM, BETA))(img, np.array([40.3]), np.array([50.7]))
    assert np.isnan(flux[0]) and np.isnan(err[0])
    flux, err = ForcedPhotometry(moffat_psf(FWHM, BETA))(img, np.zeros(0), np.zeros(0))
    assert flux.shape == err.shape == (0,)


@pytest.mark.parametrize("value", [1.0, 1.04])
def test_the_correction_scales_flux_and_error_alike(value):
    img = moffat_field(TRUTH)
    psf = moffat_psf(FWHM, BETA)
    x, y = np.array([40.3]), np.array([50.7])
    base = ForcedPhotometry(psf)(img, x, y)
    corr = ApertureCorrection(value=value, n_stars=20, scatter=0.01, radius=30.0, fallback=False)
    got = ForcedPhotometry(psf, corr)(img, x, y)
    np.testing.assert_allclose(got, np.array(base) * value)


def test_errors_on_a_difference_carry_its_noise_rescale():
    """A difference's DIA errors are scaled by the matched-filter noise rescale (``DIANSCL``);
    the forced errors on it are too, so forced and DIA S/N of an object agree. Fluxes do not change."""
    img = moffat_field(TRUTH)
    psf = moffat_psf(FWHM, BETA)
    x, y = np.array([40.3, 110.0]), np.array([50.7, 70.2])
    flux, err = ForcedPhotometry(psf)(img, x, y)
    img.metadata[DIFF_NOISE_SCALE] = 1.3
    sflux, serr = ForcedPhotometry(psf)(img, x, y)
    np.testing.assert_allclose(sflux, flux)
    np.testing.assert_allclose(serr, 1.3 * err)
