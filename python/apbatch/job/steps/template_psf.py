"""The warped template's PSF size: measured on the science PSF stars, the coadd's header only if it agrees.

A coadd describes its PSF in its header (``PSFFWHM`` arcsec, and ``PSFBETA`` for a Moffat,
else a Gaussian). A description can be stale or wrong, and the warp broadens the PSF a
little, so the size is also measured on the warped template at the positions of the
science image's bright isolated stars (:func:`~apbatch.job.steps.psf.measure_psf` with a
constant model: ~100 stamps, a few tens of ms; no detection pass over the template).
Decision: the header's sigma when every patch has one and it is within ``tolerance``
(5%) of the measured one (the noiseless description of the same PSF); the measured
sigma when they disagree or there is no header; the header's when the measurement
fails (too few stars); a detection pass over the warped template when both are missing.
"""

from __future__ import annotations

import logging
from collections.abc import Sequence

import numpy as np
import pandas as pd

from ...errors import BadInputError
from ...image import Image
from .detection import detect_sources
from .psf import measure_psf, moffat_psf
from .warp import WarpPatch

__all__ = ["header_psf_sigma", "template_psf_sigma"]

_log = logging.getLogger(__name__)


def header_psf_sigma(templates: Sequence[Image | WarpPatch], pixel_scale: float) -> float | None:
    """Gaussian-equivalent sigma (px) of the coadd's described PSF; None unless every patch describes it."""
    fwhm = [f for t in templates if isinstance(f := t.metadata.get("PSFFWHM"), (int, float)) and f > 0]
    if not templates or len(fwhm) != len(templates):
        return None
    f_px = float(np.median(fwhm)) / pixel_scale
    betas = [b for t in templates if isinstance(b := t.metadata.get("PSFBETA"), (int, float)) and b > 1]
    if len(betas) == len(templates):
        return float(moffat_psf(f_px, float(np.median(betas))).sigma)
    return f_px / 2.3548


def template_psf_sigma(
    templates: Sequence[Image | WarpPatch],
    warped: Image,
    sources: pd.DataFrame,
    pixel_scale: float,
    tolerance: float = 0.05,
) -> float:
    """Gaussian-equivalent sigma (science px) of the warped template's PSF (module docstring).

    Parameters
    ----------
    templates : `list` [`Image`] or `list` [`WarpPatch`]
        The template patches (their metadata may describe the coadd PSF).
    warped : `Image`
        The template warped onto the science grid, possibly padded (metadata ``WARPPAD``).
    sources : `pandas.DataFrame`
        Science sources (:func:`~apbatch.job.steps.detection.detect_sources`), science pixels.
    pixel_scale : `float`
        Science pixel scale, arcsec.
    tolerance : `float`
        Largest relative difference at which the header's value is trusted.

    Returns
    -------
    sigma : `float`
        The sigma; ``warped.metadata`` gets ``TPSFSIG`` (it) and ``TPSFSRC`` (``header``,
        ``measured``, ``header-unverified`` or ``detected``).
    """
    head = header_psf_sigma(templates, pixel_scale)
    pad = int(warped.metadata.get("WARPPAD", 0))
    src = sources.copy()
    src["x"] = src["x"] + pad
    src["y"] = src["y"] + pad
    try:
        model = measure_psf(warped, src, max_stars=100, degree=0)
        # a sparse field's few stars (``fallback``) are too few to overrule the header
        meas: float | None = None if model.fallback else model.sigma
    except BadInputError as exc:
        _log.info("template PSF not measured on the science stars: %s", exc)
        meas = None
    if meas is not None and head is not None and abs(head / meas - 1.0) <= tolerance:
        sigma, how = head, "header"
    elif meas is not None:
        if head is not None:
            _log.warning("template header PSF sigma %.2f px disagrees with the measured %.2f px; using the "
                         "measured one", head, meas)
        sigma, how = meas, "measured"
    elif head is not None:
        sigma, how = head, "header-unverified"
    else:
        sigma, how = measure_psf(warped, detect_sources(warped)).sigma, "detected"
    warped.metadata["TPSFSIG"] = float(sigma)
    warped.metadata["TPSFSRC"] = how
    return float(sigma)
