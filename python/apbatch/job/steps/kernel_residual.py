"""What the matching kernel leaves around bright stars: its measured residual, as variance.

A kernel whose shape or spatial variation does not follow the science PSF exactly (an
atmospheric profile whose ellipticity turns around the CCD, a size that is not polynomial in
the position) leaves around every bright star a residual of both signs, a fixed fraction of
the star's flux: 5-6 sigma lobes 3-8 px from stars of 1e5 e-, which a constant
``flux_error_floor`` (a fraction of the local flux) does not cover, because the lobes lie
where the star's profile is already low.

:func:`residual_profile` measures that residual on the kernel's own fit stamps, as the excess
of the squared residual over the noise variance, per unit of the stamp's flux squared, in
rings around the stamp centre; :func:`add_star_variance` adds ``F^2 * profile(r)`` around each
bright star of flux ``F`` to the difference's variance, so that a residual of the size the
stamps show is not a detection, while a transient away from bright stars keeps its S/N.
Plain functions; no state.
"""

from __future__ import annotations

import numpy as np
from scipy.optimize import isotonic_regression

__all__ = ["add_star_variance", "box_fluxes", "residual_profile"]


def residual_profile(res: np.ndarray, var: np.ndarray, flux: np.ndarray, min_flux_fraction: float = 0.2
                     ) -> np.ndarray:
    """Radial profile of the kernel's excess squared residual per unit flux squared.

    Parameters
    ----------
    res, var : `numpy.ndarray`
        Residual (science - model) and noise variance of the fit stamps, ``(n, 2S+1, 2S+1)``.
    flux : `numpy.ndarray`
        Flux of each stamp's star (image units), ``(n,)``.
    min_flux_fraction : `float`
        Stamps fainter than this fraction of the median flux are left out (their residual
        is noise).

    Returns
    -------
    profile : `numpy.ndarray`
        ``profile[r]`` for integer radii ``r = 0 .. S`` (px): sum over stamps of the ring's
        mean ``res^2 - var`` (``var`` scaled so that the median ``res^2 / var`` is that of
        noise), over the sum of ``flux^2``; the centre pixel belongs to ring 1; fitted
        non-increasing outwards (isotonic regression), and non-negative.
    """
    n, side = res.shape[0], res.shape[1]
    half = side // 2
    if n == 0:
        return np.zeros(half + 1)
    use = flux > min_flux_fraction * np.median(flux)
    yy, xx = np.mgrid[-half : half + 1, -half : half + 1]
    # the centre pixel joins the first ring: one pixel per stamp is too noisy a ring
    ring = np.clip(np.rint(np.hypot(xx, yy)).astype(int), 1, half + 1).ravel()
    # the noise variance calibrated on the residual itself (median chi^2 of 1 dof is 0.455):
    # the fit's variance is not exact (template noise not convolved), and a bias of 10% of
    # the sky variance would hide the residual of a star's wing
    chi = res[use] ** 2 / np.maximum(var[use], 1e-30)
    scale = float(np.median(chi)) / 0.4549 if chi.size else 1.0
    excess = (res[use] ** 2 - scale * var[use]).sum(axis=0).ravel()
    counts = np.bincount(ring, minlength=half + 2)[: half + 1] * use.sum()
    prof = np.bincount(ring, weights=excess, minlength=half + 2)[: half + 1] / np.maximum(counts, 1)
    prof = prof * use.sum() / max(float((flux[use] ** 2).sum()), 1e-30)
    # the non-increasing profile closest to the rings' values (weighted by their pixels): a
    # shape mismatch is small at the centre and peaks in lobes a few px out, and the outer
    # rings are noise to be averaged, not maximised
    fit = isotonic_regression(prof[1:], weights=np.maximum(counts[1:], 1), increasing=False).x
    return np.maximum(np.concatenate([fit[:1], fit]), 0.0)


def add_star_variance(var: np.ndarray, x: np.ndarray, y: np.ndarray, flux: np.ndarray, profile: np.ndarray,
                      min_fraction: float = 0.05) -> int:
    """Add ``flux^2 * profile(r)`` around each star to ``var``, in place.

    Parameters
    ----------
    var : `numpy.ndarray`
        Variance plane of the difference (float32), changed in place.
    x, y, flux : `numpy.ndarray`
        Stars' positions (px) and fluxes (image units).
    profile : `numpy.ndarray`
        :func:`residual_profile`.
    min_fraction : `float`
        A star is skipped if its peak added variance is below this fraction of the median
        variance (a faint star's residual is far below the noise).

    Returns
    -------
    n_stars : `int`
        Stars whose residual variance was added.
    """
    if not len(profile) or not profile.max() > 0 or not len(x):
        return 0
    ny, nx = var.shape
    floor = min_fraction * float(np.median(var[:: 16, :: 16]))
    half = len(profile) - 1
    yy, xx = np.mgrid[-half : half + 1, -half : half + 1]
    rr = np.hypot(xx, yy)
    n = 0
    for xc, yc, f in zip(np.asarray(x, float), np.asarray(y, float), np.asarray(flux, float), strict=True):
        amp = f * f
        if not (np.isfinite(amp) and amp * profile[0] > floor):
            continue
        xi, yi = int(round(xc)), int(round(yc))
        y0, y1 = max(yi - half, 0), min(yi + half + 1, ny)
        x0, x1 = max(xi - half, 0), min(xi + half + 1, nx)
        if y0 >= y1 or x0 >= x1:
            continue
        r = rr[y0 - yi + half : y1 - yi + half, x0 - xi + half : x1 - xi + half]
        add = amp * np.interp(r, np.arange(half + 1), profile, right=0.0)
        var[y0:y1, x0:x1] += add.astype(np.float32)
        n += 1
    return n


def box_fluxes(img: np.ndarray, x: np.ndarray, y: np.ndarray, half: int) -> np.ndarray:
    """Sum of ``img`` over the ``(2 half + 1)``-square box around each (rounded) position, cut
    by the image border: a star's flux measured as :func:`residual_profile` normalises it."""
    ny, nx = img.shape
    out = np.zeros(len(x))
    for k, (xc, yc) in enumerate(zip(np.asarray(x, float), np.asarray(y, float), strict=True)):
        xi, yi = int(round(xc)), int(round(yc))
        box = img[max(yi - half, 0) : min(yi + half + 1, ny), max(xi - half, 0) : min(xi + half + 1, nx)]
        out[k] = float(box.sum(dtype=np.float64)) if box.size else 0.0
    return out
