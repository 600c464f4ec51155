"""Tests of apbatch.job.steps.halos (saturated stars' halo masks scaled with their flux)."""

import numpy as np
import pytest
from apbatch.image import MaskBits
from apbatch.job.steps import moffat_psf
from apbatch.job.steps.halos import psf_tail, saturated_star_halos

FULL_WELL = 1.5e5


def _moffat(shape, x0, y0, flux, fwhm, beta=3.0):
    yy, xx = np.mgrid[0 : shape[0], 0 : shape[1]]
    alpha = fwhm / (2.0 * np.sqrt(2.0 ** (1.0 / beta) - 1.0))
    norm = (beta - 1.0) / (np.pi * alpha**2)
    return flux * norm * (1.0 + ((xx - x0) ** 2 + (yy - y0) ** 2) / alpha**2) ** -beta


def _saturated_science(flux, fwhm, shape=(600, 600), noise=30.0, seed=0):
    rng = np.random.default_rng(seed)
    img = _moffat(shape, 300.3, 299.6, flux, fwhm) + rng.normal(0, noise, shape)
    mask = np.zeros(shape, np.int32)
    sat = img > FULL_WELL
    # bleed trail: the excess charge runs up and down the columns of the core
    cols = np.nonzero(sat.any(axis=0))[0]
    half = int(flux / FULL_WELL / 6 / max(len(cols), 1))
    sat[max(300 - half, 0) : 300 + half + 1, cols] = True
    img[sat] = FULL_WELL
    mask[sat] = MaskBits.SAT
    return img.astype(np.float32), mask, np.full(shape, noise**2, np.float32)


@pytest.mark.parametrize("beta", [2.5, 3.0, 4.0])
def test_psf_tail_recovers_a_moffat_index(beta):
    tail = psf_tail(moffat_psf(3.5, beta))
    assert tail.beta == pytest.approx(beta, abs=0.3)
    assert tail(0.0) == 1.0 and tail.radius(0.5) == pytest.approx(1.75, rel=0.1)


def test_bad_seeing_stamp_too_small_uses_the_default_index():
    tail = psf_tail(moffat_psf(10.0, 3.0, size=25))  # 25 px is 1.2 FWHM of half-width
    assert tail.beta == 2.5


@pytest.mark.parametrize("fwhm", [3.5, 10.0])
def test_halo_radius_is_where_the_wing_meets_a_fraction_of_the_noise(fwhm):
    img, mask, var = _saturated_science(5e7, fwhm)
    psf = moffat_psf(fwhm, 3.0)
    halo, stars = saturated_star_halos(mask, psf, var, science=img)
    assert len(stars) == 1
    star = stars[0]
    assert abs(star.x - 300.3) < 2 and abs(star.y - 299.6) < 2
    # the star's true profile at the halo's edge, as a smooth level, is 1 sigma in the matched
    # filter; in bad seeing the PSF stamp is too small to fit the wing's index and the default
    # (2.5, shallower than the star's 3) makes the halo larger, never smaller
    level = _moffat((1, 1), -star.radius, 0.0, 5e7, fwhm)[0, 0]
    edge = 30.0 / (np.sqrt(4 * np.pi) * psf.sigma)
    assert edge / 4 < level < edge * 1.3
    assert halo[300, int(300 + star.radius) - 2] and not halo[300, int(300 + star.radius) + 3]
    assert halo[(mask & MaskBits.SAT) != 0].all()


def test_halo_grows_with_flux_and_seeing():
    radii = {}
    for flux in (5e6, 5e7):
        for fwhm in (3.5, 10.0):
            img, mask, var = _saturated_science(flux, fwhm)
            if not (mask & MaskBits.SAT).any():
                continue
            _, stars = saturated_star_halos(mask, moffat_psf(fwhm, 3.0), var, science=img)
            radii[flux, fwhm] = stars[0].radius
    assert radii[5e7, 3.5] > 1.3 * radii[5e6, 3.5]
    assert radii[5e7, 10.0] > radii[5e7, 3.5]


def test_halo_radius_uses_the_sky_noise_not_the_stars_own_poisson_noise():
    # ISR's variance plane holds each pixel's Poisson noise: next to a bright star it is the
    # star's, which grows with its flux; the halo ends where the sky's noise is, so a Poisson
    # variance plane must give the radius a constant one gives, and it must still grow with flux
    radii = {}
    for flux in (1e7, 6e7):
        img, mask, var = _saturated_science(flux, 4.9)
        poisson = var + np.maximum(img, 0.0)
        _, flat = saturated_star_halos(mask, moffat_psf(4.9, 3.0), var, science=img)
        _, pois = saturated_star_halos(mask, moffat_psf(4.9, 3.0), poisson, science=img)
        assert pois[0].noise == pytest.approx(30.0, rel=0.03)
        assert pois[0].radius == pytest.approx(flat[0].radius, rel=0.03)
        radii[flux] = pois[0].radius
    assert radii[6e7] > 1.25 * radii[1e7]


def test_without_a_science_image_the_fixed_rule_applies():
    mask = np.zeros((200, 200), np.int32)
    mask[95:106, 95:106] = MaskBits.SAT
    halo, stars = saturated_star_halos(mask, moffat_psf(4.0, 3.0), np.full((200, 200), 900.0, np.float32))
    assert not np.isfinite(stars[0].amplitude)
    assert stars[0].radius == pytest.approx(6 * 5.5)
    assert halo[100, 100 + 32] and not halo[100, 100 + 35]
    assert saturated_star_halos(np.zeros((9, 9), np.int32), moffat_psf(4.0, 3.0), np.ones((9, 9)))[1] == []


def test_a_star_saturated_only_in_the_template_gets_a_halo_beyond_its_grown_mask():
    # bad seeing: the science star peaks below the full well, the sharper template's does not;
    # the difference carries the template's SAT core and, grown by the kernel, NO_DATA around it
    fwhm = 10.0
    img, _, var = _saturated_science(2e7, fwhm)
    assert img.max() < FULL_WELL
    mask = np.zeros(img.shape, np.int32)
    yy, xx = np.mgrid[0:600, 0:600]
    r = np.hypot(xx - 300.3, yy - 299.6)
    mask[r < 30] = MaskBits.NO_DATA
    mask[r < 3] |= MaskBits.SAT
    halo, stars = saturated_star_halos(mask, moffat_psf(fwhm, 3.0), var, science=img,
                                       science_mask=np.zeros(img.shape, np.int32))
    assert len(stars) == 1 and np.isfinite(stars[0].amplitude)
    assert stars[0].noise == pytest.approx(30.0, rel=0.01)
    assert stars[0].radius > 45 and halo[r < 45].all()
