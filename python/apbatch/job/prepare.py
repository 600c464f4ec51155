"""The job's *prepare* phase: everything that does not need the raw, done before it arrives.

nextVisit gives a job its CCD, boresight, rotation and filter about 30 s before readout.
:func:`prepare_ccd` uses that time to read what the raw will need: the calibrations for the
expected time and the filter, the template patches over the predicted footprint (grown by
``pointing_pad_arcsec`` for pointing error), their astrometric reference catalogue, their
warp inputs (spline coefficients, dilated masks: `apbatch.job.steps.warp.prepare_warp`) and,
through the alert stage, the APDB history of the region. The process phase
(`apbatch.job.task`) checks each of these against the raw's headers and reads again only
what no longer fits: a calibration whose validity range does not hold the raw's time, or
templates when the telescope pointed farther than the pad from where nextVisit said.
Preparing writes nothing, so a raw that never arrives leaves nothing behind.

What was measured to move here (bench/bench_job.py, 4k x 4k ComCam CCDs): calibrations
0.45 s, template reads 0.65 s, reference detection 0.4 s, warp prefilter and mask dilation
about 0.8 s CPU per CCD.
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
from .steps.detection import detect_bright_sources
from .steps.warp import WarpPatch, prepare_warp

__all__ = ["Prepared", "TemplateSet", "expected_time", "has_flat", "prepare_ccd", "read_templates",
           "reference_catalog"]

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
    refs = []
    for t in templates:
        ts = detect_bright_sources(t, threshold=threshold)
        if len(ts) and t.wcs is not None:
            ra, dec = t.wcs.pixel_to_world_values(ts["x"].to_numpy(), ts["y"].to_numpy())
            refs.append(np.column_stack([ra, dec, ts["flux"].to_numpy()]))
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
    read, catalogued and prepared at a time (``butler_io.iter_templates`` when it has it), so
    the images are not all held at once next to their warp inputs.
    """
    corners = cam.footprint(det, *pointing, pad_arcsec=30.0 + pad_arcsec)
    read = getattr(butler_io, "iter_templates", None) or butler_io.get_templates
    patches: list[WarpPatch] = []
    refs = []
    for template in read(corners, band):
        ref = reference_catalog([template], sort=False)
        if ref is not None:
            refs.append(ref)
        patches.extend(prepare_warp([template]))
        del template
    catalog = None
    if refs:
        ref = np.concatenate(refs)
        catalog = ref[np.argsort(-ref[:, 2])][:, :2]
    return TemplateSet(tuple(map(float, pointing)), band, patches, catalog)  # type: ignore[arg-type]


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
