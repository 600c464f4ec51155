"""Warp template patch(es) onto the science pixel grid.

The science-pixel -> template-pixel map is evaluated exactly (through both WCSs) on a
coarse grid (``grid`` px) and interpolated to every pixel by a separable natural cubic
spline: two small matrix products, of rank 3-6 after an SVD of the nearly affine grid map,
evaluated in float32 about the patch centre (< 1e-3 px). The image is then resampled with
a cubic B-spline (``scipy.ndimage.map_coordinates(order=3)``), the variance by nearest
neighbour (a cubic kernel could make it negative; it is smooth) and the mask by nearest
neighbour of the mask dilated by one pixel. Several patches are mosaicked: a science
pixel takes the first patch that covers it. Pixels no patch covers (or that are within
4 px of a patch's edge in every patch) are ``NO_DATA``.

With ``pad > 0`` the template is warped onto the science grid grown by ``pad`` px on every
side (templates cover more than the CCD): the PSF-matching convolution then has real
template pixels beyond the CCD edge, and the difference is valid up to the edge.
:func:`crop_to_science` cuts such a padded template back to the science grid.
"""

from __future__ import annotations

import dataclasses
import functools

import numpy as np
from astropy.wcs import WCS
from scipy import ndimage
from scipy.interpolate import CubicSpline

from ...errors import BadInputError
from ...image import Image, MaskBits
from . import parallel

__all__ = ["NoTemplateOverlapError", "WarpPatch", "crop_to_science", "pixel_map", "prepare_warp", "shift_wcs",
           "template_unit", "warp_template"]


class NoTemplateOverlapError(BadInputError):
    """Raised if no template patch overlaps the science image."""

    def __init__(self, problem: str):
        super().__init__("template", problem, "retrieve the template patches covering the CCD footprint")


_EDGE_MARGIN = 4.0
_BAND_ROWS = 256
"""Output rows :func:`warp_template` resamples at a time (bounds its temporaries to ~30 MB)."""


def _spline_matrix(nodes: np.ndarray, n: int) -> np.ndarray:
    """(n, len(nodes)) matrix of natural-cubic-spline weights at 0..n-1."""
    return CubicSpline(nodes, np.eye(len(nodes)), bc_type="natural")(np.arange(n, dtype=float))


def _map_factors(
    sci_wcs: WCS, tmpl_wcs: WCS, shape: tuple[int, int], grid: int, region, origin=(0.0, 0.0), tol=1e-4
):
    """Low-rank factors ``(ay, by), (ax, bx)`` with ``ty - oy = ay @ by`` and ``tx - ox = ax @ bx``.

    On the science pixels of ``region``; ``origin`` is ``(oy, ox)``. The coarse-grid maps are
    split by SVD and only the components whose summed effect can exceed ``tol`` px are kept
    (a near-affine map needs 3-6 of the 65), so evaluating the interpolating spline at every
    pixel costs a rank-k instead of a rank-65 product.
    """
    ny, nx = shape
    gx = np.unique(np.r_[np.arange(0, nx, grid), nx - 1]).astype(float)
    gy = np.unique(np.r_[np.arange(0, ny, grid), ny - 1]).astype(float)
    X, Y = np.meshgrid(gx, gy)
    ra, dec = sci_wcs.pixel_to_world_values(X.ravel(), Y.ravel())
    tx, ty = tmpl_wcs.world_to_pixel_values(ra, dec)
    tx, ty = np.asarray(tx).reshape(X.shape), np.asarray(ty).reshape(X.shape)
    if not (np.isfinite(tx).all() and np.isfinite(ty).all()):
        raise NoTemplateOverlapError("the template WCS cannot map the science footprint")
    wy, wx = _spline_matrix(gy, ny), _spline_matrix(gx, nx)
    if region is not None:
        wy, wx = wy[region[0]], wx[region[1]]
    # |wy @ u| <= max row sum of |wy| for a unit vector u: bounds each dropped term
    lebesgue = np.abs(wy).sum(axis=1).max() * np.abs(wx).sum(axis=1).max()
    out = []
    for g in (ty - origin[0], tx - origin[1]):
        u, sv, vt = np.linalg.svd(g, full_matrices=False)
        tail = np.r_[np.cumsum(sv[::-1])[::-1], 0.0]
        k = int(np.argmax(tail * lebesgue <= tol))
        out.append((wy @ (u[:, :k] * sv[:k]), vt[:k] @ wx.T))
    return out


def pixel_map(
    sci_wcs: WCS,
    tmpl_wcs: WCS,
    shape: tuple[int, int],
    grid: int = 64,
    region: tuple[slice, slice] | None = None,
):
    """Template pixel coordinates (tx, ty) of the science pixels (of ``region``, default all).

    Returns two float64 arrays of the region's shape (what ``map_coordinates`` uses).
    """
    (ay, by), (ax, bx) = _map_factors(sci_wcs, tmpl_wcs, shape, grid, region)
    return ax @ bx, ay @ by


def _or_dilate(m: np.ndarray) -> np.ndarray:
    """Bitwise-OR of every pixel's 3x3 neighbourhood (a dilation that keeps all mask bits)."""
    a = m.copy()
    a[1:, :] |= m[:-1, :]
    a[:-1, :] |= m[1:, :]
    b = a.copy()
    b[:, 1:] |= a[:, :-1]
    b[:, :-1] |= a[:, 1:]
    return b


def _dilated_mask(mask: np.ndarray) -> np.ndarray | None:
    """:func:`_or_dilate` of ``mask``, as `numpy.uint16` when its bits fit; `None` if no bit is set."""
    lo, hi = (int(mask.min()), int(mask.max())) if mask.size else (0, 0)
    if lo == hi == 0:
        return None
    return _or_dilate(mask.astype(np.uint16) if lo >= 0 and hi <= 0xFFFF else mask)


def shift_wcs(wcs: WCS, offset: float) -> WCS:
    """A copy of ``wcs`` for pixel coordinates larger by ``offset`` on both axes (a grid grown by ``offset``).

    ``shift_wcs(w, p).pixel_to_world(x + p, y + p) == w.pixel_to_world(x, y)``, SIP distortion included.
    """
    out = wcs.deepcopy()
    out.wcs.crpix = wcs.wcs.crpix + float(offset)
    if out.sip is not None:
        from astropy.wcs import Sip

        out.sip = Sip(wcs.sip.a, wcs.sip.b, wcs.sip.ap, wcs.sip.bp, out.wcs.crpix)
    if wcs.pixel_shape is not None:
        out.pixel_shape = tuple(int(n + 2 * offset) for n in wcs.pixel_shape)
    out.wcs.set()
    return out


def crop_to_science(warped: Image, pad: int | None = None) -> Image:
    """The part of a padded warped template (:func:`warp_template` ``pad``) on the science grid.

    ``pad`` defaults to the template's ``WARPPAD`` metadata (0: the image itself is returned).
    Planes are views, not copies; the WCS is shifted back to science pixels.
    """
    p = int(warped.metadata.get("WARPPAD", 0) if pad is None else pad)
    if p == 0:
        return warped
    ny, nx = warped.shape
    if ny <= 2 * p or nx <= 2 * p:
        raise BadInputError("template", f"shape {warped.shape} is smaller than twice the pad {p}",
                            "crop only a template warped with that pad")
    box = (slice(p, ny - p), slice(p, nx - p))
    meta = dict(warped.metadata)
    meta["WARPPAD"] = 0
    wcs = shift_wcs(warped.wcs, -p) if warped.wcs is not None else None
    return Image(warped.image[box], warped.variance[box], warped.mask[box], wcs, meta)


def _check_template(t: Image, k: int) -> tuple[WCS, np.ndarray, np.ndarray]:
    """The template's WCS, variance and mask, checked to exist and to match the image's shape."""
    if t.wcs is None:
        raise BadInputError(f"template[{k}]", "has no WCS", "templates must carry a sky WCS")
    t_var, t_msk = t.variance, t.mask
    if t.image.ndim != 2 or t_var.shape != t.image.shape or t_msk.shape != t.image.shape:
        raise BadInputError(f"template[{k}]", "planes have inconsistent shapes", "rebuild the template")
    return t.wcs, t_var, t_msk


@dataclasses.dataclass(frozen=True)
class WarpPatch:
    """A template patch made ready for :func:`warp_template` (:func:`prepare_warp`).

    Everything here depends on the patch alone, not on the science image, so a job computes
    it before its raw arrives: cubic B-spline coefficients of the image (non-finite pixels
    zeroed), the variance, and the mask with non-finite pixels set ``NO_DATA`` and dilated by one
    pixel (or `None` when nothing is masked; `numpy.uint16` when its bits fit, as
    `apbatch.image.MaskBits` do: a job holds its patches from before the raw to the warp).
    ``metadata`` is the patch's (its ``BUNIT``, the coadd PSF description): the image planes
    themselves need not be kept.
    """

    wcs: WCS
    coef: np.ndarray
    variance: np.ndarray
    mask: np.ndarray | None
    metadata: dict

    @property
    def shape(self) -> tuple[int, int]:
        """(ny, nx) of the patch."""
        return (int(self.coef.shape[0]), int(self.coef.shape[1]))


def prepare_warp(templates: list[Image]) -> list[WarpPatch]:
    """The science-independent part of :func:`warp_template` for each patch.

    Raises
    ------
    BadInputError
        Raised if a patch has no WCS or inconsistent planes.
    """
    out = []
    for k, t in enumerate(templates):
        t_wcs, t_var, t_msk = _check_template(t, k)
        img = np.asarray(t.image, np.float32)
        tvar = np.asarray(t_var, np.float32)
        tmask = np.asarray(t_msk, np.int32)
        bad = ~np.isfinite(img) | ~np.isfinite(tvar)
        if bad.any():
            img = np.where(bad, np.float32(0), img)
            tvar = np.where(bad, np.float32(0), tvar)
            tmask = tmask | np.where(bad, np.int32(MaskBits.NO_DATA), np.int32(0))
        # float32 spline coefficients; 'mirror' needs no padding (covered pixels are >= 4 px inside)
        coef = ndimage.spline_filter(img, order=3, output=np.float32, mode="mirror")
        out.append(WarpPatch(t_wcs, coef, tvar, _dilated_mask(tmask), dict(t.metadata)))
    return out


def warp_template(
    templates: list[Image] | list[WarpPatch],
    sci_wcs: WCS,
    shape: tuple[int, int],
    grid: int = 64,
    min_coverage: float = 0.0,
    pad: int = 0,
) -> Image:
    """Resample template patches onto the science grid.

    Parameters
    ----------
    templates : `list` [`Image`] or `list` [`WarpPatch`]
        Template patches (each with its own WCS); non-finite pixels are treated as ``NO_DATA``.
        Patches already through :func:`prepare_warp` skip that part (the result is the same).
    sci_wcs : `astropy.wcs.WCS`
        The science image's (fitted) WCS.
    shape : `tuple` [`int`, `int`]
        Science image shape (ny, nx).
    grid : `int`
        Spacing (px) of the exactly-computed map.
    min_coverage : `float`
        Fraction of the science pixels that must be covered; below it the template is refused.
    pad : `int`
        Grow the output grid by this many pixels on every side (at least the PSF-matching
        kernel's half-size lets the difference be valid up to the CCD edge).

    Returns
    -------
    warped : `Image`
        The template on the science grid grown by ``pad`` (WCS ``sci_wcs`` shifted by ``pad``);
        metadata ``COVERAGE`` is the covered fraction of the science pixels, ``WARPPAD`` the pad.

    Raises
    ------
    NoTemplateOverlapError
        Raised if no patch overlaps the science image (or less than ``min_coverage``).
    """
    if not templates:
        raise NoTemplateOverlapError("no template patch given")
    unit = template_unit(templates)
    patches = [t if isinstance(t, WarpPatch) else prepare_warp([t])[0] for t in templates]
    pad = int(pad)
    if pad < 0:
        raise BadInputError("pad", f"{pad} px", "pad must be >= 0")
    sci_shape = (int(shape[0]), int(shape[1]))
    if pad:
        sci_wcs = shift_wcs(sci_wcs, pad)
        shape = (sci_shape[0] + 2 * pad, sci_shape[1] + 2 * pad)
    ny, nx = shape
    out = np.zeros(shape, np.float32)
    var = np.zeros(shape, np.float32)
    msk = np.full(shape, int(MaskBits.NO_DATA), np.int32)
    filled = np.zeros(shape, bool)
    for p in patches:
        t_wcs = p.wcs
        tny, tnx = p.shape
        # coarse check first: skip patches that miss the CCD entirely
        gx = np.linspace(0, nx - 1, 17)
        gy = np.linspace(0, ny - 1, 17)
        X, Y = np.meshgrid(gx, gy)
        cx, cy = t_wcs.world_to_pixel_values(*sci_wcs.pixel_to_world_values(X.ravel(), Y.ravel()))
        cx, cy = np.asarray(cx), np.asarray(cy)
        cell_x, cell_y = (nx - 1) / 16.0, (ny - 1) / 16.0
        mgn = 1.5 * max(cell_x, cell_y, grid)  # a node-to-node cell, in (about equal) template pixels
        inside = (cx > -mgn) & (cx < tnx + mgn) & (cy > -mgn) & (cy < tny + mgn)
        if not inside.any():
            continue
        # science region this patch can cover, from the coarse check (plus a margin)
        ins = inside.reshape(X.shape)
        rr, cc = np.flatnonzero(ins.any(axis=1)), np.flatnonzero(ins.any(axis=0))
        r0, r1 = max(int(gy[rr[0]] - cell_y), 0), min(int(gy[rr[-1]] + cell_y) + 1, ny)
        c0, c1 = max(int(gx[cc[0]] - cell_x), 0), min(int(gx[cc[-1]] + cell_x) + 1, nx)
        region = (slice(r0, r1), slice(c0, c1))
        # float32 template coordinates relative to the patch centre (rounding < 5e-4 px for
        # patches up to 16k px), stacked as map_coordinates wants them
        oy, ox = 0.5 * (tny - 1), 0.5 * (tnx - 1)
        (ay, by), (ax, bx) = _map_factors(sci_wcs, t_wcs, shape, grid, region, origin=(oy, ox))
        factors = (ay.astype(np.float32), by.astype(np.float32), ax.astype(np.float32), bx.astype(np.float32))
        # a band of rows at a time: every value is computed pixel by pixel, so the result is the
        # same as in one piece, without CCD-sized coordinate and index temporaries (~600 MB);
        # bands write disjoint rows, so the job's threads take one band each
        planes = [a[r0:r1, c0:c1] for a in (out, var, msk, filled)]
        parallel.for_each(functools.partial(_warp_band, p, factors, (oy, ox), planes),
                          range(0, r1 - r0, _BAND_ROWS))
    coverage = float(filled[pad : ny - pad, pad : nx - pad].mean())
    if coverage == 0.0 or coverage < min_coverage:
        raise NoTemplateOverlapError(f"template patches cover {coverage:.1%} of the science image")
    meta: dict[str, float | str] = {"COVERAGE": coverage, "NPATCH": len(templates), "WARPPAD": pad}
    if unit:
        meta["BUNIT"] = unit
    return Image(out, var, msk, sci_wcs, meta)


def _warp_band(p: WarpPatch, factors, origin: tuple[float, float], planes: list[np.ndarray], a: int) -> None:
    """Warp patch ``p`` onto the band of :data:`_BAND_ROWS` rows from row ``a`` of its region.

    ``factors`` are the float32 ``(ay, by, ax, bx)`` of the patch's region, ``origin`` is the
    patch centre (oy, ox) and ``planes`` the region's views ``out``, ``var``, ``msk``, ``filled``
    of the output. Pixels already ``filled`` by an earlier patch are kept.
    """
    ay, by, ax, bx = factors
    b = min(a + _BAND_ROWS, ay.shape[0])
    out, var, msk, filled = (x[a:b] for x in planes)
    tny, tnx = p.shape
    oy, ox = origin
    coords = np.empty((2, b - a, by.shape[1]), np.float32)
    np.matmul(ay[a:b], by, out=coords[0])
    np.matmul(ax[a:b], bx, out=coords[1])
    # 4 px inside the patch: the spline coefficients near a patch edge depend on the
    # boundary rule, so a seam between patches would show
    e = _EDGE_MARGIN
    cy, cx = coords
    cov = (cx >= e - ox) & (cx <= tnx - 1 - e - ox) & (cy >= e - oy) & (cy <= tny - 1 - e - oy)
    cov &= ~filled
    del cx, cy
    if not cov.any():
        return
    partial = not bool(cov.all())
    coords[0] += np.float32(oy)
    coords[1] += np.float32(ox)
    if partial:  # only the covered pixels
        coords = coords[:, cov]
    w_img = parallel.map_coordinates(p.coef, coords, order=3, mode="mirror", prefilter=False)
    # variance and mask: nearest pixel (the mask dilated by one pixel first, keeping every bit)
    # flat index of the nearest pixel; outside pixels are clipped (and not covered anyway)
    np.rint(coords, out=coords)
    itype = np.int32 if p.coef.size < 2**31 else np.intp
    flat = coords[0].astype(itype)
    flat *= itype(tnx)
    flat += coords[1].astype(itype)
    del coords
    w_var = np.take(p.variance.ravel(), flat, mode="clip")
    w_msk = np.take(p.mask.ravel(), flat, mode="clip") if p.mask is not None else None
    if partial:
        out[cov], var[cov] = w_img, w_var
        msk[cov] = w_msk if w_msk is not None else 0
    else:
        out[...], var[...] = w_img, w_var
        msk[...] = w_msk if w_msk is not None else 0
    filled |= cov


def template_unit(templates: list[Image] | list[WarpPatch]) -> str:
    """The pixel unit (``BUNIT``) the template patches share; ``""`` when none says.

    Resampling keeps the unit, so the warped template says it too: the job's flux calibration
    reads it from there (a warped template without ``BUNIT`` once left every DIA flux in
    electrons while the alerts said nJy).

    Raises
    ------
    BadInputError
        Raised if the patches disagree (one nJy, another electrons).
    """
    units = {str(t.metadata.get("BUNIT", "")).strip() for t in templates}
    if len(units) > 1:
        raise BadInputError("template_coadd.BUNIT", f"patches disagree: {sorted(units)}",
                            "rebuild the templates in one unit (nJy)")
    return units.pop() if units else ""
