"""Deterministic DIA source and object identifiers.

``diaSourceId``, ``diaForcedSourceId`` and new ``diaObjectId`` values are packed from visit,
detector and a per-CCD index (:func:`pack_id`); a new DiaObject takes the id of the DiaSource
that created it. Bit layout of the positive int64 (most significant first)::

    bit  63      0 (sign)
    bit  62      visit form: 0 = group-time visit id, 1 = exposure-style visit id
    bits 61..29  visit key, 33 bits
    bits 28..21  detector, 8 bits (0-255; LSSTCam uses 0-204, its 189 science CCDs 0-188)
    bit  20      kind: 0 = DiaSource (and the DiaObject it creates), 1 = DiaForcedSource
    bits 19..0   index of the source on this CCD and visit, 20 bits (0-1,048,575)

Visit key: a group-time visit id (:func:`apbatch.ids.visit_id_from_group`, ``SSSSSSSSSmmmNNNN``:
seconds since 2015-01-01 TAI, milliseconds, ``#N`` suffix) packs as ``seconds << 2 | N``
(seconds < 2**31, i.e. until 2083; N < 4); an exposure-style id ``YYYYMMDDnnnnn`` packs as
``days_since_2015 * 100000 + n`` (< 2**33, i.e. 235 years). Two visits of one instrument never
start in the same second with the same suffix (a visit takes >= 15 s + 2 s readout), so
distinct visits have distinct keys; detector and index have their own fields, and forced and
direct sources their own kind bit: ids of one instrument cannot collide. One APDB per
instrument, as in Rubin operations.
"""

from __future__ import annotations

import datetime

import numpy as np

from ..errors import BadInputError

__all__ = ["pack_id", "unpack_id"]

_EPOCH_DAY = datetime.date(2015, 1, 1)


def _visit_key(visit: int) -> tuple[int, int]:
    if visit >= 10**14:  # group-time form: seconds, milliseconds (3 digits), suffix (4 digits)
        seconds, suffix = visit // 10**7, visit % 10**4
        if seconds >= 2**31 or suffix >= 4:
            raise BadInputError("visit", f"{visit} cannot be packed into a source id",
                                "group-id suffix must be 0-3 and the time before 2083")
        return 0, (seconds << 2) | suffix
    try:
        day = datetime.datetime.strptime(str(visit // 100_000), "%Y%m%d").date()
    except ValueError:
        day = None
    if day is None or day < _EPOCH_DAY:
        raise BadInputError("visit", f"{visit} is neither a group-time nor an exposure-style visit id",
                            "expected e.g. 3702781866920000 or 2025060900578")
    return 1, (day - _EPOCH_DAY).days * 100_000 + visit % 100_000


def pack_id(visit: int, detector: int, index, forced: bool = False):
    """Deterministic 63-bit id of a source (see the module docstring for the layout).

    Parameters
    ----------
    visit, detector : `int`
        The CCD-visit.
    index : `int` or `numpy.ndarray`
        Index (or indices) of the source in this CCD-visit, 0 to 2**20 - 1.
    forced : `bool`
        `True` for DiaForcedSource ids.

    Raises
    ------
    BadInputError
        Raised if a field does not fit.
    """
    form, key = _visit_key(int(visit))
    if not 0 <= detector < 256:
        raise BadInputError("detector", f"{detector} does not fit in 8 bits")
    idx = np.asarray(index, dtype=np.int64)
    if idx.size and (idx.min() < 0 or idx.max() >= 2**20):
        raise BadInputError("dia_sources", "more than 1,048,576 sources on one CCD", "check detection")
    base = (form << 62) | (key << 29) | (int(detector) << 21) | (int(forced) << 20)
    out = np.int64(base) + idx
    return int(out) if out.ndim == 0 else out


def unpack_id(value: int) -> dict[str, int]:
    """Inverse of :func:`pack_id`: form, visit key, detector, forced, index."""
    return {"form": value >> 62 & 1, "visit_key": value >> 29 & (2**33 - 1), "detector": value >> 21 & 255,
            "forced": value >> 20 & 1, "index": value & (2**20 - 1)}
