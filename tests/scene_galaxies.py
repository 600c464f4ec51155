"""Sersic galaxies of the synthetic CCD scene (tests/scene_render.py renders them through the PSF).

Not a test module. Pure numpy: the profile integrated over each pixel, its core convolved
with a PSF on a finer grid, and random galaxy catalogues.
"""

from __future__ import annotations

import numpy as np

__all__ = ["GALAXY_CORE", "GALAXY_OVERSAMPLE", "fine_core", "random_galaxies", "sersic_raw"]


def _sersic_mean(n, r_e, q, theta, ys, xs, k) -> np.ndarray:
    """Mean of the Sersic profile over ``k x k`` sub-pixels of the pixels at ``ys x xs`` (offsets applied)."""
    b = 2 * n - 1 / 3 + 4 / (405 * n) + 46 / (25515 * n**2)
    sub = (np.arange(k) - (k - 1) / 2) / k
    y = ys[:, None, None, None] + sub[None, None, :, None]
    x = xs[None, :, None, None] + sub[None, None, None, :]
    c, s = np.cos(theta), np.sin(theta)
    u, v = x * c + y * s, -x * s + y * c
    r = np.sqrt(u**2 + (v / q) ** 2)
    return np.where(r <= 5 * r_e, np.exp(-b * ((r / r_e) ** (1 / n) - 1)), 0.0).mean(axis=(2, 3))


def sersic_raw(n: float, r_e: float, q: float, theta: float, h: int, dx: float, dy: float) -> np.ndarray:
    """A Sersic profile (index ``n``, half-light radius ``r_e`` along the major axis, axis ratio
    ``q``), centred ``(dx, dy)`` from the central pixel: the mean surface brightness per pixel.

    Integrated over each pixel: 3 x 3 samples per pixel, 15 x 15 in the central 5 x 5 pixels and
    45 x 45 in the central 3 x 3, where a cuspy (n = 4) profile changes faster than 3 samples
    follow (with 3 x 3 the central pixels' light depended on the sub-pixel phase by up to 26%,
    so the same galaxy on the science and the template grid differed: residuals no real sky
    has). Truncated at 5 ``r_e`` (or the stamp); not normalised.
    """
    g = np.arange(-h, h + 1, dtype=float)
    p = _sersic_mean(n, r_e, q, theta, g - dy, g - dx, 3)
    for c, k in ((min(2, h), 15), (min(1, h), 45)):
        core = np.arange(-c, c + 1, dtype=float)
        p[h - c : h + c + 1, h - c : h + c + 1] = _sersic_mean(n, r_e, q, theta, core - dy, core - dx, k)
    return p


GALAXY_CORE = 3
"""Half-size (px) of a galaxy's core that :func:`render_galaxies` convolves on a finer grid."""
GALAXY_OVERSAMPLE = 3
"""Fine samples per pixel (each way) there."""


def fine_core(n, r_e, q, theta, dx, dy, psf_fine, c=GALAXY_CORE, k=GALAXY_OVERSAMPLE):
    """The central ``(2c + 1)^2`` pixels of a galaxy convolved with the PSF on a ``k``-times finer
    grid and integrated over each pixel, in :func:`sersic_raw`'s units: ``(2 (c + hp) + 1)^2``
    px, ``hp`` the PSF's half-size in pixels (``psf_fine``: ``2 k hp + 1`` fine samples a side,
    unit sum). ``k`` odd."""
    from scipy.signal import fftconvolve

    hf = c * k + (k - 1) // 2
    # the fine cells' mean brightness: the profile with r_e and the offsets in fine cells
    fine = sersic_raw(n, r_e * k, q, theta, hf, dx * k, dy * k)
    conv = fftconvolve(fine, psf_fine, mode="full")
    m = conv.shape[0] // k
    return conv.reshape(m, k, m, k).mean(axis=(1, 3))


def random_galaxies(side, n, nx, ny):
    """Random Sersic galaxies: positions, per-snap fluxes (dN/dF ~ F^-2, 2e3-2e5 e-), shape parameters."""
    gx = side.uniform(-30, nx + 30, n)
    gy = side.uniform(-30, ny + 30, n)
    gflux = np.minimum(2000.0 * (1 - side.uniform(0, 1, n)) ** -1.0, 2e5)
    params = np.column_stack(
        [
            side.uniform(0.5, 4.0, n),
            np.exp(side.uniform(np.log(1.5), np.log(12.0), n)),
            side.uniform(0.3, 1.0, n),
            side.uniform(0, np.pi, n),
        ]
    )
    return gx, gy, gflux, params
