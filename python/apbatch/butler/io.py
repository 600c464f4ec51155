"""`ButlerIO`: everything a per-CCD job reads from and writes to the butler.

The raw read is the *distributor-backed butler get*: wait at the distributor until the
CCD's raw file(s) are complete, ingest them (``transfer="direct"`` by default: the
repository points at the distributor's file, nothing is copied), registering the
exposure's dimension records if the night's registration did not, then ``butler.get``.
"""

from __future__ import annotations

import logging
from collections.abc import Iterator, Sequence
from pathlib import Path
from typing import Any

import numpy as np
from astropy.time import Time
from lsst.daf.butler import (
    Butler,
    DatasetIdGenEnum,
    DatasetRef,
    FileDataset,
    MissingDatasetTypeError,
    Timespan,
)

from ..errors import BadInputError
from ..image import Image
from ..instruments import get_instrument
from ..raw import RawExposure, camera_name, read_raw_header, translate_header
from . import datasets as ds
from .outputs import DB_ERRORS, OutputsMixin, retry_once
from .repo import exposure_records, visit_records

__all__ = ["ButlerIO"]

log = logging.getLogger(__name__)

def _as_time(when: Any) -> Time:
    if isinstance(when, Time):
        return when.tai
    if isinstance(when, int | float):
        return Time(float(when), format="mjd", scale="tai")
    return Time(when, scale="tai")


class ButlerIO(OutputsMixin):
    """Butler reads and writes of one per-CCD job.

    Lifetime: one per job process; not thread-safe (the butler it wraps is not). Its output
    methods (``put_outputs``, ``discard_outputs``) come from `OutputsMixin`.

    Parameters
    ----------
    butler : `Butler`
        Writeable butler on the repository (injected, so tests pass their own).
    instrument : `str`
        Butler instrument name.
    collections : `str` or `list` [`str`], optional
        Where inputs are searched; default ``<instrument>/defaults``.
    transfer : `str`
        Ingest mode for raws: ``"direct"`` (keep the distributor's file) or ``"copy"``.
    skymap : `str`, optional
        Sky-map name of the templates; default: the only ``skyMap`` in ``collections``.
    """

    def __init__(
        self,
        butler: Butler,
        instrument: str,
        *,
        collections: str | Sequence[str] | None = None,
        transfer: str = "direct",
        skymap: str | None = None,
    ):
        if transfer not in ("direct", "copy", "move", "link", "symlink", "hardlink", "auto"):
            raise BadInputError("transfer", f"unknown ingest mode {transfer!r}", "use direct or copy")
        self.butler = butler
        self.instrument = instrument
        self.camera = get_instrument(camera_name(instrument))
        self.collections = (
            [collections]
            if isinstance(collections, str)
            else list(collections or [ds.defaults_collection(instrument)])
        )
        self.transfer = transfer
        self._skymap_name = skymap
        self._skymap: Any = None
        self.raw_delivered_at: float | None = None
        """When the distributor had the raws of the last :meth:`get_raw_blocking` (UTC unix s)."""

    # ------------------------------------------------------------------ raws
    def get_raw_blocking(
        self,
        group_or_obs_ids: str | Sequence[str],
        detector: int | str,
        nimages: int,
        distributor_client: Any,
        timeout: float,
        *,
        group_id: str | None = None,
        allow_partial: bool = False,
    ) -> list[RawExposure]:
        """Wait for a CCD's raw(s) at the distributor, ingest them, and read them back.

        Parameters
        ----------
        group_or_obs_ids : `str` or `list` [`str`]
            The group id (dynamic mode: image names not yet known), or the image names.
        detector : `int` or `str`
            Detector id or name.
        nimages : `int`
            Number of snaps to wait for when only the group is known.
        distributor_client : `apbatch.distributor.client.DistributorClient`
            Where the raws arrive.
        timeout : `float`
            Seconds to wait in all.
        group_id : `str`, optional
            The group, when ``group_or_obs_ids`` are image names.
        allow_partial : `bool`
            Return what arrived by the deadline (at least one raw).

        Returns
        -------
        raws : `list` [`RawExposure`]
            In snap order.

        Raises
        ------
        RawTimeoutError
            Raised if the raw(s) did not arrive in time; nothing was written.
        BadInputError
            Raised if a raw's header belongs to another instrument or detector.
        RetriableError
            Raised if registering the exposure failed twice on concurrent inserts.
        """
        det = self.camera.detector(detector)
        names: tuple[str, ...]
        if isinstance(group_or_obs_ids, str):
            group, names = group_or_obs_ids, ()
        else:
            names = tuple(group_or_obs_ids)
            group = group_id or ""
        if not group:
            raise BadInputError("group", "needed to find raws at the distributor", "pass group_id=")
        read: dict[Path, RawExposure] = {}

        def ingest_and_read(path: Path) -> None:
            read[Path(path)] = self.butler.get(self.ingest_raw(path, det.id))

        # a snap complete before the others is ingested and read while they are awaited (only when
        # a partial set is accepted: then it is used whatever happens, and a timeout writes nothing)
        paths = distributor_client.wait_for_raws(
            self.instrument,
            group,
            det.name,
            nimages,
            image_names=names,
            timeout=timeout,
            allow_partial=allow_partial,
            on_ready=ingest_and_read if allow_partial else None,
        )
        # when the distributor had them: the start of the raw -> alert latency (apbatch.latency)
        self.raw_delivered_at = distributor_client.delivered_at(paths)
        for p in paths:
            if Path(p) not in read:
                ingest_and_read(p)
        return [read[Path(p)] for p in paths]

    def ingest_raw(self, path: str | Path, detector: int | None = None) -> DatasetRef:
        """Ingest one raw file (registering its exposure if needed); returns its ref.

        Re-ingesting a raw already in the repository returns the existing ref.
        """
        meta = translate_header(read_raw_header(path), self.instrument)
        if meta.instrument != self.instrument or (detector is not None and meta.detector != detector):
            raise BadInputError(
                str(path),
                f"is {meta.instrument} detector {meta.detector}, "
                f"expected {self.instrument} detector {detector}",
                "check the distributor",
            )
        data_id = {"instrument": meta.instrument, "detector": meta.detector, "exposure": meta.exposure_id}
        run = ds.raw_run(self.instrument)
        existing = self.butler.find_dataset(ds.RAW, data_id, collections=run)
        if existing is not None:
            return existing
        self.ensure_exposure(meta)
        ref = DatasetRef(
            self.butler.get_dataset_type(ds.RAW),
            self.butler.registry.expandDataId(data_id),
            run=run,
            id_generation_mode=DatasetIdGenEnum.DATAID_TYPE_RUN,
        )
        try:
            self.butler.ingest(FileDataset(str(Path(path).absolute()), ref), transfer=self.transfer)
        except DB_ERRORS:  # a rerun of this job ingested it at the same moment
            found = self.butler.find_dataset(ds.RAW, data_id, collections=run)
            if found is None:
                raise
            return found
        return ref

    def ensure_exposure(self, meta: Any) -> bool:
        """Insert the exposure's (and its visit's) records if missing; `True` if anything was added.

        Existing records are left as they are (the night's registration may have predicted
        slightly different times); concurrent inserts of the same records are retried once.
        """
        registry = self.butler.registry
        if list(
            registry.queryDimensionRecords("exposure", instrument=meta.instrument, exposure=meta.exposure_id)
        ):
            return False
        recs = exposure_records(meta)
        visits, definitions, members, regions = visit_records([meta])  # none for a calibration exposure

        def insert():
            with registry.transaction():
                for element in ("day_obs", "group", "exposure"):
                    registry.insertDimensionData(element, recs[element], skip_existing=True)
                for element, rows in (
                    ("visit", visits),
                    ("visit_definition", definitions),
                    ("visit_system_membership", members),
                    ("visit_detector_region", regions),
                ):
                    if rows:
                        registry.insertDimensionData(element, *rows, skip_existing=True)

        retry_once(f"registering exposure {meta.obs_id}", insert)
        return True

    # ------------------------------------------------------------------ calibrations, templates
    def get_calib(self, kind: str, detector: int | str, when: Any, physical_filter: str | None = None) -> Any:
        """The ``bias`` or ``flat`` of a detector valid at ``when``, or `None` if there is none.

        :meth:`calib_ref` then :meth:`read_calib`; see them for the parameters.
        """
        ref = self.calib_ref(kind, detector, when, physical_filter)
        return None if ref is None else self.read_calib(ref)

    def calib_ref(self, kind: str, detector: int | str, when: Any, physical_filter: str | None = None) -> Any:
        """The `DatasetRef` of the ``bias`` or ``flat`` of a detector valid at ``when``, or `None`.

        A registry lookup only (milliseconds): a job that read its calibrations before the raw
        arrived compares this ref, at the raw's time, with the one it read.

        Parameters
        ----------
        kind : `str`
            ``"bias"`` or ``"flat"``.
        detector : `int` or `str`
            Detector id or name.
        when : `float`, `astropy.time.Time` or `str`
            Time of the exposure: MJD (TAI), a `Time`, or an ISO string (TAI).
        physical_filter : `str`, optional
            Needed for ``flat`` (flats are per filter).

        Raises
        ------
        BadInputError
            Raised if ``kind`` is not a calibration, or a flat is asked for without a filter.
        """
        if kind not in ds.CALIBRATIONS:
            raise BadInputError("kind", f"{kind!r} is not a calibration", f"use one of {ds.CALIBRATIONS}")
        data_id = {"instrument": self.instrument, "detector": self.camera.detector(detector).id}
        if kind == ds.FLAT:
            if not physical_filter:
                raise BadInputError(
                    "physical_filter", "needed to find a flat", "pass the raw's physical_filter"
                )
            data_id["physical_filter"] = physical_filter
        return self.butler.find_dataset(
            kind, data_id, collections=self.collections, timespan=Timespan.fromInstant(_as_time(when))
        )

    def read_calib(self, ref: Any) -> Any:
        """Read a calibration found by :meth:`calib_ref`.

        Only the image and mask planes are read: ISR uses nothing else, and decompressing the
        variance costs time. The variance is then a read-only view of zeros (no memory) and the
        mask is `numpy.uint16` when its bits fit (they are `apbatch.image.MaskBits`, 9 bits):
        the job holds its bias and flat from before the raw until ISR is done, so each
        calibration of a 4k x 4k CCD takes about 100 MB instead of 200 MB (the same values).
        """
        if "planes" in ref.datasetType.storageClass.parameters:
            return _compact_calib(self.butler.get(ref, parameters={"planes": ("image", "mask")}))
        return self.butler.get(ref)

    def skymap(self) -> Any:
        """The `apbatch.skymap.SkyMap` the templates are defined on (read once)."""
        if self._skymap is None:
            from ..skymap import SkyMap  # noqa: PLC0415

            if self._skymap_name is None:
                refs = self.butler.query_datasets(ds.SKYMAP, collections=self.collections, explain=False)
                if len(refs) != 1:
                    raise BadInputError(
                        "skymap",
                        f"{len(refs)} sky maps in {self.collections}",
                        "ingest templates with their sky map, or name the sky map",
                    )
                found = refs[0]
                self._skymap_name = str(found.dataId["skymap"])
            else:
                maybe = self.butler.find_dataset(
                    ds.SKYMAP, skymap=self._skymap_name, collections=self.collections
                )
                if maybe is None:
                    raise BadInputError("skymap", f"no sky map {self._skymap_name!r} in {self.collections}")
                found = maybe
            self._skymap = SkyMap.from_dict(self.butler.get(found))
        return self._skymap

    def get_templates(self, corners: Any, band: str, margin: int = 64) -> list[Any]:
        """Template patches of ``band`` overlapping the sky polygon ``corners`` ((N, 2) RA/Dec deg).

        Only the part of each patch inside the polygon's bounding box (plus ``margin`` pixels,
        room for the warping kernel and astrometric offsets) is read. Returns an empty list
        when there is no sky map or no template there.
        """
        return list(self.iter_templates(corners, band, margin))

    def iter_templates(self, corners: Any, band: str, margin: int = 64) -> Iterator[Any]:
        """:meth:`get_templates` one patch at a time: a caller that turns each patch into
        something smaller (`apbatch.job.prepare.read_templates`) never holds them all."""
        for template, _ in self.iter_template_patches(corners, band, margin, sources=False):
            yield template
            del template  # not held while the next patch is read

    def iter_template_patches(self, corners: Any, band: str, margin: int = 64, *, sources: bool = True
                              ) -> Iterator[tuple[Any, Any]]:
        """:meth:`iter_templates` with each patch's ``template_sources`` catalogue (a DataFrame),
        or `None` for a patch without one (or with ``sources=False``)."""
        try:
            skymap = self.skymap()
        except BadInputError as exc:
            log.warning("no templates: %s", exc)
            return
        infos = skymap.patches_overlapping(corners)
        templates = self._patch_refs(ds.TEMPLATE, band, infos)
        catalogues = self._patch_refs(ds.TEMPLATE_SOURCES, band, infos) if sources and templates else {}
        for info in infos:
            ref = templates.get((info.tract, info.patch))
            bbox = _patch_bbox(info, np.asarray(corners, dtype=float), margin)
            if ref is not None and bbox is not None:
                cat = catalogues.get((info.tract, info.patch))
                yield (self.butler.get(ref, parameters={"bbox": bbox}),
                       None if cat is None else self.butler.get(cat))

    def _patch_refs(self, kind: str, band: str, infos: Sequence[Any]) -> dict[tuple[int, int], DatasetRef]:
        """(tract, patch) -> ref of ``kind`` in ``band`` for the patches ``infos``, in one query
        (a lookup per patch costs ~10 ms each); empty for a dataset type the repository lacks
        (``template_sources`` in a repository older than it)."""
        if not infos:
            return {}
        try:
            refs = self.butler.query_datasets(
                kind, collections=self.collections, explain=False,
                where="skymap = sm AND band = b AND tract IN (tracts)",
                bind={"sm": self._skymap_name, "b": band, "tracts": sorted({int(i.tract) for i in infos})})
        except MissingDatasetTypeError:
            return {}
        wanted = {(int(i.tract), int(i.patch)) for i in infos}
        found = {(int(r.dataId["tract"]), int(r.dataId["patch"])): r for r in refs}
        return {k: r for k, r in found.items() if k in wanted}


def _compact_calib(calib: Any) -> Any:
    """A calibration read without its variance, held in less memory (:meth:`ButlerIO.read_calib`)."""
    if not isinstance(calib, Image):
        return calib
    calib.variance = np.broadcast_to(np.float32(0.0), calib.image.shape)  # read-only: nothing writes it
    mask = calib.mask
    if mask.dtype != np.uint16 and mask.size and int(mask.min()) >= 0 and int(mask.max()) <= 0xFFFF:
        calib.mask = mask.astype(np.uint16)
    return calib


def _patch_bbox(info: Any, corners: np.ndarray, margin: int) -> tuple[int, int, int, int] | None:
    """Pixel box ``(x0, x1, y0, y1)`` of a patch that covers ``corners``; `None` if it misses them."""
    x, y = info.wcs.world_to_pixel_values(corners[:, 0], corners[:, 1])
    ny, nx = info.shape
    x0, x1 = max(int(np.floor(x.min())) - margin, 0), min(int(np.ceil(x.max())) + margin + 1, nx)
    y0, y1 = max(int(np.floor(y.min())) - margin, 0), min(int(np.ceil(y.max())) + margin + 1, ny)
    if x1 <= x0 or y1 <= y0:
        return None
    return (x0, x1, y0, y1)
