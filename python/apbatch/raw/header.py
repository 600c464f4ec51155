"""Primary header -> `RawMetadata`, with obs_lsst's rules and known header fix-ups."""

from __future__ import annotations

import math
from collections.abc import Mapping
from typing import Any

from .. import ids
from ..errors import BadInputError
from ..ids import parse_obs_id
from ..instruments import get_instrument, normalize_instrument
from .model import RawMetadata

__all__ = ["STRUCTURAL_KEYS", "camera_name", "translate_header"]

# ------------------------------------------------------------------ header translation
# Simulated cameras are separate butler instruments with the geometry of the real camera.
_SIM_CAMERAS = {"lsstcamsim": ("LSSTCamSim", "LSSTCam"), "lsstcomcamsim": ("LSSTComCamSim", "LSSTComCam")}
_CAMCODE_INSTRUMENT = {"MC": "LSSTCam", "CC": "LSSTComCam", "AT": "LATISS"}
_SCIENCE_TYPES = {"object": "science", "skyexp": "science"}
# Image types that never look at the sky: no pointing, no airmass.
_NON_SKY_TYPES = {"bias", "dark", "flat", "spot", "ccob", "unknown"}
# Primary-header keys that describe the FITS structure, not the observation.
STRUCTURAL_KEYS = frozenset(
    {"SIMPLE", "BITPIX", "NAXIS", "EXTEND", "COMMENT", "HISTORY", "CHECKSUM", "DATASUM", ""}
)


def camera_name(instrument: str) -> str:
    """Name of the camera geometry an instrument uses (``LSSTCamSim`` -> ``LSSTCam``)."""
    sim = _SIM_CAMERAS.get((instrument or "").strip().lower())
    return sim[1] if sim else normalize_instrument(instrument)


def _val(header: Mapping[str, Any], key: str) -> Any:
    """Header value, `None` for missing, null or blank."""
    v = header.get(key)
    if isinstance(v, str):
        v = v.strip()
        return v or None
    return v


def _float(header: Mapping[str, Any], key: str) -> float | None:
    v = _val(header, key)
    if v is None:
        return None
    try:
        f = float(v)
    except (TypeError, ValueError):
        raise BadInputError(key, f"{v!r} is not a number", "fix the raw header") from None
    return f if math.isfinite(f) else None


def _int(header: Mapping[str, Any], key: str) -> int | None:
    v = _val(header, key)
    if v is None:
        return None
    try:
        return int(v)
    except (TypeError, ValueError):
        raise BadInputError(key, f"{v!r} is not an integer", "fix the raw header") from None


def _instrument(header: Mapping[str, Any], instrument: str | None) -> tuple[str, str]:
    """(butler instrument name, camera geometry name)."""
    name = instrument or _val(header, "INSTRUME") or _CAMCODE_INSTRUMENT.get(_val(header, "CAMCODE") or "")
    if not name:
        raise BadInputError("INSTRUME", "missing (and no CAMCODE)", "pass the instrument explicitly")
    sim = _SIM_CAMERAS.get(str(name).strip().lower())
    if sim:
        return sim
    canon = normalize_instrument(str(name), field="INSTRUME")
    return canon, canon


def _physical_filter(header: Mapping[str, Any], camera: str) -> str:
    """obs_lsst's physical filter: ``FILTER[~FILTER1][~FILTER2]``; LATISS ``FILTER~GRATING``."""
    filt = _val(header, "FILTER")
    if camera == "LATISS":
        grating = _val(header, "GRATING")
        if filt is None and grating is None:
            return "unknown"
        # LATISS has several empty wheel slots (empty_1, empty_2, ...): all are "empty".
        parts = [
            "empty" if str(p).lower().startswith("empty") else str(p)
            for p in (filt or "unknown", grating or "unknown")
        ]
        return "~".join(parts)
    if filt is None:
        return "unknown"
    if str(filt).upper() == "NONE":
        filt = "none"
    extra = [str(_val(header, k)) for k in ("FILTER1", "FILTER2") if _val(header, k) is not None]
    return "~".join([str(filt), *extra])


def _fix_ups(camera: str, day_obs: int, seq_num: int, physical_filter: str, rotpa: float | None):
    """Known header errors that obs_lsst corrects (``fix_header`` / ``to_boresight_rotation_angle``)."""
    if camera == "LSSTCam":
        if day_obs == 20250609 and 76 <= seq_num <= 578 and physical_filter == "y_10":
            physical_filter = "z_20"  # filter changer reported y while z was in the beam
        if rotpa is not None and 20250302 <= day_obs <= 20250421:
            rotpa -= 90.0
        elif rotpa is not None and day_obs == 20250422 and seq_num < 251:
            rotpa -= 180.0
    return physical_filter, rotpa


def _obs_id_parts(header: Mapping[str, Any]) -> tuple[str, str, int, int]:
    """(obs_id, controller, day_obs, seq_num) from OBSID and/or CAMCODE/CONTRLLR/DAYOBS/SEQNUM."""
    obs_id = _val(header, "OBSID")
    parsed = parse_obs_id(obs_id, field="OBSID") if obs_id else None
    day_obs = _int(header, "DAYOBS") or (parsed.day_obs if parsed else None)
    seq_num = _int(header, "SEQNUM")
    seq_num = seq_num if seq_num is not None else (parsed.seq_num if parsed else None)
    controller = _val(header, "CONTRLLR") or (parsed.controller if parsed else "O")
    if day_obs is None or seq_num is None:
        raise BadInputError(
            "DAYOBS/SEQNUM", "missing and no OBSID to take them from", "the raw header must name the image"
        )
    if obs_id is None:
        camcode = _val(header, "CAMCODE")
        if camcode is None:
            raise BadInputError("OBSID", "missing and no CAMCODE to build it from", "fix the raw header")
        obs_id = f"{camcode}_{controller}_{day_obs:08d}_{seq_num:06d}"
    return obs_id, controller, day_obs, seq_num


def translate_header(header: Mapping[str, Any], instrument: str | None = None) -> RawMetadata:
    """Translate a raw primary header the way obs_lsst does (see ``shared/data/headers/README.md``).

    Parameters
    ----------
    header : `dict`
        Primary-header keywords (values `None` where unset).
    instrument : `str`, optional
        Instrument name; default from ``INSTRUME`` (``lsstCam``, ``ComCam``, ``LATISS``,
        ``LSSTCamSim``...), then ``CAMCODE``.

    Returns
    -------
    metadata : `RawMetadata`
        Translated facts; `None` where the header has nothing (pointing of a bias, ...).

    Raises
    ------
    BadInputError
        Raised if the header lacks what no raw can do without: the image name parts, the
        detector (``RAFTBAY``/``CCDSLOT``) or ``EXPTIME``, or has a malformed value.
    """
    name, camera = _instrument(header, instrument)
    inst = get_instrument(camera)
    obs_id, controller, day_obs, seq_num = _obs_id_parts(header)
    exp_id = ids.exposure_id(day_obs, seq_num, controller)
    group = _val(header, "GROUPID")
    try:
        visit = ids.visit_id_from_group(group, field="GROUPID") if group else exp_id
    except BadInputError:
        visit = exp_id  # a group id that is not a time: the exposure is its own visit
    group = str(group) if group else str(exp_id)

    imgtype = (_val(header, "IMGTYPE") or _val(header, "OBSTYPE") or "unknown").lower()
    obs_type = _SCIENCE_TYPES.get(imgtype, imgtype)

    if camera == "LATISS":
        det = inst.detectors[0]
    else:
        raft, slot = _val(header, "RAFTBAY"), _val(header, "CCDSLOT")
        if raft is None or slot is None:
            raise BadInputError("RAFTBAY/CCDSLOT", "missing", "the raw header must name the detector")
        det = inst.detector(f"{raft}_{slot}", field="RAFTBAY/CCDSLOT")

    requested = _float(header, "EXPTIME")
    shutter = _float(header, "SHUTTIME")
    if requested is None:
        raise BadInputError("EXPTIME", "missing", "the raw header must give the exposure time")
    exposure_time = shutter if (camera != "LATISS" and shutter is not None and shutter > 0) else requested

    physical_filter = _physical_filter(header, camera)
    physical_filter, rotpa = _fix_ups(camera, day_obs, seq_num, physical_filter, _float(header, "ROTPA"))
    band = inst.filters.get(physical_filter)
    if band is None and physical_filter not in ("none", "unknown") and _val(header, "FILTBAND"):
        band = str(_val(header, "FILTBAND"))

    on_sky = obs_type not in _NON_SKY_TYPES
    tracksys = _val(header, "TRACKSYS")
    ra = dec = None
    if on_sky and (tracksys is None or str(tracksys).upper() == "RADEC"):
        for kra, kdec in (("RASTART", "DECSTART"), ("RA", "DEC")):
            ra, dec = _float(header, kra), _float(header, kdec)
            if ra is not None and dec is not None:
                break
        else:
            ra = dec = None

    vignette = _val(header, "VIGNETTE")
    can_see_sky: bool | None
    if vignette is not None:
        can_see_sky = str(vignette).upper() != "FULLY"
    else:
        can_see_sky = False if obs_type in ("bias", "dark") else None

    mjd_begin = _float(header, "MJD-BEG") or _float(header, "MJD-OBS")
    mjd_end = _float(header, "MJD-END")
    if mjd_end is None and mjd_begin is not None:
        mjd_end = mjd_begin + exposure_time / 86400.0

    return RawMetadata(
        instrument=name,
        detector=det.id,
        detector_name=det.name,
        obs_id=obs_id,
        exposure_id=exp_id,
        group_id=group,
        visit_id=visit,
        day_obs=day_obs,
        seq_num=seq_num,
        observation_type=obs_type,
        physical_filter=physical_filter,
        band=band,
        exposure_time=exposure_time,
        dark_time=_float(header, "DARKTIME"),
        requested_exposure_time=requested,
        mjd_begin=mjd_begin,
        mjd_end=mjd_end,
        ra=ra,
        dec=dec,
        rotation=rotpa,
        airmass=_float(header, "AMSTART") if on_sky else None,
        image_index=_int(header, "CURINDEX"),
        images_in_sequence=_int(header, "MAXINDEX"),
        science_program=_val(header, "PROGRAM"),
        reason=_val(header, "REASON"),
        can_see_sky=can_see_sky,
    )
