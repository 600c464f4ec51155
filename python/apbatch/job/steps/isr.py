"""Instrument signature removal: raw amplifier segments -> calibrated CCD image in electrons.

For every amplifier segment, in this order:

1. check the segment (present once, right shape, finite);
2. flag saturation on the raw ADU (``Amplifier.saturation``, before any subtraction);
3. subtract the serial overscan: the clipped mean of each row of the overscan box (its first
   ``overscan_skip`` columns are skipped because of CTI trailing), averaged over
   ``overscan_smooth`` rows (:func:`overscan_rows`); optionally also the parallel overscan,
   column by column;
4. trim to the data box, flip (``flip_x``/``flip_y``) and place it at ``Amplifier.bbox`` of
   the assembled CCD (obs_lsst convention, see ``shared/data/camera/README.md``);
5. multiply by the gain (ADU -> electrons).

Then for the CCD: subtract the bias, divide by the flat, build the variance
(``max(signal, 0) + read_noise**2``, before the flat), find the dead, hot and saturated
amplifiers (:mod:`.amps`; their pixels are masked ``BAD | NO_DATA``, header ``AMPSBAD``),
combine two snaps (:mod:`.snaps`: snap 2 is modelled as ``a * snap 1 + b(x, y)`` so that
sky and transparency changes are not cosmic rays; headers ``SNAPMODE``, ``SNAPRATI``,
``SNAPDSKY``, ``SNAPNCR``, ``SNAPRCHI``), or find cosmic rays on a single snap by a sharpness
test, find bad columns statistically, and interpolate ``BAD`` and ``CR`` pixels (flagged
``INTRP``) from their unmasked neighbours (not the bad amplifiers). The bias ``mask``
plane's ``BAD`` bits act as the defect list.
"""

from __future__ import annotations

import dataclasses

import numpy as np

from ...errors import BadInputError
from ...image import Image, MaskBits
from ...raw import RawExposure
from . import parallel
from .amps import AmpHealthConfig, amp_statistics, classify_amps, format_bad_amps, mask_amps
from .defects import detect_bad_columns, find_cosmic_rays, grow, interpolate_masked
from .overscan import overscan_rows
from .snaps import SnapConfig, combine_snaps

__all__ = ["IsrConfig", "run_isr"]


@dataclasses.dataclass(frozen=True)
class IsrConfig:
    """Knobs of :func:`run_isr` (defaults suit LSSTCam / LSSTComCam).

    ``cr_nsigma`` (4.5) is the cosmic-ray threshold of the single-snap finder and, on the
    residual of the snap model, of the two-snap combination; ``snaps`` holds that
    combination's other settings (:class:`~.snaps.SnapConfig`: when a visit falls back to the
    single-snap search). ``amp_check`` (True) turns the amplifier-health check on, with the
    thresholds of ``amps`` (:class:`~.amps.AmpHealthConfig`: what makes an amplifier dead,
    hot or saturated).
    """

    overscan_skip: int = 2
    overscan_smooth: int = 9
    parallel_overscan: bool = False
    max_bad_fraction: float = 0.01
    cr_nsigma: float = 4.5
    cr_single: bool = True
    bad_column_nsigma: float = 6.0
    interpolate: bool = True
    snaps: SnapConfig = dataclasses.field(default_factory=SnapConfig)
    amp_check: bool = True
    amps: AmpHealthConfig = dataclasses.field(default_factory=AmpHealthConfig)


def _segment_field(seg_name: str) -> str:
    return f"raw.segments[{seg_name}]"


def _check_segments(raw: RawExposure, amps) -> dict:
    by_name = {}
    for seg in raw.segments:
        name = seg.amp.extname if seg.amp is not None else "?"
        if name in by_name:
            raise BadInputError(_segment_field(name), "segment appears twice", "check the raw file")
        by_name[name] = seg
    missing = [a.extname for a in amps if a.extname not in by_name]
    if missing:
        raise BadInputError(
            "raw.segments",
            f"missing amplifier segments {', '.join(missing)}",
            "the raw file is truncated or incomplete; re-fetch it",
        )
    for a in amps:
        data = by_name[a.extname].data
        if data is None or np.shape(data) != (a.raw_ny, a.raw_nx):
            raise BadInputError(
                _segment_field(a.extname),
                f"shape {np.shape(data)} but {a.raw_ny}x{a.raw_nx} expected",
                "the raw is for another detector type or is corrupt",
            )
    return by_name


def _check_tiling(amps, det) -> None:
    """Raise `BadInputError` unless the amplifier boxes cover the detector's area."""
    area = sum((a.bbox[1] - a.bbox[0]) * (a.bbox[3] - a.bbox[2]) for a in amps)
    if area != det.nx * det.ny:
        raise BadInputError("instrument", "amplifier boxes do not tile the detector", "check the camera data")


def _read_noise2(amps, det) -> np.ndarray:
    """Read noise squared (e-^2) of every pixel of the assembled CCD."""
    rn2 = np.empty((det.ny, det.nx), np.float32)
    for a in amps:
        bx0, bx1, by0, by1 = a.bbox
        rn2[by0:by1, bx0:bx1] = a.read_noise**2
    return rn2


def _add_read_noise2(var: np.ndarray, amps) -> None:
    """Add every amplifier's read noise squared (e-^2) to its box of ``var`` in place.

    The same sums as ``var + _read_noise2(amps, det)`` without a CCD-sized array of it.
    """
    for a in amps:
        bx0, bx1, by0, by1 = a.bbox
        var[by0:by1, bx0:bx1] += np.float32(a.read_noise**2)


def _assemble(raw: RawExposure, amps, det, cfg: IsrConfig):
    """Overscan-subtract, trim, flip, gain-correct and place every segment. Returns (e-, mask)."""
    by_name = _check_segments(raw, amps)
    img = np.empty((det.ny, det.nx), np.float32)
    mask = np.zeros((det.ny, det.nx), np.int32)
    for a in amps:
        data = np.asarray(by_name[a.extname].data)
        x0, x1, y0, y1 = a.data
        raw_sec = data[y0:y1, x0:x1]
        bx0, bx1, by0, by1 = a.bbox
        if raw_sec.shape != (by1 - by0, bx1 - bx0):
            raise BadInputError(
                _segment_field(a.extname),
                "data box does not match the amplifier bbox",
                "camera geometry and raw disagree",
            )
        # views of the destination, flipped so that raw pixels land where they belong
        dst, dmask = img[by0:by1, bx0:bx1], mask[by0:by1, bx0:bx1]
        if a.flip_x:
            dst, dmask = dst[:, ::-1], dmask[:, ::-1]
        if a.flip_y:
            dst, dmask = dst[::-1], dmask[::-1]
        bad = None
        if data.dtype.kind == "f":
            finite = np.isfinite(raw_sec)
            if not finite.all():
                frac = 1.0 - finite.mean()
                if frac > cfg.max_bad_fraction:
                    raise BadInputError(
                        _segment_field(a.extname),
                        f"{frac:.1%} of the pixels are NaN or infinite",
                        "the raw is corrupt; re-fetch it",
                    )
                bad = ~finite
        sat = raw_sec >= a.saturation
        ox0, ox1, oy0, oy1 = a.serial_overscan
        ovs = data[oy0:oy1, ox0 + cfg.overscan_skip : ox1].astype(np.float32)
        if not np.isfinite(ovs).all():
            raise BadInputError(
                _segment_field(a.extname),
                "serial overscan has NaN or infinite values",
                "the raw is corrupt; re-fetch it",
            )
        row = overscan_rows(ovs, cfg.overscan_smooth)
        # overscan rows are the same rows as the data rows (both start at raw y = 0);
        # write (raw - overscan) * gain straight into the assembled image
        np.subtract(raw_sec, row[y0 - oy0 : y1 - oy0, None], out=dst, casting="unsafe")
        if cfg.parallel_overscan:
            px0, px1, py0, py1 = a.parallel_overscan
            col = np.median(data[py0:py1, x0:x1].astype(np.float32) - np.median(ovs), axis=0)
            dst -= col[None, :]
        dst *= np.float32(a.gain)
        if sat.any():
            dmask[sat] |= MaskBits.SAT
        if bad is not None:
            dst[bad] = 0.0
            dmask[bad] |= MaskBits.BAD
    return img, mask


def _apply_bias(img, mask, bias):
    if bias is not None:
        if bias.image.shape != img.shape:
            raise BadInputError(
                "bias", f"shape {bias.image.shape} but {img.shape} expected", "use the bias of this detector"
            )
        img -= bias.image


def _apply_flat(img, var, mask, flat):
    if flat is None:
        return
    if flat.image.shape != img.shape:
        raise BadInputError(
            "flat",
            f"shape {flat.image.shape} but {img.shape} expected",
            "use the flat of this detector and filter",
        )
    f = flat.image
    badflat = ~(np.isfinite(f) & (f > 0.05))
    if badflat.any():
        f = np.where(badflat, np.float32(1.0), f)
        mask[badflat] |= MaskBits.BAD
    img /= f
    var /= f  # twice in place: no CCD-sized f * f temporary
    var /= f
    mask |= flat.mask & int(MaskBits.BAD)


def _edges(badamp, amps, bad_amps: dict[str, str], width: int = 4) -> np.ndarray:
    """The pixels of the bad amplifiers within ``width`` of their box's edges (reach of interpolation)."""
    out = np.zeros(badamp.shape, bool)
    for a in amps:
        if a.name in bad_amps:
            bx0, bx1, by0, by1 = a.bbox
            out[by0:by1, bx0:bx1] = True
            out[by0 + width : by1 - width, bx0 + width : bx1 - width] = False
    return out


def _metadata(raws: list[RawExposure], detector) -> dict:
    m0, m1 = raws[0].metadata, raws[-1].metadata
    begin = m0.mjd_begin
    end = m1.mjd_end
    meta = {
        "INSTRUME": m0.instrument,
        "DETECTOR": detector.id,
        "DETNAME": detector.name,
        "OBSID": m0.obs_id,
        "EXPID": m0.exposure_id,
        "VISIT": m0.visit_id,
        "GROUPID": m0.group_id,
        "FILTER": m0.physical_filter,
        "BAND": m0.band,
        "NSNAPS": len(raws),
        "EXPTIME": float(sum(r.metadata.exposure_time for r in raws)),
        "MJDBEG": begin,
        "MJDEND": end,
        "MJDMID": (begin + end) / 2.0 if begin is not None and end is not None else None,
        "RA": m0.ra,
        "DEC": m0.dec,
        "ROTPA": m0.rotation,
        "AIRMASS": m0.airmass,
        "BUNIT": "electron",
    }
    njy = raws[0].header.get("NJY_PER_E") if isinstance(raws[0].header, dict) else None
    if njy is not None:
        meta["NJY_PER_E"] = float(njy)
    return meta


def run_isr(
    raws: list[RawExposure],
    instrument,
    detector,
    bias: Image | None = None,
    flat: Image | None = None,
    config: IsrConfig | None = None,
    *,
    release_raws: bool = False,
) -> Image:
    """Calibrate one or two snaps of one CCD.

    Parameters
    ----------
    raws : `list` [`RawExposure`]
        One or two snaps of the same detector.
    instrument : `apbatch.instruments.Instrument`
        Camera definition.
    detector : `int`, `str` or `Detector`
        The CCD; every raw must be for it.
    bias, flat : `Image`, optional
        Assembled calibrations in electrons (bias) and relative units (flat, mean ~1).
        The bias mask's ``BAD`` bits are the defect list.
    config : `IsrConfig`, optional
        Algorithm settings.
    release_raws : `bool`
        Empty every raw's ``segments`` once they are assembled (their metadata stay): a job
        that needs the raw pixels no longer frees them for the rest of ISR (70 MB a snap).

    Returns
    -------
    image : `Image`
        Calibrated image (electrons), variance, mask, raw sky WCS from the header boresight
        and metadata (``EXPTIME`` summed over snaps, ``MJDMID``, ``FILTER``, ``NSNAPS``...).

    Raises
    ------
    BadInputError
        Raised if no raw or more than two are given, a raw is for another detector, a
        segment is missing, duplicated, mis-shaped or corrupt, every amplifier is bad (dead,
        hot or saturated), or a calibration does not fit.
    """
    cfg = config or IsrConfig()
    if not raws or len(raws) > 2:
        raise BadInputError("raws", f"{len(raws or [])} snaps given", "give one or two snaps")
    det = detector if hasattr(detector, "nx") else instrument.detector(detector)
    for r in raws:
        if r.metadata.detector != det.id:
            raise BadInputError(
                "raw.detector",
                f"raw {r.metadata.obs_id} is for detector {r.metadata.detector}, not {det.id} ({det.name})",
                "pass the raw of the job's CCD",
            )
    amps = instrument.amplifiers(det.id)
    _check_tiling(amps, det)

    def calibrate(r: RawExposure) -> tuple[np.ndarray, np.ndarray]:
        img, mask = _assemble(r, amps, det, cfg)
        _apply_bias(img, mask, bias)
        return img, mask

    # two snaps: assembled at the same time when the job has two threads (numpy releases the GIL)
    if len(raws) == 2:
        snaps = list(parallel.both(lambda: calibrate(raws[0]), lambda: calibrate(raws[1])))
    else:
        snaps = [calibrate(raws[0])]
    if release_raws:
        for r in raws:
            r.segments = []
    if bias is not None:  # the bias mask's BAD pixels are the defect list
        defects = np.flatnonzero((bias.mask & int(MaskBits.BAD)).ravel())
        for _, m in snaps:
            m.ravel()[defects] |= MaskBits.BAD
    # amplifier health on every snap (a bad amp in either snap is bad for the visit)
    bad_amps: dict[str, str] = {}
    if cfg.amp_check:
        fimg = flat.image if flat is not None else None
        for i, m in snaps:
            for name, why in classify_amps(amp_statistics(i, m, amps, fimg, cfg.amps.step), cfg.amps).items():
                bad_amps.setdefault(name, why)
    if len(bad_amps) == len(amps):
        raise BadInputError(
            "raw.segments",
            f"every amplifier is bad ({format_bad_amps(bad_amps)})",
            "the CCD read out no usable data; check the camera",
        )
    extra_meta: dict = {"AMPSBAD": format_bad_amps(bad_amps)}
    badamp = None
    if bad_amps:
        for _, m in snaps:
            badamp = mask_amps(m, amps, bad_amps)
    # variance in electrons before the flat: Poisson (signal) + read noise
    if len(snaps) == 2:
        (i1, m1), (i2, m2) = snaps
        res = combine_snaps(
            i1, m1, i2, m2, _read_noise2(amps, det), flat.image if flat is not None else None, badamp,
            dataclasses.replace(cfg.snaps, nsigma=cfg.cr_nsigma),
        )
        img, var, mask, crmask = res.image, res.variance, res.mask, res.interpolate
        extra_meta.update(res.metadata)
        del i1, i2, m1, m2, snaps, res
    else:
        img, mask = snaps[0]
        var = np.maximum(img, 0)
        _add_read_noise2(var, amps)
        crmask = (
            grow(find_cosmic_rays(img, var, mask, cfg.cr_nsigma))
            if cfg.cr_single
            else np.zeros(img.shape, bool)
        )
        if badamp is not None:
            crmask &= ~badamp
        mask[crmask] |= MaskBits.CR
    _apply_flat(img, var, mask, flat)
    badcols = detect_bad_columns(
        img, mask, cfg.bad_column_nsigma, half_rows=amps[0].bbox[3] - amps[0].bbox[2]
    )
    if badamp is not None:
        badcols &= ~badamp
    mask[badcols] |= MaskBits.BAD
    if cfg.interpolate:
        # a bad amplifier (BAD | NO_DATA) is masked, not interpolated
        interp = crmask | ((mask & int(MaskBits.BAD | MaskBits.NO_DATA)) == int(MaskBits.BAD))
        if interp.any():
            # ... nor a source of values for its neighbours' interpolation
            interpolate_masked(img, var, interp | _edges(badamp, amps, bad_amps) if bad_amps else interp)
            mask[interp] |= MaskBits.INTRP
    meta = _metadata(raws, det)
    meta.update(extra_meta)
    md = raws[0].metadata
    wcs = None
    if md.ra is not None and md.dec is not None:
        wcs = instrument.sky_wcs(det, md.ra, md.dec, md.rotation or 0.0)
    return Image(img, var, mask, wcs, meta)
