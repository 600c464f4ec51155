"""DIA source detection and measurement on a difference image.

Detection: the difference is matched-filtered with a Gaussian of the PSF's sigma and
divided by the filtered noise, ``S = (G*D) / sqrt(G^2 * V)``; ``S`` is rescaled so that its
robust spread over clean pixels is 1 (the correlated noise of warping and convolution
makes it differ from the per-pixel variance), then thresholded at +-``threshold``.
``BAD``, ``SAT``, ``NO_DATA`` and ``EDGE`` pixels, a ring of 3 FWHM around saturated pixels
and each saturated star's halo (:func:`~apbatch.job.steps.defects.saturation_halos`: 6 times
its saturated core's radius) are zeroed before filtering, so defects never make detections.

Measurement per detection (positive and negative): centroid (quadratic on ``S``, then
refined by a Gaussian-windowed centroid on the difference image that ignores ``_ZERO``
pixels other than interpolated bad ones, since ``S`` is zeroed beside defects and its peak
is pushed away from them),
PSF flux by weighted least squares with the pixelised PSF shifted to the centroid (on the
difference, and on the science image: ``scienceFlux``), aperture flux (radius 1.5 FWHM),
adaptive second moments (corrected for the weight), trail length/angle from the
moments in excess of the PSF, dipole flag (an opposite-sign peak above 3 sigma within
2 FWHM; the weaker lobe of a detected pair is merged into the stronger), and pixel flags
from both masks in a 5x5 box.

Reliability is a hand-set, uncalibrated logistic score ``1 / (1 + exp(-z))`` with
``z = 1.5 + 0.8 (|snr| - 5) - 4 |ln(size / psf_size)| - 2 isDipole - 3 (bad or saturated
or cr or edge) - 1 suspect``, where ``size`` is the square root of the corrected moments'
determinant to the 1/2 (``psf_size`` the PSF sigma, so a trailed source loses some).

Fluxes are in nJy: electrons times ``njy_per_e`` (the image metadata ``NJY_PER_E``, else 1).
"""

from __future__ import annotations

import numpy as np
import pandas as pd
import sep
from scipy import ndimage

from ...image import Image, MaskBits
from .defects import saturation_halos
from .psf import PsfModel
from .subtract import dilate_bits

__all__ = ["COLUMNS", "measure_dia_sources", "psf_flux"]

COLUMNS = [
    "x",
    "y",
    "ra",
    "dec",
    "raErr",
    "decErr",
    "ra_dec_Cov",
    "psfFlux",
    "psfFluxErr",
    "snr",
    "scienceFlux",
    "scienceFluxErr",
    "apFlux",
    "apFluxErr",
    "ixx",
    "iyy",
    "ixy",
    "trailLength",
    "trailAngle",
    "isDipole",
    "isNegative",
    "pixelFlags_bad",
    "pixelFlags_saturated",
    "pixelFlags_cr",
    "pixelFlags_edge",
    "pixelFlags_interpolated",
    "pixelFlags_suspect",
    "reliability",
    "bboxSize",
]
_ZERO = int(MaskBits.BAD | MaskBits.SAT | MaskBits.NO_DATA | MaskBits.EDGE)


def psf_flux(img: Image, psf: PsfModel, x: np.ndarray, y: np.ndarray, noise_scale: float = 1.0):
    """PSF-fit flux and error (image units) at fixed positions; masked (``_ZERO``) pixels are ignored.

    Returns arrays ``(flux, err)``; NaN where no usable pixel is found.
    """
    half = int(np.ceil(2 * psf.fwhm))
    size = 2 * half + 1
    ny, nx = img.shape
    flux = np.full(len(x), np.nan)
    err = np.full(len(x), np.nan)
    variance, mask = img.variance, img.mask
    for k, (xc, yc) in enumerate(zip(np.asarray(x, float), np.asarray(y, float), strict=False)):
        xi, yi = int(round(xc)), int(round(yc))
        if xi - half < 0 or yi - half < 0 or xi + half >= nx or yi + half >= ny:
            continue
        box = (slice(yi - half, yi + half + 1), slice(xi - half, xi + half + 1))
        p = psf.stamp(xc - xi, yc - yi, size)
        w = 1.0 / np.maximum(variance[box].astype(float), 1e-6)
        w[(mask[box] & _ZERO) != 0] = 0.0
        den = (p * p * w).sum()
        if den <= 0:
            continue
        flux[k] = (p * w * img.image[box]).sum() / den
        err[k] = noise_scale / np.sqrt(den)
    return flux, err


def _filtered_snr(diff: Image, sigma: float, fwhm: float):
    mask = diff.mask
    zero = (mask & _ZERO) != 0
    near_sat = dilate_bits(mask, int(MaskBits.SAT), int(np.ceil(3 * fwhm)))
    near_sat |= saturation_halos(mask, fwhm)
    zero |= near_sat
    # interpolated defects (bad columns, cosmic rays) leave residuals in the pixels beside them
    # when a star crosses them: keep detections 2 px clear of interpolated pixels
    zero |= dilate_bits(mask, int(MaskBits.INTRP | MaskBits.BAD), 2)
    d = np.where(zero, np.float32(0), diff.image)
    num = ndimage.gaussian_filter(d, sigma, truncate=3.0, output=d)
    v = np.where(zero, np.float32(0), diff.variance)
    # filtered noise variance: G^2 * V, with G^2 a Gaussian of sigma / sqrt(2) over 4 pi sigma^2
    den = ndimage.gaussian_filter(v, sigma / np.sqrt(2), truncate=3.0, output=v)
    np.maximum(den, np.float32(1e-12 * 4 * np.pi * sigma * sigma), out=den)
    np.sqrt(den, out=den)
    s = np.divide(num, den, out=num)
    s *= np.float32(np.sqrt(4 * np.pi) * sigma)
    del den, v
    s[zero] = 0.0
    rng = np.random.default_rng(4321)
    idx = rng.integers(0, s.size, size=min(s.size, 400_000))
    z = s.ravel()[idx][~zero.ravel()[idx]]
    scale = 1.4826 * np.median(np.abs(z - np.median(z))) if z.size > 100 else 1.0
    s /= np.float32(scale)
    return s, float(scale), near_sat


def _peaks(s, threshold, min_pixels):
    out = []
    for sign in (1, -1):
        lab, n = ndimage.label(sign * s > threshold, structure=np.ones((3, 3), int))
        if n == 0:
            continue
        idx = np.arange(1, n + 1)
        slices = ndimage.find_objects(lab)
        for k, sl in zip(idx, slices, strict=False):
            own = lab[sl] == k
            if own.sum() < min_pixels:
                continue
            sub = np.where(own, sign * s[sl], -np.inf)
            py, px = np.unravel_index(np.argmax(sub), sub.shape)
            size = max(sl[0].stop - sl[0].start, sl[1].stop - sl[1].start)
            out.append((px + sl[1].start, py + sl[0].start, sign, int(size)))
    return out


def _subpixel(s, x, y, sign):
    ny, nx = s.shape
    if not (0 < x < nx - 1 and 0 < y < ny - 1):
        return float(x), float(y)
    c = sign * s[y - 1 : y + 2, x - 1 : x + 2].astype(float)
    dx = 0.5 * (c[1, 0] - c[1, 2]) / (c[1, 0] - 2 * c[1, 1] + c[1, 2] - 1e-12)
    dy = 0.5 * (c[0, 1] - c[2, 1]) / (c[0, 1] - 2 * c[1, 1] + c[2, 1] - 1e-12)
    return x + float(np.clip(dx, -0.5, 0.5)), y + float(np.clip(dy, -0.5, 0.5))


def _centroid_excluded(mask: np.ndarray) -> np.ndarray:
    """Pixels the windowed centroid ignores: ``_ZERO`` ones, except interpolated bad pixels
    (their values are estimates, and ``S`` is zeroed beside them)."""
    interpolated_only = ((mask & int(MaskBits.INTRP)) != 0) & ((mask & (_ZERO & ~int(MaskBits.BAD))) == 0)
    return ((mask & _ZERO) != 0) & ~interpolated_only


def _windowed_centroid(img, mask, x, y, sign, sigma, max_shift, n_iter=5):
    """Gaussian-windowed centroid (SExtractor's XWIN/YWIN) of ``sign * img`` from (x, y).

    ``x <- x + 2 sum(w I dx) / sum(w I)`` with ``w`` a Gaussian of ``sigma``, over the pixels
    :func:`_centroid_excluded` keeps. Keeps (x, y) if it fails or moves more than
    ``max_shift`` px (a FWHM).
    """
    ny, nx = img.shape
    h = int(np.ceil(3 * sigma))
    grid_v, grid_u = np.mgrid[-h : h + 1, -h : h + 1]
    x0, y0 = x, y
    for _ in range(n_iter):
        xi, yi = int(round(x)), int(round(y))
        if xi - h < 0 or yi - h < 0 or xi + h >= nx or yi + h >= ny:
            return x0, y0
        box = (slice(yi - h, yi + h + 1), slice(xi - h, xi + h + 1))
        u, v = grid_u - (x - xi), grid_v - (y - yi)
        w = np.exp(-0.5 * (u * u + v * v) / sigma**2) * (sign * img[box].astype(float))
        w[_centroid_excluded(mask[box])] = 0.0
        tot = w.sum()
        if tot <= 0:
            return x0, y0
        dx, dy = 2.0 * (w * u).sum() / tot, 2.0 * (w * v).sum() / tot
        x, y = x + dx, y + dy
        if np.hypot(x - x0, y - y0) > max_shift:
            return x0, y0
        if abs(dx) < 0.01 and abs(dy) < 0.01:
            break
    return float(x), float(y)


def _moments(img, x, y, sign, sigma, n_iter=6, max_half=20):
    """Adaptive second moments (elliptical Gaussian weight matched to the source; Bernstein &
    Jarvis 2002) of ``sign * img`` at (x, y), corrected for the weight. NaN if it fails."""
    ny, nx = img.shape
    xi, yi = int(round(x)), int(round(y))
    wcov = np.eye(2) * (1.5 * sigma) ** 2
    m = None
    for _ in range(n_iter):
        h = int(min(max_half, np.ceil(3 * np.sqrt(np.linalg.eigvalsh(wcov).max()))))
        if xi - h < 0 or yi - h < 0 or xi + h >= nx or yi + h >= ny:
            return np.nan, np.nan, np.nan
        st = sign * img[yi - h : yi + h + 1, xi - h : xi + h + 1].astype(float)
        v, u = np.mgrid[-h : h + 1, -h : h + 1]
        u, v = u - (x - xi), v - (y - yi)
        winv = np.linalg.inv(wcov)
        w = np.exp(-0.5 * (winv[0, 0] * u * u + 2 * winv[0, 1] * u * v + winv[1, 1] * v * v)) * st
        tot = w.sum()
        if tot <= 0:
            return np.nan, np.nan, np.nan
        m = np.array([[(w * u * u).sum(), (w * u * v).sum()], [(w * u * v).sum(), (w * v * v).sum()]]) / tot
        if np.linalg.det(m) <= 0:
            return np.nan, np.nan, np.nan
        new = 2.0 * m  # fixed point for a Gaussian source: weight = source = 2 x measured
        if np.allclose(new, wcov, rtol=1e-3):
            break
        wcov = new
    try:
        c = np.linalg.inv(np.linalg.inv(m) - np.linalg.inv(wcov))
    except np.linalg.LinAlgError:
        return np.nan, np.nan, np.nan
    if c[0, 0] <= 0 or c[1, 1] <= 0 or np.linalg.det(c) <= 0:
        return np.nan, np.nan, np.nan
    return c[0, 0], c[1, 1], c[0, 1]


def measure_dia_sources(
    diff: Image,
    psf: PsfModel,
    science: Image | None = None,
    threshold: float = 5.0,
    min_pixels: int = 3,
    njy_per_e: float | None = None,
) -> pd.DataFrame:
    """Detect and measure DIA sources.

    Parameters
    ----------
    diff : `Image`
        Difference image (variance already rescaled by the subtraction).
    psf : `PsfModel`
        PSF of the difference image (the science PSF when the template was convolved).
    science : `Image`, optional
        Calibrated science image, for ``scienceFlux`` and its mask flags.
    threshold : `float`
        Detection threshold in sigma of the (rescaled) matched-filter image.
    min_pixels : `int`
        Smallest footprint kept (pixels above threshold).
    njy_per_e : `float`, optional
        Flux calibration; default ``diff.metadata["NJY_PER_E"]`` or 1.

    Returns
    -------
    sources : `pandas.DataFrame`
        Columns :data:`COLUMNS`; ``attrs["noise_scale"]`` is the matched-filter noise rescale.
    """
    cal = float(njy_per_e if njy_per_e is not None else diff.metadata.get("NJY_PER_E", 1.0))
    sigma, fwhm = psf.sigma, psf.fwhm
    s, scale, near_sat = _filtered_snr(diff, sigma, fwhm)
    peaks = _peaks(s, threshold, min_pixels)
    rows = []
    for x, y, sign, size in peaks:
        xs, ys = _subpixel(s, x, y, sign)
        xs, ys = _windowed_centroid(diff.image, diff.mask, xs, ys, sign, sigma, fwhm)
        rows.append((xs, ys, sign, size, abs(float(s[y, x]))))
    # dipoles: an opposite-sign 3-sigma peak within 2 FWHM; a detected weaker lobe is merged
    r = int(np.ceil(2 * fwhm))
    ny, nx = s.shape
    keep, dip = [], []
    order = sorted(range(len(rows)), key=lambda k: -rows[k][4])
    taken = np.zeros(len(rows), bool)
    pts = np.array([(q[0], q[1]) for q in rows]) if rows else np.zeros((0, 2))
    for k in order:
        if taken[k]:
            continue
        x, y, sign = rows[k][:3]
        xi, yi = int(round(x)), int(round(y))
        box = s[max(yi - r, 0) : yi + r + 1, max(xi - r, 0) : xi + r + 1]
        is_dip = bool((-sign * box > 3.0).any())
        if is_dip and len(pts):
            near = (np.hypot(pts[:, 0] - x, pts[:, 1] - y) <= r) & ~taken
            near &= np.array([q[2] == -sign for q in rows])
            taken |= near
        taken[k] = True
        keep.append(k)
        dip.append(is_dip)
    rows = [rows[k] for k in keep]
    if not rows:
        empty = pd.DataFrame(
            {c: pd.Series(dtype=bool if c.startswith(("is", "pixelFlags")) else float) for c in COLUMNS}
        )
        empty.attrs["noise_scale"] = scale
        return empty
    x = np.array([q[0] for q in rows])
    y = np.array([q[1] for q in rows])
    sign = np.array([q[2] for q in rows])
    flux, ferr = psf_flux(diff, psf, x, y, scale)
    sflux, sferr = psf_flux(science, psf, x, y) if science is not None else (np.full(len(x), np.nan),) * 2
    data = np.ascontiguousarray(diff.image, dtype=np.float32)
    err = np.sqrt(np.maximum(diff.variance, 0)).astype(np.float32)
    ap, aperr, _ = sep.sum_circle(data, x, y, 1.5 * fwhm, err=err, mask=(diff.mask & _ZERO) != 0)
    mom = np.array([_moments(diff.image, xx, yy, sg, sigma) for xx, yy, sg in zip(x, y, sign, strict=False)])
    ixx, iyy, ixy = mom.T
    lam = 0.5 * (ixx + iyy) + np.sqrt(0.25 * (ixx - iyy) ** 2 + ixy**2)
    trail = np.sqrt(12.0 * np.clip(lam - sigma**2, 0, None))
    angle = np.degrees(0.5 * np.arctan2(2 * ixy, ixx - iyy)) % 180.0
    mask = diff.mask | (science.mask if science is not None else 0)
    xi, yi = np.clip(np.round(x).astype(int), 0, nx - 1), np.clip(np.round(y).astype(int), 0, ny - 1)
    around = np.zeros(len(x), np.int64)
    for dy in range(-2, 3):
        for dx in range(-2, 3):
            around |= mask[np.clip(yi + dy, 0, ny - 1), np.clip(xi + dx, 0, nx - 1)]
    flags = {
        name: (around & int(bit)) != 0
        for name, bit in (
            ("bad", MaskBits.BAD),
            ("saturated", MaskBits.SAT),
            ("cr", MaskBits.CR),
            ("edge", MaskBits.EDGE | MaskBits.NO_DATA),
            ("interpolated", MaskBits.INTRP),
            ("suspect", MaskBits.SUSPECT),
        )
    }
    flags["edge"] |= (xi < 3) | (yi < 3) | (xi > nx - 4) | (yi > ny - 4)
    flags["suspect"] |= near_sat[yi, xi]
    snr = flux / ferr
    # position errors: sqrt(2) sigma / snr per axis, through the local WCS Jacobian
    perr = np.sqrt(2.0) * sigma / np.maximum(np.abs(snr), 1e-3)
    if diff.wcs is not None:
        ra, dec = diff.wcs.pixel_to_world_values(x, y)
        ra1, dec1 = diff.wcs.pixel_to_world_values(x + 1, y)
        ra2, dec2 = diff.wcs.pixel_to_world_values(x, y + 1)
        dra1, dra2 = (ra1 - ra + 180) % 360 - 180, (ra2 - ra + 180) % 360 - 180
        cov_rr = perr**2 * (dra1**2 + dra2**2)
        cov_dd = perr**2 * ((dec1 - dec) ** 2 + (dec2 - dec) ** 2)
        cov_rd = perr**2 * (dra1 * (dec1 - dec) + dra2 * (dec2 - dec))
    else:
        ra = dec = cov_rr = cov_dd = cov_rd = np.full(len(x), np.nan)
    size = np.sqrt(np.sqrt(np.clip(ixx * iyy - ixy**2, 1e-6, None)))
    ratio = np.where(np.isfinite(size), size / sigma, 3.0)
    any_bad = flags["bad"] | flags["saturated"] | flags["cr"] | flags["edge"]
    z = (
        1.5
        + 0.8 * (np.minimum(np.abs(np.nan_to_num(snr)), 25.0) - 5.0)
        - 4.0 * np.abs(np.log(ratio))
        - 2.0 * np.array(dip)
        - 3.0 * any_bad
        - 1.0 * flags["suspect"]
    )
    out = pd.DataFrame(
        {
            "x": x,
            "y": y,
            "ra": ra,
            "dec": dec,
            "raErr": np.sqrt(cov_rr),
            "decErr": np.sqrt(cov_dd),
            "ra_dec_Cov": cov_rd,
            "psfFlux": flux * cal,
            "psfFluxErr": ferr * cal,
            "snr": snr,
            "scienceFlux": sflux * cal,
            "scienceFluxErr": sferr * cal,
            "apFlux": ap * cal,
            "apFluxErr": aperr * cal,
            "ixx": ixx,
            "iyy": iyy,
            "ixy": ixy,
            "trailLength": trail,
            "trailAngle": angle,
            "isDipole": np.array(dip, bool),
            "isNegative": sign < 0,
            **{f"pixelFlags_{k}": v for k, v in flags.items()},
            "reliability": 1.0 / (1.0 + np.exp(-z)),
            "bboxSize": np.array([q[3] for q in rows], np.int32),
        }
    )[COLUMNS]
    out.attrs["noise_scale"] = scale
    return out
