"""The raw headers against the job's arguments: what stops a job and what is only reported."""

from __future__ import annotations

import logging

import numpy as np

from ..errors import BadInputError
from ..raw import RawExposure
from ..work import CcdWork

__all__ = ["check_headers", "header_pointing", "separation_arcsec"]

log = logging.getLogger(__name__)


def separation_arcsec(ra0: float, dec0: float, ra: float, dec: float) -> float:
    """Small-angle distance (arcsec) of (ra, dec) from (ra0, dec0), degrees; RA wraps at 360."""
    dra = (ra - ra0 + 180.0) % 360.0 - 180.0
    return float(np.hypot(dra * np.cos(np.radians(dec0)), dec - dec0)) * 3600.0


def check_headers(raws: list[RawExposure], work: CcdWork) -> list[str]:
    """Compare the raws' headers with the job's arguments.

    Returns
    -------
    mismatches : `list` [`str`]
        Human-readable differences that do not stop the job (filter, exposure time,
        pointing); the header value is reported next to the argument.

    Raises
    ------
    BadInputError
        Raised if a raw belongs to another instrument, detector or group.
    """
    out: list[str] = []
    for raw in raws:
        m = raw.metadata
        if m.instrument != work.instrument:
            raise BadInputError("raw", f"{m.obs_id} is from {m.instrument}, the job is for {work.instrument}",
                                "check the distributor location")
        if m.detector != work.detector:
            raise BadInputError("raw", f"{m.obs_id} is detector {m.detector}, the job is for {work.detector}",
                                "the distributor delivered the wrong CCD")
        if work.group_id and m.group_id != work.group_id:
            raise BadInputError("raw", f"{m.obs_id} has GROUPID {m.group_id!r}, "
                                f"the job's group is {work.group_id!r}")
        if work.physical_filter and m.physical_filter != work.physical_filter:
            out.append(f"{m.obs_id}: header FILTER {m.physical_filter!r} but the job was told "
                       f"{work.physical_filter!r}"
                       " (using the job's filter)")
        exptime = m.requested_exposure_time or m.exposure_time
        snaps = max(m.images_in_sequence or work.nimages or 1, 1)
        # the expected time may be the visit's (30 s) or the snap's (2 x 15 s)
        if work.exposure_time and min(abs(exptime - work.exposure_time),
                                      abs(exptime * snaps - work.exposure_time)) > 0.5:
            out.append(f"{m.obs_id}: header EXPTIME {exptime:.3f} s but the job expected "
                       f"{work.exposure_time:.3f} s (using the header)")
        if work.ra is not None and work.dec is not None and m.ra is not None and m.dec is not None:
            sep = separation_arcsec(work.ra, work.dec, m.ra, m.dec)
            if sep > 60.0:
                out.append(f"{m.obs_id}: header pointing is {sep:.0f} arcsec from the job's boresight "
                           "(using the header)")
    for line in out:
        log.warning("header mismatch: %s", line)
    return out


def header_pointing(raw: RawExposure, work: CcdWork) -> tuple[float, float, float]:
    """(ra, dec, rotation) degrees from the raw's header, else the job's arguments.

    Raises
    ------
    BadInputError
        Raised if neither says where the telescope pointed.
    """
    m = raw.metadata
    ra = m.ra if m.ra is not None else work.ra
    dec = m.dec if m.dec is not None else work.dec
    rot = m.rotation if m.rotation is not None else work.rotation
    if ra is None or dec is None or rot is None:
        raise BadInputError("raw", f"{m.obs_id} has no pointing and the job was given none",
                            "science jobs need --ra/--dec/--rotation or RASTART/DECSTART/ROTPA")
    return float(ra), float(dec), float(rot)
