"""Where the night looked: its science CCDs on the sky as a MOC (mocpy), their area, and a PNG.

Each CCD's sky polygon comes from `apbatch.butler.regions.visit_regions` (the same regions the
butler records); the polygons are turned into HEALPix MOCs by ``MOC.from_polygons`` and
unioned, so CCDs that overlap (dithered visits, repeated fields) are counted once.

Two MOCs per night:

* **observed**: every science CCD-visit that was submitted (its ledger row has a job id);
* **processed**: the subset whose job COMPLETED (a non-zero COMPLETED is FAILED in the ledger).

The order (`DEFAULT_ORDER` = 14, cells of 12.9") is chosen for the size of a whole night: mocpy
keeps every cell a polygon touches, so a MOC overestimates a polygon by about its perimeter times
half a cell, ~4% at order 14; ``--order 16`` gives ~1% for 4x the time and files.
Measured for the 189 LSSTCam CCDs of one visit (13.6' x 13.3' CCDs, 0.0504 deg^2 each): order
14 +3.9%, 15 +1.96% (+1.86% to +2.10% per CCD; +2.13% for two ComCam visits), **16 +0.98%**
(+0.94% to +1.04% per CCD), 17 +0.49%; where CCDs overlap (dithered visits) the excess is
smaller. Each order up doubles the time and the files: for 40 LSSTCam visits (20 fields x 2
dithers, 7,560 CCDs, 5% not processed) on 2 shared cores, order 16 took 7.3 s (geometry
included) and wrote 11.6 MB (observed) + 13.5 MB (processed: its holes add edges); order 15
4.6 s, 5.2 + 6.2 MB; order 14 3.0 s, 2.0 + 2.5 MB. A 1,000-visit night at order 16 would be ~3
minutes and ~600 MB of MOCs (extrapolated), too much for a morning report; at order 14, ~75 s and
~110 MB. The areas printed are the MOCs' (so ~4% high at the default order).
"""

from __future__ import annotations

import atexit
import dataclasses
import functools
import math
from collections.abc import Iterable, Mapping, Sequence
from pathlib import Path
from typing import TYPE_CHECKING, Any

import numpy as np

from ..atomic import replacing
from ..butler.regions import visit_regions
from ..errors import BadInputError
from ..instruments import get_instrument
from ..submission import Submission

if TYPE_CHECKING:
    from .data import VisitInfo

__all__ = ["DEFAULT_ORDER", "MAX_ORDER", "MIN_ORDER", "OBSERVED_COLOUR", "PROCESSED_COLOUR", "CcdPointing",
           "NightFootprint", "area_deg2", "check_order", "footprint_paths", "night_footprint",
           "pointings_from_rows", "pointings_from_visits", "rows_summary", "write_footprint"]

DEFAULT_ORDER = 14
"""HEALPix order of the night's MOCs: ~4% above the true area of isolated CCDs (see the module doc)."""
MIN_ORDER, MAX_ORDER = 8, 20
"""Orders ``--order`` accepts: below 8 a cell (0.23 deg) is a CCD's size; above 20 a night takes hours."""

OBSERVED_COLOUR = "#6baed6"
PROCESSED_COLOUR = "#2e9e44"
"""Fill colours of the PNG (processed is drawn over observed; processed is the ledger's COMPLETED green)."""

_SQDEG = 4.0 * math.pi * (180.0 / math.pi) ** 2
_BATCH = 2000  # CCDs turned into MOCs and merged at a time


@dataclasses.dataclass(frozen=True, order=True)
class CcdPointing:
    """One science CCD-visit: where it pointed and whether its job completed."""

    instrument: str
    visit: int
    detector: int
    ra: float
    dec: float
    rotation: float
    band: str
    processed: bool


def _band(instrument: str, physical_filter: str | None) -> str:
    from ..raw import camera_name  # noqa: PLC0415

    if not physical_filter:
        return "?"
    try:
        return get_instrument(camera_name(instrument)).band_of(physical_filter)
    except ValueError:  # BadInputError: not a filter of this camera
        return "?"


def pointings_from_rows(rows: Iterable[Submission]) -> list[CcdPointing]:
    """The submitted science CCDs with a pointing among ledger rows, sorted."""
    return sorted(
        CcdPointing(r.instrument, r.visit, r.detector, float(r.work.ra), float(r.work.dec),
                    float(r.work.rotation or 0.0), _band(r.instrument, r.work.physical_filter),
                    str(r.state) == "COMPLETED")
        for r in rows
        if r.intent == "science" and r.job_id and r.work.ra is not None and r.work.dec is not None)


def pointings_from_visits(visits: Iterable[VisitInfo]) -> list[CcdPointing]:
    """The same CCDs as :func:`pointings_from_rows`, from the night report's visits, sorted."""
    return sorted(
        CcdPointing(v.instrument, v.visit, c.detector, float(v.ra), float(v.dec), float(v.rotation or 0.0),
                    _band(v.instrument, v.physical_filter), c.state == "COMPLETED")
        for v in visits if v.intent == "science" and v.ra is not None and v.dec is not None
        for c in v.ccds if c.job_id)


def area_deg2(moc: Any) -> float:
    """Area of a MOC in square degrees."""
    return float(moc.sky_fraction) * _SQDEG


def check_order(order: int | str | None, field: str = "--order") -> int:
    """The MOC order to use (default `DEFAULT_ORDER`); a string is read as an integer.

    Raises
    ------
    BadInputError
        Raised if ``order`` is not an integer from `MIN_ORDER` to `MAX_ORDER`.
    """
    if order is None:
        return DEFAULT_ORDER
    if isinstance(order, str) and order.strip().isdigit():
        order = int(order)
    if isinstance(order, bool) or not isinstance(order, int) or not MIN_ORDER <= order <= MAX_ORDER:
        raise BadInputError(field, f"{order!r} is not a MOC order from {MIN_ORDER} to {MAX_ORDER}",
                            f"use {DEFAULT_ORDER} (area ~4% high), 15 (~2%) or 16 (~1%)")
    return order


@dataclasses.dataclass
class NightFootprint:
    """The night's coverage; MOCs are `mocpy.MOC` (immutable, safe to share)."""

    day_obs: int
    order: int
    observed: Any
    processed: Any
    bands: dict[str, dict[str, float]]
    """Band -> ``observed_deg2``, ``processed_deg2`` (areas of the band's own MOCs, not kept)."""
    ccds_observed: int
    ccds_processed: int
    files: dict[str, Path] = dataclasses.field(default_factory=dict)
    """What :func:`write_footprint` wrote: ``observed``, ``processed``, ``png`` -> path."""
    _png: bytes | None = dataclasses.field(default=None, repr=False)

    def image(self) -> bytes:
        """The PNG (`apbatch.report.footprint_draw.draw`), drawn once."""
        if self._png is None:
            from .footprint_draw import draw  # noqa: PLC0415 (it imports this module)

            self._png = draw(self)
        return self._png

    def summary(self) -> dict[str, Any]:
        """Areas (deg^2) and CCD counts, JSON-clean: ``order, observed_deg2, processed_deg2,
        ccds_observed, ccds_processed, bands`` (band -> ``{observed_deg2, processed_deg2}``)."""
        return {"order": self.order, "observed_deg2": round(area_deg2(self.observed), 4),
                "processed_deg2": round(area_deg2(self.processed), 4),
                "ccds_observed": self.ccds_observed, "ccds_processed": self.ccds_processed,
                "bands": {b: {k: round(v, 4) for k, v in a.items()} for b, a in sorted(self.bands.items())}}


def _union(mocs: list, order: int) -> Any:
    from mocpy import MOC  # type: ignore[import-untyped]

    if not mocs:
        return MOC.new_empty(order)
    return mocs[0] if len(mocs) == 1 else mocs[0].union(*mocs[1:])


def _vertices(polygon) -> np.ndarray:
    """(lon, lat) degrees of a `lsst.sphgeom.ConvexPolygon`'s vertices, lon in [0, 360)."""
    xyz = np.array([(v.x(), v.y(), v.z()) for v in polygon.getVertices()])
    lon = np.degrees(np.arctan2(xyz[:, 1], xyz[:, 0])) % 360.0
    lat = np.degrees(np.arcsin(np.clip(xyz[:, 2], -1.0, 1.0)))
    return np.column_stack([lon, lat])


def _ccd_mocs(ccds: Sequence[CcdPointing], order: int) -> list:
    """One MOC per CCD, in the order of ``ccds``."""
    from mocpy import MOC

    regions: dict[tuple, dict] = {}
    polys = []
    for c in ccds:
        key = (c.instrument, c.ra, c.dec, c.rotation)
        if key not in regions:  # every CCD of a visit from one call
            regions[key] = visit_regions(c.instrument, c.ra, c.dec, c.rotation)[1]
        try:
            polys.append(_vertices(regions[key][c.detector]))
        except KeyError:
            raise BadInputError("detector", f"{c.instrument} visit {c.visit}: detector {c.detector} is not a "
                                "science CCD", "check the ledger row") from None
    out: list = [None] * len(polys)
    by_size: dict[int, list[int]] = {}
    for i, p in enumerate(polys):  # from_polygons wants polygons of one vertex count per call
        by_size.setdefault(len(p), []).append(i)
    for idx in by_size.values():
        flat = [col for i in idx for col in (polys[i][:, 0], polys[i][:, 1])]
        for i, moc in zip(idx, MOC.from_polygons(flat, max_depth=order), strict=True):
            out[i] = moc
    return out


def _merge(ccds: list[CcdPointing], order: int) -> tuple[Any, Any]:
    """Observed and processed MOCs of ``ccds``, made and merged `_BATCH` CCDs at a time (a night's
    189,000 CCD MOCs at once would take gigabytes)."""
    observed: list = []
    processed: list = []
    for start in range(0, len(ccds), _BATCH):
        batch = ccds[start:start + _BATCH]
        mocs = _ccd_mocs(batch, order)
        observed = [_union(observed + mocs, order)]
        processed = [_union(processed + [m for c, m in zip(batch, mocs, strict=True) if c.processed], order)]
    return _union(observed, order), _union(processed, order)


@functools.lru_cache(maxsize=1)
def _build(ccds: tuple[CcdPointing, ...], order: int) -> tuple[Any, Any, dict[str, dict[str, float]]]:
    # cached: the text report and the HTML page of one run ask for the same night. One band at a
    # time, keeping its areas only: the MOCs of several bands at once would double the memory.
    observed: list = []
    processed: list = []
    bands: dict[str, dict[str, float]] = {}
    for band in sorted({c.band for c in ccds}):
        o, p = _merge([c for c in ccds if c.band == band], order)
        bands[band] = {"observed_deg2": area_deg2(o), "processed_deg2": area_deg2(p)}
        observed = [_union(observed + [o], order)]
        processed = [_union(processed + [p], order)]
    return _union(observed, order), _union(processed, order), bands


atexit.register(_build.cache_clear)  # free the MOCs while mocpy can still do it (no noise at exit)


def night_footprint(ccds: Iterable[CcdPointing], *, day_obs: int, order: int | None = None) -> NightFootprint:
    """The night's observed and processed coverage, also per band.

    Parameters
    ----------
    ccds : iterable of `CcdPointing`
        From :func:`pointings_from_rows` or :func:`pointings_from_visits`.
    day_obs : `int`
        The night, YYYYMMDD.
    order : `int`, optional
        HEALPix order of the MOCs (default `DEFAULT_ORDER`).

    Raises
    ------
    BadInputError
        Raised if ``order`` is out of range, or a CCD is not a science CCD of its camera.
    """
    order = check_order(order)
    key = tuple(sorted(ccds))
    observed, processed, bands = _build(key, order)
    return NightFootprint(day_obs=day_obs, order=order, observed=observed, processed=processed, bands=bands,
                          ccds_observed=len(key), ccds_processed=sum(c.processed for c in key))


def rows_summary(rows: Iterable[Submission], day_obs: int) -> dict[str, Any] | None:
    """`NightFootprint.summary` of ledger rows at `DEFAULT_ORDER`; `None` without a submitted science CCD."""
    ccds = pointings_from_rows(rows)
    return night_footprint(ccds, day_obs=day_obs).summary() if ccds else None


# ----------------------------------------------------------------------------- files
def footprint_paths(directory: str | Path, day_obs: int) -> dict[str, Path]:
    """``observed``: ``night-<day_obs>.moc.fits``, ``processed``: ``night-<day_obs>-processed.moc.fits``,
    ``png``: ``night-<day_obs>-footprint.png``, in ``directory``."""
    d = Path(directory)
    return {"observed": d / f"night-{day_obs}.moc.fits",
            "processed": d / f"night-{day_obs}-processed.moc.fits",
            "png": d / f"night-{day_obs}-footprint.png"}


def write_footprint(fp: NightFootprint, directory: str | Path, *, field: str = "--out") -> Mapping[str, Path]:
    """Write the two MOCs (FITS) and the PNG to ``directory``, each atomically; set ``fp.files``.

    The PNG is drawn before anything is written.

    Raises
    ------
    BadInputError
        Raised if a file cannot be written (no partial or temporary file is left).
    """
    image = fp.image()
    paths = footprint_paths(directory, fp.day_obs)
    try:
        for name, moc in (("observed", fp.observed), ("processed", fp.processed)):
            with replacing(paths[name]) as tmp:
                moc.save(str(tmp), format="fits", overwrite=True)
        with replacing(paths["png"]) as tmp:
            tmp.write_bytes(image)
    except OSError as exc:
        raise BadInputError(field, f"cannot write to {str(directory)!r}: {exc.strerror or exc}",
                            "choose a writable directory") from None
    fp.files = dict(paths)
    return fp.files
