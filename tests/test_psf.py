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
    # mark every star but three as saturated: a sparse field's constant model from those three
    for x, y in src[["x", "y"]].to_numpy()[:-3]:
        im.mask[int(y), int(x)] = MaskBits.SAT
    src = detect_sources(im, psf_sigma=1.6)
    psf = measure_psf(im, src)
    assert psf.n_stars == 3 and psf.degree == 0 and psf.coeffs is None
    assert psf.fallback == "sparse field: constant PSF from 3 star(s)"
    assert psf.sigma == pytest.approx(1.6, rel=0.06)
    # one star left: no model
    for x, y in src[["x", "y"]].to_numpy()[:-1]:
        im.mask[int(y), int(x)] = MaskBits.SAT
    with pytest.raises(BadInputError, match=r"only 1 PSF stars found \(at least 2\)"):
        measure_psf(im, detect_sources(im, psf_sigma=1.6))


def _observed(img, rng, box):
    """``img`` (e-, sky included) with Poisson-like noise and 5 e- read noise, background-subtracted."""
    var = img + 25
    im = Image((img + rng.normal(0, np.sqrt(var))).astype(np.float32), var.astype(np.float32))
    subtract_background(im, box=box)
    return im


def _sparse_field(n_bright, n_faint, seed=11, sigma=2.2, galaxy=True):
    """A sparse field: a few bright stars, fainter ones below the default detection, and a bright galaxy."""
    rng = np.random.default_rng(seed)
    img = np.full((800, 800), 200.0)
    for flux in [*rng.uniform(8e4, 2e5, n_bright), *rng.uniform(2.3e3, 3.0e3, n_faint)]:
        x, y = rng.uniform(40, 760, 2)
        _paint(img, x, y, flux, lambda h, dx, dy: _gauss_stamp(sigma, h, dx, dy))
    if galaxy:
        _paint(img, 400.3, 400.6, 4e5, lambda h, dx, dy: _gauss_stamp(4.5, h, dx, dy, 0.7), h=25)
    return _observed(img, rng, box=128)


def test_sparse_field_model_leaves_the_galaxy_out():
    """4 stars and a brighter galaxy: no stellar locus to find, the constant model is the stars'."""
    im = _sparse_field(4, 0)
    src = detect_sources(im, psf_sigma=2.2)
    assert len(src) == 5  # four stars and the galaxy
    psf = measure_psf(im, src)
    assert psf.fallback == "sparse field: constant PSF from 4 star(s)"
    assert psf.n_stars == 4
    assert psf.sigma == pytest.approx(2.2, rel=0.05)


def test_sparse_field_model_is_wide_enough_for_a_wide_psf():
    """LATISS-like (Moffat, FWHM 10.6 px): the constant model spans 5 FWHM like a stellar-locus one, so
    PSF fluxes hold the light (a 25-px model gave 0.81-0.87 of the truth on a LATISS CCD)."""
    from apbatch.job.steps.measure import psf_flux

    rng = np.random.default_rng(4)
    img = np.full((700, 700), 200.0)
    xy = [(150.2, 160.7), (520.6, 210.1), (300.4, 540.3), (580.8, 590.5)]
    flux = rng.uniform(2e5, 4e5, len(xy))
    _add_stars(img, *zip(*xy, strict=True), flux, "moffat", 4.5)
    im = _observed(img, rng, box=256)
    psf = measure_psf(im, detect_sources(im, psf_sigma=4.5))
    assert psf.fallback == "sparse field: constant PSF from 4 star(s)"
    assert psf.image.shape[0] >= 2 * round(2.5 * 2.3548 * 4.5 * 0.95) + 1
    x, y = (np.array(c) for c in zip(*xy, strict=True))
    got, _ = psf_flux(im, psf, x, y)
    np.testing.assert_allclose(got / flux, 1.0, atol=0.03)


def test_sparse_field_takes_fainter_psf_stars_from_the_deeper_catalogue():
    """A LATISS-like field (Moffat FWHM 10.6 px) with 2 bright stars and fainter ones at S/N 20-40
    that the default detection misses: the second look finds them and, with the S/N floor at
    ``SPARSE_MIN_SNR``, builds a normal model (a real LATISS visit failed with "only 1 PSF stars")."""
    from apbatch.job.steps.psf import SPARSE_MIN_SNR, SPARSE_THRESHOLD, sources_and_psf

    rng = np.random.default_rng(11)
    img = np.full((1000, 1000), 200.0)
    flux = np.r_[rng.uniform(2e5, 4e5, 2), rng.uniform(6.5e3, 9.5e3, 10)]
    _add_stars(img, rng.uniform(60, 940, flux.size), rng.uniform(60, 940, flux.size), flux, "moffat", 4.5)
    im = _observed(img, rng, box=256)
    assert len(detect_sources(im)) == 2
    deep = detect_sources(im, threshold=SPARSE_THRESHOLD)
    assert ((deep["snr"] >= SPARSE_MIN_SNR) & (deep["snr"] < 50)).sum() >= 3
    src, psf = sources_and_psf(im)
    assert len(src) == len(deep) and psf.fallback is None and psf.n_stars >= 5
    assert psf.fwhm == pytest.approx(measure_psf(im, deep, min_snr=50).fwhm, rel=0.05)


def test_sources_and_psf_looks_deeper_only_in_a_sparse_field():
    """Too few stars for a normal model: the catalogue the job goes on with is a deeper one."""
    from apbatch.job.steps.psf import SPARSE_THRESHOLD, sources_and_psf

    im = _sparse_field(3, 25)
    shallow = detect_sources(im)
    deep = detect_sources(im, threshold=SPARSE_THRESHOLD)
    assert len(shallow) <= 4 < len(deep)
    src, psf = sources_and_psf(im)
    assert len(src) == len(deep)
    # the deeper catalogue (for the astrometric fit and the kernel's stamps) holds the faint stars;
    # they are too faint for PSF stars (S/N >= 50), so the model is the bright three's
    assert psf.fallback == "sparse field: constant PSF from 3 star(s)"
    assert psf.sigma == pytest.approx(2.2, rel=0.05)
    # a field with stars enough: one detection, the default one
    rich = _stars(1.6)
    src, psf = sources_and_psf(rich)
    assert len(src) == len(detect_sources(rich)) and psf.fallback is None


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


def _gauss_stamp(sigma, h, dx, dy, q=1.0):
    y, x = np.mgrid[-h : h + 1, -h : h + 1]
    p = np.exp(-((x - dx) ** 2 + ((y - dy) / q) ** 2) / (2 * sigma * sigma))
    return p / p.sum()


def _paint(img, x, y, flux, stamp_fn, h=15):
    xi, yi = int(round(x)), int(round(y))
    img[yi - h : yi + h + 1, xi - h : xi + h + 1] += flux * stamp_fn(h, x - xi, y - yi)


def _galaxy_field(seed=5, n_stars=70, n_gal=220, star_sigma=1.5):
    """A galaxy-rich field: galaxies (sigma 2.6-5 px, elongated) outnumber the stars 3 to 1; brighter."""
    rng = np.random.default_rng(seed)
    img = np.full((1000, 1000), 200.0)
    for _ in range(n_stars):
        x, y = rng.uniform(25, 975, 2)
        _paint(img, x, y, rng.uniform(2e4, 2e5), lambda h, dx, dy: _gauss_stamp(star_sigma, h, dx, dy))
    for _ in range(n_gal):
        x, y = rng.uniform(25, 975, 2)
        s, q = rng.uniform(2.6, 5.0), rng.uniform(0.6, 1.0)
        _paint(img, x, y, rng.uniform(5e4, 6e5), lambda h, dx, dy, s=s, q=q: _gauss_stamp(s, h, dx, dy, q))
    return _observed(img, rng, box=64)


def test_psf_stars_are_stars_in_a_galaxy_rich_field():
    im = _galaxy_field()
    src = detect_sources(im, psf_sigma=1.5)
    psf = measure_psf(im, src)
    # truth: a Gaussian of sigma 1.5 (FWHM 3.53 px); the median of all candidates is a galaxy's size
    assert psf.fwhm == pytest.approx(2.3548 * 1.5, rel=0.05)
    assert psf.n_stars >= 20
    ok = src["snr"] >= 50
    assert np.median(np.sqrt(0.5 * (src["ixx"] + src["iyy"]))[ok]) > 1.3 * 1.5


def test_spatially_varying_model_follows_the_seeing():
    rng = np.random.default_rng(8)
    img = np.full((900, 900), 200.0)
    for _ in range(160):
        x, y = rng.uniform(25, 875, 2)
        s = 1.4 + 0.6 * x / 900  # sigma 1.4 on the left, 2.0 on the right
        _paint(img, x, y, rng.uniform(2e4, 2e5), lambda h, dx, dy, s=s: _gauss_stamp(s, h, dx, dy))
    var = img + 25
    im = Image((img + rng.normal(0, np.sqrt(var))).astype(np.float32), var.astype(np.float32))
    subtract_background(im, box=64)
    psf = measure_psf(im, detect_sources(im, psf_sigma=1.7))
    assert psf.degree >= 1 and psf.coeffs is not None
    assert psf.sigma_at(50, 450) == pytest.approx(1.4 + 0.6 * 50 / 900, rel=0.04)
    assert psf.sigma_at(850, 450) == pytest.approx(1.4 + 0.6 * 850 / 900, rel=0.04)
    assert psf.sigma == pytest.approx(1.7, rel=0.04)
    left, right = psf.stamp(0.0, 0.0, 15, x=50, y=450), psf.stamp(0.0, 0.0, 15, x=850, y=450)
    assert left.sum() == pytest.approx(1.0) and right.sum() == pytest.approx(1.0)
    assert left.max() > 1.5 * right.max()  # the sharper PSF has the higher peak
    # a constant model ignores the position
    g = gaussian_psf(1.7)
    np.testing.assert_array_equal(g.stamp(0.2, 0.1, 15, x=10, y=20), g.stamp(0.2, 0.1, 15))


def test_radius_enclosing_matches_the_analytic_profiles():
    from apbatch.job.steps import moffat_psf

    sig = 2.0
    r_gauss = sig * np.sqrt(-2 * np.log(0.005))
    assert gaussian_psf(sig).radius_enclosing(0.995) == pytest.approx(r_gauss, abs=0.5)
    m = moffat_psf(4.0, 3.0)
    alpha = 4.0 / (2 * np.sqrt(2 ** (1 / 3) - 1))
    assert m.radius_enclosing(0.995) == pytest.approx(alpha * np.sqrt(0.005 ** (-0.5) - 1), abs=0.5)


def test_measured_encircled_energy_reaches_the_wing():
    """Stars with a Moffat wing: the measured 99.5% radius is the Moffat's, far beyond the 25-px model."""
    rng = np.random.default_rng(4)
    img = np.full((1000, 1000), 100.0)
    alpha = 4.0 / (2 * np.sqrt(2 ** (1 / 3) - 1))

    def moffat(h, dx, dy):
        y, x = np.mgrid[-h : h + 1, -h : h + 1]
        p = (1 + ((x - dx) ** 2 + (y - dy) ** 2) / alpha**2) ** -3.0
        return p / p.sum()

    for _ in range(60):
        x, y = rng.uniform(50, 950, 2)
        _paint(img, x, y, rng.uniform(1e5, 1e6), moffat, h=45)
    var = img + 25
    im = Image((img + rng.normal(0, np.sqrt(var))).astype(np.float32), var.astype(np.float32))
    im.image -= 100.0
    psf = measure_psf(im, detect_sources(im, psf_sigma=1.7))
    assert psf.encircled is not None and len(psf.encircled) > 13
    assert psf.radius_enclosing(0.995) == pytest.approx(alpha * np.sqrt(0.005 ** (-0.5) - 1), rel=0.12)


def test_candidates_at_the_edge_with_a_broad_weight():
    """Bad seeing: the size weight's stamp (3 x its width) reaches past the edge for the outermost stars."""
    im = _stars(3.5, n=80, seed=9)
    src = detect_sources(im, psf_sigma=3.5)
    src.loc[src.index[:3], "x"] = 15.0  # candidates 15 px from the edge, inside the 25-px model's margin
    psf = measure_psf(im, src)
    assert psf.sigma == pytest.approx(3.5, rel=0.06)


def test_model_grows_with_the_seeing():
    """Bad seeing: the model holds 5 FWHM, not 25 px, so PSF fluxes keep (almost) all the light."""
    sig = 4.2
    im = _stars(sig, n=40, seed=12)
    psf = measure_psf(im, detect_sources(im, psf_sigma=sig))
    assert psf.image.shape[0] >= 2 * round(2.5 * 2.3548 * sig) + 1
    assert psf.sigma == pytest.approx(sig, rel=0.06)
    assert measure_psf(im, detect_sources(im, psf_sigma=sig), size=25).image.shape == (25, 25)
    small = measure_psf(_stars(1.5), detect_sources(_stars(1.5), psf_sigma=1.5))
    assert small.image.shape == (25, 25)
