"""The image-processing steps of the per-CCD AP job, in pipeline order.

``run_isr`` -> ``subtract_background`` -> ``detect_sources`` -> ``measure_psf`` ->
``fit_wcs`` (against the template's sources) -> ``warp_template`` -> ``subtract_images``
-> ``measure_dia_sources``. Each is a plain function on :class:`apbatch.image.Image`
objects and pandas tables; none does I/O.
"""

from .astrometry import AstrometryError, AstrometryResult, fit_wcs
from .background import BackgroundResult, subtract_background
from .detection import detect_bright_sources, detect_sources
from .isr import IsrConfig, run_isr
from .measure import COLUMNS as DIA_COLUMNS
from .measure import measure_dia_sources, psf_flux
from .psf import PsfModel, gaussian_psf, measure_psf, moffat_psf
from .subtract import SubtractConfig, SubtractionResult, subtract_images
from .warp import NoTemplateOverlapError, warp_template

__all__ = [
    "DIA_COLUMNS",
    "AstrometryError",
    "AstrometryResult",
    "BackgroundResult",
    "IsrConfig",
    "NoTemplateOverlapError",
    "PsfModel",
    "SubtractConfig",
    "SubtractionResult",
    "detect_bright_sources",
    "detect_sources",
    "fit_wcs",
    "gaussian_psf",
    "moffat_psf",
    "measure_dia_sources",
    "measure_psf",
    "psf_flux",
    "run_isr",
    "subtract_background",
    "subtract_images",
    "warp_template",
]
