"""Astrometric check and fit of a CCD's WCS against reference positions (e.g. the template's sources).

Algorithm: project the reference (ra, dec) through the current WCS; vote for the offset
(1-px bins, smoothed) among all science-reference pairs closer than ``search_radius``; take
the peak, match nearest neighbours within ``match_radius`` of it, then fit a similarity
transform (shift, rotation, scale) by least squares with 3-sigma clipping. The WCS is
updated by moving ``CRPIX`` and rotating/scaling ``CD`` (exact for the camera's radial
distortion to first order in the small rotation).
"""

from __future__ import annotations

import copy
import dataclasses

import numpy as np
from astropy.wcs import WCS
from scipy import ndimage
from scipy.spatial import cKDTree

from ...errors import BadInputError

__all__ = ["AstrometryError", "AstrometryResult", "fit_wcs"]


class AstrometryError(BadInputError):
    """Raised if the science sources cannot be matched to the reference positions."""

    def __init__(self, problem: str):
        super().__init__("wcs", problem, "check the boresight/rotation in the header or the template")


@dataclasses.dataclass
class AstrometryResult:
    """Outcome of :func:`fit_wcs`: shift at the CCD centre (px), rotation (deg), scale, matches, RMS (")."""

    dx: float
    dy: float
    rotation_deg: float
    scale: float
    n_matched: int
    rms_arcsec: float


def _similarity(src: np.ndarray, dst: np.ndarray, w: np.ndarray):
    """Least squares dst = [[a, -b], [b, a]] src + t. Returns (a, b, tx, ty)."""
    n = len(src)
    A = np.zeros((2 * n, 4))
    A[0::2, 0], A[0::2, 1], A[0::2, 2] = src[:, 0], -src[:, 1], 1.0
    A[1::2, 0], A[1::2, 1], A[1::2, 3] = src[:, 1], src[:, 0], 1.0
    rhs = dst.reshape(-1)
    ww = np.repeat(w, 2)
    sol, *_ = np.linalg.lstsq(A * ww[:, None], rhs * ww, rcond=None)
    return sol


def fit_wcs(
    wcs: WCS,
    xy: np.ndarray,
    ref_radec: np.ndarray,
    search_radius: float = 50.0,
    match_radius: float = 2.0,
    max_sources: int = 500,
    min_matches: int = 6,
    pixel_scale_arcsec: float = 0.2,
) -> tuple[WCS, AstrometryResult]:
    """Fit a shift + rotation + scale correction of ``wcs``.

    Parameters
    ----------
    wcs : `astropy.wcs.WCS`
        Current (raw) WCS of the science image (0-based pixels).
    xy : `numpy.ndarray`
        (N, 2) science source positions, brightest first.
    ref_radec : `numpy.ndarray`
        (M, 2) reference positions in degrees, brightest first.
    search_radius : `float`
        Largest offset (px) searched (50 px = 10 arcsec on LSSTCam).
    match_radius : `float`
        Match tolerance (px) once the offset is known.

    Returns
    -------
    wcs : `astropy.wcs.WCS`
        A corrected copy.
    result : `AstrometryResult`
        Fit summary.

    Raises
    ------
    AstrometryError
        Raised if fewer than ``min_matches`` matches are found.
    """
    xy = np.asarray(xy, float)[:max_sources]
    ref_radec = np.asarray(ref_radec, float)[: 2 * max_sources]
    if len(xy) < min_matches or len(ref_radec) < min_matches:
        raise AstrometryError(f"too few sources to match ({len(xy)} science, {len(ref_radec)} reference)")
    rx, ry = wcs.world_to_pixel_values(ref_radec[:, 0], ref_radec[:, 1])
    ref = np.column_stack([rx, ry])
    ref = ref[np.isfinite(ref).all(axis=1)]
    tree = cKDTree(ref)
    pairs = tree.query_ball_point(xy, search_radius)
    dxs: list[np.ndarray] = []
    dys: list[np.ndarray] = []
    for i, js in enumerate(pairs):
        if js:
            d = xy[i] - ref[js]
            dxs.append(d[:, 0])
            dys.append(d[:, 1])
    if not dxs:
        raise AstrometryError("no reference source within the search radius of any science source")
    dx_all, dy_all = np.concatenate(dxs), np.concatenate(dys)
    r = int(np.ceil(search_radius))
    hist, xe, ye = np.histogram2d(dx_all, dy_all, bins=2 * r, range=[[-r, r], [-r, r]])
    hist = ndimage.uniform_filter(hist, 3, mode="constant")
    ix, iy = np.unravel_index(np.argmax(hist), hist.shape)
    off = np.array([0.5 * (xe[ix] + xe[ix + 1]), 0.5 * (ye[iy] + ye[iy + 1])])
    # match with the voted offset, then fit and clip
    c = np.asarray(wcs.wcs.crpix, float) - 1.0
    src_all = ref - c
    dist, idx = cKDTree(xy).query(ref + off, distance_upper_bound=match_radius + 1.5)
    keep = np.isfinite(dist)
    if keep.sum() < min_matches:
        raise AstrometryError(f"only {keep.sum()} matches with the voted offset {off.round(1)} px")
    src, dst = src_all[keep], xy[idx[keep]] - c
    w = np.ones(len(src))
    for _ in range(4):  # runs at least once: sol and res are bound after the loop
        sol = _similarity(src, dst, w)
        a, b, tx, ty = sol
        pred = np.column_stack([a * src[:, 0] - b * src[:, 1] + tx, b * src[:, 0] + a * src[:, 1] + ty])
        res = np.hypot(*(dst - pred).T)
        sig = max(1.4826 * np.median(res[w > 0]), 0.05)
        neww = (res < max(3 * sig, 0.3)).astype(float)
        if (neww == w).all():
            break
        w = neww
    n = int(w.sum())
    if n < min_matches:
        raise AstrometryError(f"only {n} matches survive clipping")
    a, b, tx, ty = sol
    rms = float(np.sqrt(np.mean(res[w > 0] ** 2)) * pixel_scale_arcsec)
    # p_true = R p_pred(rel. c) + t  =>  new crpix = c + t, CD' = CD R^-1 (see module docstring)
    R = np.array([[a, -b], [b, a]])
    out = copy.deepcopy(wcs)
    out.wcs.crpix = wcs.wcs.crpix + np.array([tx, ty])
    cd = wcs.wcs.cd if wcs.wcs.has_cd() else wcs.pixel_scale_matrix
    out.wcs.cd = cd @ np.linalg.inv(R)
    if out.sip is not None:
        from astropy.wcs import Sip

        out.sip = Sip(wcs.sip.a, wcs.sip.b, wcs.sip.ap, wcs.sip.bp, out.wcs.crpix)
    out.wcs.set()
    # the shift reported is at the detector centre, not at CRPIX
    ctr = np.array([wcs.pixel_shape[0] / 2.0, wcs.pixel_shape[1] / 2.0]) if wcs.pixel_shape else np.zeros(2)
    moved = R @ (ctr - c) + np.array([tx, ty]) + c - ctr
    return out, AstrometryResult(
        float(moved[0]), float(moved[1]), float(np.degrees(np.arctan2(b, a))), float(np.hypot(a, b)), n, rms
    )
