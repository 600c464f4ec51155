"""Store a job's lsst-images images with the quantization step taken from their variance plane.

``butler.put`` of a `lsst.images.VisitImage` or `~lsst.images.DifferenceImage` writes it with
the repository's ``lossy`` recipe (`apbatch.butler.formatters.LOSSY_RECIPE`): Rubin's 1/16 of
each tile's noise. cfitsio then estimates the noise of every 512 x 512 tile of the image and
the variance from pixel differences, which was 1.9 s of the 2.5 s a 4k x 4k image took to
store (bench/bench_job.py, ``write_outputs``). The image carries its noise in its variance
plane, so :func:`put_image` hands cfitsio the step directly (a negative ``level``: ``-ZSCALE``,
lsst-images' public `~lsst.images.fits.FitsQuantizationOptions`): 1/16 of the
5th-percentile sigma for the image (dithered, as the recipe) and 1/1000 of the 5th-percentile
variance for the variance, the rule apbatch's own `apbatch.image.write_image` uses
(`apbatch.image.noise_quantization_steps`). It
writes the file with `lsst.images.fits.write` and ingests it (moved, not copied) under the
dataset type's own formatter, lsst-images' ``GenericFormatter``: readers need daf_butler and
lsst-images only, exactly as for a put, and the file carries the same butler information.

Measured on a ComCam CCD's calibrated image: 2.5 s -> 1.4 s of CPU, the largest error
0.03 sigma, the file 10% larger (a step from the 5th-percentile noise is finer than most
tiles' own noise / 16). A datastore without a local root (an object store) gets a plain put.
A job killed while writing leaves its temporary directory; the next put removes those older
than :data:`STALE_AFTER`.
"""

from __future__ import annotations

import hashlib
import json
import shutil
import tempfile
import time
from pathlib import Path
from typing import Any

from lsst.daf.butler import Butler, DatasetProvenance, DatasetRef, FileDataset

from ..image import noise_quantization_steps

__all__ = ["STALE_AFTER", "compression_options", "put_image"]

_TILE = [512, 512]
_TMP_PREFIX = ".apbatch-put-"
STALE_AFTER = 3600.0
"""Seconds after which a temporary directory under the repository root is a killed job's leftover."""


def compression_options(image: Any) -> dict[str, Any] | None:
    """lsst-images FITS compression options for ``image`` (an lsst-images image with a variance).

    Returns `None` when the variance gives no usable noise (all zero or non-finite): the
    repository's recipe, which measures the noise itself, is used then.
    """
    from lsst.images.fits import FitsCompressionOptions  # noqa: PLC0415

    steps = noise_quantization_steps(image.variance.array)
    if steps is None:
        return None
    rice = {"algorithm": "RICE_1", "tile_shape": _TILE}
    return {
        "image": FitsCompressionOptions.model_validate(
            rice | {"quantization": {"dither": "SUBTRACTIVE_DITHER_2", "level": -steps[0]}}),
        "variance": FitsCompressionOptions.model_validate(
            rice | {"quantization": {"dither": "NO_DITHER", "level": -steps[1]}}),
        "mask": FitsCompressionOptions.model_validate(rice),
    }


def _seed(ref: DatasetRef) -> int:
    """A dither seed in [1, 10000] fixed by the data ID (as lsst-images' formatter derives its own)."""
    digest = hashlib.md5(json.dumps(list(ref.dataId.required_values)).encode(), usedforsecurity=False)
    return 1 + int.from_bytes(digest.digest()) % 9999


def _remove_stale(root: Path, max_age: float = STALE_AFTER) -> None:
    """Remove temporary directories that jobs killed while writing left (older than ``max_age`` s)."""
    now = time.time()
    for path in root.glob(_TMP_PREFIX + "*"):
        try:
            if now - path.stat().st_mtime > max_age:
                shutil.rmtree(path, ignore_errors=True)
        except FileNotFoundError:  # another job removed it first
            pass


def _local_root(butler: Butler) -> Path | None:
    roots = [r for r in butler.get_datastore_roots().values() if r is not None]
    if len(roots) != 1 or roots[0].scheme not in ("file", ""):
        return None
    return Path(roots[0].ospath)


def put_image(butler: Butler, image: Any, name: str, data_id: dict, run: str) -> DatasetRef:
    """Store ``image`` as dataset ``name`` in ``run`` (module docstring); like ``butler.put``.

    The file is written in a temporary directory under the datastore's root and moved into
    place by the ingest; a failure removes it and stores nothing.
    """
    options = compression_options(image)
    root = _local_root(butler)
    if options is None or root is None:
        return butler.put(image, name, data_id, run=run)
    from lsst.images.fits import write  # noqa: PLC0415
    from lsst.images.serialization import ButlerInfo  # noqa: PLC0415

    ref = DatasetRef(butler.get_dataset_type(name), butler.registry.expandDataId(data_id), run=run)
    provenance = DatasetProvenance()
    cards = provenance.to_flat_dict(ref, prefix="HIERARCH LSST BUTLER", sep=" ", simple_types=True)

    def update_header(header) -> None:
        for key, value in cards.items():
            header.set(key, value)

    _remove_stale(root)
    tmp = Path(tempfile.mkdtemp(prefix=_TMP_PREFIX, dir=root))
    try:
        path = tmp / f"{name}.fits"
        write(image, path, compression_options=options, compression_seed=_seed(ref),
              butler_info=ButlerInfo(dataset=ref.to_simple(), provenance=provenance),
              update_header=update_header)
        butler.ingest(FileDataset(str(path), [ref]), transfer="move")
    finally:
        shutil.rmtree(tmp, ignore_errors=True)
    return ref
