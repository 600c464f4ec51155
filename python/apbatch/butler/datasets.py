"""Names of the dataset types, storage classes and collections apbatch uses, with their dimensions.

Collections (``<instrument>`` is the butler instrument name, e.g. ``LSSTComCam``):

=======================================  ============  ===================================================
name                                     type          holds
=======================================  ============  ===================================================
``<instrument>/raw/all``                 RUN           raws ingested by jobs or ``apbatch repo``
``<instrument>/calib``                   CALIBRATION   bias, flat, certified with validity ranges
``<instrument>/calib/run/<valid_from>``  RUN           the calibration files (one RUN per validity start)
``<instrument>/templates``               RUN           ``template_coadd``, ``template_sources``, ``skyMap``
``<instrument>/defaults``                CHAINED       [calib, templates, raw/all]: what jobs read
``<instrument>/prompt/<day_obs>``        RUN           job outputs of one observing day
=======================================  ============  ===================================================

``calib_verification`` (a DataFrame, one row per amplifier and metric, dimensions {instrument,
exposure, detector}) is the verification of a calibration raw against the master calibrations.

``bias`` has dimensions {instrument, detector}; ``flat`` also has ``physical_filter``, as
Rubin's flats do (a flat is specific to the filter it was taken through).

``preliminary_visit_image`` and ``difference_image`` are `lsst.images.VisitImage` and
`lsst.images.DifferenceImage` (daf_butler's ``VisitImage``/``DifferenceImage`` storage classes);
bias, flat and templates stay apbatch ``Image`` files (see `apbatch.butler.formatters`).
"""

from __future__ import annotations

import dataclasses

__all__ = [
    "BIAS",
    "CALEXP",
    "CALIB_VERIFICATION",
    "CALIBRATIONS",
    "DATASET_TYPES",
    "DIA_SOURCES",
    "DIFFERENCE_IMAGE_STORAGE_CLASS",
    "DIFFIM",
    "FLAT",
    "IMAGE_STORAGE_CLASS",
    "METRICS",
    "METRICS_STORAGE_CLASS",
    "RAW",
    "RAW_STORAGE_CLASS",
    "SKYMAP",
    "TEMPLATE",
    "VISIT_IMAGE_STORAGE_CLASS",
    "DatasetTypeSpec",
    "calib_collection",
    "calib_run",
    "defaults_collection",
    "output_run",
    "raw_run",
    "templates_run",
]

IMAGE_STORAGE_CLASS = "ApbatchImage"
# daf_butler's own storage classes for lsst-images types (configs/storageClasses.yaml)
VISIT_IMAGE_STORAGE_CLASS = "VisitImage"
DIFFERENCE_IMAGE_STORAGE_CLASS = "DifferenceImage"
RAW_STORAGE_CLASS = "ApbatchRaw"
METRICS_STORAGE_CLASS = "ApbatchMetrics"

RAW = "raw"
BIAS = "bias"
FLAT = "flat"
TEMPLATE = "template_coadd"
TEMPLATE_SOURCES = "template_sources"
SKYMAP = "skyMap"
CALEXP = "preliminary_visit_image"
DIFFIM = "difference_image"
DIA_SOURCES = "dia_source_detector"
METRICS = "ap_metrics"
CALIB_VERIFICATION = "calib_verification"

CALIBRATIONS = (BIAS, FLAT)


@dataclasses.dataclass(frozen=True)
class DatasetTypeSpec:
    """What `DatasetType` to register: name, dimensions, storage class, calibration or not."""

    name: str
    dimensions: tuple[str, ...]
    storage_class: str
    is_calibration: bool = False


_CCD_VISIT = ("instrument", "visit", "detector")

DATASET_TYPES: tuple[DatasetTypeSpec, ...] = (
    DatasetTypeSpec(RAW, ("instrument", "detector", "exposure"), RAW_STORAGE_CLASS),
    DatasetTypeSpec(BIAS, ("instrument", "detector"), IMAGE_STORAGE_CLASS, True),
    DatasetTypeSpec(FLAT, ("instrument", "detector", "physical_filter"), IMAGE_STORAGE_CLASS, True),
    DatasetTypeSpec(SKYMAP, ("skymap",), "StructuredDataDict"),
    DatasetTypeSpec(TEMPLATE, ("skymap", "tract", "patch", "band"), IMAGE_STORAGE_CLASS),
    # a template patch's bright sources (ra, dec, flux): the jobs' astrometric references
    # (apbatch.job.template_sources), made once per patch instead of once per CCD
    DatasetTypeSpec(TEMPLATE_SOURCES, ("skymap", "tract", "patch", "band"), "DataFrame"),
    DatasetTypeSpec(CALEXP, _CCD_VISIT, VISIT_IMAGE_STORAGE_CLASS),
    DatasetTypeSpec(DIFFIM, _CCD_VISIT, DIFFERENCE_IMAGE_STORAGE_CLASS),
    DatasetTypeSpec(DIA_SOURCES, _CCD_VISIT, "DataFrame"),
    DatasetTypeSpec(METRICS, _CCD_VISIT, METRICS_STORAGE_CLASS),
    # one row per (amplifier, metric) of a calibration raw (apbatch.job.calverify); calibration
    # exposures are exposures, not visits
    DatasetTypeSpec(CALIB_VERIFICATION, ("instrument", "exposure", "detector"), "DataFrame"),
)


def raw_run(instrument: str) -> str:
    """RUN collection of raws."""
    return f"{instrument}/raw/all"


def calib_collection(instrument: str) -> str:
    """CALIBRATION collection jobs search (with a timespan)."""
    return f"{instrument}/calib"


def calib_run(instrument: str, label: str | None = None) -> str:
    """RUN collection holding calibration files; one per validity start (``label``)."""
    return f"{instrument}/calib/run" + (f"/{label}" if label else "")


def templates_run(instrument: str) -> str:
    """RUN collection of templates and the sky map."""
    return f"{instrument}/templates"


def defaults_collection(instrument: str) -> str:
    """CHAINED collection jobs read from."""
    return f"{instrument}/defaults"


def output_run(instrument: str, day_obs: int) -> str:
    """RUN collection of one day's job outputs."""
    return f"{instrument}/prompt/{int(day_obs)}"
