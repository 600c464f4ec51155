"""PSF model: the mean, centred, flux-normalised stamp of bright isolated unsaturated stars.

The model is constant over the CCD (spatial variation is not modelled). Its size is also
given as a Gaussian-equivalent ``sigma`` and ``fwhm`` from the stamp's second moments.
"""

from __future__ import annotations

import dataclasses

import numpy as np
import pandas as pd
from scipy import ndimage
from scipy.spatial import cKDTree

from ...errors import BadInputError
from ...image import Image

__all__ = ["PsfModel", "gaussian_psf", "measure_psf", "moffat_psf"]


@dataclasses.dataclass
class PsfModel:
    """A pixelised PSF (``image`` sums to 1, centre at ``image[h, h]``) and its size.

    Immutable by convention; safe to share.
    """

    image: np.ndarray
    sigma: float
    n_stars: int

    @property
    def fwhm(self) -> float:
        """Gaussian-equivalent FWHM, pixels."""
        return 2.3548 * self.sigma

    def stamp(self, dx: float = 0.0, dy: float = 0.0, size: int | None = None) -> np.ndarray:
        """The PSF shifted by (``dx``, ``dy``) px (cubic spline), normalised to sum 1.

        Cropped or zero-padded to ``size`` px square; ``None`` keeps the model's own size.
        """
        img = self.image
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


def gaussian_psf(sigma: float, size: int = 25) -> PsfModel:
    """A circular Gaussian PSF model (for tests and as a fallback)."""
    h = size // 2
    y, x = np.mgrid[-h : h + 1, -h : h + 1]
    img = np.exp(-(x * x + y * y) / (2.0 * sigma * sigma))
    return PsfModel(img / img.sum(), float(sigma), 0)


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
    return PsfModel(img, _moment_sigma(img), 0)


def _moment_sigma(stamp: np.ndarray) -> float:
    h = stamp.shape[0] // 2
    y, x = np.mgrid[-h : h + 1, -h : h + 1]
    w = np.exp(-(x * x + y * y) / (2 * 3.0**2))  # weight suppresses noisy wings
    s = stamp * w
    m = (s * (x * x + y * y)).sum() / s.sum() / 2.0  # weighted variance per axis
    if m <= 0 or m >= 9.0:
        return float("nan")
    return float(np.sqrt(m * 9.0 / (9.0 - m)))  # undo the Gaussian weight


def measure_psf(
    img: Image,
    sources: pd.DataFrame,
    size: int = 25,
    max_stars: int = 200,
    min_snr: float = 50.0,
    isolation: float = 15.0,
    saturation: float | None = None,
) -> PsfModel:
    """Build the PSF model from the catalogue of :func:`~apbatch.job.steps.detection.detect_sources`.

    Stars are sources with ``snr >= min_snr``, no sep flags, no masked pixel, no neighbour
    within ``isolation`` px, away from the edges, peak below ``saturation`` (if given) and on
    the stellar locus (size within 3 MADs of the median). Each stamp is shifted to its
    centroid, normalised and the stack median-combined.

    Raises
    ------
    BadInputError
        Raised if fewer than 5 PSF stars are found.
    """
    if len(sources) == 0:
        raise BadInputError(
            "image", "no sources to build a PSF from", "check the exposure (clouds? shutter?)"
        )
    ny, nx = img.shape
    h = size // 2
    xy = sources[["x", "y"]].to_numpy()
    tree = cKDTree(xy)
    nn = tree.query(xy, k=2)[0][:, 1] if len(xy) > 1 else np.full(len(xy), np.inf)
    ok = (sources["snr"] >= min_snr) & (sources["flag"] == 0) & (~sources["masked"]) & (nn > isolation)
    ok &= (
        (sources["x"] > h + 2)
        & (sources["x"] < nx - h - 3)
        & (sources["y"] > h + 2)
        & (sources["y"] < ny - h - 3)
    )
    if saturation is not None:
        ok &= sources["peak"] < 0.8 * saturation
    cand = sources[ok]
    if len(cand) >= 5:
        size_t = np.sqrt(0.5 * (cand["ixx"] + cand["iyy"]))
        med = np.median(size_t)
        mad = 1.4826 * np.median(np.abs(size_t - med)) + 1e-3
        cand = cand[np.abs(size_t - med) < 3 * mad]
    cand = cand.sort_values("snr", ascending=False).head(max_stars)
    if len(cand) < 5:
        raise BadInputError(
            "image", f"only {len(cand)} PSF stars found", "the image has too few bright stars"
        )
    stamps = []
    for x, y in zip(cand["x"].to_numpy(), cand["y"].to_numpy(), strict=False):
        xi, yi = int(round(x)), int(round(y))
        st = img.image[yi - h - 1 : yi + h + 2, xi - h - 1 : xi + h + 2].astype(np.float64)
        st = ndimage.shift(st, (yi - y, xi - x), order=3, mode="nearest")[1:-1, 1:-1]
        tot = st.sum()
        if tot > 0 and np.isfinite(tot):
            stamps.append(st / tot)
    stack = np.median(np.array(stamps), axis=0)
    stack[stack < 0] = 0.0
    yy, xx = np.mgrid[-h : h + 1, -h : h + 1]
    stack[np.hypot(xx, yy) > h] = 0.0  # round support, no corners of noise
    stack /= stack.sum()
    sigma = _moment_sigma(stack)
    if not np.isfinite(sigma):
        raise BadInputError("image", "PSF stars give no finite size", "check the exposure")
    return PsfModel(stack.astype(np.float64), sigma, len(stamps))
