"""Butler formatters for apbatch's own Python types, and the repository config that names them.

The classes are referred to by their full names in the repository's ``butler.yaml``
(:data:`REPO_CONFIG`, written by :func:`apbatch.butler.repo.create_repo`), so they must be
importable in every process that opens the repository; they import nothing heavy.

* :class:`ImageFormatter`: `apbatch.image.Image` <-> FITS (``IMAGE``/``MASK``/``VARIANCE``), for
  calibrations and templates (the job's sub-box template reads; see ``bench/bench_butler_images.py``).
* :class:`RawFormatter`: camera raw FITS -> `apbatch.raw.RawExposure` (read; write for tests).
* Metrics dicts use the butler's own ``JsonFormatter``; DataFrames its ``ParquetFormatter``.
* Calibrated and difference images use daf_butler's own ``VisitImage`` and ``DifferenceImage``
  storage classes with lsst-images' ``GenericFormatter`` (daf_butler's bundled config defines
  both); :data:`REPO_CONFIG` only adds the lossy compression recipe, so ``butler.yaml`` names
  nothing from apbatch for them and users read them with daf_butler and lsst-images alone.
"""

from __future__ import annotations

from typing import Any

from lsst.daf.butler import FormatterV2
from lsst.resources import ResourcePath

from .datasets import (
    DIFFERENCE_IMAGE_STORAGE_CLASS,
    IMAGE_STORAGE_CLASS,
    METRICS_STORAGE_CLASS,
    RAW_STORAGE_CLASS,
    VISIT_IMAGE_STORAGE_CLASS,
)

__all__ = ["LOSSY_RECIPE", "LSST_IMAGES_FORMATTER", "REPO_CONFIG", "ImageFormatter", "RawFormatter"]


class ImageFormatter(FormatterV2):
    """Reads and writes `apbatch.image.Image` as a FITS file (see `apbatch.image`).

    Read parameter ``bbox=(x0, x1, y0, y1)`` reads only that box (the tiles it overlaps);
    ``planes`` (e.g. ``("image", "mask")``) only those planes (repositories created before
    this parameter existed do not declare it: see `apbatch.butler.io.ButlerIO.get_calib`).
    """

    default_extension = ".fits"
    supported_extensions = frozenset({".fits"})
    can_read_from_local_file = True
    unsupported_parameters = frozenset()

    def read_from_local_file(self, path: str, component: str | None = None, expected_size: int = -1) -> Any:
        from ..image import read_image  # noqa: PLC0415 (astropy only when reading)

        params = self.file_descriptor.parameters or {}
        return read_image(path, bbox=params.get("bbox"), planes=params.get("planes"))

    def write_local_file(self, in_memory_dataset: Any, uri: ResourcePath) -> None:
        from ..image import write_image  # noqa: PLC0415

        write_image(in_memory_dataset, uri.ospath)


class RawFormatter(FormatterV2):
    """Reads a camera raw (multi-extension FITS, one HDU per amplifier) as a `RawExposure`.

    The instrument comes from the dataset's data ID, so simulated cameras read with the
    geometry of the camera they simulate.
    """

    default_extension = ".fits"
    supported_extensions = frozenset({".fits", ".fz", ".fits.fz"})
    can_read_from_local_file = True
    unsupported_parameters = None

    def read_from_local_file(self, path: str, component: str | None = None, expected_size: int = -1) -> Any:
        from ..raw import read_raw  # noqa: PLC0415

        return read_raw(path, instrument=str(self.data_id["instrument"]))

    def write_local_file(self, in_memory_dataset: Any, uri: ResourcePath) -> None:
        from ..raw import write_raw  # noqa: PLC0415

        write_raw(in_memory_dataset, uri.ospath)


LSST_IMAGES_FORMATTER = "lsst.images.formatters.GenericFormatter"
_RICE = {"algorithm": "RICE_1", "tile_shape": [512, 512]}
# Rubin's lossy recipe (lsst.images.fits.FitsCompressionOptions.LOSSY: 1/16 of each tile's noise,
# dithered; the dither seed comes from the data ID) for image and variance; the mask is lossless.
# Square tiles: ~15% faster to write and read than row tiles here, and cutouts read only their tiles.
LOSSY_RECIPE: dict[str, Any] = {
    "image": _RICE | {"quantization": {"dither": "SUBTRACTIVE_DITHER_2", "level": 16.0}},
    "variance": _RICE | {"quantization": {"dither": "NO_DITHER", "level": 16.0}},
    "mask": _RICE,
}
"""FITS compression of stored visit and difference images, per array."""

REPO_CONFIG: dict[str, Any] = {
    "storageClasses": {
        IMAGE_STORAGE_CLASS: {"pytype": "apbatch.image.Image", "parameters": ["bbox", "planes"]},
        RAW_STORAGE_CLASS: {"pytype": "apbatch.raw.RawExposure"},
        METRICS_STORAGE_CLASS: {"pytype": "dict"},
    },
    "datastore": {
        "formatters": {
            IMAGE_STORAGE_CLASS: f"{__name__}.ImageFormatter",
            RAW_STORAGE_CLASS: f"{__name__}.RawFormatter",
            METRICS_STORAGE_CLASS: "lsst.daf.butler.formatters.json.JsonFormatter",
            VISIT_IMAGE_STORAGE_CLASS: {
                "formatter": LSST_IMAGES_FORMATTER,
                "parameters": {"recipe": "lossy"},
            },
            DIFFERENCE_IMAGE_STORAGE_CLASS: {
                "formatter": LSST_IMAGES_FORMATTER,
                "parameters": {"recipe": "lossy"},
            },
            "write_recipes": {LSST_IMAGES_FORMATTER: {"lossy": LOSSY_RECIPE}},
        },
    },
}
"""Overrides written into a new repository's ``butler.yaml``."""
