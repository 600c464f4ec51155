"""Detection on a difference image: residual background, matched filter, peaks.

1. :func:`difference_background`: the smooth level the subtraction leaves (the kernel's
   background terms are only a plane; faint unresolved stars' wing residuals and flat-field
   errors add a level of a few 0.01 sigma per pixel, which is 0.2 sigma in the matched filter
   and made positive noise detections 3-7 times as common as negative ones). A sep mesh
   (``box`` px cells, sigma-clipped mode, median-filtered over 3x3 cells) over pixels that
   are neither masked nor in a saturated star's halo.
2. :func:`filtered_snr`: the matched filter ``S = (G*D) / sqrt(G^2 * V)`` with a Gaussian ``G``
   of the PSF's sigma, zero outside the image (``mode="constant"``: reflecting the image at
   its border would count border pixels twice in the signal but not in the noise), so that
   ``S`` is a normalised S/N up to the edge of the valid region. ``V`` is the variance less
   its pixels' own Poisson noise, which ISR's variance plane holds (``self_term``: the
   difference times the slope of variance on image, :func:`self_term_slope`). It is rescaled so that its
   robust spread over clean pixels (not zeroed, not in a halo) is 1, and re-centred on the
   median of those pixels.
3. :func:`find_peaks`: connected regions above +-``threshold``; one peak per region, except
   in ``split`` pixels (saturated stars' halos), where every local maximum at least a FWHM
   from a higher one is a peak, so that a transient is not merged into a halo's residual.

The noise rescale handed to the PSF fit (:func:`detection_image`'s ``scale``) is the filter's
spread without the sources (:func:`source_free_spread`: pixels within 2 PSF sigma of a
5-sigma excursion left out): sources are not noise, and in 2" seeing the 400 injected
transients and the stars' residuals (~2.4% of the pixels) raised the spread over every clean
pixel from 1.050 (PSF fits on 23677 blank-sky positions) to 1.074, so that every PSF-fit
error was 2.3% too large. Detection keeps the spread over every clean pixel: normalised by
the source-free one, ``S`` gave 2-3% more S/N 5-10 transients in 2" seeing but one more
unflagged false detection on 4 of 12 grid CCDs.
"""

from __future__ import annotations

import numpy as np
import sep
from scipy import ndimage

from ...image import Image, MaskBits
from . import parallel
from .halos import saturated_star_halos
from .psf import PsfModel
from .subtract import dilate_bits

__all__ = ["ZERO_BITS", "detection_image", "difference_background", "filtered_snr", "find_peaks",
           "self_term_slope", "source_free_spread"]

ZERO_BITS = int(MaskBits.BAD | MaskBits.SAT | MaskBits.NO_DATA | MaskBits.EDGE)
"""Mask bits whose pixels are zeroed before filtering and ignored by the measurement."""


def detection_image(diff: Image, psf: PsfModel, science: Image | None):
    """Halos, residual background and the normalised S/N image of a difference.

    ``diff.image`` loses its residual background and ``diff.mask`` gets ``SUSPECT`` on the
    halos, in place. Returns ``(s, scale, offset, halo, n_saturated_stars, background_rms)``:
    ``s`` normalised by the filter's spread over every clean pixel (:func:`filtered_snr`),
    ``scale`` the noise rescale of a PSF fit on the difference (that spread times
    :func:`source_free_spread`).
    """
    mask = diff.mask
    zero = (mask & ZERO_BITS) != 0
    # saturated cores and trails, and the first FWHM around them, are not measurable
    zero |= dilate_bits(mask, int(MaskBits.SAT), int(np.ceil(psf.fwhm)))
    # interpolated defects (bad columns, cosmic rays) leave residuals in the pixels beside them
    # when a star crosses them: keep detections 2 px clear of interpolated pixels
    zero |= dilate_bits(mask, int(MaskBits.INTRP | MaskBits.BAD), 2)
    halo, stars = saturated_star_halos(
        mask, psf, diff.variance,
        science=science.image if science is not None else None,
        science_mask=science.mask if science is not None else None,
    )
    mask[halo] |= MaskBits.SUSPECT
    bkg = difference_background(diff.image, zero | halo)
    diff.image = np.subtract(diff.image, bkg, dtype=np.float32)
    bkg_rms = float(np.std(bkg[::16, ::16]))
    del bkg
    s, scale, offset = filtered_snr(diff.image, diff.variance, zero, psf.sigma, ignore=halo)
    # the PSF fit's rescale: the noise's own spread, without the sources
    scale *= source_free_spread(s, zero | halo, psf.sigma)
    return s, scale, offset, halo, len(stars), bkg_rms


def difference_background(image: np.ndarray, exclude: np.ndarray, box: int = 128) -> np.ndarray:
    """Smooth residual level of a difference image (float32, its shape).

    Parameters
    ----------
    image : `numpy.ndarray`
        Difference image.
    exclude : `numpy.ndarray`
        Boolean, pixels the fit ignores (masked pixels, saturated stars' halos).
    box : `int`
        Mesh cell, px (64-128: larger than a PSF and a halo's residual ring, smaller than the
        flat-field and scattered-light structure).
    """
    data = np.ascontiguousarray(image, dtype=np.float32)
    bkg = sep.Background(data, mask=np.ascontiguousarray(exclude), bw=box, bh=box, fw=3, fh=3)
    return np.asarray(bkg.back(), dtype=np.float32)


def filtered_snr(
    image: np.ndarray, variance: np.ndarray, zero: np.ndarray, sigma: float, ignore: np.ndarray | None = None,
    self_term: bool = True,
) -> tuple[np.ndarray, float, float]:
    """Matched-filter S/N image, normalised on clean pixels.

    Parameters
    ----------
    image, variance : `numpy.ndarray`
        Difference image (its residual background removed) and variance.
    zero : `numpy.ndarray`
        Boolean, pixels set to zero before filtering (and in ``S``).
    sigma : `float`
        Gaussian-equivalent PSF sigma, px.
    ignore : `numpy.ndarray`, optional
        Boolean, pixels left out of the normalisation (saturated stars' halos).
    self_term : `bool`
        Take each pixel's own noise (``image`` clipped at 4 sigma and at a quarter of the
        variance, times :func:`self_term_slope`) off the variance first:
        ``variance`` holds it when it was made from the pixels' values (Poisson, as ISR
        does), and without this positive noise peaks lose S/N and negative ones gain it
        (1.35 times as many negative false detections as positive on the grid).

    Returns
    -------
    s : `numpy.ndarray`
        float32 S/N image.
    scale : `float`
        Robust spread of the raw ``S`` (the noise correlation the variance plane misses).
    offset : `float`
        Median of the raw ``S`` over clean pixels (subtracted; sigma units of the raw ``S``).
    """
    d = np.where(zero, np.float32(0), image).astype(np.float32, copy=False)
    v = np.where(zero, np.float32(0), variance).astype(np.float32, copy=False)
    beta = self_term_slope(d, v, zero) if self_term else 0.0
    if beta > 0:
        # ISR's variance is the pixel's own value (Poisson), so it holds the pixel's noise: a
        # pixel that fluctuated up has a larger variance and less S/N, one that fluctuated
        # down more. The difference is mostly that noise: taking beta times it off leaves
        # the variance of the expected value. Clipped at 4 sigma per pixel (beyond that a
        # pixel is a source or a residual, not a fluctuation) and at a quarter of it.
        # (one clip at the lowest variance's limit, then the few pixels beyond it at their
        # own: 0.05 s on a 4k x 4k CCD where a per-pixel limit everywhere took 0.18 s)
        def limit(var):
            return np.minimum(4.0 * np.sqrt(np.maximum(var, 0.0)), 0.25 * var)

        sample = v[::7, ::7]
        low = np.float32(limit(float(sample[sample > 0].min()))) if (sample > 0).any() else np.float32(0)
        own = np.clip(d, -low, low)
        far = np.flatnonzero((d > low) | (d < -low))
        if far.size:
            lim = limit(v.ravel()[far]).astype(np.float32)
            own.ravel()[far] = np.clip(d.ravel()[far], -lim, lim)
        own *= np.float32(beta)
        v -= own
        del own
    # filtered noise variance: G^2 * V, with G^2 a Gaussian of sigma / sqrt(2) over 4 pi sigma^2
    num, den = parallel.both(
        lambda: ndimage.gaussian_filter(d, sigma, truncate=3.0, output=d, mode="constant"),
        lambda: ndimage.gaussian_filter(v, sigma / np.sqrt(2), truncate=3.0, output=v, mode="constant"))
    np.maximum(den, np.float32(1e-12 * 4 * np.pi * sigma * sigma), out=den)
    np.sqrt(den, out=den)
    s = np.divide(num, den, out=num)
    s *= np.float32(np.sqrt(4 * np.pi) * sigma)
    del den  # (v's buffer)
    s[zero] = 0.0
    rng = np.random.default_rng(4321)
    idx = rng.integers(0, s.size, size=min(s.size, 400_000))
    keep = ~zero.ravel()[idx]
    if ignore is not None:
        keep &= ~ignore.ravel()[idx]
    z = s.ravel()[idx][keep]
    if z.size > 100:
        offset = float(np.median(z))
        scale = float(1.4826 * np.median(np.abs(z - offset)))
    else:
        offset, scale = 0.0, 1.0
    s -= np.float32(offset)
    s /= np.float32(scale)
    s[zero] = 0.0
    return s, scale, offset


def self_term_slope(image: np.ndarray, variance: np.ndarray, zero: np.ndarray,
                    n_sample: int = 100_000) -> float:
    """How much of a pixel's own value its variance holds: the slope of variance on image.

    On random clean pixels, ``variance`` less the mean of its 8 neighbours (which removes
    stars, gradients and every smooth structure, and is independent of the pixel's own
    noise) is regressed on ``image`` (pixels beyond 4 sigma left out). A Poisson variance
    made from the science pixels gives about the science's share of the difference's noise
    (1.00 on the issue-10 grid's CCDs, whose variance the subtraction also rescaled by its
    noise ratio), a variance plane that does not follow the pixels 0.

    Returns
    -------
    beta : `float`
        The slope, within [0, 1]; 0 with fewer than 1000 usable pixels.
    """
    ny, nx = image.shape
    if ny < 3 or nx < 3:
        return 0.0
    rng = np.random.default_rng(2468)
    m = min(n_sample, (ny - 2) * (nx - 2))
    iy, ix = rng.integers(1, ny - 1, m), rng.integers(1, nx - 1, m)
    nb = [(dy, dx) for dy in (-1, 0, 1) for dx in (-1, 0, 1) if dy or dx]
    ok = ~zero[iy, ix]
    for dy, dx in nb:
        ok &= ~zero[iy + dy, ix + dx]
    iy, ix = iy[ok], ix[ok]
    v = variance[iy, ix].astype(float)
    d = image[iy, ix].astype(float)
    around = sum(variance[iy + dy, ix + dx].astype(float) for dy, dx in nb) / len(nb)
    use = (v > 0) & (np.abs(d) < 4 * np.sqrt(np.maximum(v, 0)))
    if use.sum() < 1000:
        return 0.0
    d, dv = d[use], (v - around)[use]
    return float(np.clip((d * dv).sum() / max(float((d * d).sum()), 1e-30), 0.0, 1.0))


def source_free_spread(
    s: np.ndarray,
    exclude: np.ndarray,
    sigma: float,
    source_nsigma: float = 5.0,
    source_grow: float = 2.0,
    n_sample: int = 400_000,
) -> float:
    """Robust spread of a normalised S/N image over clean pixels away from the sources.

    Pixels in ``exclude`` and those within ``source_grow`` x ``sigma`` px (rounded up to
    8-px cells) of a pixel where ``|s - median|`` exceeds ``source_nsigma`` times the spread
    of every clean pixel are left out: what is left is noise (on noise alone nothing reaches
    5 sigma and the result is the plain spread).

    Parameters
    ----------
    s : `numpy.ndarray`
        S/N image (:func:`filtered_snr`).
    exclude : `numpy.ndarray`
        Boolean, pixels left out (zeroed, saturated stars' halos).
    sigma : `float`
        PSF sigma, px.
    source_nsigma, source_grow : `float`
        Excursion level (in spreads) and growth (in ``sigma``) that make a source.
    n_sample : `int`
        Random pixels the spreads are measured on.

    Returns
    -------
    spread : `float`
        1.4826 x the median absolute deviation of ``s`` from its median on those pixels;
        1.0 with 100 clean pixels or fewer.
    """
    rng = np.random.default_rng(4321)
    idx = rng.integers(0, s.size, size=min(s.size, n_sample))
    keep = ~exclude.ravel()[idx]
    level, spread = _median_spread(s.ravel()[idx][keep])
    if spread <= 0:
        return 1.0
    near = _near_excursions(s, level, source_nsigma * spread, source_grow * sigma, idx)
    _, clean = _median_spread(s.ravel()[idx][keep & ~near])
    return clean if clean > 0 else spread


def _near_excursions(s: np.ndarray, level: float, limit: float, radius: float, idx: np.ndarray,
                     block: int = 8) -> np.ndarray:
    """Whether each flat index ``idx`` of ``s`` is within ``radius`` px (at least; rounded up to
    ``block`` px cells) of a pixel with ``|s - level| > limit``: a cell map, dilated, not a pixel
    map (one pass over the image instead of a dilation of it)."""
    ny, nx = s.shape
    cy, cx = ny // block, nx // block
    if cy == 0 or cx == 0:
        return np.zeros(idx.shape, bool)
    sub = s[: cy * block, : cx * block]
    exc = sub > np.float32(level + limit)
    exc |= sub < np.float32(level - limit)
    cells = exc.reshape(cy, block, cx, block).any(axis=(1, 3))
    cells = dilate_bits(cells.view(np.uint8), 1, int(np.ceil(radius / block)) + 1)
    iy, ix = np.divmod(idx, nx)
    return cells[np.minimum(iy // block, cy - 1), np.minimum(ix // block, cx - 1)]


def _median_spread(z: np.ndarray) -> tuple[float, float]:
    """Median and robust spread (1.4826 MAD) of a sample; ``(0, 0)`` for 100 values or fewer."""
    if z.size <= 100:
        return 0.0, 0.0
    m = float(np.median(z))
    return m, float(1.4826 * np.median(np.abs(z - m)))


def _prominent(sub: np.ndarray, cand: list[tuple[int, int]], prominence: float) -> list[tuple[int, int]]:
    """The candidate maxima (highest first) that rise ``prominence`` above the lowest point of
    the straight path to every higher kept maximum: the saddle between two blended sources."""
    kept: list[tuple[int, int]] = []
    for py, px in cand:
        ok = True
        for ky, kx in kept:
            n = int(max(abs(ky - py), abs(kx - px))) + 1
            ys = np.rint(np.linspace(py, ky, n)).astype(int)
            xs = np.rint(np.linspace(px, kx, n)).astype(int)
            if sub[py, px] - sub[ys, xs].min() < prominence:
                ok = False
                break
        if ok:
            kept.append((py, px))
    return kept


def find_peaks(
    s: np.ndarray,
    threshold: float,
    min_pixels: int,
    split: np.ndarray | None = None,
    separation: float = 4.0,
    prominence: float = 2.0,
) -> list[tuple[int, int, int, int]]:
    """Peaks of ``+-s`` above ``threshold``: ``(x, y, sign, footprint size)`` each.

    A footprint (8-connected, at least ``min_pixels`` pixels) gives its highest pixel, and
    every other local maximum of ``s`` in it (the highest within ``separation`` px) that rises
    ``prominence`` (sigma of ``s``) above the saddle towards each higher peak: two blended
    sources are two detections, noise bumps on one source are not. A footprint touching
    ``split`` (a saturated star's halo, where residuals and real sources mix) gives every
    such local maximum, however low its saddle.
    """
    out = []
    foot = int(2 * np.ceil(separation) + 1)
    for sign in (1, -1):
        lab, n = ndimage.label(sign * s > threshold, structure=np.ones((3, 3), int))
        if n == 0:
            continue
        for k, sl in enumerate(ndimage.find_objects(lab), start=1):
            if sl is None:
                continue
            own = lab[sl] == k
            if own.sum() < min_pixels:
                continue
            size = max(sl[0].stop - sl[0].start, sl[1].stop - sl[1].start)
            sub = np.where(own, sign * s[sl], -np.inf)
            if size > separation:
                local = (sub == ndimage.maximum_filter(sub, size=foot, mode="constant", cval=-np.inf)) & own
                ys, xs = np.nonzero(local)
                order = np.argsort(-sub[ys, xs], kind="stable")
                cand = [(int(ys[i]), int(xs[i])) for i in order]
                in_halo = split is not None and bool(split[sl][own].any())
                peaks = cand if in_halo else _prominent(sub, cand, prominence)
            else:
                iy, ix = np.unravel_index(np.argmax(sub), sub.shape)
                peaks = [(int(iy), int(ix))]
            for py, px in peaks:
                out.append((px + sl[1].start, py + sl[0].start, sign, int(size)))
    return out
