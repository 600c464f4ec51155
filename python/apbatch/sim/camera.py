"""Image formation for the simulator: PSF stamps, noise, cosmic rays, saturation, segments.

Everything here works on one assembled CCD image in electrons (``image[y, x]``, obs_lsst's
assembled orientation) and finally splits it into raw amplifier segments in ADU, exactly
reversing the assembly convention of :class:`apbatch.instruments.Amplifier`:
``assembled[bbox] = flip(raw[data])`` with ``flip_x``/``flip_y``.

Sources are drawn as small postage stamps (size chosen from the source's flux), evaluated
for all sources of one stamp size at once, then added to the image one stamp at a time.
"""

from __future__ import annotations

import math

import numpy as np
from scipy import ndimage

from ..raw import RawSegment, segment_header
from .calibs import DetectorSignature, assembled_view

BETA = 3.5
"""Moffat index of every simulated PSF (science and template)."""

__all__ = [
    "BETA",
    "add_cosmic_rays",
    "add_noise",
    "bleed_saturation",
    "moffat_alpha",
    "psf_fwhm",
    "render_stamps",
    "stamp_neff",
    "to_segments",
]

_HALF_SIZES = (6, 12, 24, 48, 96)
_NORMAL_APPROX = 200.0  # above this mean, Poisson noise is drawn as a normal of equal variance


def moffat_alpha(fwhm: np.ndarray | float, beta: float) -> np.ndarray:
    """Moffat core width ``alpha`` for a FWHM (pixels)."""
    return np.asarray(fwhm) / (2.0 * math.sqrt(2.0 ** (1.0 / beta) - 1.0))


def psf_fwhm(
    seeing_px: float,
    x: np.ndarray,
    y: np.ndarray,
    nx: int,
    ny: int,
    fp_radius_frac: float = 0.0,
    tilt: tuple[float, float] = (0.03, -0.02),
) -> np.ndarray:
    """PSF FWHM (pixels) at CCD positions: the visit's seeing, a little worse away from the axis,
    with a linear trend of a few per cent across the CCD."""
    x = np.asarray(x, dtype=float)
    y = np.asarray(y, dtype=float)
    trend = 1.0 + tilt[0] * (x / nx - 0.5) + tilt[1] * (y / ny - 0.5)
    return seeing_px * (1.0 + 0.05 * fp_radius_frac**2) * trend


def _half_size(flux: np.ndarray, fwhm: np.ndarray, beta: float | None) -> np.ndarray:
    """Stamp half-size at which the profile drops below ~0.5 e- per pixel."""
    f = np.maximum(np.asarray(flux, dtype=float), 1.0)
    if beta is None:
        sigma = fwhm / 2.3548
        r = sigma * np.sqrt(2.0 * np.log(np.maximum(f / (2 * math.pi * sigma**2) / 0.5, 1.0)))
    else:
        alpha = moffat_alpha(fwhm, beta)
        peak = f * (beta - 1.0) / (math.pi * alpha**2)
        r = alpha * np.sqrt(np.maximum((peak / 0.5) ** (1.0 / beta) - 1.0, 0.0))
    r = np.maximum(r, 2.0 * fwhm)
    return np.array(_HALF_SIZES)[np.minimum(np.searchsorted(_HALF_SIZES, r), len(_HALF_SIZES) - 1)]


def _profiles(dx: np.ndarray, dy: np.ndarray, fwhm: np.ndarray, h: int, beta: float | None) -> np.ndarray:
    """Unit-sum stamps (n, 2h+1, 2h+1) centred at sub-pixel offsets (dx, dy)."""
    u = np.arange(-h, h + 1, dtype=np.float32)
    ux = (u[None, :] - dx[:, None].astype(np.float32)) ** 2
    uy = (u[None, :] - dy[:, None].astype(np.float32)) ** 2
    r2 = uy[:, :, None] + ux[:, None, :]
    if beta is None:
        s2 = (fwhm.astype(np.float32) / np.float32(2.3548)) ** 2
        prof = np.exp(-0.5 * r2 / s2[:, None, None])
    else:
        a2 = moffat_alpha(fwhm, beta).astype(np.float32) ** 2
        prof = (1.0 + r2 / a2[:, None, None]) ** np.float32(-beta)
    prof /= prof.sum(axis=(1, 2), keepdims=True)
    return prof


def render_stamps(
    image: np.ndarray,
    x: np.ndarray,
    y: np.ndarray,
    flux: np.ndarray,
    fwhm: np.ndarray,
    beta: float | None = 3.5,
    extent_sigma: np.ndarray | None = None,
) -> None:
    """Add sources to ``image`` in place: the PSF profile, optionally convolved with a Gaussian.

    Parameters
    ----------
    image : `numpy.ndarray`
        (ny, nx) float32, modified in place.
    x, y : `numpy.ndarray`
        0-based pixel positions (may lie a little outside the image).
    flux : `numpy.ndarray`
        Total electrons of each source (all of it lands within its stamp).
    fwhm : `numpy.ndarray`
        Profile FWHM in pixels, per source.
    beta : `float` or `None`
        Moffat index; `None` for a Gaussian.
    extent_sigma : `numpy.ndarray`, optional
        Per source, the sigma (pixels) of a Gaussian intrinsic profile (galaxies) that the PSF
        is convolved with; 0 for point sources. The convolution is done on the stamp, so a
        galaxy is the same object under any PSF (what PSF-matched subtraction assumes).
    """
    x, y, flux, fwhm = (np.atleast_1d(np.asarray(v, dtype=float)) for v in (x, y, flux, fwhm))
    ext = np.zeros_like(x) if extent_sigma is None else np.atleast_1d(np.asarray(extent_sigma, dtype=float))
    ny, nx = image.shape
    keep = flux > 0
    x, y, flux, fwhm, ext = x[keep], y[keep], flux[keep], fwhm[keep], ext[keep]
    xi, yi = np.rint(x).astype(int), np.rint(y).astype(int)
    halves = _half_size(flux, np.sqrt(fwhm**2 + (2.3548 * ext) ** 2), beta)
    for h in np.unique(halves):
        sel = np.nonzero((halves == h) & (xi + h >= 0) & (xi - h < nx) & (yi + h >= 0) & (yi - h < ny))[0]
        for start in range(0, len(sel), max(1, 2_000_000 // (2 * h + 1) ** 2)):
            chunk = sel[start : start + max(1, 2_000_000 // (2 * h + 1) ** 2)]
            stamps = _profiles(x[chunk] - xi[chunk], y[chunk] - yi[chunk], fwhm[chunk], int(h), beta)
            for j in np.nonzero(ext[chunk] > 0)[0]:
                g = ndimage.gaussian_filter(stamps[j], float(ext[chunk][j]), mode="constant", truncate=3.0)
                stamps[j] = g / max(float(g.sum()), 1e-12)
            stamps *= flux[chunk].astype(np.float32)[:, None, None]
            for k, s in zip(chunk, stamps, strict=False):
                x0, y0 = xi[k] - h, yi[k] - h
                sx0, sy0 = max(x0, 0), max(y0, 0)
                sx1, sy1 = min(x0 + 2 * h + 1, nx), min(y0 + 2 * h + 1, ny)
                image[sy0:sy1, sx0:sx1] += s[sy0 - y0 : sy1 - y0, sx0 - x0 : sx1 - x0]


def stamp_neff(fwhm: float, beta: float | None = 3.5) -> float:
    """Effective number of pixels ``1 / sum(p^2)`` of a centred unit PSF."""
    p = _profiles(np.zeros(1), np.zeros(1), np.array([fwhm]), 48, beta)[0].astype(np.float64)
    return float(1.0 / np.sum(p**2))


def add_noise(expected: np.ndarray, rng: np.random.Generator) -> np.ndarray:
    """Poisson-distributed electrons for an image of expected electrons (float32, in place).

    Exact (numpy's Poisson) below a mean of 200 e-; above, a normal of the same mean and
    variance, which is 7x faster and differs from Poisson by less than its own skewness
    (<7% of a sigma).
    """
    lam = np.maximum(expected, 0, out=expected)
    small = lam < _NORMAL_APPROX
    lam_small = lam[small]  # a copy (boolean indexing)
    noise = rng.standard_normal(lam.shape, dtype=np.float32)
    noise *= np.sqrt(lam)
    lam += noise
    np.rint(lam, out=lam)
    if lam_small.size:
        lam[small] = rng.poisson(lam_small).astype(np.float32)
    return lam


def add_cosmic_rays(image: np.ndarray, n: int, rng: np.random.Generator) -> list[tuple[float, float, float]]:
    """Add ``n`` straight cosmic-ray tracks (1-40 px long, 500-3000 e- per pixel) in place.

    Returns
    -------
    hits : `list` [(x, y, electrons)]
        Track centres and total deposited charge.
    """
    ny, nx = image.shape
    hits = []
    for _ in range(n):
        x0, y0 = rng.uniform(0, nx), rng.uniform(0, ny)
        length = rng.uniform(1, 40) if rng.uniform() < 0.7 else rng.uniform(1, 4)
        ang = rng.uniform(0, math.pi)
        t = np.linspace(0, length, max(2, int(length * 2)))
        xs = np.clip(np.rint(x0 + t * math.cos(ang)).astype(int), 0, nx - 1)
        ys = np.clip(np.rint(y0 + t * math.sin(ang)).astype(int), 0, ny - 1)
        pix = np.unique(ys * nx + xs)
        dep = rng.uniform(500, 3000, pix.size).astype(np.float32)
        image.ravel()[pix] += dep
        hits.append((float(xs.mean()), float(ys.mean()), float(dep.sum())))
    return hits


def bleed_saturation(image: np.ndarray, full_well: float, x: float, y: float, half: int) -> bool:
    """Clip pixels near (x, y) at ``full_well`` and spread the excess charge along their columns.

    Returns `True` if anything was saturated.
    """
    ny, nx = image.shape
    xi, yi = int(round(x)), int(round(y))
    y0, y1 = max(yi - half, 0), min(yi + half + 1, ny)
    hit = False
    for c in range(max(xi - half, 0), min(xi + half + 1, nx)):
        col = image[:, c]
        over = np.nonzero(col[y0:y1] > full_well)[0]
        if over.size == 0:
            continue
        hit = True
        lo, hi = y0 + over[0], y0 + over[-1]
        excess = float((col[lo : hi + 1] - full_well).clip(0).sum())
        extra = int(excess // full_well)
        lo2, hi2 = max(lo - extra // 2, 0), min(hi + extra - extra // 2, ny - 1)
        col[lo2 : hi2 + 1] = full_well
    return hit


def to_segments(electrons: np.ndarray, sig: DetectorSignature, rng: np.random.Generator) -> list[RawSegment]:
    """Split an assembled image of electrons into raw amplifier segments (int32 ADU).

    Each segment gets the amplifier's bias level and read noise everywhere (prescan,
    overscans, data), the bias structure in its data box, and the electrons divided by the
    amplifier's true gain, clipped at its saturation level.
    """
    segments = []
    for k, amp in enumerate(sig.amps):
        g = float(sig.gain_true[k])
        seg = rng.standard_normal((amp.raw_ny, amp.raw_nx), dtype=np.float32)
        seg *= np.float32(amp.read_noise / g)
        seg += np.float32(sig.bias_level[k])
        x0, x1, y0, y1 = amp.data
        adu = assembled_view(electrons, amp) / np.float32(g)
        np.minimum(adu, np.float32(amp.saturation), out=adu)
        seg[y0:y1, x0:x1] += adu + sig.bias_structure(amp)
        segments.append(
            RawSegment(amp=amp, data=np.rint(seg).astype(np.int32), header=segment_header(amp, sig.detector))
        )
    return segments
