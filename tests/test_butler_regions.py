"""Tests for apbatch.butler.regions: sky polygons of a pointing's focal plane and CCDs."""

import numpy as np
import pytest
from apbatch.butler.regions import sky_polygon, visit_regions
from apbatch.instruments import get_instrument
from lsst.sphgeom import LonLat, UnitVector3d


def _point(ra, dec):
    return UnitVector3d(LonLat.fromDegrees(float(ra), float(dec)))


@pytest.mark.parametrize(("instrument", "camera"), [("LSSTCam", "LSSTCam"), ("LATISS", "LATISS"),
                                                    ("LSSTComCamSim", "LSSTComCam")])
def test_each_ccd_region_holds_its_pixels_and_only_them(instrument, camera):
    cam = get_instrument(camera)
    ra, dec, rot = 150.0, 2.2, 37.0
    visit, ccds = visit_regions(instrument, ra, dec, rot)
    assert set(ccds) == {d.id for d in cam.science_detectors}
    rng = np.random.default_rng(4)
    for det in cam.science_detectors[:: max(1, len(cam.science_detectors) // 12)]:
        wcs = cam.sky_wcs(det, ra, dec, rot)
        xs, ys = rng.uniform(2, det.nx - 2, 5), rng.uniform(2, det.ny - 2, 5)
        for r, d in zip(*wcs.pixel_to_world_values(xs, ys), strict=True):
            p = _point(r, d)
            assert ccds[det.id].contains(p) and visit.contains(p)
            assert [k for k, reg in ccds.items() if reg.contains(p)] == [det.id]
        # just off the CCD's edge (10 px past x = nx) is outside it
        r, d = wcs.pixel_to_world_values(det.nx + 10.0, det.ny / 2)
        assert not ccds[det.id].contains(_point(r, d))
    assert not visit.contains(_point(ra + 5.0, dec))


def test_sky_polygon_is_the_hull_in_any_order():
    corners = np.array([[10.0, 0.0], [10.1, 0.0], [10.1, 0.1], [10.0, 0.1]])
    for order in (corners, corners[::-1], corners[[0, 2, 1, 3]]):
        poly = sky_polygon(order)
        assert poly.contains(_point(10.05, 0.05)) and not poly.contains(_point(10.2, 0.05))
        assert len(poly.getVertices()) == 4
