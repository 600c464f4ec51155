"""What one simulated exposure is (:class:`ExposureSpec`) and its primary header (the real
keywords of Rubin's cameras, see ``shared/data/headers/``); the pixels are rendered by
`apbatch.sim.raws`.
"""

from __future__ import annotations

import dataclasses
import hashlib
import math

from ..instruments import get_instrument
from ..timeutil import SITE_LAT_DEG, SITE_LON_DEG, local_sidereal_deg

__all__ = ["ExposureSpec", "primary_header"]

_SITE_ELEV_M = 2663.0
_SITE_GEO_M = (1818938.94, -5208470.95, -3195172.08)  # geocentric X, Y, Z
_INSTRUME = {"LSSTCam": "lsstCam", "LSSTComCam": "ComCam", "LATISS": "LATISS"}
_TELESCOP = {
    "LSSTCam": "Simonyi Survey Telescope",
    "LSSTComCam": "Simonyi Survey Telescope",
    "LATISS": "LSST AuxTelescope",
}
_SKY_TYPES = ("OBJECT", "ACQ", "CWFS")



@dataclasses.dataclass(frozen=True)
class ExposureSpec:
    """One image as the camera takes it (all CCDs share it)."""

    instrument: str
    day_obs: int
    seq_num: int
    controller: str
    image_type: str  # OBJECT, BIAS, DARK, FLAT
    exptime: float  # requested, s
    mjd_begin: float  # shutter open (TAI)
    physical_filter: str
    group_id: str | None = None
    image_index: int = 1
    images_in_sequence: int = 1
    ra: float | None = None  # commanded
    dec: float | None = None
    ra_start: float | None = None  # actual pointing = boresight of the WCS
    dec_start: float | None = None
    rotation: float | None = None
    seeing: float = 0.8  # arcsec FWHM
    sky_offset: float = 0.0  # mag/arcsec^2 brighter(-)/fainter(+) than dark sky
    transparency: float = 0.0  # zero-point offset, mag
    reason: str = "science"
    program: str = "PP-SURVEY"
    object_name: str = ""
    flat_level: float = 30000.0  # e- per pixel of a flat
    readout: float = 2.0  # s
    # injected camera faults (calibration verification tests); none by default
    hot_amps: tuple[str, ...] = ()
    """Amplifier names with extra signal: ``HOT_AMP_E`` e- plus ``HOT_AMP_RATE`` e-/s of dark time."""
    bias_drift: tuple[tuple[str, float], ...] = ()
    """(amplifier name, ADU): the amplifier's bias level (overscan and data) moved by that much."""

    def __post_init__(self):
        # JSON gives lists back: keep the fields hashable tuples
        object.__setattr__(self, "hot_amps", tuple(str(a) for a in self.hot_amps))
        object.__setattr__(self, "bias_drift", tuple((str(a), float(d)) for a, d in self.bias_drift))

    @property
    def obs_id(self) -> str:
        """Image name ``<CAMCODE>_<CONTRLLR>_<DAYOBS>_<SEQNUM:06d>``."""
        camcode = get_instrument(self.instrument).camcode
        return f"{camcode}_{self.controller}_{self.day_obs:08d}_{self.seq_num:06d}"

    @property
    def on_sky(self) -> bool:
        """`True` for images that see the sky."""
        return self.image_type in _SKY_TYPES

    @property
    def shutter_time(self) -> float:
        """Measured shutter-open time (0 for biases and darks)."""
        return self.exptime if self.image_type not in ("BIAS", "DARK") else 0.0

    @property
    def dark_time(self) -> float:
        """Charge-accumulation time: exposure plus ~0.4 s of shutter motion and clearing."""
        return self.exptime + 0.4 if self.exptime > 0 else 0.1

    @property
    def mjd_end(self) -> float:
        """Shutter close (TAI)."""
        return self.mjd_begin + self.exptime / 86400.0

    def pointing(self) -> tuple[float, float, float]:
        """(``ra_start``, ``dec_start``, ``rotation``), degrees: where an on-sky image points.

        Raises
        ------
        ValueError
            Raised if the spec has no pointing (a bias, dark or flat).
        """
        if self.ra_start is None or self.dec_start is None or self.rotation is None:
            raise ValueError(f"{self.obs_id} ({self.image_type}) has no pointing")
        return self.ra_start, self.dec_start, self.rotation

    @property
    def band(self) -> str | None:
        """Band letter of the filter, if the camera knows it."""
        return get_instrument(self.instrument).filters.get(self.physical_filter)

    def to_dict(self) -> dict:
        """Plain-JSON form."""
        return dataclasses.asdict(self)

    @classmethod
    def from_dict(cls, d: dict) -> ExposureSpec:
        """Inverse of :meth:`to_dict`."""
        return cls(**d)


def _iso(mjd: float) -> str:
    from astropy.time import Time

    return Time(mjd, format="mjd", scale="tai").isot[:23]


def _altaz(ra: float, dec: float, mjd_tai: float) -> tuple[float, float, float]:
    """(hour angle deg, elevation deg, azimuth deg) at the site."""
    lst = local_sidereal_deg((mjd_tai - 40587.0) * 86400.0, SITE_LON_DEG)
    ha = math.radians((lst - ra + 180.0) % 360.0 - 180.0)
    d, lat = math.radians(dec), math.radians(SITE_LAT_DEG)
    alt = math.asin(math.sin(d) * math.sin(lat) + math.cos(d) * math.cos(lat) * math.cos(ha))
    az = math.atan2(
        -math.sin(ha) * math.cos(d), math.sin(d) * math.cos(lat) - math.cos(d) * math.sin(lat) * math.cos(ha)
    )
    return math.degrees(ha), math.degrees(alt), math.degrees(az) % 360.0


def _airmass(alt_deg: float) -> float | None:
    return 1.0 / math.sin(math.radians(alt_deg)) if alt_deg > 5 else None


def primary_header(spec: ExposureSpec, detector: int | str) -> dict:
    """The primary header a Rubin camera writes for one CCD of ``spec``."""
    inst = get_instrument(spec.instrument)
    det = inst.detector(detector)
    raft, slot = ("R00", "S00") if inst.name == "LATISS" else (det.raft, det.sensor)
    filt, grating = (
        (spec.physical_filter.split("~") + ["empty_1"])[:2]
        if inst.name == "LATISS"
        else (spec.physical_filter, None)
    )
    if grating == "empty":
        grating = "empty_1"
    trig = spec.mjd_end + 0.005 / 86400.0
    created = spec.mjd_end + spec.readout / 86400.0
    h: dict = {
        "DATE": _iso(created),
        "MJD": created,
        "IMGTYPE": spec.image_type,
        "DATE-OBS": _iso(spec.mjd_begin),
        "MJD-OBS": spec.mjd_begin,
        "DATE-TRG": _iso(trig),
        "MJD-TRG": trig,
        "OBSID": spec.obs_id,
        "DATE-BEG": _iso(spec.mjd_begin),
        "MJD-BEG": spec.mjd_begin,
        "DATE-END": _iso(spec.mjd_end),
        "MJD-END": spec.mjd_end,
        "BUNIT": "adu",
        "TIMESYS": "TAI",
    }
    if spec.group_id:
        h["GROUPID"] = spec.group_id
    h |= {
        "INSTRUME": _INSTRUME[inst.name],
        "TELESCOP": _TELESCOP[inst.name],
        "OBS-LONG": SITE_LON_DEG,
        "OBS-LAT": SITE_LAT_DEG,
        "OBS-ELEV": _SITE_ELEV_M,
        "OBSGEO-X": _SITE_GEO_M[0],
        "OBSGEO-Y": _SITE_GEO_M[1],
        "OBSGEO-Z": _SITE_GEO_M[2],
    }
    sky = dict.fromkeys(
        (
            "RA",
            "DEC",
            "RASTART",
            "DECSTART",
            "RAEND",
            "DECEND",
            "ROTPA",
            "ROTCOORD",
            "HASTART",
            "ELSTART",
            "AZSTART",
            "AMSTART",
            "HAEND",
            "ELEND",
            "AZEND",
            "AMEND",
            "TRACKSYS",
            "RADESYS",
        )
    )
    if spec.on_sky and spec.ra_start is not None:
        ra0, dec0, _ = spec.pointing()
        ha0, el0, az0 = _altaz(ra0, dec0, spec.mjd_begin)
        ha1, el1, az1 = _altaz(ra0, dec0, spec.mjd_end)
        sky |= {
            "RA": spec.ra,
            "DEC": spec.dec,
            "RASTART": spec.ra_start,
            "DECSTART": spec.dec_start,
            "RAEND": spec.ra_start,
            "DECEND": spec.dec_start,
            "ROTPA": spec.rotation,
            "ROTCOORD": "sky",
            "HASTART": ha0 / 15.0,
            "ELSTART": el0,
            "AZSTART": az0,
            "AMSTART": _airmass(el0),
            "HAEND": ha1 / 15.0,
            "ELEND": el1,
            "AZEND": az1,
            "AMEND": _airmass(el1),
            "TRACKSYS": "RADEC",
            "RADESYS": "ICRS",
        }
    h |= sky
    h |= {
        "FOCUSZ": 0.0,
        "OBJECT": spec.object_name or None,
        "VIGNETTE": "NO" if spec.on_sky else "FULLY",
        "VIGN_MIN": "NO" if spec.on_sky else "FULLY",
        "TESTTYPE": spec.image_type,
        "CAMCODE": inst.camcode,
        "CONTRLLR": spec.controller,
        "DAYOBS": f"{spec.day_obs:08d}",
        "SEQNUM": spec.seq_num,
        "PROGRAM": spec.program if spec.on_sky else None,
        "REASON": spec.reason,
        "CURINDEX": spec.image_index,
        "MAXINDEX": spec.images_in_sequence,
        "IMAGETAG": hashlib.sha1(spec.obs_id.encode()).hexdigest()[:16],
        "CCD_MANU": det.ccd_type,
        "CCD_TYPE": "3800C" if det.ccd_type == "ITL" else "CCD250",
        "CCDSLOT": slot,
        "RAFTBAY": raft,
        "LSST_NUM": det.serial,
        "FILTBAND": spec.band,
        "FILTER": filt,
        "FILTPOS": None,
        "FILTSLOT": None,
    }
    if grating is not None:
        h |= {"GRATING": grating, "GRATBAND": "EMPTY"}
    h |= {
        "EXPTIME": spec.exptime,
        "DARKTIME": spec.dark_time,
        "SHUTTIME": spec.shutter_time,
        "AIRTEMP": 12.0,
        "PRESSURE": 74100.0,
        "HUMIDITY": 20.0,
        "WINDSPD": 3.0,
        "WINDDIR": 200.0,
        "SEEING": spec.seeing if spec.on_sky else None,
        "HEADVER": 2,
        "FILENAME": f"{spec.obs_id}_{det.name}.fits",
    }
    return h
