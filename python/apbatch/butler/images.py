"""Conversion between `apbatch.image.Image` and the public Rubin image types of ``lsst-images``.

Calibrated and difference images are stored as `lsst.images.VisitImage` and
`lsst.images.DifferenceImage` through lsst-images' own butler formatter, so anyone with
only ``lsst-daf-butler`` and ``lsst-images`` can read them. What the conversion fills in:

* the image unit from metadata ``BUNIT`` (``nJy`` or ``electron``), variance in unit²;
* the mask planes of :class:`~apbatch.image.MaskBits`, named and described as Rubin's
  visit/difference images name them (``SAT`` is ``SATURATED``, ``CR`` ``COSMIC_RAY``...);
* the sky projection from the image's astropy WCS (TAN-SIP), on the detector's pixel frame;
* the detector (pixels -> focal plane from the camera geometry; focal plane -> field angle
  by the plate scale alone: the radial distortion lives in the WCS);
* the observation (instrument, filter, times, exposure time, pointing) from the metadata
  the job's ISR writes (``FILTER``, ``MJDBEG``, ``EXPTIME``, ``RA``...);
* a Gaussian PSF of metadata ``PSFSIGMA`` (pixels); without it a nominal 0.7" FWHM PSF is
  stored and metadata ``PSFNOMNL = True`` says so.
"""

from __future__ import annotations

import functools
import logging
import math
from typing import Any

import astropy.units as u
import numpy as np
from astropy.coordinates import SkyCoord
from astropy.time import Time
from astropy.wcs import WCS

from ..errors import BadInputError
from ..image import Image, MaskBits
from ..instruments import Instrument

__all__ = ["from_visit_image", "make_detector", "mask_schema", "to_difference_image", "to_visit_image"]

log = logging.getLogger(__name__)

_BUNITS = {"nJy": u.nJy, "electron": u.electron}  # BUNIT spellings the job writes
_UNITS = {k.lower(): v for k, v in _BUNITS.items()}
_NOMINAL_FWHM_ARCSEC = 0.7
_SIGMA_PER_FWHM = 1.0 / (2.0 * math.sqrt(2.0 * math.log(2.0)))
# metadata the conversion turns into typed fields; everything else is kept as metadata
_OBS_KEYS = ("INSTRUME", "DETECTOR", "DETNAME", "OBSID", "EXPID", "VISIT", "GROUPID", "FILTER", "BAND",
             "EXPTIME", "MJDBEG", "MJDEND", "RA", "DEC", "ROTPA", "AIRMASS", "BUNIT")


@functools.cache
def mask_schema():
    """The `lsst.images.MaskSchema` of :class:`~apbatch.image.MaskBits`: one plane per bit, in bit order."""
    from lsst.images import MaskPlane, MaskSchema, get_legacy_difference_image_mask_planes  # noqa: PLC0415

    rubin = get_legacy_difference_image_mask_planes()  # afw name -> Rubin's plane (MaskBits uses afw names)
    planes = [rubin.get(b.name) or MaskPlane(b.name, f"apbatch mask bit {b.name}.") for b in MaskBits]
    return MaskSchema(planes, dtype=np.uint8)


def _byte_layout(schema) -> bool:
    """`True` if MaskBits bit ``n`` is plane ``n`` of ``schema``, stored as bit ``n % 8`` of byte ``n // 8``.

    Then a MaskBits mask's little-endian bytes are the lsst-images mask array (no per-plane loop).
    """
    return schema.dtype == np.uint8 and all(int(b) == 1 << n for n, b in enumerate(MaskBits)) and all(
        schema.bit(p.name).index == n // 8 and int(schema.bit(p.name).mask) == 1 << (n % 8)
        for n, p in enumerate(schema) if p is not None)


def _pack_mask(mask: np.ndarray) -> np.ndarray:
    """MaskBits int mask (ny, nx) -> lsst-images uint8 array (ny, nx, mask_size) (not C-contiguous)."""
    schema = mask_schema()
    unknown = int(np.bitwise_or.reduce(mask, axis=None)) & ~int(sum(MaskBits))
    if unknown:
        raise BadInputError("mask", f"bits {unknown:#x} are not MaskBits", "set only apbatch.image.MaskBits")
    if _byte_layout(schema):  # MaskBits bit n is schema plane n: byte k of the mask is element k
        # element-major memory ((mask_size, ny, nx) transposed): one pass per byte, 6x faster than
        # slicing the mask's bytes, and lsst-images' per-plane FITS packing reads it 25% faster
        out = np.empty((schema.mask_size,) + mask.shape, np.uint8)
        for k in range(schema.mask_size):
            np.right_shift(mask, 8 * k, out=out[k], casting="unsafe")  # uint8 keeps the low byte
        return out.transpose(1, 2, 0)
    out = np.zeros(mask.shape + (schema.mask_size,), np.uint8)
    for bit, plane in zip(MaskBits, schema, strict=True):
        b = schema.bit(plane.name)
        out[..., b.index] |= np.where(mask & int(bit), b.mask, 0).astype(np.uint8)
    return out


def _unpack_mask(array: np.ndarray, schema) -> np.ndarray:
    """lsst-images mask array -> MaskBits int32 mask; planes MaskBits does not know are dropped."""
    ours = mask_schema()
    if schema == ours and _byte_layout(schema):
        out = np.zeros(array.shape[:2], np.int32)
        for k in range(schema.mask_size):
            out |= array[..., k].astype(np.int32) << (8 * k)
        return out
    out = np.zeros(array.shape[:2], np.int32)
    by_name = {p.name: bit for bit, p in zip(MaskBits, ours, strict=True)}
    for plane in schema:
        if plane is not None and plane.name in by_name:
            b = schema.bit(plane.name)
            out[(array[..., b.index] & b.mask) != 0] |= int(by_name[plane.name])
    return out


def make_detector(camera: Instrument, instrument: str, detector: int | str, visit: int | None = None):
    """An `lsst.images.cameras.Detector` of one CCD of ``camera`` (``instrument``: butler name).

    Pixels map to the focal plane (mm) by the CCD's place, yaw and pixel size; the focal plane
    to field angle (radians) by the plate scale and parity (no radial distortion).
    """
    import starlink.Ast as Ast  # noqa: PLC0415 (lsst-images' own AST backend)
    from lsst.images import Box  # noqa: PLC0415
    from lsst.images.cameras import (  # noqa: PLC0415
        CameraFrameSetSerializationModel,
        DetectorAttributes,
        DetectorSerializationModel,
        DetectorType,
        Orientation,
    )
    from lsst.images.serialization import DetachedArchive  # noqa: PLC0415

    det = camera.detector(detector)
    frames = Ast.FrameSet(Ast.Frame(2, "Ident=FOCAL_PLANE,Unit(1)=mm,Unit(2)=mm"))
    scale = math.radians(camera.plate_scale_arcsec_per_mm / 3600.0)
    frames.addframe(1, Ast.MatrixMap([-scale if camera.parity_flip else scale, scale]),
                    Ast.Frame(2, "Ident=FIELD_ANGLE,Unit(1)=rad,Unit(2)=rad"))
    yaw = math.radians(det.yaw_deg)
    rot = det.pixel_size_mm * np.array([[math.cos(yaw), -math.sin(yaw)], [math.sin(yaw), math.cos(yaw)]])
    pix_to_fp = Ast.CmpMap(Ast.CmpMap(Ast.ShiftMap([-det.refpos_x, -det.refpos_y]), Ast.MatrixMap(rot), True),
                           Ast.ShiftMap([det.x_mm, det.y_mm]), True)
    pix_to_fp.invert()
    frames.addframe(1, pix_to_fp, Ast.Frame(
        2, f"Ident=DETECTOR_{det.id},Bottom(1)=0,Top(1)={det.nx},Bottom(2)=0,Top(2)={det.ny}"))
    lines: list[str] = []
    sink = type("Sink", (), {"astsink": lambda self, line: lines.append(line)})()
    Ast.Channel(None, sink).write(frames)
    attributes = DetectorAttributes(
        name=det.name, id=det.id, type=DetectorType(det.purpose),
        serial=det.serial, bbox=Box.factory[0:det.ny, 0:det.nx], pixel_size=det.pixel_size_mm,
        physical_type=det.physical_type,
        orientation=Orientation(focal_plane_x=det.x_mm, focal_plane_y=det.y_mm, focal_plane_z=0.0,
                                pixel_reference_x=det.refpos_x, pixel_reference_y=det.refpos_y,
                                yaw=det.yaw_deg * u.deg),
    )
    model = DetectorSerializationModel(
        attributes=attributes, visit=visit,
        frames=CameraFrameSetSerializationModel(instrument=instrument, ast="\n".join(lines) + "\n"))
    return model.deserialize(DetachedArchive())


def _unit(img: Image, what: str):
    bunit = str(img.metadata.get("BUNIT", "")).strip()
    unit = _UNITS.get(bunit.lower())
    if unit is None:
        raise BadInputError(f"{what}.metadata.BUNIT", f"is {bunit or 'missing'!r}", "use 'nJy' or 'electron'")
    return unit


def _time(mjd: Any) -> Time | None:
    return Time(float(mjd), format="mjd", scale="tai") if mjd is not None else None


def _obs_info(meta: dict, instrument: str, visit: int, det, what: str):
    from astro_metadata_translator import ObservationInfo  # noqa: PLC0415

    physical_filter = meta.get("FILTER")
    if not physical_filter:
        raise BadInputError(f"{what}.metadata.FILTER", "missing", "keep the ISR metadata on the image")
    kw: dict[str, Any] = {
        "instrument": instrument, "physical_filter": str(physical_filter), "visit_id": int(visit),
        "detector_num": det.id, "detector_name": det.sensor, "detector_group": det.raft,
        "detector_unique_name": det.name, "detector_serial": det.serial, "observation_type": "science",
        "datetime_begin": _time(meta.get("MJDBEG")), "datetime_end": _time(meta.get("MJDEND")),
        "exposure_time": float(meta["EXPTIME"]) * u.s if meta.get("EXPTIME") is not None else None,
        "observation_id": meta.get("OBSID"), "exposure_group": meta.get("GROUPID"),
        "exposure_id": int(meta["EXPID"]) if meta.get("EXPID") is not None else None,
        "boresight_airmass": meta.get("AIRMASS"),
        "boresight_rotation_angle": float(meta["ROTPA"]) * u.deg if meta.get("ROTPA") is not None else None,
        "boresight_rotation_coord": "sky" if meta.get("ROTPA") is not None else None,
    }
    if meta.get("RA") is not None and meta.get("DEC") is not None:
        kw["tracking_radec"] = SkyCoord(float(meta["RA"]), float(meta["DEC"]), unit="deg", frame="icrs")
    return ObservationInfo(**{k: v for k, v in kw.items() if v is not None})


def _psf(meta: dict, camera: Instrument, bbox):
    from lsst.images.psfs import GaussianPointSpreadFunction  # noqa: PLC0415

    sigma = meta.get("PSFSIGMA")
    if sigma is None or not np.isfinite(float(sigma)) or float(sigma) <= 0:
        log.warning("no PSFSIGMA in the image metadata: storing a nominal %.1f\" FWHM Gaussian PSF",
                    _NOMINAL_FWHM_ARCSEC)
        sigma = _NOMINAL_FWHM_ARCSEC * _SIGMA_PER_FWHM / camera.pixel_scale_arcsec
    stamp = 2 * int(math.ceil(5.0 * float(sigma))) + 1
    return GaussianPointSpreadFunction(float(sigma), bounds=bbox, stamp_size=stamp), "PSFSIGMA" not in meta


def to_visit_image(img: Image, camera: Instrument, instrument: str, visit: int, detector: int | str,
                   *, difference: bool = False):
    """``img`` as an `lsst.images.VisitImage` (or `~lsst.images.DifferenceImage`).

    Parameters
    ----------
    img : `apbatch.image.Image`
        A CCD image with WCS and the job's metadata (``BUNIT``, ``FILTER``...). Arrays are
        shared where their dtype allows (image, variance), not copied.
    camera : `apbatch.instruments.Instrument`
        Camera geometry of the CCD.
    instrument : `str`
        Butler instrument name (may be a simulated camera, e.g. ``LSSTComCamSim``).
    visit : `int`
        Visit id.
    detector : `int` or `str`
        Detector id or name.
    difference : `bool`
        Make a `~lsst.images.DifferenceImage`.

    Returns
    -------
    image : `lsst.images.VisitImage` or `lsst.images.DifferenceImage`

    Raises
    ------
    BadInputError
        Raised if the image has no WCS, no or an unknown ``BUNIT``, no ``FILTER``, or mask
        bits that are not `~apbatch.image.MaskBits`.
    """
    from lsst.images import (  # noqa: PLC0415
        DifferenceImage,
        Mask,
        SkyProjection,  # noqa: PLC0415
        VisitImage,
    )
    from lsst.images import Image as LsstImage  # noqa: PLC0415

    what = "diffim" if difference else "calexp"
    if img.wcs is None:
        raise BadInputError(f"{what}.wcs", "missing", "a calibrated image needs its sky WCS")
    unit = _unit(img, what)
    cam_det = camera.detector(detector)
    det = make_detector(camera, instrument, cam_det.id, visit)
    if img.shape != (cam_det.ny, cam_det.nx):
        raise BadInputError(f"{what}.shape", f"is {img.shape}, {cam_det.name} is {(cam_det.ny, cam_det.nx)}",
                            "store whole CCDs")
    projection = SkyProjection.from_fits_wcs(img.wcs, det.frame, pixel_bounds=det.bbox)
    meta = {str(k): (v.item() if isinstance(v, np.generic) else v) for k, v in img.metadata.items()
            if k not in _OBS_KEYS and isinstance(v, bool | int | float | str | np.generic)}
    psf, nominal = _psf(img.metadata, camera, det.bbox)
    if nominal:
        meta["PSFNOMNL"] = True
    band = img.metadata.get("BAND") or camera.filters.get(str(img.metadata.get("FILTER")), "unknown")
    kw = {
        "mask": Mask(_pack_mask(img.mask), schema=mask_schema()),
        "variance": LsstImage(img.variance, unit=unit**2),
        "sky_projection": projection, "obs_info": _obs_info(img.metadata, instrument, visit, cam_det, what),
        "psf": psf, "detector": det, "band": str(band), "metadata": meta,
    }
    cls = DifferenceImage if difference else VisitImage
    return cls(LsstImage(img.image, unit=unit), **kw)


def to_difference_image(img: Image, camera: Instrument, instrument: str, visit: int, detector: int | str):
    """``img`` as an `lsst.images.DifferenceImage` (see :func:`to_visit_image`)."""
    return to_visit_image(img, camera, instrument, visit, detector, difference=True)


def from_visit_image(image) -> Image:
    """An `lsst.images.VisitImage` (or a `~lsst.images.DifferenceImage`) as an `apbatch.image.Image`.

    The metadata gets back ``BUNIT`` (``nJy`` or ``electron``), ``FILTER``, ``BAND``,
    ``PSFSIGMA`` (Gaussian PSFs) and the stored metadata; the WCS is the FITS form of the
    sky projection (or its FITS approximation).
    """
    from lsst.images.psfs import GaussianPointSpreadFunction  # noqa: PLC0415

    fits_wcs = image.sky_projection.as_fits_wcs(image.bbox)
    wcs = WCS(fits_wcs.to_header(relax=True)) if fits_wcs is not None else None
    meta = dict(image.metadata)
    bunit = next((name for name, unit in _BUNITS.items() if image.unit == unit), image.unit.to_string())
    meta.update(BUNIT=bunit, FILTER=image.physical_filter, BAND=image.band)
    psf = image.psf
    if isinstance(psf, GaussianPointSpreadFunction):
        meta["PSFSIGMA"] = psf.sigma
    return Image(image.image.array, image.variance.array, _unpack_mask(image.mask.array, image.mask.schema),
                 wcs, meta)
