"""Which ObsCore records an update changes: the prompt repository's stored images (all, or those
ingested since the last update), the records already there, and the records new images replace.
See `apbatch.products.obscore`.
"""

from __future__ import annotations

import datetime

import sqlalchemy as sa
from astropy.time import Time
from lsst.daf.butler import Butler, CollectionType, DatasetRef, MissingDatasetTypeError

from .obscore_records import DATASET_TYPES

__all__ = ["CHUNK", "DID_COLUMN", "present_records", "replaced_records", "stored_images", "visit_of"]

CHUNK = 1000
"""Record ids per ``IN (...)`` list."""
DID_COLUMN = "obs_publisher_did"
"""The primary key: one record per dataset."""


def stored_images(butler: Butler, since: Time | None = None,
                  margin: datetime.timedelta = datetime.timedelta(minutes=10)) -> list[DatasetRef]:
    """The image datasets (`DATASET_TYPES`) of every RUN collection of ``butler`` whose file is stored,
    with expanded data IDs; with ``since``, only those ingested after ``since - margin``."""
    runs = sorted(butler.collections.query("*", collection_types={CollectionType.RUN}))
    where = f"ingest_date > T'{(since - margin).utc.isot}/utc'" if since is not None else ""
    refs: list[DatasetRef] = []
    for name in DATASET_TYPES if runs else ():
        try:
            refs += butler.query_datasets(name, collections=runs, find_first=False, where=where,
                                          with_dimension_records=True, limit=None, explain=False)
        except MissingDatasetTypeError:  # nothing released yet
            continue
    return [ref for ref, here in butler.stored_many(refs).items() if here]


def visit_of(ref: DatasetRef) -> tuple[str, int]:
    return str(ref.dataId["instrument"]), int(ref.dataId["visit"])


def present_records(conn: sa.Connection, tbl: sa.Table, prefix: str,
             only: dict[str, DatasetRef] | None) -> dict[str, tuple[str, int]]:
    """``{DID: (instrument, visit)}`` of this publisher's records (all, or those of ``only``'s DIDs)."""
    did = tbl.c[DID_COLUMN]
    query = (sa.select(did, tbl.c.instrument_name, tbl.c.lsst_visit)
             .where(did.startswith(prefix, autoescape=True)))
    if only is None:
        return {r[0]: (r[1], r[2]) for r in conn.execute(query)}
    out: dict[str, tuple[str, int]] = {}
    names = sorted(only)
    for i in range(0, len(names), CHUNK):
        out |= {r[0]: (r[1], r[2]) for r in conn.execute(query.where(did.in_(names[i:i + CHUNK])))}
    return out


def replaced_records(conn: sa.Connection, tbl: sa.Table, prefix: str, refs: list[DatasetRef],
              keep: set[str]) -> dict[str, tuple[str, int]]:
    """Records of this publisher with the instrument, visit, detector and calib_level of one of
    ``refs`` but a DID not in ``keep``: what those images replace."""
    did = tbl.c[DID_COLUMN]
    out: dict[str, tuple[str, int]] = {}
    for ref in refs:
        instrument, visit = visit_of(ref)
        query = sa.select(did, tbl.c.instrument_name, tbl.c.lsst_visit).where(
            did.startswith(prefix, autoescape=True), tbl.c.instrument_name == instrument,
            tbl.c.lsst_visit == visit, tbl.c.lsst_detector == int(ref.dataId["detector"]),
            tbl.c.calib_level == DATASET_TYPES[ref.datasetType.name]["calib_level"])
        out |= {r[0]: (r[1], r[2]) for r in conn.execute(query) if r[0] not in keep}
    return out
