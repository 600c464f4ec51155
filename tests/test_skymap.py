"""Tests for apbatch.skymap."""

import numpy as np
import pytest
import yaml
from apbatch.errors import BadInputError
from apbatch.instruments import get_instrument
from apbatch.skymap import SkyMap


def _map():
    return SkyMap("test", [(53.0, -28.0), (359.9, 0.0)], patch_size=4000, overlap=100, tract_radius_deg=1.0)


def test_round_trip_yaml():
    sm = _map()
    back = SkyMap.from_dict(yaml.safe_load(yaml.safe_dump(sm.to_dict())))
    assert back.to_dict() == sm.to_dict()
    assert back.patch(1, 7).wcs.wcs.crpix.tolist() == sm.patch(1, 7).wcs.wcs.crpix.tolist()


def test_tract_and_patch_geometry():
    sm = _map()
    t = sm.tract(0)
    assert t.n_patches == (10, 10)  # 2 deg = 36000 px -> 10 patches of 3900-px step (+ overlap)
    assert t.size == 10 * 3900 + 100
    c = (t.size - 1) / 2
    assert np.allclose(t.wcs.pixel_to_world_values(c, c), (53.0, -28.0))
    p = sm.patch(0, 12)  # ix=2, iy=1
    assert p.index == (2, 1) and p.shape == (4000, 4000)
    ra, dec = p.wcs.pixel_to_world_values(0.0, 0.0)
    assert np.allclose(t.wcs.world_to_pixel_values(ra, dec), (2 * 3900, 3900), atol=1e-6)
    # neighbours share 100 columns
    q = sm.patch(0, 13)
    ra, dec = q.wcs.pixel_to_world_values(0.0, 10.0)
    assert np.allclose(p.wcs.world_to_pixel_values(ra, dec), (3900, 10), atol=1e-6)
    ra0, dec0 = p.wcs.pixel_to_world_values(2000.0, 2000.0)
    ra1, dec1 = p.wcs.pixel_to_world_values(2000.0, 2001.0)
    assert (dec1 - dec0) * 3600 == pytest.approx(0.2, rel=1e-3)  # North up, 0.2"/px (TAN: ~0.2 off-centre)


def test_patches_overlapping():
    sm = _map()
    fp = get_instrument("LSSTComCam").footprint(4, 53.0, -28.0, 0.0)
    got = sm.patches_overlapping(fp)
    # the tract centre (pixel 19549.5) lies in the overlap of patches 4 and 5 along each axis
    assert {(p.tract, p.patch) for p in got} >= {(0, 44), (0, 45), (0, 54), (0, 55)}
    assert all(p.tract == 0 for p in got)
    for p in got:  # each listed patch really overlaps the CCD's bounding box
        x, y = p.wcs.world_to_pixel_values(fp[:, 0], fp[:, 1])
        assert x.max() >= -0.5 and x.min() <= 3999.5 and y.max() >= -0.5 and y.min() <= 3999.5
    ra, dec = sm.tract(0).wcs.pixel_to_world_values(
        np.array([9800.0, 9810, 9810, 9800]), np.array([5900.0, 5900, 5910, 5910])
    )
    tiny = np.column_stack([ra, dec])  # inside patch ix=2, iy=1 only
    assert [(p.tract, p.patch) for p in sm.patches_overlapping(tiny)] == [(0, 12)]
    wrap = np.array([[359.95, -0.01], [0.05, -0.01], [0.05, 0.01], [359.95, 0.01]])
    assert {p.tract for p in sm.patches_overlapping(wrap)} == {1}
    assert sm.patches_overlapping([[180.0, 60.0], [180.1, 60.0], [180.1, 60.1]]) == []


def test_bad_input():
    with pytest.raises(BadInputError):
        SkyMap("x", [])
    with pytest.raises(BadInputError):
        SkyMap("x", [(0, 95)])
    with pytest.raises(BadInputError):
        SkyMap("x", [(0, 0)], patch_size=100, overlap=60)
    with pytest.raises(BadInputError, match="tract"):
        _map().tract(5)
    with pytest.raises(BadInputError, match="patch"):
        _map().patch(0, 100)
    with pytest.raises(BadInputError, match="tract_centers"):
        SkyMap.from_dict({"name": "x"})
