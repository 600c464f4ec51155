"""Rendering helpers of the synthetic CCD scene (tests/steps_scene.py): PSF profiles, stars, galaxies, maps.

Not a test module. PSF kinds (all normalised to unit sum on their stamp):

- ``"gauss"``: a circular Gaussian of width ``sigma``;
- ``"moffat"``: a Moffat of index ``beta`` whose FWHM is ``2.3548 sigma``;
- ``"atmospheric"``: a Kolmogorov-like profile, a double-Gaussian core (80% in sigma_c,
  20% in 1.8 sigma_c) plus a power-law wing (a Moffat of index 11/6, i.e. wings falling
  as r^-11/3 as for Kolmogorov turbulence, of FWHM twice the total) carrying
  :data:`ATM_WING_FRACTION` of the light; sigma_c is solved so that the total FWHM is
  ``2.3548 sigma``.

An optional shear ``g = (a - b) / (a + b)`` at position angle ``theta`` (radians from +x)
stretches a profile along theta while keeping ``sqrt(a b)`` (so the geometric-mean FWHM) fixed.
"""

from __future__ import annotations

import functools

import numpy as np
from apbatch.image import Image, MaskBits
from scene_galaxies import GALAXY_CORE, GALAXY_OVERSAMPLE, fine_core, sersic_raw

__all__ = [
    "ATM_WING_FRACTION",
    "FULL_WELL",
    "FWHM_PER_SIGMA",
    "add_stars",
    "atmospheric_core_sigma",
    "edge_positions",
    "illumination",
    "make_template",
    "psf_field",
    "psf_fwhm",
    "radial_profile",
    "render_galaxies",
    "render_psf",
    "stamp_half",
]

FWHM_PER_SIGMA = 2.3548
FULL_WELL = 180000.0  # e-, where the science CCD saturates and bleeds
ATM_WING_FRACTION = 0.15
_ATM_WING_BETA = 11.0 / 6.0
_ATM_CORE_RATIO = 1.8


def _moffat_alpha(sigma: float, beta: float) -> float:
    return sigma * FWHM_PER_SIGMA / (2 * np.sqrt(2 ** (1 / beta) - 1))


@functools.lru_cache(maxsize=4096)
def atmospheric_core_sigma(sigma: float) -> float:
    """Width of the atmospheric profile's inner Gaussian that makes its total FWHM ``2.3548 sigma``.

    Parameters
    ----------
    sigma : `float`
        Gaussian-equivalent width of the wanted FWHM, pixels.

    Returns
    -------
    sigma_c : `float`
        Width of the core's narrow Gaussian, pixels.
    """
    from scipy.optimize import brentq

    half = sigma * FWHM_PER_SIGMA / 2

    def excess(sc: float) -> float:
        prof = radial_profile("atmospheric", np.array([0.0, half]), sigma, core_sigma=sc)
        return float(prof[1] - prof[0] / 2)

    return float(brentq(excess, 0.3 * sigma, 1.5 * sigma, xtol=1e-6))


def radial_profile(kind: str, r: np.ndarray, sigma: float, beta: float = 3.0, core_sigma=None) -> np.ndarray:
    """Analytically normalised (unit 2-d integral) surface brightness of a PSF at radii ``r`` (pixels).

    Parameters
    ----------
    kind : `str`
        ``"gauss"``, ``"moffat"`` or ``"atmospheric"``.
    r : `numpy.ndarray`
        Radii, pixels.
    sigma : `float`
        Gaussian-equivalent width (FWHM / 2.3548), pixels.
    beta : `float`, optional
        Moffat index (``"moffat"`` only).
    core_sigma : `float`, optional
        Core width of the atmospheric profile (solved from ``sigma`` if not given).

    Returns
    -------
    profile : `numpy.ndarray`
        Values at ``r``.
    """
    r2 = np.asarray(r, float) ** 2
    if kind == "moffat":
        a = _moffat_alpha(sigma, beta)
        return (beta - 1) / (np.pi * a**2) * (1 + r2 / a**2) ** -beta
    if kind == "atmospheric":
        sc = atmospheric_core_sigma(sigma) if core_sigma is None else core_sigma
        s2 = _ATM_CORE_RATIO * sc
        core = 0.8 * np.exp(-r2 / (2 * sc**2)) / (2 * np.pi * sc**2)
        core += 0.2 * np.exp(-r2 / (2 * s2**2)) / (2 * np.pi * s2**2)
        wing = radial_profile("moffat", np.sqrt(r2), 2 * sigma, _ATM_WING_BETA)
        return (1 - ATM_WING_FRACTION) * core + ATM_WING_FRACTION * wing
    return np.exp(-r2 / (2 * sigma**2)) / (2 * np.pi * sigma**2)


def render_psf(
    kind: str,
    sigma: float,
    h: int = 12,
    dx: float = 0.0,
    dy: float = 0.0,
    beta: float = 3.0,
    shear: float = 0.0,
    theta: float = 0.0,
) -> np.ndarray:
    """A PSF stamp of size ``2 h + 1``, centred at ``(dx, dy)`` from its central pixel, unit sum.

    Parameters
    ----------
    kind : `str`
        ``"gauss"``, ``"moffat"`` or ``"atmospheric"``.
    sigma : `float`
        Gaussian-equivalent width (FWHM / 2.3548), pixels.
    h : `int`, optional
        Stamp half-size.
    dx, dy : `float`, optional
        Sub-pixel offset of the centre.
    beta : `float`, optional
        Moffat index.
    shear, theta : `float`, optional
        Shear ``(a - b) / (a + b)`` and its position angle (radians from +x).

    Returns
    -------
    stamp : `numpy.ndarray`
        ``(2 h + 1, 2 h + 1)`` float64 array summing to 1.
    """
    y, x = np.mgrid[-h : h + 1, -h : h + 1]
    if shear:
        q = np.sqrt((1 + shear) / (1 - shear))  # a / sqrt(ab)
        c, s = np.cos(theta), np.sin(theta)
        u, v = (x - dx) * c + (y - dy) * s, -(x - dx) * s + (y - dy) * c
        r2 = (u / q) ** 2 + (v * q) ** 2
    else:
        r2 = (x - dx) ** 2 + (y - dy) ** 2
    if kind == "moffat":  # a Moffat with a core width matched to sigma
        alpha = sigma * 2.3548 / (2 * np.sqrt(2 ** (1 / beta) - 1))
        p = (1 + r2 / alpha**2) ** -beta
    elif kind == "atmospheric":
        p = radial_profile("atmospheric", np.sqrt(r2), sigma)
    else:
        p = np.exp(-r2 / (2 * sigma**2))
    return p / p.sum()


def psf_fwhm(kind: str, sigma: float, beta: float = 3.0) -> float:
    """FWHM in pixels of a PSF of Gaussian-equivalent width ``sigma`` (``2.3548 sigma`` by construction)."""
    del kind, beta  # every kind is built so that its FWHM is 2.3548 sigma
    return FWHM_PER_SIGMA * sigma


def stamp_half(kind: str, flux: float, sigma: float, beta: float = 3.0) -> int:
    """Stamp half-size of a star: out to where its wings fall below 0.5 e- per pixel.

    At least ``7 sigma`` (3 FWHM) and 12 px for a Moffat (30 px, ``10 sigma`` for the
    atmospheric profile), at most 60 px (90 px atmospheric); a Gaussian gets 12 px.
    """
    if kind == "atmospheric":
        a = _moffat_alpha(2 * sigma, _ATM_WING_BETA)
        peak = ATM_WING_FRACTION * flux * (_ATM_WING_BETA - 1) / (np.pi * a**2)
        r = a * np.sqrt(max((peak / 0.5) ** (1 / _ATM_WING_BETA) - 1.0, 0.0))
        return int(min(max(np.ceil(r), 30, int(10 * sigma)), 90))
    if kind != "moffat":
        return 12
    alpha = sigma * 2.3548 / (2 * np.sqrt(2 ** (1 / beta) - 1))
    peak = flux * (beta - 1) / (np.pi * alpha**2)
    r = alpha * np.sqrt(max((peak / 0.5) ** (1 / beta) - 1.0, 0.0))
    return int(min(max(np.ceil(r), 12, int(7 * sigma)), 60))


def _paste(img: np.ndarray, st: np.ndarray, xi: int, yi: int) -> None:
    """Add a stamp centred on pixel ``(xi, yi)``, clipped to the image."""
    ny, nx = img.shape
    hy, hx = st.shape[0] // 2, st.shape[1] // 2
    y0, y1, x0, x1 = yi - hy, yi + hy + 1, xi - hx, xi + hx + 1
    if x1 <= 0 or y1 <= 0 or x0 >= nx or y0 >= ny:
        return
    sy0, sx0 = max(0, -y0), max(0, -x0)
    sy1, sx1 = st.shape[0] - max(0, y1 - ny), st.shape[1] - max(0, x1 - nx)
    img[max(y0, 0) : min(y1, ny), max(x0, 0) : min(x1, nx)] += st[sy0:sy1, sx0:sx1]


def add_stars(img, xs, ys, fluxes, kind, sigma, h=None, *, beta=3.0, shape=None) -> None:
    """Add point sources to ``img`` in place.

    Parameters
    ----------
    img : `numpy.ndarray`
        Image, electrons.
    xs, ys, fluxes : array-like
        Positions (pixels) and total fluxes (electrons).
    kind : `str`
        PSF kind (see :func:`render_psf`).
    sigma : `float`
        PSF width (used where ``shape`` is not given).
    h : `int`, optional
        Stamp half-size (default: :func:`stamp_half`, i.e. to the wings' end).
    beta : `float`, optional
        Moffat index.
    shape : `callable`, optional
        ``shape(x, y) -> (sigma, shear, theta)``: the PSF at each star's position.
    """
    ny, nx = img.shape
    fixed = h
    for x, y, f in zip(xs, ys, fluxes, strict=False):
        sig, g, th = shape(x, y) if shape is not None else (sigma, 0.0, 0.0)
        h = fixed if fixed is not None else stamp_half(kind, f, sig, beta)
        xi, yi = int(round(x)), int(round(y))
        if xi < -h or yi < -h or xi >= nx + h or yi >= ny + h:
            continue
        st = f * render_psf(kind, sig, h, x - xi, y - yi, beta=beta, shear=g, theta=th)
        _paste(img, st, xi, yi)


def render_galaxies(shape_yx, xs, ys, fluxes, params, psf_at, angle_offset: float = 0.0) -> np.ndarray:
    """Render Sersic galaxies convolved with the local PSF.

    Convolving the pixel-integrated profile with the PSF sampled at whole-pixel offsets (a
    discrete convolution) moved a compact, cuspy galaxy by up to 0.04 px, depending on its
    sub-pixel phase: the same galaxy on the science and the template grid then differed by a
    dipole no real sky has (5-6 sigma in the difference for 1e5-2e5 e- galaxies; their fitted
    shifts followed the template grid's phase, correlation -0.6). The central ``GALAXY_CORE``
    pixels are therefore convolved on a ``GALAXY_OVERSAMPLE``-times finer grid and integrated
    over each pixel (within 0.002 px of a 7-times finer grid); the rest, smooth on the pixel
    scale, as before.

    Parameters
    ----------
    shape_yx : `tuple`
        Output image shape.
    xs, ys, fluxes : `numpy.ndarray`
        Positions (pixels of this image) and total fluxes (electrons).
    params : `numpy.ndarray`
        ``(n, 4)``: Sersic index, half-light radius (px), axis ratio, position angle (rad).
    psf_at : `callable`
        ``psf_at(x, y, h, scale) -> stamp`` of size ``2 h + 1``, unit sum, sampled every
        ``1 / scale`` px (``h`` counted in those samples).
    angle_offset : `float`, optional
        Added to every position angle (the rotation of this image's pixel grid).

    Returns
    -------
    image : `numpy.ndarray`
        float32 image of the galaxies alone.
    """
    from scipy.signal import fftconvolve

    out = np.zeros(shape_yx, np.float32)
    c, k, hp = GALAXY_CORE, GALAXY_OVERSAMPLE, 10
    for x, y, f, (n, re, q, th) in zip(xs, ys, fluxes, params, strict=True):
        h = int(min(np.ceil(5 * re) + 8, 64))
        xi, yi = int(round(x)), int(round(y))
        rest = sersic_raw(n, re, q, th + angle_offset, h, x - xi, y - yi)
        rest[h - c : h + c + 1, h - c : h + c + 1] = 0.0
        outer = fftconvolve(rest, psf_at(x, y, hp, 1), mode="same")
        core = fine_core(n, re, q, th + angle_offset, x - xi, y - yi, psf_at(x, y, hp * k, k))
        total = float(outer.sum() + core.sum())
        _paste(out, (f * outer / total).astype(np.float32), xi, yi)
        _paste(out, (f * core / total).astype(np.float32), xi, yi)
    return out


def illumination(det, shape_yx, drop: float) -> np.ndarray | None:
    """Vignetting: relative illumination falling linearly with focal-plane radius by ``drop``.

    1 at the CCD pixel nearest the optical axis, ``1 - drop`` at the farthest one (the
    detector's reference position and ``x_mm``/``y_mm`` give the optical axis in pixels).
    Returns `None` when ``drop`` is 0.
    """
    if not drop:
        return None
    ny, nx = shape_yx
    ox = det.refpos_x - det.x_mm / det.pixel_size_mm
    oy = det.refpos_y - det.y_mm / det.pixel_size_mm
    yy, xx = np.mgrid[0:ny, 0:nx].astype(np.float32)
    r = np.hypot(xx - ox, yy - oy)
    del yy, xx
    lo, hi = float(r.min()), float(r.max())
    return (1.0 - drop * (r - lo) / (hi - lo)).astype(np.float32)


def psf_field(nx: int, ny: int, sci_sigma: float, variation: float, ellipticity: float):
    """``(x, y) -> (sigma, shear, theta)`` across a CCD, or `None` for a constant round PSF.

    The FWHM grows linearly with the distance from the CCD centre, by ``variation`` at the
    corners. The ellipticity ``(a^2 - b^2) / (a^2 + b^2)`` (as second moments measure it)
    grows from ``ellipticity / 2`` at the centre to ``ellipticity`` at the corners, oriented
    radially (so its position angle turns around the CCD).
    """
    if not variation and not ellipticity:
        return None
    cx, cy = (nx - 1) / 2.0, (ny - 1) / 2.0
    rmax = float(np.hypot(cx, cy))

    def field(x, y):
        rho = float(np.hypot(x - cx, y - cy)) / rmax
        theta = float(np.arctan2(y - cy, x - cx))
        e = ellipticity * (0.5 + 0.5 * rho)
        return sci_sigma * (1 + variation * rho), e / (1 + np.sqrt(1 - e**2)), theta

    return field


def edge_positions(rng, n: int, nx: int, ny: int, lo: float, hi: float):
    """``n`` random positions between ``lo`` and ``hi`` px from the nearest CCD edge (all four sides).

    Spread evenly around the border (each in its own 1/n of the perimeter, at a random place
    in the middle 60% of it): a test of detection near the edge, not of deblending (100
    transients dropped at random in the 22-px strip were 11 times denser than in the CCD's
    interior, and in 2" seeing half of the misses were blends with each other).
    """
    wx, wy = nx - 1 - 2 * lo, ny - 1 - 2 * lo
    perimeter = 2 * (wx + wy)
    t = (np.arange(n) + rng.uniform(0.2, 0.8, n)) / n * perimeter + rng.uniform(0, perimeter)
    t %= perimeter
    depth = rng.uniform(lo, hi, n)
    x, y = np.empty(n), np.empty(n)
    for k, u in enumerate(t):
        if u < wx:  # bottom side, left to right
            x[k], y[k] = lo + u, depth[k]
        elif u < wx + wy:  # right side, upwards
            x[k], y[k] = nx - 1 - depth[k], lo + u - wx
        elif u < 2 * wx + wy:  # top side, right to left
            x[k], y[k] = nx - 1 - lo - (u - wx - wy), ny - 1 - depth[k]
        else:  # left side, downwards
            x[k], y[k] = depth[k], ny - 1 - lo - (u - 2 * wx - wy)
    return x, y


def make_template(rng, wcs, nx, ny, stars, galaxies, snaps, sky, depth, psf, beta, sigma, two_patches):
    """The template coadd: own grid (rotated 0.3 deg, shifted), low noise, sharper PSF, SAT-masked cores."""
    from astropy.wcs import WCS

    sra, sdec, flux = stars
    gra, gdec, gflux, gpar = galaxies
    tny, tnx = ny + 120, nx + 120
    cra, cdec = wcs.pixel_to_world_values((nx - 1) / 2.0, (ny - 1) / 2.0)
    th = np.radians(0.3)
    rmat = np.array([[np.cos(th), -np.sin(th)], [np.sin(th), np.cos(th)]])
    twcs = WCS(naxis=2)
    twcs.wcs.ctype = ["RA---TAN", "DEC--TAN"]
    twcs.wcs.crval = [float(cra), float(cdec)]
    twcs.wcs.crpix = [(tnx - 1) / 2.0 + 1 + 37.3, (tny - 1) / 2.0 + 1 - 21.6]
    twcs.wcs.cd = wcs.pixel_scale_matrix @ rmat
    twcs.wcs.set()
    tpx, tpy = twcs.world_to_pixel_values(sra, sdec)
    timg = np.zeros((tny, tnx), np.float32)
    add_stars(timg, tpx, tpy, flux * snaps, psf, sigma, beta=beta)
    if len(gflux):
        gpx, gpy = twcs.world_to_pixel_values(gra, gdec)

        def tmpl_psf(x, y, h, scale=1):
            return render_psf(psf, sigma * scale, h, beta=beta)

        timg += render_galaxies((tny, tnx), gpx, gpy, gflux * snaps, gpar, tmpl_psf, angle_offset=-th)
    tvar = (snaps * sky / depth + timg / depth).astype(np.float32)
    timg += rng.standard_normal((tny, tnx), dtype=np.float32) * np.sqrt(tvar) + 5.0
    tmask = np.zeros((tny, tnx), np.int32)
    tmask[timg > 0.9 * FULL_WELL * snaps] = MaskBits.SAT
    if not two_patches:
        return [Image(timg, tvar, tmask, twcs)]
    cut = tnx // 2
    w1 = twcs.deepcopy()
    w2 = twcs.deepcopy()
    w2.wcs.crpix = twcs.wcs.crpix - np.array([cut - 50, 0])
    w2.wcs.set()
    return [
        Image(timg[:, : cut + 50], tvar[:, : cut + 50], tmask[:, : cut + 50], w1),
        Image(timg[:, cut - 50 :], tvar[:, cut - 50 :], tmask[:, cut - 50 :], w2),
    ]
