"""A bright object's own registration, shape and wing mismatch, fitted in the difference, as variance.

The matching kernel is one smooth function of the CCD position, fitted on stars. Around a
single bright object it can still be off: the template's copy of the object sits a few
hundredths of a pixel away (differential chromatic refraction moves an object whose colour is
not the stars'; the test scene's galaxies were moved by a rendering error, since fixed), its
width and ellipticity differ (an atmospheric PSF whose ellipticity turns across the CCD faster than the
kernel's polynomial), or its wing does (the same PSF's wing, 2-4 FWHM out). The difference
then holds dipoles and quadrupoles at the object's core, 5-6 sigma in the matched filter for
objects of 1e5-4e5 e-, and one-sided lobes in its wing, 5-7 sigma 13-17 px from stars of
4e5-1e6 e-. The ring test of :func:`~.kernel_residual.add_measured_variance` misses both:
the core's rings are too small to reach its significance, and a lobe in one sector of a ring
looks like a transient beside the star to it.

:func:`add_mismatch_variance` fits, around each bright object, the difference with ``a M + c``
(a change of the object's flux, a level; ``M`` is the matched template, science less
difference) plus mismatch terms, in two passes:

- core, within ``1.5 FWHM``: the five derivatives of ``M`` (x, y shift; xx, xy, yy: width and
  ellipticity). ZOGY (Zackay, Ofek & Gal-Yam 2016, sec. 3.3) adds the variance of a
  registration error to its score for the same reason, with one astrometric scatter for the
  whole image; here each object's own fitted mismatch is used;
- wing, from ``1.5`` to ``4 FWHM``: ``M`` times the angular harmonics 1, cos, sin of phi and
  2 phi, each also times ``r`` (the wing's level and its lopsidedness, ten terms).

A pass counts when its terms lower chi^2 by more than a chance of ``p_false`` allows beyond
the other explanation, a point source at the residual's peak (a transient beside the object
is fitted by derivatives too, but by a point source better; a dipole, a ring or a one-sided
lobe of a wing is not), explain what is there (the filtered residual stays below ``max_left``
sigma; otherwise something else is in the box and the object is left alone) and are small
beside the object (``max_core``, ``max_wing``: a transient brighter than a faint star 1-2 px
away fits the terms too, as large as the star).
Then ``coherence x m^2`` is added to the variance (``m`` the fitted mismatch terms), as for
the ring test (a mismatch is coherent over the matched filter). A change of the object's own
flux (a variable star, a nuclear transient) is ``a M``, not ``m``: it keeps its S/N, apart
from the variance its mismatch adds. A faint transient within about one FWHM of a bright
object that also has a mismatch is absorbed by the derivatives (the price, measured in
tests/test_mismatch.py).
Plain functions; no state.
"""

from __future__ import annotations

from typing import NamedTuple

import numpy as np
from scipy import ndimage
from scipy.stats import chi2

__all__ = ["MismatchFit", "add_mismatch_variance", "core_terms", "mismatch_fit", "wing_terms"]


class MismatchFit(NamedTuple):
    """:func:`mismatch_fit`'s result."""

    dchi2: float
    """How much the mismatch terms lower chi^2 beyond a flux change and a point source."""
    point_dchi2: float
    """How much the point source lowers chi^2 beyond a flux change and the mismatch terms."""
    flux_change: float
    """``a`` (a fraction of the object's flux)."""
    mismatch: np.ndarray
    """The fitted mismatch terms on the box (zero where not usable)."""
    resid: np.ndarray
    """What no term explains, on the box (zero where not usable)."""


def core_terms(model: np.ndarray) -> list[np.ndarray]:
    """``d/dx, d/dy, d2/dx2, d2/dxdy, d2/dy2`` of a stamp (central differences), cut by the
    2 px they need on every side."""
    gy, gx = np.gradient(model)
    gxy, gxx = np.gradient(gx)
    gyy = np.gradient(gy, axis=0)
    inner = (slice(2, -2), slice(2, -2))
    return [t[inner] for t in (gx, gy, gxx, gxy, gyy)]


def wing_terms(model: np.ndarray, dx: float, dy: float, r_in: float) -> list[np.ndarray]:
    """``M`` beyond ``r_in`` times 1, cos, sin of phi and 2 phi, each also times ``r / r_out``.

    ``(dx, dy)``: the object's offset from the box centre (px); ``r_out`` is the box half-size.
    """
    h = model.shape[0] // 2
    yy, xx = np.mgrid[-h : h + 1, -h : h + 1].astype(float)
    xx -= dx
    yy -= dy
    r = np.hypot(xx, yy)
    phi = np.arctan2(yy, xx)
    wing = np.where(r > r_in, model, 0.0)
    out = []
    for f in (np.ones_like(r), np.cos(phi), np.sin(phi), np.cos(2 * phi), np.sin(2 * phi)):
        out += [wing * f, wing * f * (r / h)]
    return out


def mismatch_fit(diff: np.ndarray, model: np.ndarray, terms: list[np.ndarray], var: np.ndarray,
                 ok: np.ndarray, sigma: float, point_dchi2: float = 16.0) -> MismatchFit:
    """Fit one box of a difference with a flux change, mismatch terms and a point source.

    Terms: ``a M + c`` (a change of the object's flux, a level), ``terms`` and a point source
    (a Gaussian of ``sigma``) at the peak of what ``a M + c`` or ``a M + c + terms`` leaves
    (the better of the two). The point source stays in the fit that gives the mismatch and the
    residual only when it lowers chi^2 by more than ``point_dchi2`` (a source of S/N 4): a
    transient beside a mismatched object is not taken for part of its mismatch.

    Parameters
    ----------
    diff, model, var : `numpy.ndarray`
        The difference, the matched template ``M`` and the variance on the box.
    terms : `list` [`numpy.ndarray`]
        The mismatch terms on the box (:func:`core_terms`, :func:`wing_terms`).
    ok : `numpy.ndarray`
        Boolean, usable pixels of the box.
    sigma : `float`
        Gaussian-equivalent PSF sigma (px).
    point_dchi2 : `float`
        See above.

    Returns
    -------
    fit : `MismatchFit`
    """
    d, w = diff[ok], 1.0 / np.maximum(var[ok], 1e-30)
    flux = np.column_stack([model[ok], np.ones(int(ok.sum()))])
    mis_cols = np.column_stack([t[ok] for t in terms])
    k = mis_cols.shape[1]

    def solve(design):
        aw = design * w[:, None]
        p = np.linalg.lstsq(aw.T @ design, aw.T @ d, rcond=None)[0]
        return float((w * (d - design @ p) ** 2).sum()), p

    _, p0 = solve(flux)
    with_terms = np.column_stack([flux, mis_cols])
    chi_mis, p_mis = solve(with_terms)
    chi_pt = np.inf
    best: tuple[float, np.ndarray, np.ndarray] | None = None
    for pfit, design in ((p0, flux), (p_mis, with_terms)):
        left = np.zeros(ok.shape)
        left[ok] = d - design @ pfit
        at = _peak(ndimage.gaussian_filter(left, sigma, mode="constant"), ok)
        pt = _gaussian_at(at, ok.shape, sigma)[ok]
        chi_pt = min(chi_pt, solve(np.column_stack([flux, pt]))[0])
        chi_all, p_all = solve(np.column_stack([with_terms, pt]))
        if best is None or chi_all < best[0]:
            best = (chi_all, p_all, pt)
    assert best is not None  # two candidates were tried
    chi_all, p_all, pt = best
    with_point = chi_mis - chi_all > point_dchi2
    design, p = (np.column_stack([with_terms, pt]), p_all) if with_point else (with_terms, p_mis)
    mis = np.zeros(ok.shape)
    mis[ok] = mis_cols @ p[2 : 2 + k]
    resid = np.zeros(ok.shape)
    resid[ok] = d - design @ p
    return MismatchFit(chi_pt - chi_all, chi_mis - chi_all, float(p[0]), mis, resid)


def _peak(img: np.ndarray, ok: np.ndarray) -> tuple[float, float]:
    """Sub-pixel ``(y, x)`` of the largest ``|img|`` over ``ok`` (a parabola through 3 pixels each way)."""
    a = np.abs(img)
    flat = int(np.argmax(np.where(ok, a, -1.0)))
    iy, ix = flat // img.shape[1], flat % img.shape[1]
    out = []
    for pos, lo, hi in ((iy, a[max(iy - 1, 0), ix], a[min(iy + 1, a.shape[0] - 1), ix]),
                        (ix, a[iy, max(ix - 1, 0)], a[iy, min(ix + 1, a.shape[1] - 1)])):
        curv = lo - 2 * a[iy, ix] + hi
        out.append(pos + (0.5 * (lo - hi) / curv if curv < 0 else 0.0))
    return out[0], out[1]


def _gaussian_at(yx: tuple[float, float], shape: tuple[int, int], sigma: float) -> np.ndarray:
    yy, xx = np.mgrid[0 : shape[0], 0 : shape[1]].astype(float)
    return np.exp(-((xx - yx[1]) ** 2 + (yy - yx[0]) ** 2) / (2 * sigma * sigma))


def add_mismatch_variance(diff: np.ndarray, science: np.ndarray, var: np.ndarray, bad: np.ndarray,
                          x: np.ndarray, y: np.ndarray, sigma: float, fwhm: float, coherence: float,
                          p_false: float = 1.5e-5, max_left: float = 4.5, max_core: float = 0.1,
                          max_wing: float = 0.5, wing: bool = True) -> int:
    """Add each bright object's significant fitted mismatch, squared, times ``coherence``, to ``var``.

    Parameters
    ----------
    diff, science : `numpy.ndarray`
        The difference and the science image it was made from (``science - diff`` is the
        matched template, background included: the fit's level absorbs it).
    var : `numpy.ndarray`
        Variance of the difference (float32), changed in place.
    bad : `numpy.ndarray`
        Boolean, pixels left out of the fits (masked, no data).
    x, y : `numpy.ndarray`
        The objects' positions (px); boxes cut by the image border are fitted on their part
        inside it.
    sigma, fwhm : `float`
        Gaussian-equivalent PSF sigma and FWHM (px): the matched filter of the ``max_left``
        test; the core's (1.5 FWHM) and the wing's (4 FWHM) box half-sizes.
    coherence : `float`
        Factor on ``m^2`` (about ``pi sigma^2``; see the module docstring).
    p_false : `float`
        Chance that noise alone makes a pass count (its chi^2 threshold: 30 for the core's
        five terms, 42 for the wing's ten; on the default grid CCDs the core's 99th percentile
        over the brightest 500 objects is 16).
    max_left : `float`
        Largest matched-filter peak (sigma) of a fit's residual for the mismatch to count as
        the whole story; a box whose difference has no peak above it is not fitted.
    max_core, max_wing : `float`
        Largest fitted mismatch, as a fraction of the object's own model over the box (rms),
        at the core and in the wing.
    wing : `bool`
        Also fit the wing.

    Returns
    -------
    n_objects : `int`
        Objects with a mismatch added (core, wing or both).
    """
    r_core = int(np.ceil(1.5 * fwhm))
    passes = [(r_core, None, max_core)] + ([(int(np.ceil(4 * fwhm)), r_core, max_wing)] if wing else [])
    hit = np.zeros(len(np.atleast_1d(x)), bool)
    for half, r_in, max_size in passes:
        for i, (xc, yc) in enumerate(zip(np.asarray(x, float), np.asarray(y, float), strict=True)):
            hit[i] |= _one_box(diff, science, var, bad, xc, yc, half, r_in, sigma, coherence, p_false,
                               max_left, max_size)
    return int(hit.sum())


def _one_box(diff, science, var, bad, xc, yc, half, r_in, sigma, coherence, p_false, max_left,
             max_size) -> bool:
    """One pass around one object (core if ``r_in`` is None, else wing); True if variance was added."""
    ny, nx = var.shape
    xi, yi = int(round(xc)), int(round(yc))
    grow = 2 if r_in is None else 0  # the derivatives need 2 px on every side
    y0, x0 = yi - half - grow, xi - half - grow
    y1, x1 = yi + half + grow + 1, xi + half + grow + 1
    if y1 <= 0 or x1 <= 0 or y0 >= ny or x0 >= nx:
        return False
    d, s, v, bb, inside = _padded((diff, science, var, bad), y0, y1, x0, x1)
    usable = inside & (bb == 0)
    if grow:
        usable = ndimage.binary_erosion(usable, np.ones((5, 5), bool), border_value=0)
    inner = (slice(grow, grow + 2 * half + 1),) * 2
    ok, d_in, v_in = usable[inner], d[inner], v[inner]
    if r_in is not None:
        yy, xx = np.mgrid[-half : half + 1, -half : half + 1]
        ok = ok & (np.hypot(xx, yy) <= half)
    if ok.sum() < 0.5 * ok.size * (1.0 if r_in is None else np.pi / 4):
        return False
    den = np.sqrt(np.maximum(ndimage.gaussian_filter(np.where(ok, v_in, 0.0), sigma / np.sqrt(2),
                                                     mode="constant"), 1e-30)) / (np.sqrt(4 * np.pi) * sigma)

    def peak(img):
        filtered = ndimage.gaussian_filter(np.where(ok, img, 0.0), sigma, mode="constant")
        return float((np.abs(filtered) / den)[ok].max())

    # nothing the matched filter would detect: nothing to explain (most objects)
    if peak(d_in) < max_left:
        return False
    model = s - d
    terms = core_terms(model) if r_in is None else wing_terms(model[inner], xc - xi, yc - yi, r_in)
    fit = mismatch_fit(d_in, model[inner], terms, v_in, ok, sigma)
    if not fit.dchi2 > chi2.isf(p_false, len(terms)) or peak(fit.resid) > max_left:
        return False
    # a mismatch is small beside the object itself: a transient brighter than a faint star 1-2 px
    # away fits the terms too, as large as the star (0.28 of it; two S/N 38 transients were
    # lost in 0.5" seeing without this test; stars' core mismatches are 0.01-0.03 of them, the
    # varying atmospheric PSF's wings 0.07-0.23 of theirs)
    own = model[inner] if r_in is None else np.where(terms[0] != 0, model[inner], 0.0)
    if np.sqrt((fit.mismatch[ok] ** 2).sum()) > max_size * np.sqrt((own[ok] ** 2).sum()):
        return False
    iy0, iy1, ix0, ix1 = max(yi - half, 0), min(yi + half + 1, ny), max(xi - half, 0), min(xi + half + 1, nx)
    sub = (slice(iy0 - yi + half, iy1 - yi + half), slice(ix0 - xi + half, ix1 - xi + half))
    var[iy0:iy1, ix0:ix1] += (coherence * fit.mismatch[sub] ** 2).astype(np.float32)
    return True


def _padded(images, y0, y1, x0, x1):
    """The ``[y0:y1, x0:x1]`` box of each image (float64, zero outside the image) and a boolean
    map of the pixels inside it."""
    ny, nx = images[0].shape
    sy0, sy1, sx0, sx1 = max(y0, 0), min(y1, ny), max(x0, 0), min(x1, nx)
    inside = np.zeros((y1 - y0, x1 - x0), bool)
    dst = (slice(sy0 - y0, sy1 - y0), slice(sx0 - x0, sx1 - x0))
    inside[dst] = True
    out = []
    for img in images:
        box = np.zeros(inside.shape)
        box[dst] = img[sy0:sy1, sx0:sx1]
        out.append(box)
    return (*out, inside)
