"""The per-CCD job's butler outputs: calibrated and difference images (as lsst-images types),
the DIA source table and the metrics, put once per attempt and removed when an attempt fails.
"""

from __future__ import annotations

import logging
import time
from typing import Any

from lsst.daf.butler import Butler, DatasetRef, DatasetType, MissingCollectionError
from lsst.daf.butler.registry import ConflictingDefinitionError
from sqlalchemy.exc import IntegrityError, OperationalError

from ..errors import BadInputError, RetriableError
from ..image import Image
from . import datasets as ds
from .image_writes import put_image
from .images import to_difference_image, to_visit_image

__all__ = ["DB_ERRORS", "OutputsMixin", "retry_once"]

log = logging.getLogger(__name__)

DB_ERRORS = (IntegrityError, OperationalError, ConflictingDefinitionError)


def retry_once(what: str, fn, *args, **kwargs):
    """Run ``fn``; on a concurrent-insert database error wait a moment and run it once more."""
    try:
        return fn(*args, **kwargs)
    except DB_ERRORS as exc:
        log.info("%s: %s; retrying once", what, type(exc).__name__)
        time.sleep(0.05)
        try:
            return fn(*args, **kwargs)
        except DB_ERRORS as exc2:
            raise RetriableError(f"{what} failed twice: {exc2}") from exc2


class OutputsMixin:
    """Output methods of `apbatch.butler.io.ButlerIO` (which provides ``butler``, ``instrument``
    and ``camera``). Not thread-safe."""

    butler: Butler
    instrument: str
    camera: Any

    def put_outputs(
        self,
        visit: int,
        detector: int | str,
        calexp: Any = None,
        diffim: Any = None,
        dia_sources: Any = None,
        metrics: dict | None = None,
        run: str | None = None,
    ) -> list[DatasetRef]:
        """Store a CCD's outputs (``None`` ones are skipped), replacing those of an earlier attempt.

        ``calexp`` and ``diffim`` are `apbatch.image.Image` (whole CCD, sky WCS, the job's
        metadata with ``BUNIT``); they are stored as `lsst.images.VisitImage` and
        `lsst.images.DifferenceImage` (see `apbatch.butler.images`). ``run`` defaults to
        ``<instrument>/prompt/<day_obs of the visit>``; it is created if missing (it should
        have been, by ``apbatch repo register``).

        Raises
        ------
        BadInputError
            Raised if the visit is not registered, or an image lacks what the lsst-images
            type needs (WCS, ``BUNIT``, ``FILTER``); nothing is written then.
        """
        det = self.camera.detector(detector)
        data_id = {"instrument": self.instrument, "visit": int(visit), "detector": det.id}
        if run is None:
            rec = next(iter(self.butler.registry.queryDimensionRecords("visit", dataId=data_id)), None)
            if rec is None:
                raise BadInputError("visit", f"{visit} is not registered", "register the night first")
            run = ds.output_run(self.instrument, rec.day_obs)
        if isinstance(calexp, Image):
            calexp = to_visit_image(calexp, self.camera, self.instrument, int(visit), det.id)
        if isinstance(diffim, Image):
            diffim = to_difference_image(diffim, self.camera, self.instrument, int(visit), det.id)
        refs = []
        for name, obj in (
            (ds.CALEXP, calexp),
            (ds.DIFFIM, diffim),
            (ds.DIA_SOURCES, dia_sources),
            (ds.METRICS, metrics),
        ):
            if obj is not None:
                refs.append(self._put(obj, name, data_id, run))
        return refs

    def put_calib_verification(self, table: Any, exposure: int, detector: int | str, run: str) -> DatasetRef:
        """Store the verification table of one calibration raw (``calib_verification``), replacing
        an earlier attempt's; the dataset type is registered if the repository predates it."""
        det = self.camera.detector(detector)
        spec = next(s for s in ds.DATASET_TYPES if s.name == ds.CALIB_VERIFICATION)
        dtype = DatasetType(spec.name, spec.dimensions, spec.storage_class, universe=self.butler.dimensions)
        retry_once("registering calib_verification", self.butler.registry.registerDatasetType, dtype)
        data_id = {"instrument": self.instrument, "exposure": int(exposure), "detector": det.id}
        return self._put(table, ds.CALIB_VERIFICATION, data_id, run)

    def discard_outputs(self, visit: int, detector: int | str, run: str) -> int:
        """Remove a CCD's outputs from ``run``: what a failed attempt of its job put there.

        Returns
        -------
        n : `int`
            How many datasets were removed (0 when the run does not exist yet).
        """
        det = self.camera.detector(detector)
        data_id = {"instrument": self.instrument, "visit": int(visit), "detector": det.id}
        refs = []
        for name in (ds.CALEXP, ds.DIFFIM, ds.DIA_SOURCES, ds.METRICS):
            try:
                ref = self.butler.find_dataset(name, data_id, collections=run)
            except MissingCollectionError:
                return 0
            if ref is not None:
                refs.append(ref)
        if refs:
            self.butler.pruneDatasets(refs, disassociate=True, unstore=True, purge=True)
        return len(refs)

    def _put(self, obj: Any, name: str, data_id: dict, run: str) -> DatasetRef:
        old = None
        try:
            old = self.butler.find_dataset(name, data_id, collections=run)
        except MissingCollectionError:
            log.warning("output run %s missing: creating it (register runs before jobs start)", run)
            retry_once(f"creating run {run}", self.butler.collections.register, run)
        if old is not None:
            self.butler.pruneDatasets([old], disassociate=True, unstore=True, purge=True)
        if name in (ds.CALEXP, ds.DIFFIM):  # quantized by their own variance (image_writes)
            return put_image(self.butler, obj, name, data_id, run)
        return self.butler.put(obj, name, data_id, run=run)
