"""Forced photometry of DiaObjects (``DiaForcedSource``) measured the way DIA sources are.

`apbatch.job.apdb.forced_photometry` weights by a Gaussian of the PSF's FWHM. On a PSF with
wings that is biased low: 0.71 / 0.77 / 0.85 of the flux for a Moffat beta of 2.5 / 3 / 4.5
(computed), and in the demo night (Moffat PSFs) DiaForcedSource fluxes were 0.92 of the
DiaSource fluxes of the same objects in the same visit, which match the simulator's truth: a
light curve mixing the two jumped by 8%. :class:`ForcedPhotometry` fits the CCD's own PSF
model at each position (`apbatch.job.steps.measure.psf_flux`, as the DIA measurement does)
and applies the CCD's aperture correction (`apbatch.job.steps.apcorr`), so the forced and the
detected fluxes of an object agree. On the difference image the errors are scaled, as the DIA
sources' are, by the measured noise of the matched-filter image (away from sources) over its expectation (the
image's ``DIANSCL`` metadata, `DIFF_NOISE_SCALE`, which the job sets after the DIA measurement):
without it, forced S/N on a difference whose variance plane underestimates the noise (a kernel's
correlated noise) would read higher than the same object's DIA S/N.
"""

from __future__ import annotations

import dataclasses

import numpy as np

from ..image import Image
from .steps.apcorr import ApertureCorrection
from .steps.measure import psf_flux
from .steps.psf import PsfModel

__all__ = ["DIFF_NOISE_SCALE", "ForcedPhotometry"]

DIFF_NOISE_SCALE = "DIANSCL"
"""Metadata key of a difference image: the factor its DIA flux errors were scaled by."""


@dataclasses.dataclass(frozen=True)
class ForcedPhotometry:
    """PSF-model fluxes at fixed positions, aperture-corrected: ``(flux, err) = self(image, x, y)``.

    Immutable; safe to share. Units are the image's (nJy in the job).

    Parameters
    ----------
    psf : `PsfModel`
        The science image's PSF model (the difference is matched to it).
    apcorr : `ApertureCorrection`, optional
        The CCD's aperture correction; none: fluxes within the PSF model's stamp.
    """

    psf: PsfModel
    apcorr: ApertureCorrection | None = None

    @property
    def fwhm(self) -> float:
        """The PSF's FWHM in pixels (what the Gaussian forced photometry would use)."""
        return float(self.psf.fwhm)

    def __call__(self, image: Image, x: np.ndarray, y: np.ndarray) -> tuple[np.ndarray, np.ndarray]:
        """Fluxes and errors at (``x``, ``y``); NaN where no usable pixel is found.

        Errors are scaled by ``image.metadata[DIFF_NOISE_SCALE]`` when present (a difference).
        """
        x, y = np.asarray(x, float), np.asarray(y, float)
        if len(x) == 0:
            return np.zeros(0), np.zeros(0)
        flux, err = psf_flux(image, self.psf, x, y, float(image.metadata.get(DIFF_NOISE_SCALE, 1.0)))
        if self.apcorr is not None:
            corr = self.apcorr.at(x, y)
            flux, err = flux * corr, err * corr
        return flux, err
