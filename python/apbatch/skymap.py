"""A simple sky map for templates: tracts about given centres, each cut into overlapping patches.

A *tract* is a gnomonic (TAN) projection about its centre, North up and East left, at a
fixed pixel scale (0.2"/pixel by default, instrument-agnostic), covering a square of side
``2 * tract_radius_deg``. It is cut into a grid of square *patches* of ``patch_size`` pixels;
neighbouring patches overlap by ``overlap`` pixels. Patch ids are ``iy * nx + ix``.

Tract ids are the positions of the centres in the list, so a sky map is fully described by
its :meth:`SkyMap.to_dict` (YAML-friendly), from which the butler's ``skymap``/``tract``/
``patch`` dimension records and the template look-ups are both derived.
"""

from __future__ import annotations

import dataclasses
import math

import numpy as np
from astropy.wcs import WCS

from .errors import BadInputError

__all__ = ["PatchInfo", "SkyMap", "TractInfo"]


@dataclasses.dataclass(frozen=True)
class PatchInfo:
    """One patch: its ids, WCS (0-based pixels of the patch image), shape (ny, nx), sky corners."""

    tract: int
    patch: int
    index: tuple[int, int]
    wcs: WCS
    shape: tuple[int, int]
    corners: np.ndarray  # (4, 2) ra, dec


@dataclasses.dataclass(frozen=True)
class TractInfo:
    """One tract: centre, WCS of the whole tract (0-based) and its patch grid."""

    id: int
    ra: float
    dec: float
    wcs: WCS
    size: int
    n_patches: tuple[int, int]  # (nx, ny)


class SkyMap:
    """Tracts about ``tract_centers``, cut into patches.

    Immutable; safe to share between threads.

    Parameters
    ----------
    name : `str`
        Sky map name (butler ``skymap`` dimension value).
    tract_centers : `list` [(`float`, `float`)]
        (ra, dec) of each tract's centre, degrees.
    patch_size : `int`
        Patch side in pixels (overlap included).
    overlap : `int`
        Pixels shared by neighbouring patches.
    pixel_scale : `float`
        Arcsec per pixel.
    tract_radius_deg : `float`
        Half-side of a tract.

    Raises
    ------
    BadInputError
        Raised for an empty centre list, a declination outside [-90, 90], or sizes that do
        not make sense.
    """

    def __init__(
        self,
        name: str,
        tract_centers,
        patch_size: int = 4000,
        overlap: int = 100,
        pixel_scale: float = 0.2,
        tract_radius_deg: float = 2.0,
    ):
        centers = [(float(r) % 360.0, float(d)) for r, d in tract_centers]
        if not centers:
            raise BadInputError("tract_centers", "empty", "give at least one (ra, dec)")
        if any(abs(d) > 90 for _, d in centers):
            raise BadInputError("tract_centers", "declination outside [-90, 90]")
        if patch_size <= 2 * overlap or overlap < 0 or pixel_scale <= 0 or tract_radius_deg <= 0:
            raise BadInputError(
                "skymap",
                f"patch_size {patch_size}, overlap {overlap}, scale {pixel_scale}, "
                f"radius {tract_radius_deg} are inconsistent",
                "need patch_size > 2 * overlap >= 0 and positive scale and radius",
            )
        self.name = name
        self.centers = centers
        self.patch_size = int(patch_size)
        self.overlap = int(overlap)
        self.pixel_scale = float(pixel_scale)
        self.tract_radius_deg = float(tract_radius_deg)
        step = self.patch_size - self.overlap
        npatch = max(
            1, math.ceil((2 * self.tract_radius_deg * 3600 / self.pixel_scale - self.overlap) / step)
        )
        self._npatch = npatch
        self._size = npatch * step + self.overlap

    # --------------------------------------------------------------- (de)serialisation
    def to_dict(self) -> dict:
        """YAML/JSON-friendly description."""
        return {
            "name": self.name,
            "tract_centers": [list(c) for c in self.centers],
            "patch_size": self.patch_size,
            "overlap": self.overlap,
            "pixel_scale": self.pixel_scale,
            "tract_radius_deg": self.tract_radius_deg,
        }

    @classmethod
    def from_dict(cls, d: dict) -> SkyMap:
        """Inverse of :meth:`to_dict`."""
        try:
            return cls(
                d["name"],
                d["tract_centers"],
                d.get("patch_size", 4000),
                d.get("overlap", 100),
                d.get("pixel_scale", 0.2),
                d.get("tract_radius_deg", 2.0),
            )
        except (KeyError, TypeError) as exc:
            raise BadInputError(
                "skymap", f"bad sky map description: {exc}", "need name and tract_centers"
            ) from None

    # --------------------------------------------------------------- geometry
    @property
    def n_tracts(self) -> int:
        """Number of tracts."""
        return len(self.centers)

    def tract(self, tract_id: int) -> TractInfo:
        """Tract ``tract_id``.

        Raises
        ------
        BadInputError
            Raised if there is no such tract.
        """
        if not 0 <= int(tract_id) < len(self.centers):
            raise BadInputError(
                "tract", f"sky map {self.name!r} has no tract {tract_id}", f"use 0-{len(self.centers) - 1}"
            )
        ra, dec = self.centers[int(tract_id)]
        return TractInfo(int(tract_id), ra, dec, self._wcs(ra, dec, 0, 0), self._size, (self._npatch,) * 2)

    def _wcs(self, ra: float, dec: float, x0: int, y0: int) -> WCS:
        w = WCS(naxis=2)
        w.wcs.ctype = ["RA---TAN", "DEC--TAN"]
        w.wcs.crval = [ra, dec]
        # tract centre at 0-based pixel ((size-1)/2, (size-1)/2); FITS crpix is 1-based
        c = (self._size - 1) / 2.0
        w.wcs.crpix = [c - x0 + 1.0, c - y0 + 1.0]
        s = self.pixel_scale / 3600.0
        w.wcs.cd = [[-s, 0.0], [0.0, s]]
        w.wcs.radesys = "ICRS"
        return w

    def patch(self, tract_id: int, patch_id: int) -> PatchInfo:
        """Patch ``patch_id`` of tract ``tract_id``.

        Raises
        ------
        BadInputError
            Raised if there is no such tract or patch.
        """
        t = self.tract(tract_id)
        n = self._npatch
        if not 0 <= int(patch_id) < n * n:
            raise BadInputError("patch", f"tract {tract_id} has no patch {patch_id}", f"use 0-{n * n - 1}")
        iy, ix = divmod(int(patch_id), n)
        step = self.patch_size - self.overlap
        x0, y0 = ix * step, iy * step
        wcs = self._wcs(t.ra, t.dec, x0, y0)
        wcs.pixel_shape = (self.patch_size, self.patch_size)
        e = self.patch_size - 0.5
        r, d = wcs.pixel_to_world_values(np.array([-0.5, e, e, -0.5]), np.array([-0.5, -0.5, e, e]))
        return PatchInfo(
            t.id, int(patch_id), (ix, iy), wcs, (self.patch_size, self.patch_size), np.column_stack([r, d])
        )

    def patches_overlapping(self, corners_radec) -> list[PatchInfo]:
        """Patches (of every tract) that overlap a sky polygon's bounding box in the tract plane.

        Conservative: a rotated polygon may list a patch that only its bounding box touches.

        Parameters
        ----------
        corners_radec : array-like, shape (N, 2)
            (ra, dec) corners in degrees, e.g. a CCD footprint.

        Returns
        -------
        patches : `list` [`PatchInfo`]
            Sorted by (tract, patch).
        """
        corners = np.asarray(corners_radec, dtype=float).reshape(-1, 2)
        out = []
        step = self.patch_size - self.overlap
        for tid, (ra, dec) in enumerate(self.centers):
            # skip tracts whose tangent point is too far for the gnomonic projection to be sane
            cosang = np.sin(np.radians(dec)) * np.sin(np.radians(corners[:, 1])) + np.cos(
                np.radians(dec)
            ) * np.cos(np.radians(corners[:, 1])) * np.cos(np.radians(corners[:, 0] - ra))
            if np.any(cosang < math.cos(math.radians(45.0))):
                continue
            x, y = self._wcs(ra, dec, 0, 0).world_to_pixel_values(corners[:, 0], corners[:, 1])
            x0, x1, y0, y1 = x.min(), x.max(), y.min(), y.max()
            if x1 < -0.5 or y1 < -0.5 or x0 > self._size - 0.5 or y0 > self._size - 0.5:
                continue
            ix = range(
                max(0, int((x0 - self.patch_size) // step) + 1), min(self._npatch, int(x1 // step) + 1)
            )
            iy = range(
                max(0, int((y0 - self.patch_size) // step) + 1), min(self._npatch, int(y1 // step) + 1)
            )
            for j in iy:
                for i in ix:
                    if (
                        i * step <= x1 + 0.5
                        and i * step + self.patch_size >= x0 - 0.5
                        and j * step <= y1 + 0.5
                        and j * step + self.patch_size >= y0 - 0.5
                    ):
                        out.append(self.patch(tid, j * self._npatch + i))
        return out
