"""Tests of apbatch.job.steps.measure (DIA source detection and measurement)."""

import numpy as np
import pytest
from apbatch.image import Image, MaskBits
from apbatch.instruments import get_instrument
from apbatch.job.steps import DIA_COLUMNS, gaussian_psf, measure_dia_sources, psf_flux
from steps_scene import _add_stars

N = 512
SIG = 1.7
WCS = get_instrument("LSSTComCam").sky_wcs(4, 150.0, 2.0, 0.0)


def _noise(seed=0, sigma=20.0):
    rng = np.random.default_rng(seed)
    img = rng.normal(0, sigma, (N, N)).astype(np.float32)
    return img, np.full((N, N), sigma**2, np.float32)


def _flux_for_snr(snr, sigma=20.0):
    p = gaussian_psf(SIG).image
    return snr * sigma / np.sqrt((p**2).sum())


def test_positive_negative_dipole_trail_and_flags():
    img, var = _noise(1)
    f20 = _flux_for_snr(20)
    _add_stars(img, [100.3], [120.6], [f20], "gauss", SIG)
    _add_stars(img, [400.0], [100.0], [-f20], "gauss", SIG)
    # dipole: +/- lobes 2 px apart
    _add_stars(img, [250.0], [400.0], [f20], "gauss", SIG)
    _add_stars(img, [252.0], [400.0], [-f20], "gauss", SIG)
    # trailed source: 12 px long at 30 degrees
    t = np.linspace(-6, 6, 25)
    _add_stars(
        img,
        380 + t * np.cos(np.radians(30)),
        380 + t * np.sin(np.radians(30)),
        [3 * f20 / 25] * 25,
        "gauss",
        SIG,
    )
    # a hot bad column must not make detections
    img[:, 200] += 500.0
    mask = np.zeros((N, N), np.int32)
    mask[:, 200] = MaskBits.BAD
    diff = Image(img, var, mask, WCS, {"NJY_PER_E": 2.0})
    sci_mask = np.zeros((N, N), np.int32)
    sci_mask[121, 101] = MaskBits.CR
    sci = Image(np.zeros((N, N), np.float32), var, sci_mask)
    out = measure_dia_sources(diff, gaussian_psf(SIG), sci)
    assert list(out.columns) == DIA_COLUMNS
    assert len(out) == 4, out[["x", "y", "snr"]]

    def at(x, y, tol=1.5):
        d = np.hypot(out["x"] - x, out["y"] - y)
        assert d.min() < tol
        return out.iloc[int(d.argmin())]

    pos = at(100.3, 120.6)
    assert abs(pos.x - 100.3) < 0.2 and abs(pos.y - 120.6) < 0.2
    assert pos.psfFlux == pytest.approx(2.0 * f20, rel=0.15)  # nJy = 2 x electrons
    assert pos.snr == pytest.approx(20, abs=3.5)
    assert not pos.isNegative and not pos.isDipole and pos.pixelFlags_cr and not pos.pixelFlags_bad
    assert pos.raErr > 0 and np.isfinite(pos.ra) and pos.trailLength < 2.0
    ra, dec = WCS.pixel_to_world_values(pos.x, pos.y)
    assert pos.ra == pytest.approx(ra) and pos.dec == pytest.approx(dec)
    neg = at(400.0, 100.0)
    assert neg.isNegative and neg.psfFlux < 0 and neg.snr < -15
    dip = at(251.0, 400.0, tol=3.0)  # reported at the stronger lobe
    assert dip.isDipole and dip.reliability < pos.reliability
    tr = at(380.0, 380.0)
    assert tr.trailLength == pytest.approx(12.0, rel=0.3)
    assert tr.trailAngle == pytest.approx(30.0, abs=8)
    assert pos.reliability > 0.8
    assert 0.9 < out.attrs["noise_scale"] < 1.1


def test_pure_noise_gives_at_most_one_false_detection():
    img, var = _noise(7)
    out = measure_dia_sources(Image(img, var), gaussian_psf(SIG))
    assert len(out) <= 1
    assert list(out.columns) == DIA_COLUMNS


def test_correlated_noise_is_rescaled():
    from scipy import ndimage

    img, var = _noise(3)
    img = ndimage.gaussian_filter(img, 0.7) * 2.0  # correlated, per-pixel variance now wrong
    out = measure_dia_sources(Image(img.astype(np.float32), var), gaussian_psf(SIG))
    assert out.attrs["noise_scale"] > 1.3
    assert len(out) <= 1


def test_forced_psf_flux_unbiased():
    img, var = _noise(5)
    rng = np.random.default_rng(0)
    xs, ys = rng.uniform(30, N - 30, 40), rng.uniform(30, N - 30, 40)
    f = _flux_for_snr(10)
    _add_stars(img, xs, ys, [f] * 40, "gauss", SIG)
    flux, err = psf_flux(Image(img, var), gaussian_psf(SIG), xs, ys)
    assert np.median(flux) == pytest.approx(f, rel=0.05)
    assert np.median(err) == pytest.approx(f / 10, rel=0.05)
    pull = (flux - f) / err
    assert 0.7 < np.std(pull) < 1.3


@pytest.mark.parametrize("sigma", [1.7, 4.5])  # 0.8" and 2" seeing on LSSTCam
def test_psf_flux_is_unbiased_with_a_variance_plane_made_from_the_pixels(sigma):
    """ISR's variance is the pixels' own Poisson estimate (sky + fluctuation): weighting the fit
    by its inverse put blank-sky fluxes at -0.21 sigma (0.8") and -0.56 sigma (2"), DIA fluxes at
    S/N 5-10 at 0.96 and 0.88 of the truth. The fit is unweighted; the variance gives the error."""
    rng = np.random.default_rng(3)
    sky, n = 1000.0, 1000
    img = rng.poisson(sky, (n, n)).astype(np.float32)
    var = img.copy()  # the pixels' own Poisson variance, as ISR makes it
    img -= sky
    x, y = rng.uniform(40, n - 40, 3000), rng.uniform(40, n - 40, 3000)
    flux, err = psf_flux(Image(img, var), gaussian_psf(sigma, 2 * int(3 * sigma) + 1), x, y)
    pull = flux / err
    assert abs(np.mean(pull)) < 0.1  # the weighted fit gave -0.20 (sigma 1.7), -0.51 (4.5)
    assert np.std(pull) == pytest.approx(1.0, abs=0.08)
    # a source is measured in full
    img2 = img.copy()
    _add_stars(img2, [500.3], [480.6], [20000.0], "gauss", sigma)
    var2 = var + np.where(img2 > img, img2 - img, 0)
    f, e = psf_flux(Image(img2, var2), gaussian_psf(sigma, 41), [500.3], [480.6])
    assert f[0] == pytest.approx(20000.0, abs=3 * e[0])


@pytest.mark.parametrize("col_offset", [-2, -1, 1, 2])
def test_centroid_beside_an_interpolated_column_is_not_pushed_away(col_offset):
    """S is zeroed 2 px around interpolated pixels; the windowed centroid on the image is not."""
    img, var = _noise(5)
    x0, y0 = 250.4, 260.7
    _add_stars(img, [x0], [y0], [_flux_for_snr(35)], "gauss", SIG)
    mask = np.zeros((N, N), np.int32)
    col = int(round(x0)) + col_offset
    mask[:, col] = MaskBits.BAD | MaskBits.INTRP
    out = measure_dia_sources(Image(img, var, mask, WCS), gaussian_psf(SIG))
    assert len(out) == 1
    assert np.hypot(out["x"].iloc[0] - x0, out["y"].iloc[0] - y0) < 0.6


def _moffat(shape, x0, y0, flux, fwhm, beta=3.0):
    yy, xx = np.mgrid[0 : shape[0], 0 : shape[1]]
    alpha = fwhm / (2.0 * np.sqrt(2.0 ** (1.0 / beta) - 1.0))
    r2 = (xx - x0) ** 2 + (yy - y0) ** 2
    return flux * (beta - 1) / (np.pi * alpha**2) * (1.0 + r2 / alpha**2) ** -beta


@pytest.mark.parametrize("fwhm, dist", [(3.5, 16.0), (10.0, 32.0)])  # 0.7" and 2" seeing
def test_saturated_star_halo_sources_are_kept_but_flagged(fwhm, dist):
    from apbatch.job.steps import moffat_psf

    n, noise, full_well, f_star = 600, 35.0, 1.5e5, 3e7
    x0, y0 = 300.3, 299.6
    rng = np.random.default_rng(int(fwhm))
    star = _moffat((n, n), x0, y0, f_star, fwhm)
    sat = star > full_well
    cols = np.nonzero(sat.any(axis=0))[0]
    sat[int(y0) - 60 : int(y0) + 61, cols] = True  # bleed trail along the columns
    sci = (star + rng.normal(0, noise, (n, n))).astype(np.float32)
    sci[sat] = full_well
    mask = np.where(sat, int(MaskBits.SAT), 0).astype(np.int32)
    var = np.full((n, n), noise**2, np.float32)
    # the difference: noise, a 10 % wing mismatch of the star (broader and 0.15 px off in the
    # template: a ring and a dipole, both far above the noise), garbage in the saturated pixels
    resid = 0.1 * (star - _moffat((n, n), x0 + 0.15, y0, f_star, 1.1 * fwhm))
    img = (rng.normal(0, noise, (n, n)) + resid).astype(np.float32)
    img[sat] = 1e4
    psf = moffat_psf(fwhm, 3.0)
    p = psf.stamp()
    f_tr = 25.0 * noise / np.sqrt((p**2).sum())
    tx, ty = x0 + dist / np.sqrt(2), y0 + dist / np.sqrt(2)  # in the halo, off the trail
    cx, cy = 520.0, 90.0  # a control transient far from the star
    for x, y in ((tx, ty), (cx, cy)):
        img += _moffat((n, n), x, y, f_tr, fwhm).astype(np.float32)
        sci += _moffat((n, n), x, y, f_tr, fwhm).astype(np.float32)
    diff = Image(img, var, mask.copy(), WCS)
    out = measure_dia_sources(diff, psf, Image(sci, var, mask.copy()))

    def near(x, y):
        return np.hypot(out["x"] - x, out["y"] - y) < 2.0

    halo_sources = out[np.hypot(out["x"] - x0, out["y"] - y0) < 150]
    flagged = halo_sources["pixelFlags_suspect"] | halo_sources["pixelFlags_saturated"]
    assert len(halo_sources) >= 2  # the residual is detected (and kept), not only the transient
    assert flagged.all(), halo_sources[["x", "y", "snr", "pixelFlags_suspect"]]
    assert near(tx, ty).sum() == 1
    tr = out[near(tx, ty)].iloc[0]
    assert tr.pixelFlags_suspect and tr.snr == pytest.approx(25.0, rel=0.35)
    assert out.attrs["n_in_saturation_halos"] == int(out["pixelFlags_suspect"].sum())
    assert out.attrs["n_saturated_stars"] == 1
    ctrl = out[near(cx, cy)]
    assert len(ctrl) == 1 and not ctrl.pixelFlags_suspect.iloc[0] and ctrl.reliability.iloc[0] > 0.8
    assert diff.mask[int(ty), int(tx)] & MaskBits.SUSPECT
    assert not diff.mask[int(cy), int(cx)] & MaskBits.SUSPECT
    assert not (out["pixelFlags_suspect"] & (np.hypot(out["x"] - x0, out["y"] - y0) > 200)).any()


def test_positive_offset_gives_symmetric_noise_detections():
    n = 1024
    rng = np.random.default_rng(17)
    yy, xx = np.mgrid[0:n, 0:n]
    level = 0.6 + 0.4 * np.sin(xx / 300.0)  # e-: 0.01-0.05 sigma per pixel, 0.2 sigma in the filter
    img = (rng.normal(0, 20.0, (n, n)) + level).astype(np.float32)
    var = np.full((n, n), 400.0, np.float32)
    out = measure_dia_sources(Image(img, var), gaussian_psf(SIG), threshold=3.0)
    pos, neg = int((~out.isNegative).sum()), int(out.isNegative.sum())
    assert pos + neg > 30
    assert abs(pos - neg) <= 2.5 * np.sqrt(pos + neg), (pos, neg)  # a 3:1 ratio without the fix
    assert out.attrs["background_rms"] > 0.1 and abs(out.attrs["snr_offset"]) < 0.05


def test_snr_of_isolated_sources_is_within_two_percent_of_optimal():
    img, var = _noise(9)
    # sparse (one per 96 px square): the matched filter's noise is normalised on all pixels,
    # sources included, and at one per 48 px square they inflate it by 5 %
    xy = np.array([(x, y) for x in range(25, N - 20, 96) for y in range(25, N - 20, 96)], float)
    xy += np.random.default_rng(1).uniform(-0.5, 0.5, xy.shape)
    _add_stars(img, xy[:, 0], xy[:, 1], [_flux_for_snr(30)] * len(xy), "gauss", SIG)
    out = measure_dia_sources(Image(img, var), gaussian_psf(SIG))
    assert len(out) == len(xy)
    assert np.median(out["snr"]) == pytest.approx(30.0, rel=0.02)


@pytest.mark.parametrize("edge_px", [0, 10])  # the image border; the border of an EDGE-masked band
def test_source_three_px_from_the_edge_is_measured_and_flagged(edge_px):
    img, var = _noise(11)
    f = _flux_for_snr(30)
    x0, y0 = edge_px + 3.2, 260.4
    _add_stars(img, [x0], [y0], [f], "gauss", SIG)
    _add_stars(img, [260.0], [200.0], [f], "gauss", SIG)
    mask = np.zeros((N, N), np.int32)
    mask[:, :edge_px] = MaskBits.EDGE
    out = measure_dia_sources(Image(img, var, mask), gaussian_psf(SIG))
    d = np.hypot(out["x"] - x0, out["y"] - y0)
    assert d.min() < 1.0
    src = out.iloc[int(d.argmin())]
    assert np.isfinite(src.psfFlux) and src.psfFlux == pytest.approx(f, rel=0.2)
    assert src.pixelFlags_edge and src.snr > 15
    inner = out.iloc[int(np.hypot(out["x"] - 260, out["y"] - 200).argmin())]
    assert not inner.pixelFlags_edge


def test_truncated_psf_fit_is_unbiased_at_the_border():
    from apbatch.job.steps.measure import psf_fit

    img, var = _noise(13)
    ys = np.linspace(20, N - 20, 30) + np.random.default_rng(2).uniform(-0.5, 0.5, 30)
    xs = np.full(30, 2.0)
    f = _flux_for_snr(20)
    _add_stars(img, xs, ys, [f] * 30, "gauss", SIG)
    flux, err, truncated = psf_fit(Image(img, var), gaussian_psf(SIG), xs, ys)
    assert truncated.all() and np.isfinite(flux).all()
    assert np.median(flux) == pytest.approx(f, rel=0.05)
    assert 0.7 < np.std((flux - f) / err) < 1.3
    _, _, t = psf_fit(Image(img, var), gaussian_psf(SIG), [200.0], [200.0])
    assert not t[0]
