"""Flux calibration of the per-CCD job: electrons -> nJy through the PSF-matching kernel.

Templates are calibrated coadds in nJy (``BUNIT = 'nJy'``); Alard-Lupton matching convolves the
template onto the science image, so the kernel's sum is the science image's electrons per nJy
and its inverse the calibration. Every image and flux the job writes after DIA measurement
(butler outputs, APDB, alert cutouts) is in nJy and says so in ``BUNIT``.
"""

from __future__ import annotations

import numpy as np

from ..errors import BadInputError, RetriableError
from ..image import Image

__all__ = ["photometric_scale", "to_njy"]


def photometric_scale(calexp: Image, template: Image, kernel_sum: float) -> float:
    """nJy per electron of the science image, recorded as its ``NJY_PER_E``.

    Templates are calibrated coadds in nJy; the PSF-matching kernel maps template flux onto
    science flux, so its sum is electrons per nJy.

    Raises
    ------
    BadInputError
        Raised if the (warped) template is not in nJy: DIA fluxes could not be calibrated, and
        labelling electrons as nJy is what this check exists to prevent.
    RetriableError
        Raised if the matching kernel's sum is not positive (a failed fit).
    """
    unit = str(template.metadata.get("BUNIT", ""))
    if unit.lower() != "njy":
        raise BadInputError("template_coadd.BUNIT",
                            f"is {unit or 'missing'!r}, not nJy: DIA fluxes cannot be calibrated",
                            "ingest calibrated coadds whose header says BUNIT = 'nJy'")
    if not (np.isfinite(kernel_sum) and kernel_sum > 0):
        raise RetriableError(f"PSF-matching kernel sum {kernel_sum!r} is not positive: no flux calibration")
    scale = 1.0 / float(kernel_sum)
    calexp.metadata["NJY_PER_E"] = scale
    return scale


def to_njy(img: Image, njy_per_e: float) -> None:
    """Scale ``img`` (electrons) to nJy in place and say so in its metadata (``BUNIT``)."""
    if str(img.metadata.get("BUNIT", "")).lower() == "njy":
        return
    img.image *= np.float32(njy_per_e)
    img.variance *= np.float32(njy_per_e**2)
    img.metadata.update(BUNIT="nJy", NJY_PER_E=njy_per_e)
