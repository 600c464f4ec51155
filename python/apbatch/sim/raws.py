"""Simulated raw CCD exposures: what one exposure is (:class:`ExposureSpec`), its primary
header (real keywords, see ``shared/data/headers/``), and its pixels and truth.

The pointing in the header (``RASTART``/``DECSTART``/``ROTPA``) and the detector name are
all a reader needs to rebuild the WCS the simulator used
(:meth:`apbatch.instruments.Instrument.sky_wcs`): the simulator never derives a WCS itself.
"""

from __future__ import annotations

import dataclasses
import hashlib
import math
from pathlib import Path

import numpy as np
import pandas as pd

from ..instruments import get_instrument
from ..raw import RawSegment, write_raw
from . import camera
from .calibs import detector_signature
from .sky import SKY_MAG, ZERO_POINTS, SkyModel

__all__ = ["ExposureSpec", "SimulatedRaw", "primary_header", "render_exposure", "simulate_ccd"]

_SITE = {"lon": -70.749417, "lat": -30.244639, "elev": 2663.0, "geo": (1818938.94, -5208470.95, -3195172.08)}
_INSTRUME = {"LSSTCam": "lsstCam", "LSSTComCam": "ComCam", "LATISS": "LATISS"}
_TELESCOP = {
    "LSSTCam": "Simonyi Survey Telescope",
    "LSSTComCam": "Simonyi Survey Telescope",
    "LATISS": "LSST AuxTelescope",
}
_ZP_OFFSET = {"LSSTCam": 0.0, "LSSTComCam": 0.0, "LATISS": -4.2}  # 1.2 m vs 6.4 m effective aperture
_SKY_TYPES = ("OBJECT", "ACQ", "CWFS")
_TAI_UTC = 37.0
_BETA = camera.BETA


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


@dataclasses.dataclass
class SimulatedRaw:
    """A rendered raw: header, segments (HDU order) and the truth of this exposure."""

    header: dict
    segments: list[RawSegment]
    truth: pd.DataFrame


def _iso(mjd: float) -> str:
    from astropy.time import Time

    return Time(mjd, format="mjd", scale="tai").isot[:23]


def _altaz(ra: float, dec: float, mjd_tai: float) -> tuple[float, float, float]:
    """(hour angle deg, elevation deg, azimuth deg) at the site (GMST formula, UT = TAI - 37 s)."""
    jd = mjd_tai + 2400000.5 - _TAI_UTC / 86400.0
    lst = (280.46061837 + 360.98564736629 * (jd - 2451545.0) + _SITE["lon"]) % 360.0
    ha = math.radians((lst - ra + 180.0) % 360.0 - 180.0)
    d, lat = math.radians(dec), math.radians(_SITE["lat"])
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
        "OBS-LONG": _SITE["lon"],
        "OBS-LAT": _SITE["lat"],
        "OBS-ELEV": _SITE["elev"],
        "OBSGEO-X": _SITE["geo"][0],
        "OBSGEO-Y": _SITE["geo"][1],
        "OBSGEO-Z": _SITE["geo"][2],
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
        ha0, el0, az0 = _altaz(spec.ra_start, spec.dec_start, spec.mjd_begin)
        ha1, el1, az1 = _altaz(spec.ra_start, spec.dec_start, spec.mjd_end)
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


def _truth(src: pd.DataFrame, x, y, flux, tflux, fwhm, noise_var, saturated) -> pd.DataFrame:
    out = pd.DataFrame(
        {
            "id": src["id"].to_numpy(),
            "kind": [SkyModel.kind_name(k) for k in src["kind"]],
            "ra": src["ra"].to_numpy(),
            "dec": src["dec"].to_numpy(),
            "x": x,
            "y": y,
            "mag": src["mag"].to_numpy(),
            "flux_e": flux,
            "template_flux_e": tflux,
            "diff_flux_e": flux - tflux,
            "fwhm_px": fwhm,
            "noise_var_e": noise_var,
            "saturated": saturated,
        }
    )
    out["snr"] = out["flux_e"] / np.sqrt(out["flux_e"].clip(lower=0) + out["noise_var_e"])
    out["diff_snr"] = out["diff_flux_e"] / np.sqrt(out["flux_e"].clip(lower=0) + out["noise_var_e"])
    return out


def render_exposure(
    spec: ExposureSpec, detector: int | str, sky: SkyModel | None, seed: int, cosmic_rays: bool = True
) -> SimulatedRaw:
    """Render one CCD of one exposure.

    Parameters
    ----------
    spec : `ExposureSpec`
        The exposure.
    detector : `int` or `str`
        The CCD.
    sky : `SkyModel` or `None`
        The sky (needed for on-sky images).
    seed : `int`
        Seed of the camera signature and of the noise (with the image name and detector).
    cosmic_rays : `bool`
        Add cosmic rays.

    Returns
    -------
    raw : `SimulatedRaw`
        Header, segments and truth (sources whose centre is on the CCD; empty off-sky).
    """
    inst = get_instrument(spec.instrument)
    det = inst.detector(detector)
    sig = detector_signature(inst.name, det.id, seed)
    rng = np.random.default_rng([int(seed), 3, spec.day_obs, spec.seq_num, det.id])
    img = np.zeros((det.ny, det.nx), np.float32)
    truth = _truth(
        pd.DataFrame({"id": [], "kind": [], "ra": [], "dec": [], "mag": []}),
        *([np.zeros(0)] * 6),
        np.zeros(0, bool),
    )
    bright = []
    t_open = spec.shutter_time
    if spec.on_sky:
        if sky is None or spec.ra_start is None:
            raise ValueError("an on-sky exposure needs a sky and a pointing")
        band, scale, zp = spec.band or "r", inst.pixel_scale_arcsec, _ZP_OFFSET[inst.name] + spec.transparency
        wcs = inst.sky_wcs(det, spec.ra_start, spec.dec_start, spec.rotation)
        cra, cdec = wcs.pixel_to_world_values((det.nx - 1) / 2, (det.ny - 1) / 2)
        radius = math.hypot(det.nx, det.ny) / 2 * scale / 3600 + 0.01
        mjd_mid = spec.mjd_begin + t_open / 2 / 86400
        src = sky.sources(float(cra), float(cdec), radius)
        movers = sky.movers_near(float(cra), float(cdec), radius, mjd_mid)
        if len(movers):
            src = pd.concat([src, movers], ignore_index=True)
        x, y = wcs.world_to_pixel_values(src["ra"].to_numpy(), src["dec"].to_numpy())
        flux = SkyModel.fluxes(src, band, mjd_mid, t_open, zp)
        tflux = SkyModel.fluxes(src, band, mjd_mid, t_open, zp, template=True)
        fp_r = math.hypot(det.x_mm, det.y_mm) / 330.0
        fwhm = camera.psf_fwhm(spec.seeing / scale, x, y, det.nx, det.ny, fp_r)
        fwhm_src = np.sqrt(fwhm**2 + (src["size"].to_numpy() / scale) ** 2)
        camera.render_stamps(img, x, y, flux, fwhm, _BETA, extent_sigma=src["size"].to_numpy() / scale / 2.3548)
        sky_e = 10 ** (-0.4 * (SKY_MAG[band] + spec.sky_offset - ZERO_POINTS[band] - zp)) * scale**2 * t_open
        img += np.float32(sky_e)
        on = (x >= -0.5) & (x < det.nx - 0.5) & (y >= -0.5) & (y < det.ny - 0.5)
        rn2 = float(np.mean([a.read_noise for a in sig.amps])) ** 2
        neff = camera.stamp_neff(float(np.median(fwhm)), _BETA) * (fwhm / np.median(fwhm)) ** 2
        full_well = min(a.saturation * g for a, g in zip(sig.amps, sig.gain_true, strict=False))
        peak = flux / (neff / 2.0)  # generous estimate of the peak pixel
        bright = [(x[k], y[k], k) for k in np.nonzero(on & (peak > 0.5 * full_well))[0]]
        truth = _truth(
            src[on],
            x[on],
            y[on],
            flux[on],
            tflux[on],
            fwhm_src[on],
            neff[on] * (sky_e + rn2),
            np.zeros(on.sum(), bool),
        )
    elif spec.image_type == "FLAT":
        img += np.float32(spec.flat_level)
    img *= sig.response
    img += np.float32(0.002 * spec.dark_time)
    sig.add_hot_columns(img, spec.dark_time)
    camera.add_noise(img, rng)
    if cosmic_rays and spec.dark_time > 1:
        camera.add_cosmic_rays(img, int(rng.poisson(0.6 * spec.dark_time)), rng)
    sat = np.zeros(len(truth), bool)
    for xb, yb, _k in bright:
        amp = next(
            a for a in sig.amps if a.bbox[0] <= round(xb) < a.bbox[1] and a.bbox[2] <= round(yb) < a.bbox[3]
        )
        fw = amp.saturation * float(sig.gain_true[amp.index])
        if camera.bleed_saturation(img, fw, xb, yb, 12):
            sat |= (np.abs(truth["x"] - xb) < 0.01) & (np.abs(truth["y"] - yb) < 0.01)
    truth["saturated"] = sat
    return SimulatedRaw(primary_header(spec, det.id), camera.to_segments(img, sig, rng), truth)


def simulate_ccd(
    spec: ExposureSpec,
    detector: int | str,
    sky: SkyModel | None,
    seed: int,
    out_path: str | Path,
    compress: str | None = "RICE",
) -> SimulatedRaw:
    """Render one CCD and write its raw file atomically; return the rendered raw."""
    raw = render_exposure(spec, detector, sky, seed)
    write_raw((raw.header, raw.segments), out_path, compress=compress)
    return raw
