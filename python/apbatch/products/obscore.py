"""ObsCore records of the released images, in a PostgreSQL table with pg_sphere footprints.

Every image of the public ("prompt") repository (``preliminary_visit_image``, calib_level 2;
``difference_image``, calib_level 3) whose file is stored has one record in the ObsCore table
(``ivoa.obscore`` by default: `SCHEMA_NAME`, `TABLE_NAME`), usually in the PPDB's database, which
the TAP service publishes as ``ivoa.ObsCore``.

The table
---------
Columns as lsst-sdm-schemas' ``ivoa_obscore.yaml`` defines them (`COLUMNS`, built with felis),
except ``s_region``: a pg_sphere ``spoly`` (the CCD's sky polygon) with a GiST index, so that
``spoint(radians(ra), radians(dec)) @ s_region`` finds the images covering a position.
``obs_publisher_did`` (from the butler dataset id) is the primary key. `create_obscore_table`
runs ``CREATE EXTENSION IF NOT EXISTS pg_sphere`` first.

Why the records are made this way
---------------------------------
lsst-dax-obscore offers two paths, neither of which fits a SQLite-registry butler writing into a
separate PostgreSQL database: the live ObsCore table manager keeps the table inside the registry's
own database (here SQLite), and the exporter (``butler obscore-export``) writes every dataset of
the configured collections to a file, as plain dicts (``s_region`` as 6-decimal STC-S text), with
no dataset reference to tell whether the file is still stored or where it is. Both are built on
daf_butler's ObsCore `~lsst.daf.butler.registry.obscore.RecordFactory`; so is this module (see
`apbatch.products.obscore_records`): the factory, configured with dax_obscore's
``ExporterConfig``, computes each record from the dataset's expanded data ID, and pg_sphere's
plugin and SQLAlchemy type give ``s_region``. Apbatch adds only the glue: which datasets to
record (stored images not yet in the table), ``access_url`` (the file's URI), and the
transaction.

Update
------
`update_obscore` compares the stored images of the repository with the table: it inserts a
record for each image missing from it and deletes the records whose dataset is no longer stored
(purged by ``apbatch embargo release --purge``, or replaced by a rerun's), all in one transaction
under a table lock: an update killed anywhere leaves the table as it was, and a rerun (or a second
run) adds only what is missing, never a duplicate. Records whose ``obs_publisher_did`` does not
have this configuration's prefix are left alone.

An update can start from the time the last one began (``since``): it then looks only at the
images ingested into the prompt repository since (``ingest_date``, less a margin for clock skew
and transactions in flight), adds their records, and removes the records they replace (same
instrument, visit, detector and calib_level: a CCD rerun after its release); the query is the
size of what is new, not of every image kept. Such an update does not notice purged images: run
a full update (``--full``) after ``embargo release --purge``, as the crontab does.

Cron order: ``apbatch ppdb replicate`` -> ``apbatch embargo release [--purge]`` ->
``apbatch obscore update [--full]``.
"""

from __future__ import annotations

import dataclasses
import datetime
import functools
import importlib.resources
import logging
import re
import time
from collections import defaultdict
from collections.abc import Callable
from typing import Any

import sqlalchemy as sa
from astropy.time import Time
from lsst.daf.butler import Butler, DatasetRef
from lsst.daf.butler.registry.obscore.pgsphere import PgSpherePolygon

from ..errors import BadInputError, first_line
from .obscore_changes import CHUNK as _CHUNK
from .obscore_changes import DID_COLUMN, present_records, replaced_records, stored_images, visit_of
from .obscore_records import ObscoreRecords

__all__ = [
    "COLUMNS",
    "DID_COLUMN",
    "REGION_COLUMN",
    "SCHEMA_NAME",
    "TABLE_NAME",
    "ObscoreUpdate",
    "VisitChange",
    "create_obscore_table",
    "obscore_table",
    "obscore_url",
    "update_obscore",
]

log = logging.getLogger(__name__)

SCHEMA_NAME = "ivoa"
"""Default SQL schema of the table (``obscore.schema_name``)."""
TABLE_NAME = "obscore"
"""Default SQL name of the table (``obscore.table``): unquoted, lowercase."""
REGION_COLUMN = "s_region"
"""The pg_sphere ``spoly`` column (radians inside pg_sphere; GiST-indexed)."""

_FIX_URL = "set obscore.url (or ppdb.url) to postgresql://USER@HOST:PORT/DATABASE"
_IDENTIFIER = re.compile(r"[a-z_][a-z0-9_]{0,62}")


@functools.cache
def _felis_table() -> Any:
    """The ObsCore table of lsst-sdm-schemas' ``ivoa_obscore.yaml``, as felis builds it."""
    import yaml  # noqa: PLC0415
    from felis.datamodel import Schema  # noqa: PLC0415
    from felis.metadata import MetaDataBuilder  # noqa: PLC0415

    text = (importlib.resources.files("lsst.sdm.schemas") / "ivoa_obscore.yaml").read_text()
    schema: Schema = Schema.model_validate(yaml.safe_load(text), context={"id_generation": True})
    (table,) = MetaDataBuilder(schema, apply_schema_to_metadata=False).build().tables.values()
    return table


COLUMNS: tuple[str, ...] = tuple(c.name for c in _felis_table().columns)
"""The table's columns, in the order of ``ivoa_obscore.yaml``."""


def obscore_table(metadata: sa.MetaData, schema_name: str = SCHEMA_NAME, table: str = TABLE_NAME) -> sa.Table:
    """The ObsCore table's definition (nothing is created).

    Parameters
    ----------
    metadata : `sqlalchemy.MetaData`
        Where to define it.
    schema_name, table : `str`
        SQL schema and table names (lowercase identifiers).

    Raises
    ------
    BadInputError
        Raised if a name is not a lowercase SQL identifier.
    """
    for field, name in (("obscore.schema_name", schema_name), ("obscore.table", table)):
        if not _IDENTIFIER.fullmatch(name):
            raise BadInputError(field, f"{name!r} is not a lowercase SQL identifier",
                                "use lowercase letters, digits and _ (e.g. ivoa, obscore)")
    columns = [sa.Column(c.name, PgSpherePolygon() if c.name == REGION_COLUMN else c.type.copy(),
                         nullable=c.nullable and c.name != DID_COLUMN, primary_key=c.name == DID_COLUMN,
                         comment=c.comment)
               for c in _felis_table().columns]
    return sa.Table(table, metadata, *columns,
                    sa.Index(f"{table}_{REGION_COLUMN}_gist", REGION_COLUMN, postgresql_using="gist"),
                    sa.Index(f"{table}_lsst_visit", "lsst_visit", "lsst_detector"),
                    sa.Index(f"{table}_t_min", "t_min"),
                    schema=schema_name)


def obscore_url(url: str, field: str = "obscore.url", connect_timeout: int = 10) -> tuple[str, str]:
    """Check an ObsCore database URL; return it (psycopg2, with ``connect_timeout``) and its shown form.

    Raises
    ------
    BadInputError
        Raised if the URL is malformed or not PostgreSQL.
    """
    try:
        sa_url = sa.engine.make_url(url)
    except sa.exc.ArgumentError:
        raise BadInputError(field, f"{url!r} is not a database URL", _FIX_URL) from None
    if sa_url.get_backend_name() != "postgresql":
        raise BadInputError(field, f"{sa_url.render_as_string(hide_password=True)} is not PostgreSQL",
                            f"ObsCore needs PostgreSQL with pg_sphere: {_FIX_URL}")
    if sa_url.drivername == "postgresql":
        sa_url = sa_url.set(drivername="postgresql+psycopg2")
    if "connect_timeout" not in sa_url.query:
        sa_url = sa_url.update_query_dict({"connect_timeout": str(connect_timeout)})
    return sa_url.render_as_string(hide_password=False), sa_url.render_as_string(hide_password=True)


def _connect(url: str, field: str, connect_timeout: int) -> tuple[sa.Engine, str]:
    """An engine on a reachable PostgreSQL database with pg_sphere (created if missing)."""
    full, shown = obscore_url(url, field, connect_timeout)
    engine = sa.create_engine(full)
    try:
        with engine.connect() as conn:
            conn.execute(sa.text("SELECT 1"))
    except sa.exc.DBAPIError as exc:
        engine.dispose()
        raise BadInputError(field, f"cannot reach {shown}: {first_line(exc)}",
                            "check the URL, credentials and that the server is running") from None
    try:
        with engine.begin() as conn:
            conn.execute(sa.text("CREATE EXTENSION IF NOT EXISTS pg_sphere"))
    except sa.exc.DBAPIError as exc:
        engine.dispose()
        raise BadInputError(field, f"pg_sphere is not installed in {shown} ({first_line(exc)})",
                            "install postgresql-<version>-pgsphere on the server and run "
                            "CREATE EXTENSION pg_sphere in that database as a superuser") from None
    return engine, shown


def _create(engine: sa.Engine, schema_name: str, table: str) -> sa.Table:
    tbl = obscore_table(sa.MetaData(), schema_name, table)
    with engine.begin() as conn:
        conn.execute(sa.text(f"CREATE SCHEMA IF NOT EXISTS {schema_name}"))
        tbl.create(conn, checkfirst=True)
    return tbl


def create_obscore_table(url: str, schema_name: str = SCHEMA_NAME, table: str = TABLE_NAME, *,
                         field: str = "obscore.url", connect_timeout: int = 10) -> str:
    """Create the ObsCore table (and its schema, and pg_sphere) unless it exists.

    Parameters
    ----------
    url : `str`
        SQLAlchemy URL of a PostgreSQL database.
    schema_name, table : `str`
        Where the table goes.
    field : `str`
        Config field the URL came from (error messages).
    connect_timeout : `int`
        Seconds to wait for the server.

    Returns
    -------
    shown : `str`
        The URL without password.

    Raises
    ------
    BadInputError
        Raised if the URL is not PostgreSQL, the server cannot be reached, or pg_sphere is
        missing and cannot be created.
    """
    engine, shown = _connect(url, field, connect_timeout)
    try:
        _create(engine, schema_name, table)
    finally:
        engine.dispose()
    return shown


@dataclasses.dataclass
class VisitChange:
    """Records added and removed for one visit by one update."""

    instrument: str
    visit: int
    added: int = 0
    removed: int = 0


@dataclasses.dataclass
class ObscoreUpdate:
    """Result of `update_obscore`."""

    url: str
    """Database (password hidden)."""
    table: str
    """``schema.table``."""
    dry_run: bool
    added: int = 0
    """Records inserted (or, in a dry run, that would be)."""
    removed: int = 0
    """Records deleted: their dataset is no longer stored."""
    unchanged: int = 0
    """Records already there for stored images."""
    seconds: float = 0.0
    visits: list[VisitChange] = dataclasses.field(default_factory=list)
    since: str | None = None
    """ISO UTC start of the update this one continued from (`None`: a full update)."""
    started: str | None = None
    """ISO UTC time this update began: the ``since`` of the next (`None` for a dry run)."""

    def as_dict(self) -> dict[str, Any]:
        """Plain types, for JSON and printing."""
        return dataclasses.asdict(self)


def update_obscore(
    prompt: Butler,
    url: str,
    schema_name: str = SCHEMA_NAME,
    table: str = TABLE_NAME,
    *,
    obs_collection: str,
    publisher_did: str,
    dry_run: bool = False,
    field: str = "obscore.url",
    connect_timeout: int = 10,
    after_visit: Callable[[VisitChange], None] | None = None,
    since: Time | None = None,
    margin: datetime.timedelta = datetime.timedelta(minutes=10),
) -> ObscoreUpdate:
    """Make the ObsCore table hold exactly one record per stored image of ``prompt``, in one transaction.

    Parameters
    ----------
    prompt : `Butler`
        The public repository.
    url : `str`
        SQLAlchemy URL of the PostgreSQL database (the table is created if missing, except in a
        dry run).
    schema_name, table : `str`
        The table.
    obs_collection : `str`
        ``obs_collection`` of the new records (``obscore.obs_collection``).
    publisher_did : `str`
        Format of ``obs_publisher_did`` with ``{id}`` (``obscore.publisher_did``); records whose
        DID lacks its prefix are not this repository's and are never deleted.
    dry_run : `bool`
        Count what would change; change nothing.
    field : `str`
        Config field the URL came from (error messages).
    connect_timeout : `int`
        Seconds to wait for the server.
    after_visit : callable, optional
        Called with each visit's `VisitChange` once its records are written, before the commit
        (progress; an exception from it rolls the whole update back).
    since : `astropy.time.Time`, optional
        When the last update began (its ``started``): look only at images ingested since (less
        ``margin``), and remove only the records they replace; default: a full update.
    margin : `datetime.timedelta`
        Allowance for clock skew and transactions in flight at the last update.

    Returns
    -------
    summary : `ObscoreUpdate`

    Raises
    ------
    BadInputError
        Raised if the URL is not PostgreSQL or unreachable, pg_sphere is missing, a name is not
        an identifier, or ``publisher_did`` lacks ``{id}``.
    """
    start, started = time.monotonic(), Time.now()
    if publisher_did.count("{id}") != 1 or "{" in publisher_did.replace("{id}", ""):
        raise BadInputError("obscore.publisher_did", f"{publisher_did!r} must contain {{id}} once and "
                            "no other {...}", "e.g. ivo://org.rubinobs/apbatch/prompt?id={id}")
    prefix = publisher_did.split("{id}")[0]
    tbl = obscore_table(sa.MetaData(), schema_name, table)
    engine, shown = _connect(url, field, connect_timeout)
    summary = ObscoreUpdate(url=shown, table=f"{schema_name}.{table}", dry_run=dry_run)
    try:
        exists = sa.inspect(engine).has_table(table, schema=schema_name)
        if not exists and not dry_run:
            _create(engine, schema_name, table)
            exists = True
        records = ObscoreRecords(prompt, COLUMNS, obs_collection, publisher_did)
        wanted = {records.did(ref): ref for ref in stored_images(prompt, since, margin)}
        with engine.begin() as conn:
            if not exists:
                present: dict[str, tuple[str, int]] = {}
            else:
                if not dry_run:  # one updater at a time; readers (TAP) are not blocked
                    conn.execute(sa.text(f"LOCK TABLE {schema_name}.{table} IN SHARE ROW EXCLUSIVE MODE"))
                present = present_records(conn, tbl, prefix, None if since is None else wanted)
            todo = [ref for d, ref in wanted.items() if d not in present]
            if since is None:
                gone = sorted(set(present) - set(wanted))
            else:  # the records the new images replace (a CCD rerun after its release)
                replaced = replaced_records(conn, tbl, prefix, todo, set(wanted)) if exists else {}
                present.update(replaced)
                gone = sorted(replaced)
            changes: dict[tuple[str, int], VisitChange] = {}
            for d in gone:
                key = (str(present[d][0]), int(present[d][1] or 0))
                changes.setdefault(key, VisitChange(*key)).removed += 1
            by_visit: dict[tuple[str, int], list[DatasetRef]] = defaultdict(list)
            for ref in todo:
                by_visit[visit_of(ref)].append(ref)
                changes.setdefault(visit_of(ref), VisitChange(*visit_of(ref))).added += 1
            if not dry_run:
                for i in range(0, len(gone), _CHUNK):
                    conn.execute(tbl.delete().where(tbl.c[DID_COLUMN].in_(gone[i:i + _CHUNK])))
            for key in sorted(changes):
                refs = by_visit.get(key, [])
                if refs and not dry_run:
                    conn.execute(tbl.insert(), records.make(refs))
                if after_visit is not None:
                    after_visit(changes[key])
    finally:
        engine.dispose()
    summary.added, summary.removed = len(todo), len(gone)
    summary.unchanged = len(wanted) - len(todo)
    summary.visits = [changes[k] for k in sorted(changes)]
    summary.seconds = round(time.monotonic() - start, 3)
    summary.since = since.utc.isot if since is not None else None
    summary.started = None if dry_run else started.utc.isot
    log.info("ObsCore %s: %d record(s) added, %d removed, %d unchanged in %.1f s%s", summary.table,
             summary.added, summary.removed, summary.unchanged, summary.seconds,
             " (dry run)" if dry_run else "")
    return summary
