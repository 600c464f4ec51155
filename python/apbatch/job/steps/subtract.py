"""PSF-matched image subtraction (Alard & Lupton 1998) with a spatially varying kernel.

Model: ``science(x) = (template * K_x)(x) + b(x)`` where the kernel is a sum of Gaussian x
polynomial basis functions (:mod:`~apbatch.job.steps.kernel_basis`) whose coefficients, and
the differential background ``b``, are polynomials in the CCD position: linear, or
quadratic when the science PSF model varies over the CCD by more than
``psf_variation_threshold`` (3%) in size (a seeing that changes from centre to corner is
not linear in x, y).

Sizes come from the measured PSF profiles, not only the FWHM. Given a science
:class:`~apbatch.job.steps.psf.PsfModel`, the kernel's half-size is the radius enclosing
``kernel_enclosed`` (99.7%) of its light (its measured encircled-energy curve) or 7 x FWHM,
whichever is larger, within ``kernel_size_range`` (21-71 px): the matching kernel carries the
science image's wings, and a kernel cut short leaves a ring of residual flux around every bright
star (a fixed 21-px kernel left one 11-18 px out in 1.2" seeing; a 7 x FWHM kernel cut the broad
wing of an atmospheric PSF). The basis widths are ``sigma_factors`` x the core match width
``sqrt(sci_sigma^2 - tmpl_sigma^2)``, plus, when the science PSF's light reaches far, a wing
Gaussian of ``wing_fraction`` (0.4) x that radius. Given bare sigmas, the kernel is 7 x FWHM and
the basis the core widths only (as before).

The template may be warped onto the science grid grown by ``pad`` px on every side
(``warp_template(..., pad=template_pad(psf))``): it is convolved on that grid and cropped,
so the difference is valid up to the CCD edge wherever the template has data; only the
outer ``h - pad`` px (all of the kernel half-size ``h`` with ``pad=0``) are ``EDGE``.

The coefficients are fitted on ~80 bright, isolated, unmasked star stamps (inverse-variance
weighted; stamp half-size = kernel half-size + ``stamp_margin``), clipping stamps whose
chi^2 is a > ``clip_sigma`` outlier, and refitting. Applying it costs one FFT convolution per
spatial term (3, or 6 when quadratic), not one per basis function, and the same for any
kernel size: ``T * K_x = sum_s P_s(x) (T * K_s)`` exactly (float32 ``scipy.fft``).

Variance: ``var_sci + var_tmpl * sum(K_0**2) + (flux_error_floor * T*K)**2`` (the template
variance is smooth; the last term stands for the kernel model's error, proportional to
the local flux, and keeps bright-star residuals from being detected), plus, around each of
the ``n_residual_stars`` brightest science sources, ``residual_scale`` (3) x ``F^2 * profile(r)``:
the residual the fitted kernel leaves on its own stamps (which it fits better than the stars
between them), measured in rings per unit flux squared
(:mod:`~apbatch.job.steps.kernel_residual`; a kernel that cannot follow a PSF whose
ellipticity turns across the CCD left 5-6 sigma lobes 3-8 px from 1e5 e- stars), and the
significant excess each of those stars leaves in the difference itself once a change of its
own flux is fitted out (``measured_residual``: lobes 5-8 px from 4e5-1e6 e- stars that the
profile, measured on fainter stamps, underestimated), and each of those objects' own
mismatch at its core (shift, width, ellipticity: the derivatives of the matched template)
and in its wing (its level and lopsidedness), fitted where it is significant and a point
source beside the object does not explain it as well (:mod:`~apbatch.job.steps.mismatch`:
dipoles at stars' cores and lobes 13-17 px from 1e6 e- stars in the varying atmospheric PSF),
then multiplied by the square of the empirical noise ratio (robust spread of
``diff / sqrt(var)``), which absorbs the noise correlation of warping and convolution.
The template must have the smaller PSF (true of coadd templates); the result says if not.
"""

from __future__ import annotations

import dataclasses
import logging

import numpy as np
import pandas as pd
import scipy.fft as sfft

from ...errors import BadInputError
from ...image import Image, MaskBits
from .kernel_basis import STAMP_BAD, basis_1d, convolve_terms, fit_kernel, kernel_image, select_stamps
from .kernel_residual import add_measured_variance, add_star_variance, box_fluxes
from .mismatch import add_mismatch_variance
from .psf import PsfModel, gaussian_psf

_log = logging.getLogger(__name__)

__all__ = ["SubtractConfig", "SubtractionResult", "dilate_bits", "subtract_images", "template_pad"]


@dataclasses.dataclass(frozen=True)
class SubtractConfig:
    """Settings of :func:`subtract_images`."""

    kernel_size: int | None = None
    kernel_fwhm_scaling: float = 7.0
    kernel_enclosed: float = 0.997
    kernel_size_range: tuple[int, int] = (21, 71)
    sigma_factors: tuple[float, ...] = (0.5, 1.0, 2.0, 4.0)
    degrees: tuple[int, ...] = (4, 2, 2, 1)
    wing_fraction: float = 0.4
    wing_degree: int = 2
    spatial_degree: int | None = None
    psf_variation_threshold: float = 0.03
    n_stamps: int = 80
    min_stamps: int = 15
    """Stamps a spatially varying kernel needs; with fewer the kernel is constant across the CCD."""
    min_stamps_constant: int = 4
    """Stamps a constant kernel needs (a sparse field: LATISS, a short exposure); fewer is bad input."""
    stamp_margin: int = 5
    min_stamp_snr: float = 30.0
    sparse_stamp_snr: float = 10.0
    """Stamp S/N floor of a sparse field (fewer than ``min_stamps_constant`` stamps at ``min_stamp_snr``)."""
    n_residual_stars: int = 500
    """Brightest science sources whose measured kernel residual is added to the variance."""
    residual_scale: float = 3.0
    """Factor on the residual measured on the fit stamps (the kernel fits its own stamps better
    than the stars between them)."""
    measured_residual: bool = True
    """Also add, around each of those stars, the residual measured in the difference itself
    beyond a change of the star's flux (:func:`~.kernel_residual.add_measured_variance`)."""
    clip_sigma: float = 3.0
    max_iter: int = 3
    flux_error_floor: float = 0.005

    def kernel_half(self, sci_psf: float | PsfModel) -> int:
        """Kernel half-size (px) for the science PSF (a model, or its Gaussian-equivalent sigma).

        ``kernel_size`` if set; else ``kernel_fwhm_scaling`` x FWHM, or for a model the radius
        holding ``kernel_enclosed`` of its light if larger (its measured encircled-energy
        curve: a broad wing asks for a broad kernel); within ``kernel_size_range``.
        """
        if self.kernel_size is not None:
            return int(self.kernel_size) // 2
        lo, hi = self.kernel_size_range
        sigma = sci_psf.sigma if isinstance(sci_psf, PsfModel) else float(sci_psf)
        size = int(np.ceil(self.kernel_fwhm_scaling * 2.3548 * sigma))
        if isinstance(sci_psf, PsfModel):
            # never below the FWHM rule: the measured curve underestimates a power-law wing
            # (its outer level is subtracted), and a kernel sized by it alone left residual
            # rings just outside it around bright unsaturated stars (5 sigma, 15-18 px out)
            size = max(size, 2 * int(np.ceil(sci_psf.radius_enclosing(self.kernel_enclosed))) + 1)
        return min(max(size, lo), hi) // 2


@dataclasses.dataclass
class SubtractionResult:
    """Fit summary: stamps used/rejected, kernel sum at the centre, noise rescale, basis widths,
    the kernel at the CCD centre and the degree of its spatial variation."""

    n_stamps: int
    n_rejected: int
    kernel_sum: float
    noise_scale: float
    sigmas: tuple[float, ...]
    chi2_per_dof: float
    template_psf_smaller: bool
    kernel: np.ndarray
    spatial_degree: int = 1
    n_residual_stars: int = 0
    """Bright stars around which the kernel's measured residual was added to the variance."""
    n_mismatch_stars: int = 0
    """Of those, stars whose own residual in the difference showed a mismatch (``measured_residual``)."""
    n_fitted_mismatch: int = 0
    """Objects whose fitted mismatch at the core (shift, width, shape) or in the wing was added
    (:mod:`.mismatch`)."""

    @property
    def kernel_size(self) -> int:
        """Side (px) of the matching kernel."""
        return int(self.kernel.shape[0])


def dilate_bits(mask: np.ndarray, bits: int, radius: int) -> np.ndarray:
    """Pixels within a (2 radius + 1)-square box of a pixel with any of ``bits``.

    Each axis by symmetric shift-and-OR steps whose reach doubles (radius 12 in 3 steps),
    on a copy padded by ``radius`` so that no step loses what an earlier one pushed past
    an edge: the same result as a box maximum filter, at a fraction of its cost.
    """
    hit = (mask & bits) != 0
    if radius < 1 or not hit.any():
        return hit
    r = radius
    pad = np.zeros((hit.shape[0] + 2 * r, hit.shape[1] + 2 * r), bool)
    pad[r:-r, r:-r] = hit
    for o in (pad, pad.T):
        reach = 0
        while reach < r:
            step = min(2 * reach + 1, r - reach)
            o[step:] |= o[:-step]
            o[:-step] |= o[step:]
            reach += step
    return np.ascontiguousarray(pad[r:-r, r:-r])


def _sigma(psf: float | PsfModel) -> float:
    return float(psf.sigma) if isinstance(psf, PsfModel) else float(psf)


def _basis_widths(cfg: SubtractConfig, sci_psf, tmpl_psf, h: int
                  ) -> tuple[tuple[float, ...], tuple[int, ...]]:
    """Basis Gaussian widths and polynomial degrees: the core match, and the science PSF's wing.

    The core widths are ``sigma_factors`` x ``sqrt(sci_sigma^2 - tmpl_sigma^2)``. A measured
    science PSF whose light reaches far (``wing_fraction`` x its ``kernel_enclosed`` radius wider
    than 1.5 x the widest core Gaussian, e.g. an atmospheric power-law wing) adds one wing
    Gaussian of that width (capped at h / 2), of degree ``wing_degree``.
    """
    match = float(np.sqrt(max(_sigma(sci_psf) ** 2 - _sigma(tmpl_psf) ** 2, 0.25)))
    sigmas = [max(0.4, f * match) for f in cfg.sigma_factors]
    degrees = list(cfg.degrees)
    if isinstance(sci_psf, PsfModel) and cfg.kernel_size is None:
        wing = min(cfg.wing_fraction * sci_psf.radius_enclosing(cfg.kernel_enclosed), h / 2.0)
        if wing > 1.5 * max(sigmas):
            sigmas.append(wing)
            degrees.append(cfg.wing_degree)
    return tuple(sigmas), tuple(degrees)


def _spatial_degree(cfg: SubtractConfig, sci_psf) -> int:
    """``spatial_degree`` if set; else 2 when the science PSF model's size varies by more than
    ``psf_variation_threshold`` between the CCD centre and its corners, else 1."""
    if cfg.spatial_degree is not None:
        return int(cfg.spatial_degree)
    if not isinstance(sci_psf, PsfModel) or sci_psf.coeffs is None or sci_psf.ccd_shape is None:
        return 1
    ny, nx = sci_psf.ccd_shape
    at = [sci_psf.sigma_at(x, y) for x in (0, nx / 2, nx - 1) for y in (0, ny / 2, ny - 1)]
    return 2 if max(abs(a / sci_psf.sigma - 1.0) for a in at) > cfg.psf_variation_threshold else 1


def template_pad(sci_psf: float | PsfModel | None = None, config: SubtractConfig | None = None) -> int:
    """The pad (px) to warp the template with so that the difference is valid up to the CCD edge.

    The kernel half-size :func:`subtract_images` will use for ``sci_psf``; without one, the
    largest it can use.
    """
    cfg = config or SubtractConfig()
    if sci_psf is None:
        return int(cfg.kernel_size) // 2 if cfg.kernel_size is not None else cfg.kernel_size_range[1] // 2
    return cfg.kernel_half(sci_psf)


def _template_pad(science: Image, template: Image) -> int:
    (ny, nx), (ty, tx) = science.shape, template.shape
    pad = (ty - ny) // 2
    if ty - ny != tx - nx or (ty - ny) % 2 or pad < 0 or int(template.metadata.get("WARPPAD", pad)) != pad:
        raise BadInputError(
            "template",
            f"shape {template.shape} but the science image is {science.shape}",
            "warp the template onto the science grid first (optionally padded equally on every side)",
        )
    return pad


def subtract_images(
    science: Image,
    template: Image,
    sci_sigma: float | PsfModel,
    tmpl_sigma: float | PsfModel,
    sources: pd.DataFrame,
    config: SubtractConfig | None = None,
) -> tuple[Image, SubtractionResult]:
    """Difference ``science - template (x) kernel - background``.

    Parameters
    ----------
    science : `Image`
        Calibrated, background-subtracted science image.
    template : `Image`
        Template warped onto the science grid (:func:`~apbatch.job.steps.warp.warp_template`),
        possibly padded by ``pad`` px on every side (``warp_template(..., pad=template_pad(psf))``):
        it is then convolved on its padded grid and cropped, and the difference is valid up
        to the science image's edge wherever the template has data.
    sci_sigma, tmpl_sigma : `float` or `PsfModel`
        PSFs of science and template: a measured model (its encircled energy sizes the
        kernel and its wing widens the basis; its spatial variation asks for a quadratic
        kernel) or a bare Gaussian-equivalent sigma (px).
    sources : `pandas.DataFrame`
        Science sources (:func:`~apbatch.job.steps.detection.detect_sources`) to choose stamps from.
    config : `SubtractConfig`, optional
        Settings.

    Returns
    -------
    diff : `Image`
        Difference image on the science grid (PSF of the science image), rescaled variance
        and the OR of both masks (template masks grown by the kernel half-size; ``EDGE``
        where the kernel reaches beyond the template: the border of the kernel half-size
        less the pad).
    result : `SubtractionResult`
        Fit summary.

    Raises
    ------
    BadInputError
        Raised if the shapes do not match or too few clean star stamps are found.
    """
    cfg = config or SubtractConfig()
    pad = _template_pad(science, template)
    h = cfg.kernel_half(sci_sigma)
    sigmas, degrees = _basis_widths(cfg, sci_sigma, tmpl_sigma, h)
    sdeg = _spatial_degree(cfg, sci_sigma)
    funcs, terms = basis_1d(sigmas, degrees, h)
    stamps = select_stamps(sources, science, template, h, pad, cfg.n_stamps, cfg.stamp_margin,
                           cfg.min_stamp_snr)
    if len(stamps) < cfg.min_stamps:  # a large kernel in a crowded field: accept neighbours in the outer half
        stamps = select_stamps(sources, science, template, h, pad, cfg.n_stamps, cfg.stamp_margin,
                               cfg.min_stamp_snr, isolation=(h + cfg.stamp_margin) / 2.0)
    if len(stamps) < cfg.min_stamps_constant:  # a sparse field: fainter stars for a constant kernel
        stamps = select_stamps(sources, science, template, h, pad, cfg.n_stamps, cfg.stamp_margin,
                               cfg.sparse_stamp_snr, isolation=(h + cfg.stamp_margin) / 2.0)
    if len(stamps) < cfg.min_stamps_constant:
        raise BadInputError(
            "science",
            f"only {len(stamps)} clean star stamps for the kernel fit (at least {cfg.min_stamps_constant})",
            "too few bright isolated stars on this CCD",
        )
    if len(stamps) < cfg.min_stamps and sdeg > 0:
        # a sparse field: a constant kernel (its pixels are still many times its terms) rather
        # than no difference image at all; the metadata says so (DIFFSDEG 0)
        _log.warning("only %d clean star stamps: a kernel constant across the CCD", len(stamps))
        sdeg = 0
    coef, chi2, n_used, n_rej, profile = fit_kernel(science, template, stamps, funcs, terms, h, pad,
                                                    cfg.stamp_margin, sdeg, cfg.clip_sigma, cfg.max_iter)
    ny, nx = science.shape
    tny, tnx = template.shape
    fshape = (sfft.next_fast_len(tny + h + 1, real=True), sfft.next_fast_len(tnx + h + 1, real=True))
    inner = (slice(pad, pad + ny), slice(pad, pad + nx))
    tmask = template.mask
    timg = np.where((tmask & int(MaskBits.NO_DATA)) != 0, np.float32(0.0), template.image)
    xs = ((np.arange(nx, dtype=np.float32) - nx / 2) / (nx / 2))[None, :]
    ys = ((np.arange(ny, dtype=np.float32) - ny / 2) / (ny / 2))[:, None]
    # spatial terms 1, x, y, x^2, xy, y^2 as (row, column) factors
    facs = [(None, None), (xs, None), (None, ys), (xs * xs, None), (xs, ys), (None, ys * ys)][: len(coef)]
    diff = science.image.astype(np.float32, copy=True)
    floor = None
    # the brightest stars, ranked by the catalogue; their flux is measured on the matched template
    bright = sources.nlargest(cfg.n_residual_stars, "flux") if "flux" in sources else sources.iloc[:0]
    star_flux = np.zeros(0)
    # in place where possible: every CCD-sized temporary costs page faults as well as time
    terms_of = convolve_terms(timg, coef[:, :-1], funcs, terms, fshape, inner)
    del timg  # the generator frees it once it has its FFT
    for (fx, fy), c in zip(facs, terms_of, strict=False):
        if fx is None and fy is None:
            diff -= c
            star_flux = box_fluxes(c, bright["x"].to_numpy(), bright["y"].to_numpy(), h + cfg.stamp_margin)
            floor = np.square(c, out=c)  # model error: a fraction of the matched template's flux
            floor *= np.float32(cfg.flux_error_floor**2)
            continue
        if fx is not None:
            c *= fx
        if fy is not None:
            c *= fy
        diff -= c
        del c
    del terms_of
    bg = coef[:, -1].astype(np.float32)
    for k, (fx, fy) in enumerate(facs):
        diff -= bg[k] * (fx if fx is not None else np.float32(1)) * (fy if fy is not None else np.float32(1))
    k0 = kernel_image(coef[0, :-1], funcs, terms)
    var = np.multiply(template.variance[inner], np.float32((k0**2).sum()), dtype=np.float32)
    var += science.variance
    if floor is not None:
        var += floor
        del floor
    n_res = add_star_variance(var, bright["x"].to_numpy(), bright["y"].to_numpy(), star_flux,
                              cfg.residual_scale * profile) if len(star_flux) else 0
    mask = science.mask.copy()
    grow = dilate_bits(tmask, int(MaskBits.NO_DATA | MaskBits.SAT | MaskBits.BAD), h)[inner]
    mask |= tmask[inner]
    mask[grow] |= MaskBits.NO_DATA
    e = max(h - pad, 0)
    if e:
        edge = np.zeros(mask.shape, bool)
        edge[:e, :], edge[-e:, :], edge[:, :e], edge[:, -e:] = True, True, True, True
        mask[edge] |= MaskBits.EDGE
    n_mis = n_fit = 0
    if cfg.measured_residual and len(bright):
        model = sci_sigma if isinstance(sci_sigma, PsfModel) else gaussian_psf(float(sci_sigma), 2 * h + 1)
        bad = (mask & STAMP_BAD) != 0
        bx, by = bright["x"].to_numpy(), bright["y"].to_numpy()
        n_mis = add_measured_variance(diff, var, bad, bx, by, model, h, np.pi * model.sigma**2)
        n_fit = add_mismatch_variance(diff, science.image, var, bad, bx, by, model.sigma, model.fwhm,
                                      np.pi * model.sigma**2)
    # empirical noise rescaling on clean pixels (a random subsample, for speed)
    rng = np.random.default_rng(12345)
    idx = rng.integers(0, diff.size, size=min(diff.size, 400_000))
    clean = (mask.ravel()[idx] & (STAMP_BAD | int(MaskBits.DETECTED))) == 0
    z = diff.ravel()[idx][clean] / np.sqrt(np.maximum(var.ravel()[idx][clean], 1e-6))
    scale = 1.4826 * np.median(np.abs(z - np.median(z))) if z.size > 100 else 1.0
    var *= np.float32(scale**2)
    res = SubtractionResult(
        n_used, n_rej, float(k0.sum()), float(scale), sigmas, chi2,
        bool(_sigma(tmpl_sigma) <= _sigma(sci_sigma)), k0, sdeg, n_res, n_mis, n_fit,
    )
    meta = dict(science.metadata)
    meta.update({"DIFFKSUM": res.kernel_sum, "DIFFNSCL": res.noise_scale, "DIFFNSTM": n_used,
                 "DIFFKSIZ": res.kernel_size, "DIFFSDEG": sdeg, "DIFFTPAD": pad,
                 "DIFFNRES": n_res, "DIFFNMIS": n_mis, "DIFFNFIT": n_fit})
    return Image(diff, var, mask, science.wcs, meta), res
