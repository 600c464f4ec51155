"""ObsCore records of released images, computed by the butler's own ObsCore record factory.

Part of `apbatch.products.obscore` (the table and its update), kept apart for size: this module
knows the butler and lsst-dax-obscore, not the database.

What the library computes
-------------------------
The configuration is lsst-dax-obscore's `~lsst.dax.obscore.ExporterConfig` (daf_butler's
``ObsCoreConfig`` with the exporter's additions); each record comes from daf_butler's
`~lsst.daf.butler.registry.obscore.RecordFactory` for the repository's dimension universe, the
factory that ``butler obscore-export`` and the live ObsCore table manager use:
``dataproduct_type``, ``calib_level``, ``obs_id``, ``obs_publisher_did``, ``facility_name``,
``instrument_name``, ``t_min``/``t_max`` (the visit's timespan, MJD UTC), ``t_exptime``,
``em_min``/``em_max`` (the band's spectral range), the ``lsst_*`` columns and ``obs_title``
(templates of `DATASET_TYPES`); ``s_ra``, ``s_dec``, ``s_fov`` from daf_butler's default spatial
plugin and the ``s_region`` polygon from its pg_sphere plugin (the vertices of the
``visit_detector_region`` region, bound as a pg_sphere ``spoly`` by that plugin's SQLAlchemy type).

What is glue
------------
``access_url`` (the file's URI from the datastore: the factory knows only DataLink templates),
``s_xel1``/``s_xel2`` (the camera's CCD size), and dropping the factory's non-standard
``em_filter_name`` (not a column of lsst-sdm-schemas' ``ivoa_obscore.yaml``).
"""

from __future__ import annotations

import functools
from collections.abc import Iterable, Mapping
from typing import Any

from lsst.daf.butler import Butler, DatasetRef
from lsst.daf.butler.registry.obscore import DatasetTypeConfig, ObsCoreSchema, RecordFactory
from lsst.daf.butler.registry.obscore.default_spatial import DefaultSpatialObsCorePlugin
from lsst.daf.butler.registry.obscore.pgsphere import PgSphereObsCorePlugin
from lsst.dax.obscore import ExporterConfig

from ..butler import datasets as ds

__all__ = [
    "DATASET_TYPES",
    "FACILITY_NAME",
    "SPECTRAL_RANGES",
    "ObscoreRecords",
    "exporter_config",
]

FACILITY_NAME = "Rubin:Simonyi"
"""``facility_name`` (as Rubin's own ObsCore services write it)."""

SPECTRAL_RANGES: dict[str, tuple[float, float]] = {
    "u": (330.0e-9, 400.0e-9),
    "g": (402.0e-9, 552.0e-9),
    "r": (552.0e-9, 691.0e-9),
    "i": (691.0e-9, 818.0e-9),
    "z": (818.0e-9, 922.0e-9),
    "y": (950.0e-9, 1080.0e-9),
}
"""``em_min``, ``em_max`` (m) per LSST band."""

_EXTRA_COLUMNS: dict[str, dict[str, str]] = {
    "lsst_visit": {"template": "{visit}", "type": "int"},
    "lsst_detector": {"template": "{detector}", "type": "int"},
    "lsst_band": {"template": "{band}", "type": "string"},
    "lsst_filter": {"template": "{physical_filter}", "type": "string"},
}

DATASET_TYPES: dict[str, dict[str, Any]] = {
    ds.CALEXP: {"dataproduct_subtype": "lsst.preliminary_visit_image", "calib_level": 2,
                "title": "calibrated image"},
    ds.DIFFIM: {"dataproduct_subtype": "lsst.difference_image", "calib_level": 3,
                "title": "difference image"},
}
"""The released images that get an ObsCore record, with their calibration level."""


def exporter_config(obs_collection: str, publisher_did: str) -> ExporterConfig:
    """The lsst-dax-obscore configuration of apbatch's ObsCore records.

    Parameters
    ----------
    obs_collection : `str`
        ``obs_collection`` of every record.
    publisher_did : `str`
        Format of ``obs_publisher_did``, with ``{id}`` (the butler dataset id).

    Returns
    -------
    config : `lsst.dax.obscore.ExporterConfig`
    """
    types = {
        name: DatasetTypeConfig(
            dataproduct_type="image",
            dataproduct_subtype=spec["dataproduct_subtype"],
            calib_level=spec["calib_level"],
            o_ucd="phot.flux.density",
            access_format="image/fits",
            obs_id_fmt="{instrument}-{visit}-{records[detector].full_name}",
            extra_columns={"obs_title": {
                "template": f"{spec['title']} {{band}} {{records[detector].full_name}} "
                            "{records[visit].timespan.begin.utc.isot}Z",
                "type": "string"}},
        )
        for name, spec in DATASET_TYPES.items()
    }
    return ExporterConfig.model_validate({
        "facility_name": FACILITY_NAME,
        "obs_collection": obs_collection,
        "obs_publisher_did_fmt": publisher_did,
        "dataset_types": types,
        "spectral_ranges": SPECTRAL_RANGES,
        "extra_columns": _EXTRA_COLUMNS,
    })


@functools.cache
def _ccd_shape(instrument: str, detector: int) -> tuple[int, int] | None:
    """(nx, ny) of a CCD of an apbatch camera; `None` for a camera apbatch does not describe."""
    from ..instruments import get_instrument  # noqa: PLC0415

    try:
        det = get_instrument(instrument).detector(detector)
    except Exception:  # an instrument only the butler knows: no s_xel
        return None
    return int(det.nx), int(det.ny)


class ObscoreRecords:
    """Makes the ObsCore record of an image dataset of a butler repository.

    Parameters
    ----------
    butler : `Butler`
        The repository the datasets belong to (its dimension universe and datastore).
    columns : iterable of `str`
        Columns of the ObsCore table; the record has exactly these keys.
    obs_collection, publisher_did : `str`
        See `exporter_config`.

    Notes
    -----
    Lives as long as one update; not thread-safe (nor is the factory).
    """

    def __init__(self, butler: Butler, columns: Iterable[str], obs_collection: str, publisher_did: str):
        self.butler = butler
        self.columns = tuple(columns)
        self.config = exporter_config(obs_collection, publisher_did)
        self.publisher_did = publisher_did
        default = DefaultSpatialObsCorePlugin(name="default", config={})
        # pg_sphere's plugin overwrites the default's STC-S text s_region with the polygon's vertices,
        # which its SQLAlchemy type binds as an spoly; the position column is not in ivoa_obscore.yaml.
        pgsphere = PgSphereObsCorePlugin(name="pgsphere", config={"region_column": "s_region",
                                                                   "position_column": "_position"})
        schema = ObsCoreSchema(config=self.config, spatial_plugins=[default])
        universe = butler.dimensions
        factory_type = RecordFactory.get_record_type_from_universe(universe)
        self.factory = factory_type(self.config, schema, universe, [default, pgsphere], None)

    def did(self, ref: DatasetRef) -> str:
        """``obs_publisher_did`` of a dataset (what the factory writes)."""
        return self.publisher_did.format(id=ref.id)

    def make(self, refs: Iterable[DatasetRef]) -> list[dict[str, Any]]:
        """The records of ``refs`` (expanded data IDs, stored datasets), in order.

        Raises
        ------
        ValueError
            Raised if a dataset is not one of `DATASET_TYPES`.
        """
        refs = list(refs)
        uris: Mapping[DatasetRef, Any] = self.butler.get_many_uris(refs) if refs else {}
        rows = []
        for ref in refs:
            record = self.factory(ref)
            if record is None:
                raise ValueError(f"{ref.datasetType.name} is not an image type with ObsCore records")
            record["access_url"] = uris[ref].primaryURI.geturl()
            shape = _ccd_shape(str(ref.dataId["instrument"]), int(ref.dataId["detector"]))
            if shape is not None:
                record["s_xel1"], record["s_xel2"] = shape
            rows.append({name: record.get(name) for name in self.columns})
        return rows
