"""Rubin cameras: detectors, amplifiers, filters and per-CCD sky geometry.

The numbers come from obs_lsst's camera definition (``data/camera/``, copied from the
project's shared data). Three instruments are known: ``LATISS`` (1 CCD), ``LSSTComCam``
(9 CCDs, raft R22) and ``LSSTCam`` (189 science CCDs; 8 wavefront and 8 guider CCDs are
listed but never fanned out to).

Sky geometry
------------
:meth:`Instrument.sky_wcs` gives the raw (pre-astrometry) WCS of a CCD from the boresight,
the rotator angle and the camera geometry, the way obs_base's ``createInitialSkyWcs`` does:
a gnomonic projection about the boresight, the CCD's place and yaw in the focal plane, the
plate scale and the camera's radial field-angle polynomial, written as an exact-to-1e-5-pixel
SIP distortion (forward and inverse). Orientation: ``rotation`` is the position angle of
focal-plane +Y measured from North through East (``ROTCOORD = sky``); at 0, +Y points North
and +X West, so images have standard sky parity (East left when North is up). LATISS has
the opposite focal-plane parity.
"""

from __future__ import annotations

import csv
import dataclasses
import functools
import importlib.resources
import math
from collections.abc import Iterable

import numpy as np
import yaml
from astropy.wcs import WCS

from .errors import BadInputError

__all__ = [
    "Amplifier",
    "Detector",
    "Instrument",
    "get_instrument",
    "instrument_names",
    "normalize_instrument",
]


@dataclasses.dataclass(frozen=True)
class Amplifier:
    """One amplifier segment of a CCD (a row of ``<instrument>_amps.csv``).

    Boxes are 0-based, end-exclusive ``(x0, x1, y0, y1)`` in the raw segment array
    (``data``, ``serial_overscan``, ``parallel_overscan``) or in the assembled CCD
    (``bbox``), with ``flip_x``/``flip_y`` applied to the raw data before placing it.
    """

    name: str
    index: int
    hdu: int
    extname: str
    raw_nx: int
    raw_ny: int
    data: tuple[int, int, int, int]
    serial_overscan: tuple[int, int, int, int]
    parallel_overscan: tuple[int, int, int, int]
    bbox: tuple[int, int, int, int]
    flip_x: bool
    flip_y: bool
    gain: float
    read_noise: float
    saturation: float
    hdr_detsec: str
    hdr_dtv: tuple[float, float]
    hdr_dtm: tuple[float, float]
    datasec: str

    def segment_view(self, arr: np.ndarray) -> np.ndarray:
        """This amplifier's box of an assembled CCD array (``bbox``), flipped into raw-segment
        orientation: a view, so writing into it writes the assembled array."""
        x0, x1, y0, y1 = self.bbox
        view = arr[y0:y1, x0:x1]
        if self.flip_x:
            view = view[:, ::-1]
        if self.flip_y:
            view = view[::-1, :]
        return view


@dataclasses.dataclass(frozen=True)
class Detector:
    """One CCD of a camera (a row of ``<instrument>.csv``)."""

    id: int
    name: str
    raft: str
    sensor: str
    purpose: str
    ccd_type: str
    physical_type: str
    serial: str
    x_mm: float
    y_mm: float
    yaw_deg: float
    nx: int
    ny: int
    refpos_x: float
    refpos_y: float
    pixel_size_mm: float

    @property
    def is_science(self) -> bool:
        """`True` for science CCDs (not wavefront or guider)."""
        return self.purpose == "SCIENCE"


def _box(spec: str) -> tuple[int, int, int, int]:
    """Convert a FITS section ``[x0:x1,y0:y1]`` (1-based, inclusive) to 0-based ``(x0, x1, y0, y1)``."""
    xs, ys = spec.strip("[]").split(",")
    x0, x1 = (int(v) for v in xs.split(":"))
    y0, y1 = (int(v) for v in ys.split(":"))
    return min(x0, x1) - 1, max(x0, x1), min(y0, y1) - 1, max(y0, y1)


# Physical filters -> band, as the butler knows them for each camera.
_FILTERS = {
    "LSSTCam": {"u_24": "u", "g_6": "g", "r_57": "r", "i_39": "i", "z_20": "z", "y_10": "y"},
    "LSSTComCam": {"u_02": "u", "g_01": "g", "r_03": "r", "i_06": "i", "z_03": "z", "y_04": "y"},
    "LATISS": {
        "SDSSg_65mm~empty": "g",
        "SDSSr_65mm~empty": "r",
        "SDSSi_65mm~empty": "i",
        "SDSSz_65mm~empty": "z",
        "SDSSy_65mm~empty": "y",
    },
}
_CAMCODES = {"LSSTCam": "MC", "LSSTComCam": "CC", "LATISS": "AT"}
# Names the camera writes in INSTRUME, and other spellings people use, -> butler name.
_ALIASES = {
    "lsstcam": "LSSTCam",
    "lsstcomcam": "LSSTComCam",
    "comcam": "LSSTComCam",
    "latiss": "LATISS",
}


def instrument_names() -> list[str]:
    """Butler names of the known instruments."""
    return list(_CAMCODES)


def normalize_instrument(name: str, field: str = "instrument") -> str:
    """Map an instrument name as events, headers or people write it to the butler name.

    Raises
    ------
    BadInputError
        Raised if the name is not one of the known cameras.
    """
    canon = _ALIASES.get((name or "").strip().lower())
    if canon is None:
        raise BadInputError(field, f"unknown instrument {name!r}", f"use one of {', '.join(_CAMCODES)}")
    return canon


class Instrument:
    """A camera's detectors, amplifiers, filters and optics.

    Instances are immutable after construction and safe to share between threads; get them
    with :func:`get_instrument`, which caches one per name.
    """

    def __init__(self, name: str, detectors: Iterable[Detector], amps: dict[int, tuple[Amplifier, ...]],
                 optics: dict):
        self.name = name
        self.camcode = _CAMCODES[name]
        self.filters = dict(_FILTERS[name])
        self._detectors = {d.id: d for d in detectors}
        self._by_name = {d.name: d for d in self._detectors.values()}
        self._amps = amps
        self.plate_scale_arcsec_per_mm = float(optics["plate_scale_arcsec_per_mm"])
        self.parity_flip = bool(optics.get("focal_plane_parity", False))
        coeffs = list(optics["field_angle_transform"]["coeffs"]) + [0.0] * 6
        self._c3, self._c5 = float(coeffs[3]), float(coeffs[5])

    def __repr__(self) -> str:
        return f"Instrument({self.name!r})"

    @property
    def detectors(self) -> list[Detector]:
        """Every detector, in id order (science, wavefront and guider)."""
        return [self._detectors[k] for k in sorted(self._detectors)]

    @property
    def science_detectors(self) -> list[Detector]:
        """The science CCDs, in id order: the ones AP jobs run on."""
        return [d for d in self.detectors if d.is_science]

    def detector(self, key: int | str, field: str = "detector") -> Detector:
        """Look a detector up by id (``94``, ``"94"``) or name (``"R22_S11"``).

        Raises
        ------
        BadInputError
            Raised if the camera has no such detector.
        """
        if isinstance(key, str) and key.strip().lstrip("-").isdigit():
            key = int(key)
        found = self._detectors.get(key) if isinstance(key, int) else self._by_name.get(str(key).strip())
        if found is None:
            raise BadInputError(field, f"{self.name} has no detector {key!r}",
                                f"use an id 0-{max(self._detectors)} or a name like {self.detectors[0].name}")
        return found

    def amplifiers(self, detector: int | str) -> tuple[Amplifier, ...]:
        """The amplifiers of a detector, in HDU order."""
        return self._amps[self.detector(detector).id]

    def band_of(self, physical_filter: str, field: str = "filter") -> str:
        """Band letter of a physical filter.

        Raises
        ------
        BadInputError
            Raised if this camera has no such filter.
        """
        band = self.filters.get(physical_filter)
        if band is None:
            raise BadInputError(field, f"{self.name} has no filter {physical_filter!r}",
                                f"use one of {', '.join(self.filters)}")
        return band

    # ----------------------------------------------------------------- geometry
    @property
    def pixel_scale_arcsec(self) -> float:
        """On-axis pixel scale, arcsec per pixel."""
        return self.plate_scale_arcsec_per_mm * self.detectors[0].pixel_size_mm

    def sky_wcs(self, detector: int | str | Detector, ra: float, dec: float, rotation: float) -> WCS:
        """Raw sky WCS of a CCD (0-based pixel coordinates of the assembled image).

        Parameters
        ----------
        detector : `int`, `str` or `Detector`
            The CCD.
        ra, dec : `float`
            Boresight (optical axis), degrees ICRS.
        rotation : `float`
            Sky rotator angle (``ROTPA``, ``ROTCOORD = sky``), degrees.

        Returns
        -------
        wcs : `astropy.wcs.WCS`
            A TAN-SIP WCS; use ``pixel_to_world_values``/``world_to_pixel_values`` (0-based).
        """
        det = detector if isinstance(detector, Detector) else self.detector(detector)
        p = det.pixel_size_mm
        s_rad = math.radians(self.plate_scale_arcsec_per_mm / 3600.0) * p  # radians per pixel
        yaw = math.radians(det.yaw_deg)
        # detector pixel offsets -> focal-plane pixel offsets (rotation by the CCD's yaw)
        r_yaw = np.array([[math.cos(yaw), -math.sin(yaw)], [math.sin(yaw), math.cos(yaw)]])
        theta = math.radians(rotation)
        x_dir = np.array([-math.cos(theta), math.sin(theta)])  # (xi east, eta north) of focal-plane +X
        y_dir = np.array([math.sin(theta), math.cos(theta)])   # ... of focal-plane +Y
        if self.parity_flip:
            x_dir = -x_dir
        cd = math.degrees(s_rad) * np.column_stack([x_dir, y_dir]) @ r_yaw
        # pixel of the optical axis (focal-plane origin) in this CCD's frame
        fp_origin_pix = -np.linalg.solve(r_yaw, np.array([det.x_mm, det.y_mm]) / p)
        crpix = fp_origin_pix + np.array([det.refpos_x, det.refpos_y])

        w = WCS(naxis=2)
        w.wcs.ctype = ["RA---TAN-SIP", "DEC--TAN-SIP"]
        w.wcs.crval = [ra % 360.0, dec]
        w.wcs.crpix = crpix + 1.0  # FITS is 1-based
        w.wcs.cd = cd
        w.wcs.radesys = "ICRS"
        w.sip = self._radial_sip(s_rad, p, crpix + 1.0)
        w.pixel_shape = (det.nx, det.ny)
        return w

    def _radial_sip(self, s_rad: float, p: float, crpix: np.ndarray):
        """SIP polynomials for the radial field-angle distortion plus the gnomonic tan(theta).

        With rho the distance from the optical axis in pixels, the projection-plane radius is
        ``rho * (1 + A rho^2 + B rho^4)`` to O(1e-5 px) over the whole focal plane, and its
        inverse ``rho' * (1 - A rho'^2 + (3A^2 - B) rho'^4)``.
        """
        from astropy.wcs import Sip

        a_coef = self._c3 * p**2 + s_rad**2 / 3.0
        b_coef = self._c5 * p**4 + self._c3 * p**2 * s_rad**2 + 2.0 * s_rad**4 / 15.0
        ainv, binv = -a_coef, 3.0 * a_coef**2 - b_coef

        def polys(a, b):
            pa, pb = np.zeros((6, 6)), np.zeros((6, 6))
            # u (A rho^2 + B rho^4), rho^2 = u^2 + v^2
            pa[3, 0] = pa[1, 2] = a
            pa[5, 0], pa[3, 2], pa[1, 4] = b, 2 * b, b
            pb[0, 3] = pb[2, 1] = a
            pb[0, 5], pb[2, 3], pb[4, 1] = b, 2 * b, b
            return pa, pb

        fa, fb = polys(a_coef, b_coef)
        ia, ib = polys(ainv, binv)
        return Sip(fa, fb, ia, ib, crpix)

    def footprint(self, detector: int | str | Detector, ra: float, dec: float, rotation: float,
                  pad_arcsec: float = 0.0) -> np.ndarray:
        """Sky corners of a CCD, padded outward by ``pad_arcsec``.

        Returns
        -------
        corners : `numpy.ndarray`
            Shape (4, 2): (ra, dec) in degrees, counter-clockwise in pixel space.
        """
        det = detector if isinstance(detector, Detector) else self.detector(detector)
        pad = pad_arcsec / self.pixel_scale_arcsec
        xs = np.array([-0.5 - pad, det.nx - 0.5 + pad, det.nx - 0.5 + pad, -0.5 - pad])
        ys = np.array([-0.5 - pad, -0.5 - pad, det.ny - 0.5 + pad, det.ny - 0.5 + pad])
        r, d = self.sky_wcs(det, ra, dec, rotation).pixel_to_world_values(xs, ys)
        return np.column_stack([r, d])


def _read_csv(name: str) -> list[dict[str, str]]:
    ref = importlib.resources.files("apbatch") / "data" / "camera" / name
    with ref.open("r", encoding="utf-8") as fh:
        return list(csv.DictReader(fh))


@functools.cache
def get_instrument(name: str) -> Instrument:
    """Load (once per process) the camera definition for ``name``.

    Raises
    ------
    BadInputError
        Raised if ``name`` is not a known instrument.
    """
    canon = normalize_instrument(name)
    dets = [
        Detector(
            id=int(r["detector_id"]), name=r["detector_name"], raft=r["raft"], sensor=r["sensor"],
            purpose=r["purpose"], ccd_type=r["ccd_type"], physical_type=r["physical_type"],
            serial=r["serial"], x_mm=float(r["x_mm"]), y_mm=float(r["y_mm"]), yaw_deg=float(r["yaw_deg"]),
            nx=int(r["nx"]), ny=int(r["ny"]), refpos_x=float(r["refpos_x_pix"]),
            refpos_y=float(r["refpos_y_pix"]), pixel_size_mm=float(r["pixel_size_um"]) / 1000.0,
        )
        for r in _read_csv(f"{canon}.csv")
    ]
    amps: dict[int, list[Amplifier]] = {}
    for r in _read_csv(f"{canon}_amps.csv"):
        amps.setdefault(int(r["detector_id"]), []).append(
            Amplifier(
                name=r["amp_name"], index=int(r["amp_index"]), hdu=int(r["hdu"]), extname=r["extname"],
                raw_nx=int(r["raw_nx"]), raw_ny=int(r["raw_ny"]), data=_box(r["raw_datasec"]),
                serial_overscan=_box(r["raw_serial_overscan_sec"]),
                parallel_overscan=_box(r["raw_parallel_overscan_sec"]),
                bbox=(int(r["bbox_x0"]), int(r["bbox_x1"]) + 1, int(r["bbox_y0"]), int(r["bbox_y1"]) + 1),
                flip_x=r["flip_x"] == "True", flip_y=r["flip_y"] == "True",
                gain=float(r["gain"]), read_noise=float(r["read_noise"]), saturation=float(r["saturation"]),
                hdr_detsec=r["hdr_detsec"],
                hdr_dtv=(float(r["hdr_dtv1"] or 0), float(r["hdr_dtv2"] or 0)),
                hdr_dtm=(float(r["hdr_dtm1_1"] or 0), float(r["hdr_dtm2_2"] or 0)),
                datasec=r["raw_datasec"],
            )
        )
    ref = importlib.resources.files("apbatch") / "data" / "camera" / f"{canon}_optics.yaml"
    optics = yaml.safe_load(ref.read_text(encoding="utf-8"))
    amps_by_hdu = {k: tuple(sorted(v, key=lambda a: a.hdu)) for k, v in amps.items()}
    return Instrument(canon, dets, amps_by_hdu, optics)
