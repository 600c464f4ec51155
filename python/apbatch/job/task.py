"""The per-CCD Alert Production job, top to bottom.

:func:`run_ccd` reads like the pipeline: wait for the raw(s) -> check headers against the
job's arguments -> ISR -> background and detection -> PSF -> templates -> astrometry ->
warp -> subtract -> DIA sources -> butler outputs -> APDB association (stored once) ->
alerts (spooled, then sent). Everything that talks to the outside (butler, distributor,
APDB, alert sink) is injected through `JobDeps`, so tests pass real local instances or fakes.

Failure classes (see `apbatch.errors`): a raw that never arrives raises `RawTimeoutError`
(exit 3) having written nothing; bad arguments or data raise `BadInputError` (exit 2); any
other failure before the APDB store is `RetriableError` (exit 4); the APDB/alert stage
raises `NonRetriableError` (exit 5) when a rerun could not repair it.
"""

from __future__ import annotations

import dataclasses
import logging
import resource
import time
from collections.abc import Callable
from typing import Any

import numpy as np

from ..errors import ApbatchError, BadInputError, RetriableError
from ..image import Image
from ..instruments import get_instrument
from ..raw import RawExposure
from ..work import CcdWork
from .alert_policy import split_alertable
from .photometry import photometric_scale, to_njy
from .steps.astrometry import AstrometryError, fit_wcs
from .steps.background import subtract_background
from .steps.detection import detect_bright_sources, detect_sources
from .steps.isr import run_isr
from .steps.measure import measure_dia_sources
from .steps.psf import measure_psf
from .steps.subtract import subtract_images, template_pad
from .steps.template_psf import template_psf_sigma
from .steps.warp import NoTemplateOverlapError, crop_to_science, warp_template

__all__ = ["CcdResult", "JobDeps", "check_headers", "run_ccd"]

log = logging.getLogger(__name__)


# what ISR found, from the calibrated image's metadata: the snap model and the amplifiers' health
_ISR_REPORT = ("SNAPMODE", "SNAPRATI", "SNAPDSKY", "SNAPNCR", "SNAPRCHI", "AMPSBAD")


@dataclasses.dataclass
class JobDeps:
    """What a job talks to. Lifetime: one job; not thread-safe.

    ``alerts`` is a callable ``(ccd_visit, dia_sources, science, template, difference,
    psf_fwhm_pix) -> report`` (normally a closure over
    `apbatch.job.alerts.process_ccd_alerts` with the APDB association, alert builder, spool
    and sink); `None` skips association and alerts (calibrated/difference images only).
    """

    butler_io: Any
    distributor: Any
    alerts: Callable[..., Any] | None = None


@dataclasses.dataclass
class CcdResult:
    """What one job did; written into the butler as the ``metrics`` dataset too."""

    status: str = "started"
    snaps_used: int = 0
    snaps_expected: int = 0
    mismatches: list[str] = dataclasses.field(default_factory=list)
    n_sources: int = 0
    n_dia_sources: int = 0
    astrometry: dict = dataclasses.field(default_factory=dict)
    subtraction: dict = dataclasses.field(default_factory=dict)
    alerts: dict = dataclasses.field(default_factory=dict)
    dia_rejected: dict[str, int] = dataclasses.field(default_factory=dict)
    isr: dict = dataclasses.field(default_factory=dict)
    timings: dict[str, dict[str, float]] = dataclasses.field(default_factory=dict)

    def to_dict(self) -> dict:
        """Plain-JSON form."""
        return dataclasses.asdict(self)


class _Timer:
    """Per-step wall and CPU time and the process's peak RSS (MiB) at its end, into ``CcdResult.timings``."""

    def __init__(self, result: CcdResult):
        self.result = result

    def __call__(self, name: str):
        timer = self

        class _Step:
            def __enter__(self):
                self.w, self.c = time.perf_counter(), time.process_time()
                log.debug("step %s", name)

            def __exit__(self, *exc):
                timer.result.timings[name] = {"wall": round(time.perf_counter() - self.w, 4),
                                              "cpu": round(time.process_time() - self.c, 4),
                                              "maxrss_mib": _maxrss_mib()}

        return _Step()


def _maxrss_mib() -> float:
    """Peak resident memory of this process so far, MiB (Linux reports KiB)."""
    return round(resource.getrusage(resource.RUSAGE_SELF).ru_maxrss / 1024.0, 1)


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
            dra = (m.ra - work.ra + 180.0) % 360.0 - 180.0
            sep = float(np.hypot(dra * np.cos(np.radians(work.dec)), m.dec - work.dec)) * 3600
            if sep > 60.0:
                out.append(f"{m.obs_id}: header pointing is {sep:.0f} arcsec from the job's boresight "
                           "(using the header)")
    for line in out:
        log.warning("header mismatch: %s", line)
    return out


def _pointing(raw: RawExposure, work: CcdWork) -> tuple[float, float, float]:
    m = raw.metadata
    ra = m.ra if m.ra is not None else work.ra
    dec = m.dec if m.dec is not None else work.dec
    rot = m.rotation if m.rotation is not None else work.rotation
    if ra is None or dec is None or rot is None:
        raise BadInputError("raw", f"{m.obs_id} has no pointing and the job was given none",
                            "science jobs need --ra/--dec/--rotation or RASTART/DECSTART/ROTPA")
    return float(ra), float(dec), float(rot)


def run_ccd(work: CcdWork, deps: JobDeps, *, timeout: float = 120.0, output_run: str | None = None,
            region_padding_arcsec: float = 10.0) -> CcdResult:
    """Run the AP pipeline for one CCD.

    Parameters
    ----------
    work : `CcdWork`
        The job's arguments.
    deps : `JobDeps`
        Butler I/O, distributor client and the association+alert stage.
    timeout : `float`
        Seconds to wait for the raw(s).
    output_run : `str`, optional
        Butler RUN for the outputs (default: the butler I/O's nightly run).
    region_padding_arcsec : `float`
        Padding of the CCD's sky region for the APDB (``apdb.region_padding_arcsec``): objects
        this far outside the CCD are loaded for association.

    Raises
    ------
    RawTimeoutError, BadInputError, RetriableError, NonRetriableError
        See the module docstring.
    """
    res = CcdResult(snaps_expected=max(work.nimages, len(work.image_names), 1))
    step = _Timer(res)
    cam = get_instrument(work.instrument)
    det = cam.detector(work.detector)

    with step("wait_for_raw"):
        target = list(work.image_names) if work.image_names else work.group_id
        raws = deps.butler_io.get_raw_blocking(target, det.id, res.snaps_expected, deps.distributor, timeout,
                                               group_id=work.group_id, allow_partial=res.snaps_expected > 1)
    res.snaps_used = len(raws)
    if res.snaps_used < res.snaps_expected:
        log.warning("only %d of %d snaps arrived before the timeout; processing what arrived",
                    res.snaps_used, res.snaps_expected)
    res.mismatches = check_headers(raws, work)
    meta = raws[0].metadata
    physical_filter = work.physical_filter or meta.physical_filter

    try:
        return _process(work, deps, raws, res, step, cam, det, physical_filter, output_run,
                        region_padding_arcsec)
    except ApbatchError:
        raise
    except Exception as exc:  # anything unexpected before the APDB stage: safe to rerun
        log.debug("unexpected failure", exc_info=True)  # the job boundary reports it in one line
        raise RetriableError(f"{type(exc).__name__}: {exc}") from exc


def _process(work, deps, raws, res, step, cam, det, physical_filter, output_run, padding) -> CcdResult:
    when = raws[0].metadata.mjd_begin
    with step("calib_retrieval"):
        bias = deps.butler_io.get_calib("bias", det.id, when) if when is not None else None
        flat = (deps.butler_io.get_calib("flat", det.id, when, physical_filter=physical_filter)
                if when is not None and physical_filter not in (None, "none", "unknown") else None)
    with step("isr"):
        calexp = run_isr(raws, cam, det, bias=bias, flat=flat)
    # Large inputs are dropped as soon as they are used, so later steps reuse their memory
    # instead of growing the process (each new page costs a fault): calibrations and raw
    # pixels here (the raws' metadata stays), template patches after the warp.
    del bias, flat
    for raw in raws:
        raw.segments = []
    calexp.metadata["SNAPS"] = res.snaps_used
    res.isr = {k.lower(): calexp.metadata[k] for k in _ISR_REPORT if calexp.metadata.get(k) is not None}
    if work.intent != "science":
        # Calibration frames get ISR as a health check; their products are made by the
        # calibration pipelines, not here, so nothing is written to the butler.
        res.status = f"calibration:{work.intent}"
        return res

    ra, dec, rot = _pointing(raws[0], work)
    band = cam.band_of(physical_filter, field="filter")
    with step("background_detection"):
        subtract_background(calexp)
        sources = detect_sources(calexp)
        psf = measure_psf(calexp, sources)
    # the stored image's PSF (lsst-images VisitImage); the difference image inherits it
    calexp.metadata["PSFSIGMA"] = float(psf.sigma)
    res.n_sources = len(sources)
    corners = cam.footprint(det, ra, dec, rot, pad_arcsec=30.0)
    with step("template_retrieval"):
        templates = deps.butler_io.get_templates(corners, band)
    if not templates:
        why = f"no template covers this CCD in band {band}"
        return _no_template(deps, work, res, output_run, calexp, why)

    with step("astrometry"):
        _fit_astrometry(calexp, sources, templates, cam, res)
    with step("warp"):
        try:
            # padded by the kernel half-size, so that the difference is valid up to the CCD edge
            warped = warp_template(templates, calexp.wcs, calexp.shape, min_coverage=0.05,
                                   pad=template_pad(psf))
        except NoTemplateOverlapError as exc:
            return _no_template(deps, work, res, output_run, calexp, str(exc))
        # the coadd's PSF description is used only where the warped template's stars agree with it
        tmpl_sigma = template_psf_sigma(templates, warped, sources, cam.pixel_scale_arcsec)
    del templates
    with step("subtract"):
        diff, sub = subtract_images(calexp, warped, psf, tmpl_sigma, sources)
    warped = crop_to_science(warped)  # the alerts' template cutouts are on the science grid
    res.subtraction = {"n_stamps": sub.n_stamps, "kernel_sum": float(sub.kernel_sum),
                       "noise_scale": float(sub.noise_scale),
                       "coverage": float(warped.metadata.get("COVERAGE", 1))}
    with step("measure"):
        njy = photometric_scale(calexp, warped, sub.kernel_sum)
        dia = measure_dia_sources(diff, psf, science=calexp, njy_per_e=njy)
        # from here on every image is in nJy, like the DIA fluxes: the butler outputs, the APDB's
        # forced photometry and the alert cutouts (the warped template already is)
        for img in (calexp, diff):
            to_njy(img, njy)
    res.n_dia_sources = len(dia)
    from .apdb import CcdVisit

    m = raws[0].metadata
    mid = (m.mjd_begin + m.mjd_end) / 2 if m.mjd_begin and m.mjd_end else m.mjd_begin
    ccd = CcdVisit(work.instrument, work.visit, det.id, band, float(mid),
                   tuple(map(tuple, cam.footprint(det, ra, dec, rot, pad_arcsec=padding))), m.exposure_time)
    dia = _with_context(dia, ccd)
    with step("write_catalog"):
        _put(deps, work, res, output_run, dia_sources=dia)

    alertable, res.dia_rejected = split_alertable(dia)
    if res.dia_rejected["total"]:
        log.info("%d of %d DIA sources flagged (saturated star core, trail or halo): stored in the "
                 "butler table, not alerted", res.dia_rejected["total"], len(dia))
    if deps.alerts is not None:
        with step("associate_alerts"):
            report = deps.alerts(ccd, alertable, calexp, warped, diff, psf.fwhm)
        res.alerts = report.to_dict() if hasattr(report, "to_dict") else dict(report)
    # The images go into the butler after the alerts are out: as lsst-images types they take
    # 2-4 s to compress and write (bench/bench_butler_images.py), time the alerts need not wait.
    with step("write_outputs"):
        _put(deps, work, res, output_run, calexp=calexp, diffim=diff)
    res.status = "done"
    _put(deps, work, res, output_run)  # final metrics, with the alert counts and every step's time
    return res


def _with_context(dia, ccd) -> Any:
    """The DIA source table with its ids and context, as Rubin's ``dia_source_detector`` has them.

    ``diaSourceId`` is the same deterministic id the APDB stores (`apbatch.job.apdb_ids.pack_id`
    over the table's row order), so the butler table and the APDB join on it.
    """
    from .apdb_ids import pack_id

    out = dia.reset_index(drop=True)
    out.insert(0, "diaSourceId", pack_id(ccd.visit, ccd.detector, np.arange(len(out))).astype(np.int64))
    out["visit"] = np.int64(ccd.visit)
    out["detector"] = np.int64(ccd.detector)
    out["band"] = ccd.band
    out["midpointMjdTai"] = float(ccd.midpoint_mjd_tai)
    out.attrs = dict(dia.attrs)
    return out


def _fit_astrometry(calexp: Image, sources, templates: list[Image], cam, res: CcdResult) -> None:
    """Refit the raw WCS against the templates' bright sources; keep the raw WCS if that fails."""
    refs = []
    for t in templates:
        ts = detect_bright_sources(t, threshold=20.0)
        if len(ts) and t.wcs is not None:
            ra, dec = t.wcs.pixel_to_world_values(ts["x"].to_numpy(), ts["y"].to_numpy())
            refs.append(np.column_stack([ra, dec, ts["flux"].to_numpy()]))
    if not refs:
        res.astrometry = {"status": "no reference sources"}
        return
    ref = np.concatenate(refs)
    ref = ref[np.argsort(-ref[:, 2])][:, :2]
    good = sources[(sources["flag"] == 0) & (~sources["masked"])].sort_values("flux", ascending=False)
    try:
        wcs, fit = fit_wcs(calexp.wcs, good[["x", "y"]].to_numpy(), ref,
                           pixel_scale_arcsec=cam.pixel_scale_arcsec)
    except AstrometryError as exc:
        log.warning("astrometric fit failed (%s); keeping the header WCS", exc)
        res.astrometry = {"status": f"failed: {exc}"}
        return
    calexp.wcs = wcs
    res.astrometry = {"status": "fitted", **{k: float(v) for k, v in dataclasses.asdict(fit).items()}}


def _no_template(deps: JobDeps, work: CcdWork, res: CcdResult, output_run, calexp: Image,
                 why: str) -> CcdResult:
    """Early in a survey there may be no template: keep the calibrated image, record why."""
    log.warning("%s: calibrated image only", why)
    res.status = "no_template"
    _put(deps, work, res, output_run, calexp=calexp)
    return res


def _put(deps: JobDeps, work: CcdWork, res: CcdResult, output_run, **outputs) -> None:
    deps.butler_io.put_outputs(work.visit, work.detector, metrics=res.to_dict(), run=output_run, **outputs)
