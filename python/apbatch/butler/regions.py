"""Sky regions of visits and CCDs, as the butler's ``visit`` and ``visit_detector_region`` records hold."""

from __future__ import annotations

from typing import Any

from lsst.sphgeom import ConvexPolygon, LonLat, UnitVector3d

from ..instruments import get_instrument

__all__ = ["sky_polygon", "visit_regions"]


def sky_polygon(corners: Any) -> ConvexPolygon:
    """The convex hull of sky points ((N, 2) RA/Dec degrees) as a `lsst.sphgeom.ConvexPolygon`.

    The hull, not the points in order: it does not depend on the camera's parity.
    """
    points = [UnitVector3d(LonLat.fromDegrees(float(r), float(d))) for r, d in corners]
    return ConvexPolygon.convexHull(points)


def visit_regions(instrument: str, ra: float, dec: float, rotation: float) -> tuple[ConvexPolygon, dict]:
    """Sky regions of a pointing: the whole focal plane, and each science CCD's (by detector id).

    Parameters
    ----------
    instrument : `str`
        Butler instrument name (a simulated camera uses the geometry it simulates).
    ra, dec, rotation : `float`
        Boresight and sky rotator angle, degrees (see `apbatch.instruments.Instrument.sky_wcs`).

    Returns
    -------
    visit : `lsst.sphgeom.ConvexPolygon`
        The convex hull of every science CCD's corners.
    ccds : `dict` [`int`, `lsst.sphgeom.ConvexPolygon`]
        Each science CCD's region, by detector id.

    Raises
    ------
    BadInputError
        Raised if ``instrument`` is not a known camera.
    """
    from ..raw import camera_name  # noqa: PLC0415

    camera = get_instrument(camera_name(instrument))
    corners = {d.id: camera.footprint(d, ra, dec, rotation) for d in camera.science_detectors}
    ccds = {det: sky_polygon(c) for det, c in corners.items()}
    return sky_polygon([p for c in corners.values() for p in c]), ccds
