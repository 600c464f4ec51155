"""The job's *prepare* phase: everything that does not need the raw, done before it arrives.

nextVisit gives a job its CCD, boresight, rotation and filter about 30 s before readout.
:func:`prepare_ccd` uses that time to read what the raw will need: the calibrations for the
expected time and the filter, the template patches over the predicted footprint (grown by
``pointing_pad_arcsec`` for pointing error), their astrometric reference catalogues (stored
with the templates: `apbatch.job.template_sources`), their
warp inputs (spline coefficients, dilated masks: `apbatch.job.steps.warp.prepare_warp`) and,
through the alert stage, the APDB history of the region. The process phase
(`apbatch.job.task`) checks each of these against the raw's headers and reads again only
what no longer fits: a calibration whose validity range does not hold the raw's time, or
templates when the telescope pointed farther than the pad from where nextVisit said.
Preparing writes nothing, so a raw that never arrives leaves nothing behind.

What was measured to move here (bench/bench_job.py, 4k x 4k ComCam CCDs): calibrations
0.45 s, template reads 0.65 s, reference detection 0.4 s (0.7 s later; since then read from
the butler: 0.02 s per patch), warp prefilter and mask dilation about 0.8 s CPU per CCD.
"""

from __future__ import annotations

import contextlib
import dataclasses
import datetime
import logging
import time
from typing import Any

import numpy as np
from astropy.time import Time

from ..image import Image
from ..work import CcdWork
from .headers import separation_arcsec
from .steps.warp import WarpPatch, prepare_warp
from .template_sources import detect_references, sources_in_box

__all__ = ["Prepared", "TemplateSet", "calibs_for_raw", "expected_time", "has_flat", "prepare_ccd",
           "read_templates", "reference_catalog", "templates_for_pointing"]

log = logging.getLogger(__name__)


@dataclasses.dataclass
class TemplateSet:
    """Template patches read for one footprint, ready to warp."""

    pointing: tuple[float, float, float]
    """(ra, dec, rotation) degrees the footprint was computed for."""
    band: str
    patches: list[WarpPatch]
    references: np.ndarray | None
    """(N, 2) RA/Dec degrees of the patches' bright sources, brightest first (astrometry)."""


@dataclasses.dataclass
class Prepared:
    """What :func:`prepare_ccd` read; the process phase uses or replaces each item."""

    calibs: dict[str, tuple[Any, Any]] = dataclasses.field(default_factory=dict)
    """kind -> (dataset ref, image) for ``bias`` and (with a filter) ``flat``."""
    templates: TemplateSet | None = None
    apdb_objects: int | None = None
    """DiaObjects whose history was preloaded (`None`: no preload)."""


def has_flat(physical_filter: str | None) -> bool:
    """Whether the filter takes a flat (not for no filter, ``none`` or ``unknown``)."""
    return physical_filter not in (None, "none", "unknown")


def expected_time(work: CcdWork, now: float | None = None) -> Time:
    """When the exposure is expected: the group id's time (obs_lsst's ISO group ids), else now."""
    gid = (work.group_id or "").split("#")[0].split("+")[0]
    try:
        t = datetime.datetime.fromisoformat(gid)
        return Time(t.replace(tzinfo=None), scale="tai")
    except ValueError:
        return Time(time.time() if now is None else now, format="unix")


def reference_catalog(templates: list[Image], threshold: float = 20.0, *, sort: bool = True
                      ) -> np.ndarray | None:
    """Bright sources of the template patches as (N, 2) RA/Dec, brightest first; `None` if none.

    With ``sort=False``: (N, 3) RA/Dec/flux in detection order, for a caller that merges
    several calls (:func:`read_templates`) and sorts once.
    """
    refs = [r for r in (detect_references(t, threshold) for t in templates) if r is not None]
    if not refs:
        return None
    ref = np.concatenate(refs)
    if not sort:
        return ref
    return ref[np.argsort(-ref[:, 2])][:, :2]


def read_templates(butler_io, cam, det, pointing: tuple[float, float, float], band: str,
                   pad_arcsec: float) -> TemplateSet:
    """Read, prepare and catalogue the template patches over the footprint at ``pointing``.

    The footprint is grown by 30 arcsec (the warp's margin) plus ``pad_arcsec``. One patch is
    read, catalogued and prepared at a time (``butler_io.iter_template_patches`` when it has
    it), so the images are not all held at once next to their warp inputs. A patch's
    references come from its stored ``template_sources`` (`apbatch.job.template_sources`),
    or are detected in the part read when it has none.
    """
    corners = cam.footprint(det, *pointing, pad_arcsec=30.0 + pad_arcsec)
    patches: list[WarpPatch] = []
    refs = []
    for template, catalog in _template_patches(butler_io, corners, band):
        ref = detect_references(template) if catalog is None else sources_in_box(catalog, template)
        if ref is not None:
            refs.append(ref)
        patches.extend(prepare_warp([template]))
        del template
    catalog = None
    if refs:
        ref = np.concatenate(refs)
        catalog = ref[np.argsort(-ref[:, 2], kind="stable")][:, :2]
    return TemplateSet(tuple(map(float, pointing)), band, patches, catalog)  # type: ignore[arg-type]


def _template_patches(butler_io, corners, band: str):
    """(template, its reference catalogue or `None`) pairs from any of the butler I/O's readers."""
    pairs = getattr(butler_io, "iter_template_patches", None)
    if pairs is not None:
        yield from pairs(corners, band)
        return
    read = getattr(butler_io, "iter_templates", None) or butler_io.get_templates
    for template in read(corners, band):
        yield template, None
        del template  # not held while the next patch is read


def prepare_ccd(work: CcdWork, deps, cam, det, *, pad_arcsec: float = 20.0,
                region_padding_arcsec: float = 10.0, step=None) -> Prepared:
    """Read before the raw arrives what the science job will need (module docstring).

    Parameters
    ----------
    work : `CcdWork`
        The job's arguments (nextVisit's pointing and filter, when known).
    deps : `apbatch.job.task.JobDeps`
        Butler I/O and the alert stage (whose ``prepare(region, when)`` preloads the APDB).
    cam, det
        The instrument and detector.
    pad_arcsec : `float`
        Pointing error allowed for (``job.pointing_pad_arcsec``).
    region_padding_arcsec : `float`
        The APDB region's own padding (``apdb.region_padding_arcsec``).
    step : callable, optional
        The job's step timer (``step(name)`` is a context manager).

    Returns
    -------
    prepared : `Prepared`
        Partially filled when nextVisit gave no pointing or filter (the raw's headers then decide).
    """
    step = step or (lambda name: contextlib.nullcontext())
    when = expected_time(work)
    out = Prepared()
    if work.intent != "science":
        return out  # calibration frames get ISR only, with the calibrations of the raw's own time
    flt = work.physical_filter
    with step("prepare_calibs"):
        for kind, needs in (("bias", True), ("flat", bool(flt) and has_flat(flt))):
            if needs:
                ref = deps.butler_io.calib_ref(kind, det.id, when,
                                               physical_filter=flt if kind == "flat" else None)
                if ref is not None:
                    out.calibs[kind] = (ref, deps.butler_io.read_calib(ref))
    if None in (work.ra, work.dec, work.rotation) or not flt:
        return out
    pointing = (float(work.ra), float(work.dec), float(work.rotation))  # type: ignore[arg-type]
    band = cam.band_of(flt, field="filter")
    with step("prepare_templates"):
        out.templates = read_templates(deps.butler_io, cam, det, pointing, band, pad_arcsec)
    prep = getattr(deps.alerts, "prepare", None)  # the alert stage; a test's plain callable has none
    if prep is not None:
        with step("prepare_apdb"):
            region = cam.footprint(det, *pointing, pad_arcsec=region_padding_arcsec + pad_arcsec)
            out.apdb_objects = prep(region, when)
    return out


# ----------------------------------------------------------------------------- after the raw
def calibs_for_raw(butler_io, det, when, physical_filter: str | None, prepared: Prepared) -> dict[str, Any]:
    """Bias and flat valid at the raw's time: the prepared ones when they are the same datasets.

    The prepared calibrations are dropped from ``prepared`` once used (large images).
    """
    out: dict[str, Any] = {"bias": None, "flat": None}
    if when is None:
        return out
    for kind in ("bias", "flat"):
        if kind == "flat" and not has_flat(physical_filter):
            continue
        flt = physical_filter if kind == "flat" else None
        ref = butler_io.calib_ref(kind, det.id, when, physical_filter=flt)
        have = prepared.calibs.get(kind)
        if ref is None:
            continue
        if have is not None and have[0].id == ref.id:
            out[kind] = have[1]
            continue
        if have is not None:
            log.info("%s: the prepared one does not apply to the raw's time; reading %s", kind, ref.id)
        out[kind] = butler_io.read_calib(ref)
    prepared.calibs.clear()
    return out


def templates_for_pointing(butler_io, cam, det, pointing: tuple[float, float, float], band: str,
                           prepared: Prepared, pad: float, report: dict) -> TemplateSet:
    """The prepared templates if they cover the CCD where the header says it pointed, else new ones.

    ``report["templates"]`` says which (``prepared``, or why they were read again).
    """
    have = prepared.templates
    prepared.templates = None
    if have is not None and have.band == band:
        # how far the CCD's corners are from where nextVisit put them (pointing and rotation)
        new = cam.footprint(det, *pointing, pad_arcsec=0.0)
        old = cam.footprint(det, *have.pointing, pad_arcsec=0.0)
        moved = max(separation_arcsec(float(n[0]), float(n[1]), float(o[0]), float(o[1]))
                    for o, n in zip(old, new, strict=True))
        if moved <= pad:
            report["templates"] = "prepared"
            return have
        report["templates"] = f"re-read: the CCD is {moved:.0f} arcsec from nextVisit's footprint"
        log.warning("templates read again: the CCD is %.0f arcsec from where nextVisit said (pad %.0f)",
                    moved, pad)
    else:
        report["templates"] = "read after the raw" if have is None else f"re-read: band {band}"
    return read_templates(butler_io, cam, det, pointing, band, pad)
