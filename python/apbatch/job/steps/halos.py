"""Saturated stars in a difference image: how far their unmatched wings reach.

A saturated star's core and bleed trail are masked (``SAT``) in the difference image, but
its wings are not: the matching kernel is fitted on unsaturated stars, and the relative
mismatch of the wings (a few per cent of the star's profile) becomes a residual that is
above the noise out to a radius that grows with the star's flux and with the seeing.

:func:`saturated_star_halos` sizes that radius per star. For every connected ``SAT`` region
of the difference mask (the science image's saturated cores and trails, and the warped
template's, which :func:`~apbatch.job.steps.subtract.subtract_images` carries over):

1. the star's amplitude ``A`` is fitted on the science image's unsaturated wings (an annulus
   just outside the saturated pixels: the median of ``image / profile``, robust to
   neighbours), with ``profile`` the measured PSF's radial profile extended by a Moffat
   tail (:func:`psf_tail`: index and width fitted to the PSF stamp, since the stamp itself
   stops at ~12 px, which is about one FWHM in bad seeing);
2. the halo radius is where ``A * profile(r)``, taken as a smooth level, would give a
   matched-filter S/N of ``max_snr`` (default 1): the filter (a Gaussian of the PSF's
   ``sigma``) turns a level ``L`` into ``S = sqrt(4 pi) sigma L / noise``, so the edge is at
   ``L = max_snr * noise / (sqrt(4 pi) sigma)``, 0.17 of the noise per pixel in 0.7" seeing and
   0.07 in 2", with ``noise`` the sky's around the star (the median variance over a box 4 times
   the fit's reach: next to the star the variance plane holds the star's own Poisson noise,
   which grows with its flux and made every halo ~21 px from 4e6 to 3e7 e-). The whole wing is
   assumed to be left over: a kernel of limited size cannot broaden a sharp template's wings to
   a bad-seeing science PSF's, and in 2" seeing that residual made 5-sigma detections 45 px
   from a 2e7 e- star;
3. the halo is that disc plus the saturated region widened by ``trail_fwhm`` FWHM (bleed
   trails spill charge beside them, and their residual is as wide as the PSF).

Without a science image (or when the annulus has no usable pixel) the radius falls back
to :func:`~apbatch.job.steps.defects.saturation_halos`'s rule (6 times the core radius).
"""

from __future__ import annotations

import dataclasses

import numpy as np
from scipy import ndimage

from ...image import MaskBits
from .psf import PsfModel

__all__ = ["MoffatTail", "SaturatedStar", "psf_tail", "saturated_star_halos"]

_UNUSABLE = int(MaskBits.SAT | MaskBits.BAD | MaskBits.NO_DATA | MaskBits.EDGE | MaskBits.CR)


@dataclasses.dataclass(frozen=True)
class MoffatTail:
    """A circular Moffat ``(1 + r^2 / alpha^2) ** -beta`` (peak 1) describing a PSF's profile."""

    alpha: float
    beta: float

    def __call__(self, r: np.ndarray | float) -> np.ndarray:
        """Profile at radius ``r`` px (1 at the centre)."""
        return (1.0 + np.square(r) / self.alpha**2) ** -self.beta

    def radius(self, ratio: float) -> float:
        """Radius at which the profile falls to ``ratio`` of its peak (0 if ``ratio >= 1``)."""
        if ratio >= 1.0:
            return 0.0
        return float(self.alpha * np.sqrt(max(ratio ** (-1.0 / self.beta) - 1.0, 0.0)))


@dataclasses.dataclass(frozen=True)
class SaturatedStar:
    """One saturated region: centre (px), core radius, fitted amplitude (e-/px at the centre of the
    profile; NaN if not fitted), the sky's noise per pixel around it and the halo radius masked."""

    x: float
    y: float
    core: float
    amplitude: float
    noise: float
    radius: float


def psf_tail(psf: PsfModel, default_beta: float = 2.5) -> MoffatTail:
    """Fit a Moffat to the PSF stamp's radial profile (in log space, on a grid of ``alpha`` and
    ``beta``, 1.5-6).

    When the stamp holds less than 1.5 (Gaussian-equivalent) FWHM of profile (bad seeing),
    ``beta = default_beta``, a wing between a Kolmogorov PSF's (~1.8) and a Moffat-3, and only
    ``alpha`` is fitted.
    """
    img = np.asarray(psf.image, float)
    h = img.shape[0] // 2
    yy, xx = np.mgrid[-h : h + 1, -h : h + 1]
    r = np.hypot(xx, yy)
    ri = np.round(r).astype(int)
    tot = np.bincount(ri.ravel(), img.ravel())
    cnt = np.bincount(ri.ravel())
    prof = tot / np.maximum(cnt, 1)
    rad = np.arange(prof.size, dtype=float)
    fwhm = psf.fwhm
    peak = prof[0] if prof[0] > 0 else img.max()
    use = (rad <= h) & (prof > 1e-4 * peak)
    betas = np.arange(1.5, 6.01, 0.25)
    if rad[use].max(initial=0.0) < 1.5 * fwhm or use.sum() < 4:
        betas = np.array([default_beta])
    logp = np.log(prof[use] / peak)
    best = (np.inf, default_beta, fwhm)
    for alpha in np.geomspace(0.2, 3.0, 57) * fwhm:
        for beta in betas:
            resid = logp + beta * np.log1p(rad[use] ** 2 / alpha**2)
            cost = float(np.sum((resid - np.median(resid)) ** 2))
            if cost < best[0]:
                best = (cost, float(beta), float(alpha))
    return MoffatTail(best[2], best[1])


def _amplitude(science: np.ndarray, smask: np.ndarray, region: np.ndarray, box: tuple, cy: float, cx: float,
               core: float, width: float, tail: MoffatTail) -> float:
    """Median of ``image / profile`` over an annulus just outside the saturated ``region``."""
    sub = science[box].astype(float)
    yy, xx = np.ogrid[box[0].start : box[0].stop, box[1].start : box[1].stop]
    r = np.hypot(yy - cy, xx - cx)
    near = ndimage.binary_dilation(region, iterations=2)
    ann = (r >= core + 1.0) & (r <= core + 1.0 + width) & ~near & ((smask[box] & _UNUSABLE) == 0)
    if ann.sum() < 8:
        return float("nan")
    ratio = sub[ann] / tail(r[ann])
    a = float(np.median(ratio))
    return a if a > 0 and np.isfinite(a) else float("nan")


def saturated_star_halos(
    mask: np.ndarray,
    psf: PsfModel,
    variance: np.ndarray,
    science: np.ndarray | None = None,
    science_mask: np.ndarray | None = None,
    max_snr: float = 1.0,
    trail_fwhm: float = 2.0,
    max_radius: float = 300.0,
) -> tuple[np.ndarray, list[SaturatedStar]]:
    """Halo masks of the saturated stars of a difference image, scaled with each star's flux.

    Parameters
    ----------
    mask : `numpy.ndarray`
        Difference-image mask (``SAT`` from the science image and the warped template).
    psf : `PsfModel`
        PSF of the science image (its profile, extended by :func:`psf_tail`, sizes the halo).
    variance : `numpy.ndarray`
        Difference-image variance (the local noise per pixel).
    science : `numpy.ndarray`, optional
        Background-subtracted science image, whose unsaturated wings give each star's flux.
    science_mask : `numpy.ndarray`, optional
        The science image's mask (default ``mask``).
    max_snr : `float`
        Halo edge: where the star's profile, as a smooth level, gives this matched-filter S/N.
    trail_fwhm : `float`
        Saturated pixels (cores, bleed trails) are widened by this many FWHM.
    max_radius : `float`
        Largest halo radius, px.

    Returns
    -------
    halo : `numpy.ndarray`
        Boolean, ``mask``'s shape: pixels in some saturated star's halo (saturated pixels included).
    stars : `list` [`SaturatedStar`]
        One entry per connected saturated region.
    """
    sat = (mask & int(MaskBits.SAT)) != 0
    halo = np.zeros(mask.shape, bool)
    stars: list[SaturatedStar] = []
    if not sat.any():
        return halo, stars
    fwhm = psf.fwhm
    tail = psf_tail(psf)
    level = max_snr / (np.sqrt(4.0 * np.pi) * psf.sigma)  # in units of the noise per pixel
    smask = mask if science_mask is None else science_mask
    ny, nx = mask.shape
    lab, _ = ndimage.label(sat, structure=np.ones((3, 3), int))
    widen = int(np.ceil(trail_fwhm * fwhm))
    typical = float(np.sqrt(np.median(variance[:: max(ny // 64, 1), :: max(nx // 64, 1)])))
    width = max(2.0 * fwhm, 6.0)
    for k, sl in enumerate(ndimage.find_objects(lab), start=1):
        if sl is None:
            continue
        ys, xs = np.nonzero(lab[sl] == k)
        # the star sits at the middle of its saturated region (bleed trails run both ways)
        cy = sl[0].start + 0.5 * (ys.min() + ys.max())
        cx = sl[1].start + 0.5 * (xs.min() + xs.max())
        core = 0.5 * min(sl[0].stop - sl[0].start, sl[1].stop - sl[1].start)
        reach = int(np.ceil(core + 2.0 + width))
        y0, y1 = max(int(cy) - reach, 0), min(int(cy) + reach + 1, ny)
        x0, x1 = max(int(cx) - reach, 0), min(int(cx) + reach + 1, nx)
        box = (slice(y0, y1), slice(x0, x1))
        # the difference's noise where the halo ends: the sky's, in a box 4 times the fit's
        # reach (the star's wing holds a few per cent of it). Not the noise next to the star,
        # which is the star's own Poisson noise and grows with its flux: with it, every halo
        # had the same ~21 px radius from 4e6 to 3e7 e- (NO_DATA is included: a saturated
        # template star's grown mask, where the variance is still computed)
        wide = max(4 * reach, 64)
        wbox = (slice(max(int(cy) - wide, 0), min(int(cy) + wide + 1, ny)),
                slice(max(int(cx) - wide, 0), min(int(cx) + wide + 1, nx)))
        var = variance[wbox][(mask[wbox] & int(MaskBits.SAT | MaskBits.BAD)) == 0]
        noise = float(np.sqrt(np.median(var))) if var.size else typical
        amp = float("nan")
        if science is not None and np.isfinite(noise) and noise > 0:
            amp = _amplitude(science, smask, lab[box] == k, box, cy, cx, core, width, tail)
        if np.isfinite(amp):
            r = tail.radius(level * noise / amp)
        else:  # the fixed rule of defects.saturation_halos
            r = 6.0 * core
        r = float(min(max(r, core + 3.0 * fwhm), max_radius))
        stars.append(SaturatedStar(float(cx), float(cy), float(core), amp, noise, r))
        y0, y1 = max(int(cy - r), 0), min(int(cy + r) + 1, ny)
        x0, x1 = max(int(cx - r), 0), min(int(cx + r) + 1, nx)
        yy, xx = np.ogrid[y0:y1, x0:x1]
        halo[y0:y1, x0:x1] |= (yy - cy) ** 2 + (xx - cx) ** 2 <= r * r
        # the saturated pixels widened by the seeing (a trail's residual is as wide as the PSF)
        wy0, wy1 = max(sl[0].start - widen, 0), min(sl[0].stop + widen, ny)
        wx0, wx1 = max(sl[1].start - widen, 0), min(sl[1].stop + widen, nx)
        own = np.zeros((wy1 - wy0, wx1 - wx0), bool)
        own[sl[0].start - wy0 : sl[0].stop - wy0, sl[1].start - wx0 : sl[1].stop - wx0] = lab[sl] == k
        halo[wy0:wy1, wx0:wx1] |= ndimage.binary_dilation(own, np.ones((3, 3), bool), iterations=widen)
    return halo, stars
