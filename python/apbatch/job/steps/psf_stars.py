"""PSF star selection for :func:`~apbatch.job.steps.psf.measure_psf`: candidates, sizes, the stellar locus.

Sizes are Gaussian-weighted second moments corrected for the weight (independent of a
star's flux, unlike isophotal moments). The stellar locus is the smallest-size peak of
the candidates' log sizes that holds at least a quarter as many candidates as the highest
peak (galaxies are larger and in a galaxy-rich field outnumber the stars: the median of all
candidates was a galaxy's size there), then the members within 3 robust sigmas of a plane
``log size = a + b u + c v`` fitted to it (the seeing may change across the CCD).
Plain functions; no state.
"""

from __future__ import annotations

import warnings

import numpy as np
import pandas as pd
from scipy import ndimage
from scipy.spatial import cKDTree

from ...image import Image

__all__ = ["centred_stamp", "encircled", "encircled_profile", "inside", "psf_candidates", "stellar_locus",
           "weighted_sizes"]


def inside(cand: pd.DataFrame, h: int, nx: int, ny: int) -> pd.Series:
    """Whether each candidate's stamp of half-size ``h`` (plus its 2-3 px for sub-pixel centring)
    lies inside an ``ny`` x ``nx`` image."""
    cx, cy = cand["x"], cand["y"]
    return (cx > h + 2) & (cx < nx - h - 3) & (cy > h + 2) & (cy < ny - h - 3)


def encircled(img: np.ndarray) -> np.ndarray:
    """Fraction of ``img``'s sum within radius r + 0.5 of its centre, r = 0 .. half-size."""
    h = img.shape[0] // 2
    y, x = np.mgrid[-h : h + 1, -h : h + 1]
    r = np.rint(np.hypot(x, y)).astype(int).ravel()
    ring = np.bincount(r, weights=img.ravel().astype(float))[: h + 1]
    ee = np.maximum.accumulate(np.cumsum(ring))
    return ee / ee[-1] if ee[-1] > 0 else ee


def centred_stamp(img: np.ndarray, x: float, y: float, h: int) -> np.ndarray:
    """``2h+1`` square of ``img`` shifted (cubic spline) so that (x, y) is its centre."""
    xi, yi = int(round(x)), int(round(y))
    st = img[yi - h - 1 : yi + h + 2, xi - h - 1 : xi + h + 2].astype(np.float64)
    return ndimage.shift(st, (yi - y, xi - x), order=3, mode="nearest")[1:-1, 1:-1]


def weighted_sizes(img: np.ndarray, x: np.ndarray, y: np.ndarray, w: float) -> np.ndarray:
    """Flux-independent sizes: Gaussian-weighted (width ``w``) second moments, corrected for the weight."""
    h = int(np.ceil(3 * w))
    yy, xx = np.mgrid[-h : h + 1, -h : h + 1].astype(float)
    out = np.full(len(x), np.nan)
    for k, (xc, yc) in enumerate(zip(x, y, strict=False)):
        xi, yi = int(round(xc)), int(round(yc))
        if yi - h < 0 or xi - h < 0:
            continue
        st = img[yi - h : yi + h + 1, xi - h : xi + h + 1].astype(float)
        if st.shape != xx.shape:  # too near the edge for this weight
            continue
        r2 = (xx - (xc - xi)) ** 2 + (yy - (yc - yi)) ** 2
        wt = st * np.exp(-r2 / (2 * w * w))
        s = wt.sum()
        if s <= 0:
            continue
        m = (wt * r2).sum() / s / 2.0
        if 0 < m < w * w:
            out[k] = np.sqrt(m * w * w / (w * w - m))
    return out


def stellar_locus(size: np.ndarray, u: np.ndarray, v: np.ndarray, bw: float = 0.03) -> np.ndarray:
    """Members of the stellar locus: the smallest well-populated size peak, then a plane in (u, v)."""
    ls = np.log(np.where(size > 0, size, np.nan))
    ok = np.isfinite(ls)
    if ok.sum() < 5:
        return ok
    g = np.arange(ls[ok].min() - 2 * bw, ls[ok].max() + 2 * bw, bw / 4)
    dens = np.exp(-0.5 * ((g[:, None] - ls[ok][None, :]) / bw) ** 2).sum(axis=1)
    peak = (dens >= np.r_[-1, dens[:-1]]) & (dens >= np.r_[dens[1:], -1]) & (dens >= 0.25 * dens.max())
    peak &= dens >= 3.0  # at least a few candidates' worth
    g0 = g[np.flatnonzero(peak)[0]] if peak.any() else g[np.argmax(dens)]
    member = ok & (np.abs(ls - g0) < 0.15)
    for _ in range(3):
        if member.sum() < 8:
            break
        a = np.column_stack([np.ones(member.sum()), u[member], v[member]])
        coef = np.linalg.lstsq(a, ls[member], rcond=None)[0]
        res = ls - (coef[0] + coef[1] * u + coef[2] * v)
        spread = max(1.4826 * np.median(np.abs(res[member] - np.median(res[member]))), 0.02)
        member = ok & (np.abs(res) < 3.0 * spread)
    return member


def psf_candidates(img, sources, h, min_snr, isolation, saturation):
    ny, nx = img.shape
    xy = sources[["x", "y"]].to_numpy()
    nn = cKDTree(xy).query(xy, k=2)[0][:, 1] if len(xy) > 1 else np.full(len(xy), np.inf)
    ok = (sources["snr"] >= min_snr) & (sources["flag"] == 0) & (~sources["masked"]) & (nn > isolation)
    ok &= inside(sources, h, nx, ny)
    if saturation is not None:
        ok &= sources["peak"] < 0.8 * saturation
    return sources[ok]


def encircled_profile(img: Image, cand: pd.DataFrame, sources: pd.DataFrame, fwhm: float,
                       n: int = 40) -> np.ndarray | None:
    """Encircled energy out to ~8 FWHM (at most 64 px) from the median stack of the brightest stars, or None.

    Pixels near other sources (within 4 x their rms size + 1 FWHM) are left out of the stack,
    as are masked pixels, and the stack's level in its outermost ring is subtracted: in a
    galaxy-rich field the galaxies' light would otherwise pass for a broad wing.
    """
    ny, nx = img.shape
    hb = int(min(max(np.ceil(8.0 * fwhm), 24), 64))
    sel = cand[inside(cand, hb, nx, ny)].sort_values("snr", ascending=False).head(n)
    if len(sel) < 5:
        return None
    yy, xx = np.mgrid[-hb : hb + 1, -hb : hb + 1]
    core = np.hypot(xx, yy) <= 1.5 * fwhm
    sxy = sources[["x", "y"]].to_numpy()
    srad = 4.0 * sources["a"].to_numpy() + fwhm
    tree = cKDTree(sxy)
    stack = []
    for x, y in zip(sel["x"].to_numpy(), sel["y"].to_numpy(), strict=False):
        st = centred_stamp(img.image, x, y, hb)
        c = st[core].sum()
        if not (c > 0 and np.isfinite(c)):
            continue
        st = st / c
        xi, yi = int(round(x)), int(round(y))
        st[img.mask[yi - hb : yi + hb + 1, xi - hb : xi + hb + 1] != 0] = np.nan
        for k in tree.query_ball_point((x, y), hb * 1.42 + srad.max()):
            dx, dy = sxy[k, 0] - x, sxy[k, 1] - y
            if dx * dx + dy * dy > 1.0:  # not the star itself
                st[np.hypot(xx - dx, yy - dy) < srad[k]] = np.nan
        stack.append(st)
    if len(stack) < 5:
        return None
    with warnings.catch_warnings():  # a pixel masked in every stamp is a NaN, then 0
        warnings.simplefilter("ignore", RuntimeWarning)
        med = np.nanmedian(np.array(stack), axis=0)
        # the level of the outermost ring is diffuse light (faint galaxies, background
        # residuals) rather than PSF: a power-law wing loses < 60% of its light beyond hb
        r = np.hypot(xx, yy)
        ped = np.nanmedian(med[(r >= hb - 4) & (r <= hb)])
    med = med - (ped if np.isfinite(ped) else 0.0)
    return encircled(np.where(np.isfinite(med), med, 0.0))
