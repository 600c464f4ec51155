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
