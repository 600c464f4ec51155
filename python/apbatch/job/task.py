"""The per-CCD Alert Production job, top to bottom.

:func:`run_ccd` reads like the pipeline: prepare (`apbatch.job.prepare`: calibrations,
templates, references, warp inputs, APDB history, before the raw exists) -> wait for the
raw(s) -> check headers against the job's arguments -> ISR -> background and detection ->
PSF -> templates (the prepared ones if they still cover the CCD) -> astrometry -> warp ->
subtract -> DIA sources -> DIA table -> APDB association (stored once) -> alerts (spooled,
then sent) -> images into the butler. Each stage's time goes into a
`apbatch.latency.StageClock`. Everything that talks to the outside (butler, distributor,
APDB, alert sink) is injected through `JobDeps`, so tests pass real local instances or fakes.

Failure classes (see `apbatch.errors`): a raw that never arrives raises `RawTimeoutError`
(exit 3) having written nothing; bad arguments or data raise `BadInputError` (exit 2); any
other failure before the APDB store is `RetriableError` (exit 4); the APDB/alert stage
raises `NonRetriableError` (exit 5) when a rerun could not repair it.
"""

from __future__ import annotations

import dataclasses
import logging
import math
import resource
import time
from collections.abc import Callable
from typing import Any

import numpy as np

from ..errors import ApbatchError, RetriableError
from ..image import Image
from ..instruments import get_instrument
from ..latency import StageClock
from ..work import CcdWork
from .alert_policy import split_alertable
from .calverify import Verification, store_verification, verify_calibration
from .forced import DIFF_NOISE_SCALE, ForcedPhotometry
from .headers import check_headers, header_pointing
from .photometry import photometric_scale, to_njy
from .prepare import Prepared, calibs_for_raw, prepare_ccd, templates_for_pointing
from .steps.apcorr import apply_aperture_correction, measure_aperture_correction
from .steps.astrometry import AstrometryError, fit_wcs
from .steps.background import subtract_background
from .steps.isr import run_isr
from .steps.measure import measure_dia_sources
from .steps.memory import warm_heap
from .steps.psf import sources_and_psf
from .steps.subtract import subtract_images, template_pad
from .steps.template_psf import template_psf_sigma
from .steps.warp import NoTemplateOverlapError, crop_to_science, warp_template

__all__ = ["CcdResult", "JobDeps", "check_headers", "run_ccd"]

log = logging.getLogger(__name__)
_AB_NJY = 31.4
"""AB magnitude of 1 nJy."""
WARM_BYTES_PER_PIXEL = 24
"""Heap a fresh job process page-faults before its raw, per CCD pixel (`warm_heap`): its steps
grow the process by 28-30 bytes a pixel after the raw (LATISS: 1175-1269 MiB peak, 640 MiB
when prepared), so 24 warms most of it; measured, the peak rose by ~90 MB (fragmentation)."""


# what ISR found, from the calibrated image's metadata: the snap model and the amplifiers' health
_ISR_REPORT = ("SNAPMODE", "SNAPRATI", "SNAPDSKY", "SNAPNCR", "SNAPRCHI", "AMPSBAD")


@dataclasses.dataclass
class JobDeps:
    """What a job talks to. Lifetime: one job; not thread-safe.

    ``alerts`` is a callable ``(ccd_visit, dia_sources, science, template, difference,
    psf_fwhm_pix, photometry=) -> report`` (``photometry``: the DiaObjects' forced photometry,
    `apbatch.job.forced.ForcedPhotometry`; normally a closure over
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
    prepare: dict = dataclasses.field(default_factory=dict)
    """What the prepare phase's reads became (e.g. ``templates``: prepared or re-read, and why)."""
    stages: dict[str, float] = dataclasses.field(default_factory=dict)
    """UTC unix seconds of each stage reached (`apbatch.latency.STAGES`)."""
    timings: dict[str, dict[str, float]] = dataclasses.field(default_factory=dict)
    verification: dict = dataclasses.field(default_factory=dict)
    """A calibration's verdict (`apbatch.job.calverify.Verification.summary`); empty for science."""
    apcorr: dict = dataclasses.field(default_factory=dict)
    """The aperture correction applied to the DIA PSF fluxes (`ApertureCorrection.to_dict`)."""
    quality: dict = dataclasses.field(default_factory=dict)
    """Data quality for telemetry (OCPS, dashboards): ``psf_fwhm_arcsec`` (2.3548 x the PSF model's
    second-moment sigma, the way Rubin's visit summaries derive seeing), ``sky_level``
    (background, electrons per pixel) and ``zero_point`` (AB magnitude that gives one electron
    in the exposure, from the template's calibration)."""

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


def run_ccd(work: CcdWork, deps: JobDeps, *, timeout: float = 120.0, output_run: str | None = None,
            region_padding_arcsec: float = 10.0, pointing_pad_arcsec: float = 20.0,
            clock: StageClock | None = None, calib_verify: Any = None) -> CcdResult:
    """Run the AP pipeline for one CCD: prepare, wait for the raw, process.

    Parameters
    ----------
    work : `CcdWork`
        The job's arguments.
    deps : `JobDeps`
        Butler I/O, distributor client and the association+alert stage.
    timeout : `float`
        Seconds to wait for the raw(s), counted from the end of the prepare phase.
    output_run : `str`, optional
        Butler RUN for the outputs (default: the butler I/O's nightly run).
    region_padding_arcsec : `float`
        Padding of the CCD's sky region for the APDB (``apdb.region_padding_arcsec``): objects
        this far outside the CCD are loaded for association.
    pointing_pad_arcsec : `float`
        Pointing error the prepared templates and APDB region allow for (``job.pointing_pad_arcsec``).
    clock : `apbatch.latency.StageClock`, optional
        Where the stage times go (default: a new one, marked ``started`` now).
    calib_verify : `apbatch.config.CalibVerifyConfig`, optional
        Thresholds of the verification of calibration raws (``calib_verify``; default: the defaults).

    Raises
    ------
    RawTimeoutError, BadInputError, RetriableError, NonRetriableError
        See the module docstring; a failure while preparing is retriable (exit 4) unless it is
        bad input, and leaves nothing written.
    """
    clock = clock or StageClock()
    if "started" not in clock.marks:
        clock.mark("started")
    res = CcdResult(snaps_expected=max(work.nimages, len(work.image_names), 1), stages=clock.marks)
    step = _Timer(res)
    cam = get_instrument(work.instrument)
    det = cam.detector(work.detector)
    if deps.alerts is not None and hasattr(deps.alerts, "clock"):
        deps.alerts.clock = clock  # the alert stage marks apdb_stored and alerts_sent
    try:
        prepared = prepare_ccd(work, deps, cam, det, pad_arcsec=pointing_pad_arcsec,
                               region_padding_arcsec=region_padding_arcsec, step=step)
    except ApbatchError:
        raise
    except Exception as exc:  # butler or APDB away: nothing is written yet, a rerun may succeed
        log.debug("preparation failed", exc_info=True)
        raise RetriableError(f"preparation failed: {type(exc).__name__}: {exc}") from exc
    clock.mark("prepared")
    # the steps' first CCD-sized buffers are page-faulted now, not after the raw
    warm_heap(WARM_BYTES_PER_PIXEL * det.nx * det.ny)
    if prepared.apdb_objects is not None:
        res.prepare["apdb_objects"] = prepared.apdb_objects

    with step("wait_for_raw"):
        target = list(work.image_names) if work.image_names else work.group_id
        raws = deps.butler_io.get_raw_blocking(target, det.id, res.snaps_expected, deps.distributor, timeout,
                                               group_id=work.group_id, allow_partial=res.snaps_expected > 1)
    if deps.butler_io.raw_delivered_at is not None:  # unknown when the distributor does not say
        clock.mark("raw_available", deps.butler_io.raw_delivered_at)
    clock.mark("raw_read")
    res.snaps_used = len(raws)
    if res.snaps_used < res.snaps_expected:
        log.warning("only %d of %d snaps arrived before the timeout; processing what arrived",
                    res.snaps_used, res.snaps_expected)
    res.mismatches = check_headers(raws, work)
    physical_filter = work.physical_filter or raws[0].metadata.physical_filter

    try:
        return _process(work, deps, raws, res, step, cam, det, physical_filter, output_run,
                        region_padding_arcsec, prepared, pointing_pad_arcsec, clock, calib_verify)
    except ApbatchError:
        raise
    except Exception as exc:  # anything unexpected before the APDB stage: safe to rerun
        log.debug("unexpected failure", exc_info=True)  # the job boundary reports it in one line
        raise RetriableError(f"{type(exc).__name__}: {exc}") from exc


def _process(work, deps, raws, res, step, cam, det, physical_filter, output_run, padding,
             prepared: Prepared, pointing_pad: float, clock: StageClock,
             calib_verify: Any = None) -> CcdResult:
    with step("calib_retrieval"):
        calibs = calibs_for_raw(deps.butler_io, det, raws[0].metadata.mjd_begin, physical_filter, prepared)
    with step("isr"):
        # a science job needs no raw pixels after ISR (a calibration's verification does)
        calexp = run_isr(raws, cam, det, bias=calibs["bias"], flat=calibs["flat"],
                         release_raws=work.intent == "science")
    checks: list[Verification] = []
    if work.intent != "science" and (calib_verify is None or calib_verify.enabled):
        with step("calib_verify"):  # on the raw pixels and the calibrations, before they are dropped
            checks = verify_calibration(raws, cam, det, work.intent, calibs, calib_verify)
    # Large inputs are dropped as soon as they are used, so later steps reuse their memory
    # instead of growing the process (each new page costs a fault): calibrations and raw
    # pixels here (the raws' metadata stays), template patches after the warp.
    del calibs
    for raw in raws:
        raw.segments = []
    clock.mark("isr_done")
    calexp.metadata["SNAPS"] = res.snaps_used
    res.isr = {k.lower(): calexp.metadata[k] for k in _ISR_REPORT if calexp.metadata.get(k) is not None}
    if work.intent != "science":
        # Calibration frames get ISR as a health check and the raw verification; their products
        # are made by the calibration pipelines, so only the verification goes to the butler.
        res.status = f"calibration:{work.intent}"
        if checks:
            with step("write_outputs"):
                res.verification = store_verification(deps.butler_io, work, output_run, checks)
        return res

    ra, dec, rot = header_pointing(raws[0], work)
    band = cam.band_of(physical_filter, field="filter")
    with step("background_detection"):
        sky = subtract_background(calexp)
        sources, psf = sources_and_psf(calexp)
    res.quality = {"psf_fwhm_arcsec": round(2.3548 * float(psf.sigma) * cam.pixel_scale_arcsec, 4),
                   "sky_level": round(float(sky.level), 3), "psf_n_stars": int(psf.n_stars)}
    if psf.fallback:
        res.quality["psf_fallback"] = psf.fallback
        log.warning("PSF: %s", psf.fallback)
    # the stored image's PSF (lsst-images VisitImage); the difference image inherits it
    calexp.metadata["PSFSIGMA"] = float(psf.sigma)
    res.n_sources = len(sources)
    with step("template_retrieval"):
        tset = templates_for_pointing(deps.butler_io, cam, det, (ra, dec, rot), band, prepared,
                                      pointing_pad, res.prepare)
    if not tset.patches:
        why = f"no template covers this CCD in band {band}"
        return _no_template(deps, work, res, output_run, calexp, why)

    with step("astrometry"):
        _fit_astrometry(calexp, sources, tset.references, cam, res)
    with step("warp"):
        try:
            # padded by the kernel half-size, so that the difference is valid up to the CCD edge
            warped = warp_template(tset.patches, calexp.wcs, calexp.shape, min_coverage=0.05,
                                   pad=template_pad(psf))
        except NoTemplateOverlapError as exc:
            return _no_template(deps, work, res, output_run, calexp, str(exc))
        # the coadd's PSF description is used only where the warped template's stars agree with it
        tmpl_sigma = template_psf_sigma(tset.patches, warped, sources, cam.pixel_scale_arcsec)
    del tset
    with step("subtract"):
        diff, sub = subtract_images(calexp, warped, psf, tmpl_sigma, sources)
    clock.mark("difference_done")
    warped = crop_to_science(warped)  # the alerts' template cutouts are on the science grid
    res.subtraction = {"n_stamps": sub.n_stamps, "kernel_sum": float(sub.kernel_sum),
                       "noise_scale": float(sub.noise_scale),
                       "coverage": float(warped.metadata.get("COVERAGE", 1))}
    with step("measure"):
        njy = photometric_scale(calexp, warped, sub.kernel_sum)
        if njy > 0:
            res.quality["zero_point"] = round(_AB_NJY - 2.5 * math.log10(njy), 4)
        dia = measure_dia_sources(diff, psf, science=calexp, njy_per_e=njy)
        # the DIA errors' noise rescale (source-free), for the forced photometry on the difference
        diff.metadata[DIFF_NOISE_SCALE] = float(dia.attrs.get("noise_scale", 1.0))
        apcorr = measure_aperture_correction(calexp, psf, sources)
        dia, res.apcorr = apply_aperture_correction(dia, apcorr), apcorr.to_dict()
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
            report = deps.alerts(ccd, alertable, calexp, warped, diff, psf.fwhm,
                                 photometry=ForcedPhotometry(psf, apcorr))
        res.alerts = report.to_dict() if hasattr(report, "to_dict") else dict(report)
        if res.alerts.get("pending"):  # not sent: the latency is not known until a flush
            clock.marks.pop("alerts_sent", None)
    # The images go into the butler after the alerts are out: as lsst-images types they take
    # 2-4 s to compress and write (bench/bench_butler_images.py), time the alerts need not wait.
    with step("write_outputs"):
        _put(deps, work, res, output_run, calexp=calexp, diffim=diff)
    res.status = "done"
    clock.mark("finished")
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


def _fit_astrometry(calexp: Image, sources, ref: np.ndarray | None, cam, res: CcdResult) -> None:
    """Refit the raw WCS against the templates' bright sources (``ref``, RA/Dec, brightest first);
    keep the raw WCS if that fails."""
    if ref is None or not len(ref):
        res.astrometry = {"status": "no reference sources"}
        return
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
    res.prepare["no_template"] = why  # the metrics and the night report say why
    _put(deps, work, res, output_run, calexp=calexp)
    return res


def _put(deps: JobDeps, work: CcdWork, res: CcdResult, output_run, **outputs) -> None:
    deps.butler_io.put_outputs(work.visit, work.detector, metrics=res.to_dict(), run=output_run, **outputs)
