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

from .psf import PsfModel

__all__ = ["add_measured_variance", "add_star_variance", "box_fluxes", "residual_profile"]


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


def add_measured_variance(diff: np.ndarray, var: np.ndarray, bad: np.ndarray, x: np.ndarray, y: np.ndarray,
                          psf: PsfModel, half: int, coherence: float, detect_sigma: float = 4.0,
                          min_sigma: float = 2.0, max_share: float = 0.7) -> int:
    """Add each bright star's own measured residual, beyond a change of its flux, to ``var``, in place.

    Around each star the difference is fitted with the local PSF (a real change of the star's
    brightness, a variable, stays in the fit and keeps its S/N); what is left is measured in
    rings as the excess of its square over ``var``, in units of its noise
    (``var * sqrt(2 / pixels)``). A ring's excess is the kernel's mismatch when it is spread
    around the star: two adjacent eighths of the ring hold less than ``max_share`` of it (a
    PSF-width mismatch is a whole ring, a shape mismatch lobes of both signs on opposite
    sides, while a transient beside the star sits in one or two eighths and must keep its
    S/N). A star has a mismatch when one such ring reaches ``detect_sigma`` (on noise alone
    1.2% of stars do at 4, 0.15% at 5; a mismatch of a 4e5 e- star reached 4-5); then its
    rings above ``min_sigma`` get their excess, times ``coherence``, added to ``var``,
    non-increasing outwards. ``coherence`` is the number of pixels a lobe is coherent over in
    the matched filter (about ``pi sigma^2``): a per-pixel variance equal to the lobe's mean
    square would leave the filtered lobe as significant as before.

    Parameters
    ----------
    diff, var : `numpy.ndarray`
        Difference and its variance (float32); ``var`` is changed in place.
    bad : `numpy.ndarray`
        Boolean, pixels left out of the fit and the rings (masked, no data).
    x, y : `numpy.ndarray`
        Stars' positions (px).
    psf : `PsfModel`
        The science PSF (its model at each star's position, cut or padded to the rings' box).
    half : `int`
        Radius (px) of the rings.
    coherence : `float`
        Factor on the measured excess (see above).
    detect_sigma, min_sigma : `float`
        Significance of the ring that shows a mismatch, and of the rings then added.
    max_share : `float`
        Largest share of a ring's excess two adjacent eighths may hold.

    Returns
    -------
    n_stars : `int`
        Stars with a mismatch.
    """
    ny, nx = var.shape
    yy, xx = np.mgrid[-half : half + 1, -half : half + 1]
    rr = np.hypot(xx, yy)
    ring = np.clip(np.rint(rr).astype(int), 1, half + 1)
    sector = ((np.arctan2(yy, xx) + np.pi) / (np.pi / 4)).astype(int) % 8
    n = 0
    for xc, yc in zip(np.asarray(x, float), np.asarray(y, float), strict=True):
        xi, yi = int(round(xc)), int(round(yc))
        if xi - half < 0 or yi - half < 0 or xi + half >= nx or yi + half >= ny:
            continue
        box = (slice(yi - half, yi + half + 1), slice(xi - half, xi + half + 1))
        d, v, ok = diff[box].astype(float), var[box].astype(float), ~bad[box]
        if ok.sum() < 0.8 * ok.size:
            continue
        p = psf.stamp(size=2 * half + 1, x=xc, y=yc)
        pw = p[ok]
        r = d - float((pw * d[ok]).sum() / max(float((pw * pw).sum()), 1e-30)) * p
        cells = (ring * 8 + sector)[ok]
        ex = np.bincount(cells, weights=r[ok] ** 2 - v[ok], minlength=8 * (half + 2)).reshape(-1, 8)
        ex = ex[1 : half + 1]
        cnt = np.maximum(np.bincount(ring[ok], minlength=half + 2)[1 : half + 1], 1)
        vm = np.bincount(ring[ok], weights=v[ok], minlength=half + 2)[1 : half + 1] / cnt
        exc = ex.sum(axis=1) / cnt
        pos = np.maximum(ex, 0.0)
        share = (pos + np.roll(pos, -1, axis=1)).max(axis=1) / np.maximum(pos.sum(axis=1), 1e-30)
        noise = vm * np.sqrt(2.0 / cnt)  # a ring with no usable pixel (all masked) has none: z 0
        z = np.divide(exc, noise, out=np.zeros_like(exc), where=noise > 0)
        spread = share < max_share
        # a mismatch must show in one ring beyond doubt; its weaker rings are then taken too
        if not (spread & (z > detect_sigma)).any():
            continue
        keep = spread & (z > min_sigma)
        # non-increasing outwards: what a lobe shows in its ring also covers the rings inside it
        prof = np.maximum.accumulate(np.where(keep, exc, 0.0)[::-1])[::-1] * coherence
        add = np.interp(rr, np.arange(1, half + 1), prof, left=prof[0], right=0.0)
        var[box] += add.astype(np.float32)
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
