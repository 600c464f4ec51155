"""The one home of time-scale constants and conversions, checked against astropy."""

from __future__ import annotations

import pytest
from apbatch.timeutil import SITE_LON_DEG, TAI_MINUS_UTC, local_sidereal_deg, tai_datetime
from astropy.coordinates import Longitude
from astropy.time import Time


@pytest.mark.parametrize("iso", ["2017-01-01T00:00:00", "2024-11-08T03:12:00", "2026-11-26T06:00:00"])
def test_tai_minus_utc_matches_astropy(iso):
    t = Time(iso, scale="utc")
    assert (t.tai.datetime - t.datetime).total_seconds() == pytest.approx(TAI_MINUS_UTC, abs=1e-6)


@pytest.mark.parametrize("iso", ["2020-03-21T00:00:00", "2025-10-16T01:00:00", "2026-06-01T23:30:00"])
def test_local_sidereal_time_matches_astropy_mean_sidereal_time(iso):
    t = Time(iso, scale="utc")
    tai_unix = (t.tai.datetime - Time("1970-01-01T00:00:00", scale="tai").datetime).total_seconds()
    ours = local_sidereal_deg(tai_unix)
    theirs = t.sidereal_time("mean", longitude=Longitude(SITE_LON_DEG, unit="deg")).deg
    diff = (ours - theirs + 180.0) % 360.0 - 180.0
    assert abs(diff) * 3600 < 15.0  # arcsec: the linear GMST formula without UT1-UTC


def test_tai_datetime_is_naive_tai():
    assert tai_datetime(0.0).isoformat() == "1970-01-01T00:00:00"
    assert tai_datetime(86400.5).isoformat() == "1970-01-02T00:00:00.500000"
