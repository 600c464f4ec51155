"""One home for the time scales apbatch converts between.

Observatory events stamp times in TAI (``private_sndStamp``: TAI seconds since 1970); Butler
timespans, ``day_obs`` and raw headers use TAI or UTC. TAI - UTC is 37 s since 2017-01-01 and
until the next leap second (none is announced); the constant is kept here, not computed with
``astropy.time`` on every event, because the daemon judges staleness per event and
``import astropy.time`` alone costs about half a second.
"""

from __future__ import annotations

import datetime

__all__ = ["SITE_LAT_DEG", "SITE_LON_DEG", "TAI_MINUS_UTC", "local_sidereal_deg", "tai_datetime"]

TAI_MINUS_UTC = 37.0
"""TAI - UTC, seconds (valid from 2017-01-01 until the next leap second)."""

SITE_LON_DEG = -70.749417
"""Longitude of Cerro Pachón (Rubin Observatory), degrees east."""
SITE_LAT_DEG = -30.244639
"""Latitude of Cerro Pachón, degrees."""

_UNIX_EPOCH_JD = 2440587.5
_J2000_JD = 2451545.0


def tai_datetime(tai_seconds: float) -> datetime.datetime:
    """Naive datetime of a TAI unix time (the scale ``ids.day_obs_of`` expects)."""
    return datetime.datetime(1970, 1, 1) + datetime.timedelta(seconds=tai_seconds)


def local_sidereal_deg(tai_seconds: float, lon_deg: float = SITE_LON_DEG) -> float:
    """Local mean sidereal time, degrees, at a TAI unix time (GMST linear formula, UT1 ~ UTC).

    Accurate to a few arcseconds over decades: enough to place simulated pointings and compute
    airmasses, not for telescope control.
    """
    jd_ut = _UNIX_EPOCH_JD + (tai_seconds - TAI_MINUS_UTC) / 86400.0
    return (280.46061837 + 360.98564736629 * (jd_ut - _J2000_JD) + lon_deg) % 360.0
