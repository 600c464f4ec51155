"""Tests for apbatch.instruments: detector tables, amplifiers and the per-CCD sky WCS."""

import math

import numpy as np
import pytest
from apbatch.errors import BadInputError
from apbatch.instruments import get_instrument, normalize_instrument
from astropy.coordinates import SkyCoord


@pytest.mark.parametrize("name, n", [("LATISS", 1), ("LSSTComCam", 9), ("LSSTCam", 189)])
def test_science_detector_counts(name, n):
    assert len(get_instrument(name).science_detectors) == n


def test_lsstcam_ids_match_obs_lsst():
    cam = get_instrument("LSSTCam")
    for name, det_id in [("R01_S01", 1), ("R10_S02", 29), ("R22_S11", 94), ("R22_S22", 98), ("R44_SW0", 203)]:
        assert cam.detector(name).id == det_id
        assert cam.detector(det_id).name == name
    assert {d.purpose for d in cam.detectors} == {"SCIENCE", "WAVEFRONT", "GUIDER"}
    assert all(d.id < 189 for d in cam.science_detectors)


@pytest.mark.parametrize(
    "alias, canon", [("lsstCam", "LSSTCam"), ("ComCam", "LSSTComCam"), ("latiss", "LATISS")]
)
def test_aliases(alias, canon):
    assert normalize_instrument(alias) == canon


def test_unknown_instrument_and_detector():
    with pytest.raises(BadInputError, match="instrument.*unknown instrument 'HSC'"):
        get_instrument("HSC")
    with pytest.raises(BadInputError, match="detector"):
        get_instrument("LSSTComCam").detector(9)
    with pytest.raises(BadInputError, match="filter"):
        get_instrument("LSSTCam").band_of("r_03")


def test_amplifier_boxes_tile_the_ccd():
    for name, det in [("LSSTCam", 0), ("LSSTCam", 94), ("LATISS", 0)]:
        cam = get_instrument(name)
        d = cam.detector(det)
        cover = np.zeros((d.ny, d.nx), int)
        for amp in cam.amplifiers(det):
            x0, x1, y0, y1 = amp.bbox
            dx0, dx1, dy0, dy1 = amp.data
            assert (x1 - x0, y1 - y0) == (dx1 - dx0, dy1 - dy0)
            cover[y0:y1, x0:x1] += 1
        assert (cover == 1).all()


def test_wcs_round_trip_and_orientation():
    cam = get_instrument("LSSTCam")
    w = cam.sky_wcs("R22_S11", 150.0, -30.0, 0.0)
    x = np.random.default_rng(1).uniform(0, 4000, 200)
    y = np.random.default_rng(2).uniform(0, 4000, 200)
    ra, dec = w.pixel_to_world_values(x, y)
    x2, y2 = w.world_to_pixel_values(ra, dec)
    assert np.abs(x2 - x).max() < 1e-6 and np.abs(y2 - y).max() < 1e-6
    # rotation 0: +y is North, +x is West (RA decreases)
    r0, d0 = w.pixel_to_world_values(2000, 2000)
    r1, d1 = w.pixel_to_world_values(2100, 2000)
    r2, d2 = w.pixel_to_world_values(2000, 2100)
    assert r1 < r0 and abs(d1 - d0) < 1e-6
    assert d2 > d0
    # rotation 90: +y is East
    w90 = cam.sky_wcs("R22_S11", 150.0, -30.0, 90.0)
    ra_a, _ = w90.pixel_to_world_values(2000, 2000)
    ra_b, _ = w90.pixel_to_world_values(2000, 2100)
    assert ra_b > ra_a


def test_wcs_matches_field_angle_polynomial():
    """A CCD's reference pixel lies at the field angle obs_lsst's radial polynomial gives."""
    cam = get_instrument("LSSTCam")
    for name in ["R01_S00", "R43_S22", "R20_S10"]:
        det = cam.detector(name)
        w = cam.sky_wcs(det, 10.0, -45.0, 37.0)
        ra, dec = w.pixel_to_world_values(det.refpos_x, det.refpos_y)
        sep = SkyCoord(10.0, -45.0, unit="deg").separation(SkyCoord(ra, dec, unit="deg")).deg
        r = math.hypot(det.x_mm, det.y_mm)
        expected = cam.plate_scale_arcsec_per_mm / 3600 * (r - 8.33713991e-09 * r**3 - 1.41389858e-15 * r**5)
        assert abs(sep - expected) * 3600 / cam.pixel_scale_arcsec < 0.01


def test_neighbouring_ccds_tile_the_sky():
    """The gap between R22_S11 and R22_S12 on the sky equals the focal-plane gap."""
    cam = get_instrument("LSSTCam")
    a, b = cam.detector("R22_S11"), cam.detector("R22_S12")
    wa, wb = cam.sky_wcs(a, 45.0, 10.0, 12.0), cam.sky_wcs(b, 45.0, 10.0, 12.0)
    # the focal-plane point midway between the two CCD centres, seen from each CCD
    mid_mm = ((a.x_mm + b.x_mm) / 2, (a.y_mm + b.y_mm) / 2)
    pa = (a.refpos_x + (mid_mm[0] - a.x_mm) / 0.01, a.refpos_y + (mid_mm[1] - a.y_mm) / 0.01)
    pb = (b.refpos_x + (mid_mm[0] - b.x_mm) / 0.01, b.refpos_y + (mid_mm[1] - b.y_mm) / 0.01)
    ca = SkyCoord(*wa.pixel_to_world_values(*pa), unit="deg")
    cb = SkyCoord(*wb.pixel_to_world_values(*pb), unit="deg")
    assert ca.separation(cb).arcsec < 1e-4


def test_footprint_padding_grows_region():
    cam = get_instrument("LSSTComCam")
    c0 = cam.footprint(4, 53.0, -28.0, 0.0)
    c1 = cam.footprint(4, 53.0, -28.0, 0.0, pad_arcsec=10.0)
    assert c0.shape == (4, 2)
    centre = SkyCoord(53.0, -28.0, unit="deg")
    d0 = centre.separation(SkyCoord(c0[:, 0], c0[:, 1], unit="deg")).arcsec
    d1 = centre.separation(SkyCoord(c1[:, 0], c1[:, 1], unit="deg")).arcsec
    assert np.all(d1 > d0 + 9.0)


def test_latiss_parity_is_flipped():
    cam = get_instrument("LATISS")
    w = cam.sky_wcs(0, 200.0, -40.0, 0.0)
    r0, _ = w.pixel_to_world_values(2000, 2000)
    r1, _ = w.pixel_to_world_values(2100, 2000)
    assert r1 > r0
