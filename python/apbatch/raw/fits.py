"""Reading and writing raw files (plain or RICE tile-compressed multi-extension FITS)."""

from __future__ import annotations

from collections.abc import Mapping, Sequence
from pathlib import Path
from typing import Any

import fitsio
import numpy as np

from ..atomic import replacing
from ..errors import BadInputError
from ..instruments import Amplifier, Detector, get_instrument
from .header import STRUCTURAL_KEYS, camera_name, translate_header
from .model import RawExposure, RawSegment

__all__ = ["read_raw", "read_raw_header", "segment_header", "write_raw"]

# ------------------------------------------------------------------ FITS I/O
def _header_dict(hdr) -> dict[str, Any]:
    """A fitsio header as an ordered dict, structural cards dropped."""
    return {
        rec["name"]: rec.get("value")
        for rec in hdr.records()
        if rec.get("name") and rec["name"].upper() not in STRUCTURAL_KEYS
    }


def _bad(path, where: str, problem: str) -> BadInputError:
    return BadInputError(f"{path}{where}", problem, "the raw is truncated or corrupt: deliver it again")


def read_raw_header(path: str | Path) -> dict[str, Any]:
    """Primary header of a raw file as a dict (structural cards dropped).

    Raises
    ------
    BadInputError
        Raised if the file is missing or not FITS.
    """
    try:
        with fitsio.FITS(str(path)) as f:
            return _header_dict(f[0].read_header())
    except (OSError, ValueError) as exc:
        raise _bad(path, "", f"cannot read the primary header: {str(exc).splitlines()[0]}") from None


def read_raw(path: str | Path, instrument: str | None = None, verify_checksum: bool = True) -> RawExposure:
    """Read a raw CCD file: primary header, translated metadata and every amplifier segment.

    Parameters
    ----------
    path : `str` or `Path`
        Multi-extension FITS file, one image HDU (plain or tile-compressed) per amplifier.
    instrument : `str`, optional
        Override for the header's ``INSTRUME``.
    verify_checksum : `bool`
        Check ``DATASUM``/``CHECKSUM`` of HDUs that carry them.

    Returns
    -------
    raw : `RawExposure`
        Segments in the camera's HDU order, ``data`` the full ``(raw_ny, raw_nx)`` int32 array.

    Raises
    ------
    BadInputError
        Raised if the file cannot be read, is truncated or corrupt, lacks a segment, or a
        segment has the wrong shape or ``DATASEC`` or non-finite pixels; the message names the
        file and HDU.
    """
    try:
        fits = fitsio.FITS(str(path))
    except (OSError, ValueError) as exc:
        raise _bad(path, "", f"not a readable FITS file: {str(exc).splitlines()[0]}") from None
    with fits:
        try:
            header = _header_dict(fits[0].read_header())
        except (OSError, ValueError) as exc:
            raise _bad(path, "[0]", f"cannot read the primary header: {exc}") from None
        meta = translate_header(header, instrument)
        amps = get_instrument(camera_name(meta.instrument)).amplifiers(meta.detector)
        index: dict[str, int] = {}
        for k in range(1, len(fits)):
            try:
                index[str(fits[k].get_extname()).strip()] = k
            except (OSError, ValueError):
                continue
        segments = []
        for amp in amps:
            i = index.get(amp.extname)
            if i is None:
                raise _bad(
                    path,
                    f"[{amp.extname}]",
                    f"segment {amp.extname} is missing ({len(amps)} expected for {meta.detector_name})",
                )
            where = f"[HDU {i} {amp.extname}]"
            hdu = fits[i]
            try:
                fits_header = hdu.read_header()
                seg_header = _header_dict(fits_header)
                dims = tuple(hdu.get_dims())
                if dims != (amp.raw_ny, amp.raw_nx):
                    raise _bad(path, where, f"shape {dims}, expected {(amp.raw_ny, amp.raw_nx)}")
                datasec = str(seg_header.get("DATASEC", "")).strip()
                if datasec != amp.datasec:
                    raise _bad(path, where, f"DATASEC {datasec!r}, expected {amp.datasec!r}")
                if verify_checksum and "DATASUM" in fits_header:
                    hdu.verify_checksum()
                pixels = hdu.read()
                if pixels.dtype.kind == "f" and not np.isfinite(pixels).all():
                    # a camera writes integer ADU: NaN or inf means a broken file, not data
                    # (cast to int32 they would become arbitrary numbers)
                    raise _bad(path, where, f"{int((~np.isfinite(pixels)).sum())} non-finite pixel(s)")
                data = np.asarray(pixels, dtype=np.int32)
            except BadInputError:
                raise
            except (OSError, ValueError) as exc:
                raise _bad(path, where, f"unreadable segment: {str(exc).splitlines()[0]}") from None
            segments.append(RawSegment(amp=amp, data=data, header=seg_header))
    return RawExposure(header=header, metadata=meta, segments=segments)


def segment_header(amp: Amplifier, detector: Detector) -> dict[str, Any]:
    """The per-amplifier keywords a camera writes into a segment HDU."""
    return {
        "EXTNAME": amp.extname,
        "CHANNEL": amp.hdu,
        "CCDSUM": "1 1",
        "DATASEC": amp.datasec,
        "DETSEC": amp.hdr_detsec,
        "DETSIZE": f"[1:{detector.nx},1:{detector.ny}]",
        "DTV1": amp.hdr_dtv[0],
        "DTV2": amp.hdr_dtv[1],
        "DTM1_1": amp.hdr_dtm[0],
        "DTM2_2": amp.hdr_dtm[1],
        "DTM1_2": 0.0,
        "DTM2_1": 0.0,
        "BUNIT": "adu",
        "BSCALE": 1.0,
        "BZERO": 0.0,
    }


def _records(header: Mapping[str, Any]) -> list[dict]:
    recs = []
    for key, value in header.items():
        if str(key).upper() in STRUCTURAL_KEYS:
            continue
        if isinstance(value, np.generic):
            value = value.item()
        recs.append({"name": str(key), "value": value})
    return recs


def write_raw(
    raw_or_parts: RawExposure | tuple[Mapping[str, Any], Sequence[RawSegment]],
    path: str | Path,
    compress: str | None = "RICE",
) -> Path:
    """Write a raw file atomically (temporary file in the same directory, then rename).

    Parameters
    ----------
    raw_or_parts : `RawExposure` or (`dict`, `list` [`RawSegment`])
        The raw, or its primary header and segments (HDU order is the order given).
    path : `str` or `Path`
        Destination; its directory is created.
    compress : `str` or `None`
        Tile compression of the segments (``"RICE"`` like the camera, or `None`).

    Returns
    -------
    path : `Path`
        The written file. Each HDU carries ``CHECKSUM``/``DATASUM``.
    """
    header: Mapping[str, Any]
    segments: Sequence[RawSegment]
    if isinstance(raw_or_parts, RawExposure):
        header, segments = raw_or_parts.header, raw_or_parts.segments
    else:
        header, segments = raw_or_parts
    path = Path(path)
    path.parent.mkdir(parents=True, exist_ok=True)
    with replacing(path, durable=False) as tmp, fitsio.FITS(str(tmp), "rw", clobber=True) as f:
        f.write(None, header=_records(header))
        f[0].write_checksum()
        for seg in segments:
            hdr = dict(seg.header) or {"EXTNAME": seg.amp.extname}
            kw = {"compress": compress, "tile_dims": [1, seg.data.shape[1]]} if compress else {}
            f.write(
                np.ascontiguousarray(seg.data, dtype=np.int32),
                extname=str(hdr.pop("EXTNAME")),
                header=_records(hdr),
                **kw,
            )
            f[-1].write_checksum()
    return path
