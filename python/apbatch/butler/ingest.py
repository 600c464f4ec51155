"""Ingest calibrations and templates described by a ``manifest.yaml`` into the repository.

Manifest format
---------------
One ``manifest.yaml`` per directory (the simulator writes one next to its calibrations and
one next to its templates); paths are relative to that directory::

    instrument: LSSTComCam              # butler instrument name (required)
    skymap: skymap.yaml                 # templates only: SkyMap.to_dict() as YAML or JSON
    datasets:
      - dataset_type: bias              # bias | flat | template_coadd
        file: bias/bias_R22_S00.fits    # an apbatch.image.Image FITS file
        data_id: {detector: 0}          # bias: detector (id or name)
        valid_from: 2024-11-01T00:00:00 # calibrations: TAI ISO time or MJD; omit/null = unbounded
        valid_to: null
      - dataset_type: flat
        file: flat/flat_R22_S00_g_01.fits
        data_id: {detector: R22_S00, physical_filter: g_01}
      - dataset_type: template_coadd
        file: templates/t0_p12_g.fits
        data_id: {tract: 0, patch: 12, band: g}   # the sky map comes from ``skymap``
      - dataset_type: template_sources    # optional: its astrometric references (Parquet .parq,
        file: templates/t0_p12_g.parq     # apbatch.job.template_sources); made here if omitted
        data_id: {tract: 0, patch: 12, band: g}

Calibrations go into RUN ``<instrument>/calib/run/<valid_from>`` and are certified into CALIBRATION
``<instrument>/calib`` with their validity range; templates and the sky map go into RUN
``<instrument>/templates``, with each template's ``template_sources`` (detected from the template
here when the manifest does not list one: the jobs' astrometric references). Every entry is
checked before anything is written, and each manifest is ingested in one butler transaction: a
bad manifest leaves the repository as it was.
"""

from __future__ import annotations

import logging
from pathlib import Path
from typing import Any

import yaml
from astropy.time import Time
from lsst.daf.butler import (
    Butler,
    DatasetIdGenEnum,
    DatasetRef,
    FileDataset,
    MissingDatasetTypeError,
    Timespan,
)
from lsst.daf.butler.registry import ConflictingDefinitionError

from ..errors import BadInputError
from ..instruments import get_instrument
from . import datasets as ds
from .repo import register_dataset_types
from .skymaps import register_skymap

__all__ = ["ingest_manifest", "load_manifest"]

log = logging.getLogger(__name__)

_KINDS = (ds.BIAS, ds.FLAT, ds.TEMPLATE, ds.TEMPLATE_SOURCES)
_PATCH_KINDS = (ds.TEMPLATE, ds.TEMPLATE_SOURCES)


def load_manifest(directory: str | Path) -> dict[str, Any]:
    """Read and check ``<directory>/manifest.yaml`` (see the module docstring).

    Raises
    ------
    BadInputError
        Raised if the file is missing or malformed, a dataset file is missing, or a data ID
        lacks a key; the message names the entry.
    """
    directory = Path(directory)
    path = directory / "manifest.yaml"
    try:
        manifest = yaml.safe_load(path.read_text())
    except FileNotFoundError:
        raise BadInputError(str(path), "no manifest", "the directory must hold a manifest.yaml") from None
    except yaml.YAMLError as exc:
        raise BadInputError(str(path), f"not valid YAML: {str(exc).splitlines()[0]}") from None
    if not isinstance(manifest, dict) or not isinstance(manifest.get("datasets"), list):
        raise BadInputError(f"{path}: datasets", "missing or not a list", "see apbatch.butler.ingest")
    if not manifest.get("instrument"):
        raise BadInputError(f"{path}: instrument", "missing", "name the butler instrument")
    camera_name = manifest["instrument"]
    from ..raw import camera_name as geometry  # noqa: PLC0415

    camera = get_instrument(geometry(camera_name))
    for i, entry in enumerate(manifest["datasets"]):
        where = f"{path}: datasets[{i}]"
        if not isinstance(entry, dict):
            raise BadInputError(where, "not a mapping")
        kind = entry.get("dataset_type")
        if kind not in _KINDS:
            raise BadInputError(f"{where}.dataset_type", f"{kind!r} is not one of {', '.join(_KINDS)}")
        file = directory / str(entry.get("file", ""))
        if not entry.get("file") or not file.is_file():
            raise BadInputError(f"{where}.file", f"no such file {str(file)!r}", "fix the path")
        entry["path"] = file.resolve()
        data_id = dict(entry.get("data_id") or {})
        needed = {
            ds.BIAS: ("detector",),
            ds.FLAT: ("detector", "physical_filter"),
            ds.TEMPLATE: ("tract", "patch", "band"),
            ds.TEMPLATE_SOURCES: ("tract", "patch", "band"),
        }[kind]
        for key in needed:
            if data_id.get(key) is None:
                raise BadInputError(f"{where}.data_id.{key}", "missing")
        if "detector" in data_id:
            data_id["detector"] = camera.detector(data_id["detector"], field=f"{where}.data_id.detector").id
        entry["data_id"] = data_id
        if kind == ds.TEMPLATE_SOURCES:
            _check_sources_file(file, f"{where}.file")
        if kind in ds.CALIBRATIONS:
            entry["timespan"] = Timespan(
                _time(entry.get("valid_from"), f"{where}.valid_from"),
                _time(entry.get("valid_to"), f"{where}.valid_to"),
            )
    if any(e["dataset_type"] in _PATCH_KINDS for e in manifest["datasets"]):
        if not manifest.get("skymap") or not (directory / str(manifest["skymap"])).is_file():
            raise BadInputError(f"{path}: skymap", "templates need the sky map file", "skymap: skymap.yaml")
        manifest["skymap_path"] = (directory / str(manifest["skymap"])).resolve()
    return manifest


def _check_sources_file(path: Path, field: str) -> None:
    """Refuse a ``template_sources`` file that is not Parquet with numeric ``ra``/``dec``/``flux``.

    Checked here, not when a job reads it: a bad catalogue would fail every job on that patch.
    """
    import pyarrow as pa  # noqa: PLC0415 (only manifests with catalogues need it)
    import pyarrow.parquet as pq  # noqa: PLC0415

    from ..job.template_sources import COLUMNS  # noqa: PLC0415

    try:
        schema = pq.read_schema(path)
    except (pa.ArrowException, OSError) as exc:
        raise BadInputError(field, f"{path.name} is not a Parquet file ({str(exc).splitlines()[0]})",
                            "write it with apbatch.job.template_sources.write_template_sources") from None
    bad = [c for c in COLUMNS if c not in schema.names
           or not (pa.types.is_floating(schema.field(c).type) or pa.types.is_integer(schema.field(c).type))]
    if bad:
        raise BadInputError(field, f"{path.name} lacks numeric column(s) {', '.join(bad)}",
                            f"a template_sources table has columns {', '.join(COLUMNS)}")


def _time(value: Any, field: str) -> Time | None:
    if value is None:
        return None
    try:
        if isinstance(value, int | float):
            return Time(float(value), format="mjd", scale="tai")
        return Time(str(value).replace(" ", "T"), scale="tai")
    except ValueError:
        raise BadInputError(
            field, f"{value!r} is not a time", "TAI ISO (2024-11-01T00:00:00) or MJD"
        ) from None


def _label(timespan: Timespan) -> str:
    """Name of the RUN of calibrations valid from ``timespan.begin`` (a dataset id is unique per RUN)."""
    begin = timespan.begin
    return begin.tai.strftime("%Y%m%dT%H%M%S") if isinstance(begin, Time) else "unbounded"


def ingest_manifest(butler: Butler, directory: str | Path, transfer: str = "copy") -> int:
    """Ingest (and certify) everything a manifest lists; returns the number of datasets it lists
    (``template_sources`` made for templates the manifest gives none are not counted).

    Parameters
    ----------
    butler : `Butler`
        Writeable butler; the manifest's instrument must be registered.
    directory : `str` or `Path`
        Directory holding ``manifest.yaml``.
    transfer : `str`
        ``copy`` (default: the repository owns the files) or ``direct``/``symlink``...

    Raises
    ------
    BadInputError
        Raised if the manifest is invalid or its instrument is not registered.
    """
    manifest = load_manifest(directory)
    instrument = manifest["instrument"]
    if not list(butler.registry.queryDimensionRecords("instrument", instrument=instrument)):
        raise BadInputError(
            "instrument", f"{instrument} is not registered", "run apbatch repo register first"
        )
    entries = manifest["datasets"]
    try:
        n = _ingest(butler, manifest, instrument, entries, transfer)
    except ConflictingDefinitionError as exc:
        raise BadInputError(
            str(directory),
            f"already ingested: {str(exc).splitlines()[0]}",
            "ingest each manifest once; give new calibrations a new valid_from",
        ) from None
    log.info("ingested %d dataset(s) from %s", n, directory)
    return n


def _ingest(butler: Butler, manifest: dict, instrument: str, entries: list[dict], transfer: str) -> int:
    if any(e["dataset_type"] in _PATCH_KINDS for e in entries):
        try:
            butler.get_dataset_type(ds.TEMPLATE_SOURCES)
        except MissingDatasetTypeError:  # a repository created before template_sources existed
            register_dataset_types(butler)
    with butler.transaction():
        skymap_name = None
        if "skymap_path" in manifest:
            pairs = [
                (int(e["data_id"]["tract"]), int(e["data_id"]["patch"]))
                for e in entries
                if e["dataset_type"] in _PATCH_KINDS
            ]
            skymap_name = register_skymap(
                butler, manifest["skymap_path"], ds.templates_run(instrument), pairs
            )
        files, certify = [], []
        for entry in entries:
            kind = entry["dataset_type"]
            if kind in _PATCH_KINDS:
                data_id, run = {"skymap": skymap_name, **entry["data_id"]}, ds.templates_run(instrument)
            else:
                data_id = {"instrument": instrument, **entry["data_id"]}
                run = ds.calib_run(instrument, _label(entry["timespan"]))
                butler.collections.register(run)
            ref = DatasetRef(
                butler.get_dataset_type(kind),
                butler.registry.expandDataId(data_id),
                run=run,
                id_generation_mode=DatasetIdGenEnum.DATAID_TYPE_RUN,
            )
            files.append(FileDataset(str(entry["path"]), ref))
            if kind in ds.CALIBRATIONS:
                certify.append((ref, entry["timespan"]))
        if files:
            butler.ingest(*files, transfer=transfer)
        for ref, timespan in certify:
            butler.registry.certify(ds.calib_collection(instrument), [ref], timespan)
        _make_missing_sources(butler, files)
    return len(files)


def _patch_key(ref: DatasetRef) -> tuple:
    return tuple(ref.dataId[k] for k in ("skymap", "tract", "patch", "band"))


def _make_missing_sources(butler: Butler, files: list[FileDataset]) -> int:
    """Detect and store ``template_sources`` for each ingested template the manifest gave none."""
    from ..job.template_sources import template_sources  # noqa: PLC0415 (detection: only here)

    refs = [f.refs[0] for f in files]
    have = {_patch_key(r) for r in refs if r.datasetType.name == ds.TEMPLATE_SOURCES}
    made = 0
    for ref in refs:
        if ref.datasetType.name == ds.TEMPLATE and _patch_key(ref) not in have:
            template = butler.get(ref)
            if getattr(template, "wcs", None) is None:
                raise BadInputError(f"template {dict(ref.dataId.required)}", "has no WCS",
                                    "give the template its sky WCS (jobs warp it with that)")
            catalog = template_sources(template)
            butler.put(catalog, ds.TEMPLATE_SOURCES, ref.dataId, run=ref.run)
            made += 1
    if made:
        log.info("catalogued the sources of %d template(s)", made)
    return made
