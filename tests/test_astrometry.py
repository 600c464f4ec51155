"""Tests of apbatch.job.steps.astrometry."""

import numpy as np
import pytest
from apbatch.errors import BadInputError, ExitCode
from apbatch.instruments import get_instrument
from apbatch.job.steps.astrometry import AstrometryError, fit_wcs

INST = get_instrument("LSSTCam")


def _truth(n=400, seed=0, det=10):
    rng = np.random.default_rng(seed)
    true = INST.sky_wcs(det, 40.0, -30.0, 12.0)
    xy = np.column_stack([rng.uniform(0, 4072, n), rng.uniform(0, 4000, n)])
    radec = np.column_stack(true.pixel_to_world_values(xy[:, 0], xy[:, 1]))
    return true, xy, radec, rng


@pytest.mark.parametrize("off_arcsec,drot", [((1.5, -2.0), 0.0), ((-6.0, 3.0), 0.01)])
def test_recovers_offset_and_rotation(off_arcsec, drot):
    true, xy, radec, rng = _truth()
    # a header WCS: boresight off by a few arcsec, rotator off by drot degrees
    raw = INST.sky_wcs(
        10, 40.0 + off_arcsec[0] / 3600 / np.cos(np.radians(30)), -30.0 + off_arcsec[1] / 3600, 12.0 + drot
    )
    px, py = raw.world_to_pixel_values(radec[:, 0], radec[:, 1])
    assert np.hypot(px - xy[:, 0], py - xy[:, 1]).max() > 5  # the header WCS is really off
    meas = xy + rng.normal(0, 0.05, xy.shape)
    # reference has 30% unmatched stars and misses 20% of the science ones
    extra = np.column_stack(true.pixel_to_world_values(rng.uniform(0, 4072, 120), rng.uniform(0, 4000, 120)))
    ref = np.vstack([radec[80:], extra])
    fitted, res = fit_wcs(raw, meas, ref)
    fx, fy = fitted.world_to_pixel_values(radec[:, 0], radec[:, 1])
    err = np.hypot(fx - xy[:, 0], fy - xy[:, 1])
    assert err.max() < 0.1
    assert res.n_matched >= 250
    assert res.rms_arcsec < 0.03
    assert res.rotation_deg == pytest.approx(-drot, abs=2e-3) or res.rotation_deg == pytest.approx(
        drot, abs=2e-3
    )


def test_unrelated_reference_fails_clearly():
    true, xy, radec, rng = _truth()
    other = np.column_stack(true.pixel_to_world_values(rng.uniform(0, 4072, 15), rng.uniform(0, 4000, 15)))
    with pytest.raises(AstrometryError) as ei:
        fit_wcs(true, xy[:15], other, search_radius=10)
    assert ei.value.exit_code == ExitCode.BAD_INPUT
    assert isinstance(ei.value, BadInputError) and ei.value.field == "wcs"


def test_too_few_sources():
    true, xy, radec, _ = _truth()
    with pytest.raises(AstrometryError, match="too few"):
        fit_wcs(true, xy[:3], radec)
