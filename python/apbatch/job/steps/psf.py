"""PSF model: a spatially varying pixelised PSF built from bright isolated stars on the stellar locus.

Star selection (:mod:`~apbatch.job.steps.psf_stars`): bright isolated unmasked candidates
on the stellar locus of flux-independent sizes (the smallest well-populated size, drifting
over the CCD as the seeing does), not the median of all candidates (in a galaxy-rich
field that was a galaxy's size).

Model: every pixel of the centred, flux-normalised stamp is a polynomial of ``degree`` (0-2)
in the CCD position, fitted by weighted least squares to the stars (outlier pixels, from
neighbours or cosmic rays, clipped at 4 sigma and refitted). ``image``/``sigma``/``fwhm``
describe the CCD centre, :meth:`PsfModel.stamp` and :meth:`PsfModel.sigma_at` any position.
The encircled energy curve out to several FWHM (from a larger median stack) gives the
radius that holds a fraction of the light (:meth:`PsfModel.radius_enclosing`): the PSF
matching sizes its kernel with it.
"""

from __future__ import annotations

import dataclasses

import numpy as np
import pandas as pd
from scipy import ndimage

from ...errors import BadInputError
from ...image import Image
from .detection import detect_sources
from .psf_stars import (
    centred_stamp,
    encircled,
    encircled_profile,
    inside,
    psf_candidates,
    stellar_locus,
    weighted_sizes,
)

__all__ = ["SPARSE_MIN_SNR", "SPARSE_THRESHOLD", "PsfModel", "gaussian_psf", "measure_psf", "moffat_psf",
           "sources_and_psf"]


def _terms(degree: int) -> list[tuple[int, int]]:
    return [(i, j) for d in range(degree + 1) for i in range(d + 1) for j in (d - i,)]


def _poly(degree: int, u: np.ndarray, v: np.ndarray) -> np.ndarray:
    """(len(u), n_terms) monomials ``u**i v**j`` with ``i + j <= degree``."""
    return np.stack([u**i * v**j for i, j in _terms(degree)], axis=-1)


@dataclasses.dataclass
class PsfModel:
    """A pixelised PSF (``image`` sums to 1, centre at ``image[h, h]``) and its size.

    ``image`` and ``sigma`` are the PSF at the CCD centre. A spatially varying model also
    has ``coeffs`` (one stamp per polynomial term of ``degree`` in the CCD position scaled to
    [-1, 1] over ``ccd_shape``). ``encircled`` is the fraction of the light within radius
    ``r`` px for ``r = 0, 1, ...``. Immutable by convention; safe to share.
    """

    image: np.ndarray
    sigma: float
    n_stars: int
    coeffs: np.ndarray | None = None
    degree: int = 0
    ccd_shape: tuple[int, int] | None = None
    encircled: np.ndarray | None = None
    fallback: str | None = None
    """Why the model is simpler than the data would normally give (a sparse field), else `None`."""

    @property
    def fwhm(self) -> float:
        """Gaussian-equivalent FWHM at the CCD centre, pixels."""
        return 2.3548 * self.sigma

    def image_at(self, x: float | None = None, y: float | None = None) -> np.ndarray:
        """The unshifted model at CCD position (``x``, ``y``); the centre's when not given or constant."""
        if self.coeffs is None or self.ccd_shape is None or x is None or y is None:
            return self.image
        ny, nx = self.ccd_shape
        u = np.clip((float(x) - nx / 2.0) / (nx / 2.0), -1.0, 1.0)
        v = np.clip((float(y) - ny / 2.0) / (ny / 2.0), -1.0, 1.0)
        p = _poly(self.degree, np.array([u]), np.array([v]))[0]
        return _clean_stamp(np.tensordot(p, self.coeffs, axes=1))

    def sigma_at(self, x: float, y: float) -> float:
        """Gaussian-equivalent sigma (px) at CCD position (``x``, ``y``)."""
        return _moment_sigma(self.image_at(x, y)) if self.coeffs is not None else self.sigma

    def radius_enclosing(self, fraction: float) -> float:
        """Radius (px) that holds ``fraction`` of the PSF's light (from ``encircled``, else ``image``)."""
        ee = self.encircled if self.encircled is not None else encircled(self.image)
        k = int(np.searchsorted(ee, fraction))
        if k >= len(ee):
            return float(len(ee) - 1)
        if k == 0:
            return 0.0
        return float(k - 1 + (fraction - ee[k - 1]) / max(ee[k] - ee[k - 1], 1e-12))

    def stamp(
        self,
        dx: float = 0.0,
        dy: float = 0.0,
        size: int | None = None,
        x: float | None = None,
        y: float | None = None,
    ) -> np.ndarray:
        """The PSF shifted by (``dx``, ``dy``) px (cubic spline), normalised to sum 1.

        Cropped or zero-padded to ``size`` px square; ``None`` keeps the model's own size.
        ``x``, ``y`` are the CCD position the PSF is wanted at; a constant model ignores them.
        """
        img = self.image_at(x, y)
        if dx or dy:
            img = ndimage.shift(img, (dy, dx), order=3, mode="constant")
        if size is not None and size < img.shape[0]:
            c, h = img.shape[0] // 2, size // 2
            img = img[c - h : c + h + 1, c - h : c + h + 1]
        elif size is not None and size > img.shape[0]:  # bad seeing: a box larger than the model
            pad = (size - img.shape[0]) // 2
            img = np.pad(img, ((pad, size - img.shape[0] - pad),) * 2)
        s = img.sum()
        return img / s if s > 0 else img


def _clean_stamp(img: np.ndarray) -> np.ndarray:
    """Negative pixels and corners beyond the inscribed circle zeroed, normalised to sum 1."""
    h = img.shape[0] // 2
    yy, xx = np.mgrid[-h : h + 1, -h : h + 1]
    out = np.where((img > 0) & (np.hypot(xx, yy) <= h), img, 0.0)
    s = out.sum()
    return out / s if s > 0 else out


def gaussian_psf(sigma: float, size: int = 25) -> PsfModel:
    """A circular Gaussian PSF model (for tests and as a fallback)."""
    h = size // 2
    y, x = np.mgrid[-h : h + 1, -h : h + 1]
    img = np.exp(-(x * x + y * y) / (2.0 * sigma * sigma))
    r = np.arange(max(h, int(np.ceil(6 * sigma))) + 1) + 0.5
    return PsfModel(img / img.sum(), float(sigma), 0, encircled=1.0 - np.exp(-r * r / (2 * sigma**2)))


def moffat_psf(fwhm: float, beta: float, size: int = 25) -> PsfModel:
    """A circular Moffat PSF model of ``fwhm`` (px) and index ``beta`` (a coadd's described PSF).

    Its ``sigma`` is measured from the pixelised profile the same way as :func:`measure_psf`
    does for stars, so the two are comparable (a Moffat's is larger than ``fwhm / 2.3548``).
    """
    if not (fwhm > 0 and beta > 1):
        raise BadInputError("psf", f"Moffat FWHM {fwhm} px, beta {beta}", "need FWHM > 0 and beta > 1")
    h = size // 2
    y, x = np.mgrid[-h : h + 1, -h : h + 1]
    alpha = fwhm / (2.0 * np.sqrt(2.0 ** (1.0 / beta) - 1.0))
    img = (1.0 + (x * x + y * y) / alpha**2) ** -beta
    img /= img.sum()
    r = np.arange(max(h, int(np.ceil(10 * fwhm))) + 1) + 0.5
    ee = 1.0 - (1.0 + r * r / alpha**2) ** (1.0 - beta)
    return PsfModel(img, _moment_sigma(img), 0, encircled=ee)


def _moment_sigma(stamp: np.ndarray) -> float:
    h = stamp.shape[0] // 2
    y, x = np.mgrid[-h : h + 1, -h : h + 1]
    w = np.exp(-(x * x + y * y) / (2 * 3.0**2))  # weight suppresses noisy wings
    s = stamp * w
    m = (s * (x * x + y * y)).sum() / s.sum() / 2.0  # weighted variance per axis
    if m <= 0 or m >= 9.0:
        return float("nan")
    return float(np.sqrt(m * 9.0 / (9.0 - m)))  # undo the Gaussian weight


def _fit_pixels(stamps: np.ndarray, wts: np.ndarray, design: np.ndarray, n_iter: int = 2) -> np.ndarray:
    """Weighted least-squares polynomial per pixel, with outlier pixels (> 4 sigma) replaced and refitted."""
    n = len(stamps)
    flat = stamps.reshape(n, -1).copy()
    sw = np.sqrt(wts)[:, None]
    coef = np.linalg.lstsq(design * sw, flat * sw, rcond=None)[0]
    for _ in range(n_iter):
        model = design @ coef
        z = (flat - model) * sw
        scale = 1.4826 * np.median(np.abs(z), axis=0) + 1e-12
        bad = np.abs(z) > 4.0 * scale
        if not bad.any():
            break
        flat[bad] = model[bad]
        coef = np.linalg.lstsq(design * sw, flat * sw, rcond=None)[0]
    return coef.reshape((design.shape[1],) + stamps.shape[1:])


MIN_STARS = 5
"""Candidates below which no stellar locus is sought: the sparse-field fallback (`measure_psf`)."""
MIN_STARS_SPARSE = 2
"""PSF stars a sparse-field constant model needs; with fewer the image is bad input."""
FEW_STARS_SIZE_RATIO = 1.3
"""In a sparse field, candidates larger than this times the smallest one's size are left out."""


def _model_half(star_sigma: float) -> int:
    """Half-size (px) of a PSF model 5 FWHM across for stars of Gaussian-equivalent ``star_sigma``, 12-40."""
    return int(min(max(12, round(2.5 * 2.3548 * star_sigma)), 40))


def _smallest(img: Image, cand: pd.DataFrame) -> tuple[pd.DataFrame, float | None]:
    """The candidates of a sparse field no larger than `FEW_STARS_SIZE_RATIO` x the smallest one,
    and their median size (sigma, px; `None` when none could be measured).

    Sizes are the flux-independent weighted sizes of the stellar locus (an isophotal size
    grows with the flux, so a bright star would pass for a galaxy).
    """
    if cand.empty:
        return cand, None
    iso = np.sqrt(0.5 * (cand["ixx"] + cand["iyy"])).to_numpy()
    w = float(np.clip(1.5 * iso.min(), 1.5, 8.0))
    size = weighted_sizes(img.image, cand["x"].to_numpy(), cand["y"].to_numpy(), w)
    ok = np.isfinite(size)
    if not ok.any():
        return cand.iloc[:0], None
    ok &= size <= FEW_STARS_SIZE_RATIO * size[ok].min()
    return cand[ok], float(np.median(size[ok]))


def measure_psf(
    img: Image,
    sources: pd.DataFrame,
    size: int | None = None,
    max_stars: int = 200,
    min_snr: float = 50.0,
    isolation: float = 15.0,
    saturation: float | None = None,
    degree: int | None = None,
) -> PsfModel:
    """Build the PSF model from the catalogue of :func:`~apbatch.job.steps.detection.detect_sources`.

    Candidates are sources with ``snr >= min_snr``, no sep flags, no masked pixel, no
    neighbour within ``isolation`` px, away from the edges and with a peak below
    ``saturation`` (if given); the PSF stars are the (at most ``max_stars`` brightest)
    candidates on the stellar locus (module docstring). Each stamp is shifted to its
    centroid and normalised; the model is their polynomial fit in the CCD position.

    Parameters
    ----------
    size : `int`, optional
        Side of the model (px, odd); default 25, or 5 x the stars' FWHM (at most 81) when
        that is larger: in bad seeing a 25-px model holds only ~85% of the light, and PSF
        fluxes would be low by as much.
    degree : `int`, optional
        Polynomial degree of the spatial variation; default 2 with >= 40 stars, 1 with
        >= 15, else 0 (constant).

    Notes
    -----
    A sparse field (a LATISS field at high latitude, a short snap: fewer than
    `MIN_STARS` candidates, so no stellar locus can be found) gets a constant model from
    the candidates no larger than `FEW_STARS_SIZE_RATIO` times the smallest (a galaxy is
    larger than every star), and ``fallback`` says so; the job reports it in its metrics.

    Raises
    ------
    BadInputError
        Raised if fewer than `MIN_STARS_SPARSE` PSF stars are found.
    """
    if len(sources) == 0:
        raise BadInputError(
            "image", "no sources to build a PSF from", "check the exposure (clouds? shutter?)"
        )
    ny, nx = img.shape
    h = 12 if size is None else size // 2
    cand = psf_candidates(img, sources, h, min_snr, isolation, saturation)
    cand = cand.sort_values("snr", ascending=False).head(4 * max_stars)
    if len(cand) >= 5:
        iso = np.sqrt(0.5 * (cand["ixx"] + cand["iyy"])).to_numpy()
        w = float(np.clip(1.5 * np.percentile(iso, 25), 1.5, 8.0))
        sizes = weighted_sizes(img.image, cand["x"].to_numpy(), cand["y"].to_numpy(), w)
        u = (cand["x"].to_numpy() - nx / 2.0) / (nx / 2.0)
        v = (cand["y"].to_numpy() - ny / 2.0) / (ny / 2.0)
        member = stellar_locus(sizes, u, v)
        if size is None and member.any():
            h = _model_half(float(np.median(sizes[member])))
        cand = cand[member]
        cand = cand[inside(cand, h, nx, ny)]
    cand = cand.head(max_stars)
    sparse = len(cand) < MIN_STARS
    if sparse:
        cand, star_size = _smallest(img, cand)
        if size is None and star_size is not None:  # as for a stellar locus: 5 FWHM across
            h = _model_half(star_size)
            cand = cand[inside(cand, h, nx, ny)]
    if len(cand) < MIN_STARS_SPARSE:
        raise BadInputError(
            "image", f"only {len(cand)} PSF stars found (at least {MIN_STARS_SPARSE})",
            "the image has too few bright stars"
        )
    stamps, wts, pos = [], [], []
    for x, y in zip(cand["x"].to_numpy(), cand["y"].to_numpy(), strict=False):
        st = centred_stamp(img.image, x, y, h)
        tot = st.sum()
        if tot > 0 and np.isfinite(tot):
            xi, yi = int(round(x)), int(round(y))
            var = float(np.median(img.variance[yi - h : yi + h + 1, xi - h : xi + h + 1]))
            stamps.append(st / tot)
            wts.append(tot * tot / max(var, 1e-6))
            pos.append((x, y))
    if len(stamps) < MIN_STARS_SPARSE:
        raise BadInputError(
            "image", f"only {len(stamps)} PSF stars found (at least {MIN_STARS_SPARSE})",
            "the image has too few bright stars"
        )
    fallback = f"sparse field: constant PSF from {len(stamps)} star(s)" if sparse else None
    if sparse:
        degree = 0
    elif degree is None:
        degree = 2 if len(stamps) >= 40 else 1 if len(stamps) >= 15 else 0
    w_arr = np.array(wts)
    w_arr = np.minimum(w_arr, np.percentile(w_arr, 80))  # a few very bright stars must not decide alone
    p = np.array(pos)
    design = _poly(degree, (p[:, 0] - nx / 2.0) / (nx / 2.0), (p[:, 1] - ny / 2.0) / (ny / 2.0))
    coeffs = _fit_pixels(np.array(stamps), w_arr, design)
    centre = _clean_stamp(coeffs[0])
    sigma = _moment_sigma(centre)
    if not np.isfinite(sigma):
        raise BadInputError("image", "PSF stars give no finite size", "check the exposure")
    ee = encircled_profile(img, cand, sources, 2.3548 * sigma)
    return PsfModel(
        centre.astype(np.float64),
        sigma,
        len(stamps),
        coeffs=coeffs if degree > 0 else None,
        degree=degree,
        ccd_shape=(ny, nx),
        encircled=ee,
        fallback=fallback,
    )


SPARSE_THRESHOLD = 2.5
"""Detection threshold (per-pixel sigma of the smoothed image) of a sparse field's second look."""
SPARSE_MIN_SNR = 20.0
"""PSF-star S/N floor of a sparse field's second look (a normal field's is 50)."""


def sources_and_psf(img: Image) -> tuple[pd.DataFrame, PsfModel]:
    """Detect the sources of a calibrated image and build its PSF model, looking deeper in a sparse field.

    The default detection (:func:`~apbatch.job.steps.detection.detect_sources`, 5 sigma per
    pixel) keeps only bright sources: a LATISS field at high latitude gives 4-10. When they
    are too few for a normal PSF model (fewer than `MIN_STARS` stars, or none usable),
    detection runs again at `SPARSE_THRESHOLD` (~0.3 s on a 4k x 4k CCD; only then), PSF
    stars down to S/N `SPARSE_MIN_SNR` are accepted, and the deeper catalogue (for the
    astrometric fit and the kernel's stamps too) is the one used.

    Raises
    ------
    BadInputError
        Raised if even the deeper catalogue has fewer than `MIN_STARS_SPARSE` PSF stars.
    """
    sources = detect_sources(img)
    try:
        psf = measure_psf(img, sources)
        if psf.fallback is None:
            return sources, psf
    except BadInputError:
        pass
    sources = detect_sources(img, threshold=SPARSE_THRESHOLD)
    return sources, measure_psf(img, sources, min_snr=SPARSE_MIN_SNR)
