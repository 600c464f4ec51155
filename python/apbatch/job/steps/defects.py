"""Pixel defects of a calibrated CCD image: cosmic rays, bad columns, and their interpolation.

Used by :mod:`apbatch.job.steps.isr`: :func:`find_cosmic_rays` for a single snap (two snaps
are compared with each other in ISR itself), :func:`detect_bad_columns` for columns that
the bias's defect list misses, :func:`interpolate_masked` for both, and :func:`grow`.
:func:`saturation_halos` (a fixed multiple of the saturated core) is no longer used by the DIA
detection, which sizes each halo from the star's flux
(:func:`apbatch.job.steps.halos.saturated_star_halos`, whose fallback is the same rule).
"""

from __future__ import annotations

import numpy as np
from scipy import ndimage

from ...image import MaskBits

__all__ = ["detect_bad_columns", "find_cosmic_rays", "grow", "interpolate_masked", "saturation_halos"]


def find_cosmic_rays(
    img: np.ndarray, var: np.ndarray, mask: np.ndarray, nsigma: float = 5.0, sharpness: float = 0.8,
    rows_per_block: int = 256,
) -> np.ndarray:
    """Single-image cosmic-ray finder: pixels much sharper than any PSF.

    A pixel is a cosmic ray if its excess over the mean of its 4 neighbours is above
    ``nsigma`` times the noise of that excess, and above ``sharpness`` times the neighbours'
    own level above the local background (stars with a FWHM over ~2.2 px cannot pass).
    Returns a boolean array (not dilated).
    """
    # the cheap test first, on the inner pixels (an edge pixel has no 4 neighbours: never a CR),
    # in blocks of rows: float32 temporaries of a few MB (cache-sized, and no CCD-sized
    # buffers at ISR, the job's peak-memory step); excess^2 against the variance, no square root
    ny, nx = img.shape
    cand = np.zeros((ny, nx), bool)
    if ny < 3 or nx < 3:
        return cand
    k = np.float32(1.25 * nsigma * nsigma)
    bkg_small = None
    b = 16
    for r0 in range(1, ny - 1, rows_per_block):
        r1 = min(r0 + rows_per_block, ny - 1)
        nbr = img[r0 - 1 : r1 - 1, 1:-1] + img[r0 + 1 : r1 + 1, 1:-1]
        nbr += img[r0:r1, :-2]
        nbr += img[r0:r1, 2:]
        nbr *= np.float32(0.25)
        excess = np.subtract(img[r0:r1, 1:-1], nbr, dtype=np.float32)
        thr = np.multiply(var[r0:r1, 1:-1], k, dtype=np.float32)
        ys, xs = np.nonzero((excess > 0) & (np.square(excess) > thr))
        if ys.size == 0:
            continue
        if bkg_small is None:  # local background: median of 16x16 blocks (every 4th pixel), smoothed
            small = img[: ny // b * b, : nx // b * b].reshape(ny // b, b, nx // b, b)
            bkg_small = ndimage.median_filter(np.median(small[:, ::4, :, ::4], axis=(1, 3)), size=3,
                                              mode="nearest")
        y, x = ys + r0, xs + 1
        by = np.minimum(y // b, bkg_small.shape[0] - 1)
        bx = np.minimum(x // b, bkg_small.shape[1] - 1)
        keep = excess[ys, xs] > sharpness * (nbr[ys, xs] - bkg_small[by, bx])
        keep &= (mask[y, x] & int(MaskBits.SAT)) == 0
        cand[y[keep], x[keep]] = True
    return cand
    nbr = img[:-2, 1:-1] + img[2:, 1:-1]
    nbr += img[1:-1, :-2]
    nbr += img[1:-1, 2:]
    nbr *= np.float32(0.25)
    excess = np.subtract(img[1:-1, 1:-1], nbr, dtype=np.float32)
    sq = np.square(excess)
    thr = np.multiply(var[1:-1, 1:-1], np.float32(1.25 * nsigma * nsigma), dtype=np.float32)
    hit = (excess > 0) & (sq > thr)
    del sq, thr
    ys, xs = np.nonzero(hit)
    if ys.size == 0:
        return cand
    # local background at the candidates only: median of 16x16 blocks (every 4th pixel), smoothed
    b = 16
    small = img[: ny // b * b, : nx // b * b].reshape(ny // b, b, nx // b, b)
    bkg_small = ndimage.median_filter(np.median(small[:, ::4, :, ::4], axis=(1, 3)), size=3, mode="nearest")
    by = np.minimum((ys + 1) // b, bkg_small.shape[0] - 1)
    bx = np.minimum((xs + 1) // b, bkg_small.shape[1] - 1)
    n = nbr[ys, xs]
    keep = excess[ys, xs] > sharpness * (n - bkg_small[by, bx])
    keep &= (mask[ys + 1, xs + 1] & int(MaskBits.SAT)) == 0
    cand[ys[keep] + 1, xs[keep] + 1] = True
    return cand


def detect_bad_columns(
    img: np.ndarray,
    mask: np.ndarray,
    nsigma: float = 6.0,
    nblock: int = 4,
    step: int = 4,
    half_rows: int | None = None,
) -> np.ndarray:
    """Columns (or blocks of them) whose median is off from their neighbours' by > ``nsigma``.

    The image is cut into ``nblock`` row blocks per amplifier row (``half_rows`` high, default
    half the image); in each, the median of every column (every ``step``-th row sampled) is
    compared with a 15-column running median; the spread of those differences (MAD) sets
    the threshold. Returns a boolean pixel mask (flagged blocks of columns).
    """
    ny, nx = img.shape
    half = half_rows or ny // 2
    out = np.zeros((ny, nx), bool)
    edges = []
    for h0 in range(0, ny, half):
        h1 = min(h0 + half, ny)
        bl = (h1 - h0) // nblock
        edges += [(h0 + i * bl, h1 if i == nblock - 1 else h0 + (i + 1) * bl) for i in range(nblock)]
    for r0, r1 in edges:
        sample = img[r0:r1:step]
        colmed = np.median(sample, axis=0)
        ref = ndimage.median_filter(colmed, size=15, mode="nearest")
        dev = colmed - ref
        mad = 1.4826 * np.median(np.abs(dev - np.median(dev)))
        if mad <= 0:
            continue
        badcol = np.abs(dev) > nsigma * mad
        out[r0:r1, badcol] = True
    return out


def interpolate_masked(img: np.ndarray, var: np.ndarray, bad: np.ndarray, reach: int = 4) -> None:
    """Replace ``bad`` pixels (in place) by the mean of the nearest good pixel left and right.

    Each side looks up to ``reach`` pixels along the row (defects are mostly columns);
    where no side has a good pixel the same is tried along the column; pixels with no good
    neighbour at all keep their value. The variance is interpolated the same way.
    """
    ny, nx = img.shape
    ys, xs = np.nonzero(bad)
    if ys.size == 0:
        return
    for axis in (1, 0):
        n = nx if axis == 1 else ny
        pos = xs if axis == 1 else ys
        acc_i = np.zeros(ys.size)
        acc_v = np.zeros(ys.size)
        cnt = np.zeros(ys.size)
        for direction in (-1, 1):
            found = np.zeros(ys.size, bool)
            for d in range(1, reach + 1):
                q = pos + direction * d
                inside = (q >= 0) & (q < n) & ~found
                qq = np.clip(q, 0, n - 1)
                yy, xx = (ys, qq) if axis == 1 else (qq, xs)
                take = inside & ~bad[yy, xx]
                acc_i[take] += img[yy[take], xx[take]]
                acc_v[take] += var[yy[take], xx[take]]
                cnt[take] += 1
                found |= take
        ok = cnt > 0
        img[ys[ok], xs[ok]] = acc_i[ok] / cnt[ok]
        var[ys[ok], xs[ok]] = acc_v[ok] / cnt[ok]
        ys, xs = ys[~ok], xs[~ok]
        if ys.size == 0:
            return


def grow(m: np.ndarray) -> np.ndarray:
    """3x3 dilation of a sparse boolean mask (cheap when few pixels are set)."""
    ys, xs = np.nonzero(m)
    if ys.size == 0:
        return m
    out = m.copy()
    ny, nx = m.shape
    for dy in (-1, 0, 1):
        for dx in (-1, 0, 1):
            out[np.clip(ys + dy, 0, ny - 1), np.clip(xs + dx, 0, nx - 1)] = True
    return out


def saturation_halos(mask: np.ndarray, fwhm: float, scale: float = 6.0, max_radius: int = 150) -> np.ndarray:
    """Discs around saturated stars out to where their wings may still leave residuals.

    A saturated star's core is masked in the difference image, but its wings beyond the
    matching kernel are not modelled. For a Moffat of index ``beta`` the radius at which a
    star's profile falls to a level ``L`` grows as ``(peak / L) ** (1 / (2 beta))`` once it
    is past the core width, so from the full well (~1e5 e-) down to ~1 e- per pixel it is
    5-10 times the radius of the saturated core (beta 2.5-3.5). Each connected ``SAT``
    region gets a disc of ``scale`` times its core radius (half its narrower side: bleed
    trails run along one axis), at least 3 ``fwhm``, about its centre.

    Returns
    -------
    halos : `numpy.ndarray`
        Boolean, the mask's shape.
    """
    sat = (mask & int(MaskBits.SAT)) != 0
    out = np.zeros(mask.shape, bool)
    if not sat.any():
        return out
    lab, n = ndimage.label(sat, structure=np.ones((3, 3), int))
    ny, nx = mask.shape
    for k, sl in enumerate(ndimage.find_objects(lab), start=1):
        ys, xs = np.nonzero(lab[sl] == k)
        cy, cx = sl[0].start + ys.mean(), sl[1].start + xs.mean()
        core = 0.5 * min(sl[0].stop - sl[0].start, sl[1].stop - sl[1].start)
        r = min(max(scale * core, 3.0 * fwhm), max_radius)
        y0, y1 = max(int(cy - r), 0), min(int(cy + r) + 1, ny)
        x0, x1 = max(int(cx - r), 0), min(int(cx + r) + 1, nx)
        yy, xx = np.ogrid[y0:y1, x0:x1]
        out[y0:y1, x0:x1] |= (yy - cy) ** 2 + (xx - cx) ** 2 <= r * r
    return out
