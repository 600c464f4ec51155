"""Astrometric reference catalogues of template patches, made once per patch, not per job.

A science job fits its WCS to the bright sources of the template patches it warps
(`apbatch.job.steps.astrometry`). Detecting them is the same work for every CCD that
overlaps a patch, about 0.15 s of CPU per patch read (0.7 s per 4k x 4k ComCam CCD,
bench/bench_job.py), so it is done when the template is made or ingested and stored in the
butler as ``template_sources`` (a DataFrame with the template's data ID): ``ra``, ``dec``
(degrees, the template's WCS) and ``flux`` (isophotal, the template's unit), brightest first.
This is apbatch's counterpart of the reference catalogue Rubin's jobs read from the butler.

A job that finds no catalogue for a patch (a repository ingested before these existed)
detects the sources in the part of the patch it read, as before.
"""

from __future__ import annotations

from pathlib import Path

import numpy as np
import pandas as pd

from ..atomic import replacing
from ..image import Image
from .steps.detection import detect_bright_sources

__all__ = ["COLUMNS", "THRESHOLD", "detect_references", "sources_in_box", "template_sources",
           "write_template_sources"]

THRESHOLD = 20.0
"""Detection threshold (sigma) of reference sources: bright, well-centroided stars and galaxies."""
COLUMNS = ("ra", "dec", "flux")


def detect_references(img: Image, threshold: float = THRESHOLD) -> np.ndarray | None:
    """Bright sources of one image as (N, 3) RA/Dec/flux in detection order; `None` if none or no WCS."""
    found = detect_bright_sources(img, threshold=threshold)
    if not len(found) or img.wcs is None:
        return None
    ra, dec = img.wcs.pixel_to_world_values(found["x"].to_numpy(), found["y"].to_numpy())
    return np.column_stack([ra, dec, found["flux"].to_numpy()])


def template_sources(img: Image, threshold: float = THRESHOLD) -> pd.DataFrame:
    """The reference catalogue of a whole template patch (module docstring), brightest first.

    Raises
    ------
    ValueError
        Raised if the template has no WCS.
    """
    if img.wcs is None:
        raise ValueError("a template needs its WCS to catalogue its sources")
    ref = detect_references(img, threshold)
    if ref is None:
        return pd.DataFrame({c: np.zeros(0) for c in COLUMNS})
    ref = ref[np.argsort(-ref[:, 2], kind="stable")]
    return pd.DataFrame({c: ref[:, i] for i, c in enumerate(COLUMNS)})


def write_template_sources(catalog: pd.DataFrame, path: str | Path) -> Path:
    """Write a catalogue as Parquet (atomically: a reader never sees half a file); returns ``path``."""
    path = Path(path)
    with replacing(path, durable=False) as tmp:
        catalog.to_parquet(tmp, index=False)
    return path


def sources_in_box(catalog: pd.DataFrame, img: Image) -> np.ndarray | None:
    """The catalogue's sources that fall inside ``img`` (a patch or the part read), as (N, 3) RA/Dec/flux.

    Returns `None` when none do (or ``img`` has no WCS), like :func:`detect_references`.

    Raises
    ------
    ValueError
        Raised if the catalogue lacks one of :data:`COLUMNS`.
    """
    missing = [c for c in COLUMNS if c not in catalog.columns]
    if missing:
        raise ValueError(f"template_sources lacks column(s) {missing}")
    if img.wcs is None or not len(catalog):
        return None
    ref = catalog.loc[:, list(COLUMNS)].to_numpy(np.float64)
    x, y = img.wcs.world_to_pixel_values(ref[:, 0], ref[:, 1])
    ny, nx = img.shape
    inside = (x >= -0.5) & (x < nx - 0.5) & (y >= -0.5) & (y < ny - 0.5)
    return ref[inside] if inside.any() else None
