"""The Prompt Products Database (PPDB): creating it and replicating the APDB into it.

The APDB is created with replication enabled (``apdb.replication``): every ``Apdb.store`` also
records which *replica chunk* (a window of ``replica_chunk_seconds`` of visit time) its
DiaObjects, DiaSources and DiaForcedSources belong to. `Replicator` copies those chunks with
``lsst-dax-ppdb`` (`lsst.dax.ppdb.sql.PpdbSql`) into the PPDB:

- in order: chunks are taken by increasing id (window start); a chunk that is not ready stops
  the pass, so a later chunk is never copied before an earlier one;
- exactly once: ``PpdbSql.store`` writes a chunk's rows and its ``PpdbReplicaChunk`` record in
  one transaction; a chunk whose id the PPDB already holds is not copied again, so a pass killed
  anywhere leaves every chunk either wholly copied or not at all, and the next pass resumes;
- a chunk is deleted from the APDB's replica bookkeeping (``deleteReplicaChunks``; the
  catalogs themselves stay in the APDB) only after the PPDB committed it, and only with
  ``delete_from_apdb``;
- ready: a chunk is copied once a newer chunk exists and its last store is ``min_wait_seconds``
  old, or, for the newest chunk, once it is ``max_wait_seconds`` old (as dax_ppdb's replicator
  decides);
- late rows: a chunk that gained rows after it was copied (a CCD stored late into an old
  window gives the chunk a new ``unique_id``) is copied again with only the rows whose keys the
  PPDB lacks (``update=True`` replaces its ``PpdbReplicaChunk`` record), in the same single
  transaction; rows are never duplicated. Such late rows necessarily arrive after newer chunks.
"""

from __future__ import annotations

import dataclasses
import logging
import time
from collections.abc import Callable
from pathlib import Path
from typing import Any

import sqlalchemy as sa
from lsst.dax.apdb import ApdbTableData

from ..errors import BadInputError, first_line

__all__ = ["ChunkCopy", "ReplicationReport", "Replicator", "create_ppdb", "open_apdb_replica", "open_ppdb",
           "ppdb_url"]

_LOG = logging.getLogger(__name__)

_FIX_URL = "use sqlite:///PATH or postgresql+psycopg2://USER@HOST:PORT/DATABASE"
TABLES = ("DiaObject", "DiaSource", "DiaForcedSource")
KEYS = {"DiaObject": ("diaObjectId", "validityStartMjdTai"), "DiaSource": ("diaSourceId",),
        "DiaForcedSource": ("diaObjectId", "visit", "detector")}
"""Primary keys of the replicated tables in the ``lsst-sdm-schemas`` APDB schema."""


def ppdb_url(url: str, connect_timeout: int = 10) -> tuple[str, str]:
    """Check a PPDB URL; return it (``postgresql://`` taken as psycopg2) and its password-free form.

    A PostgreSQL URL gets ``connect_timeout`` (seconds) unless it has one: dax_ppdb's own
    ``connection_timeout`` reaches psycopg2 as a float, which psycopg2 refuses.

    Raises
    ------
    BadInputError
        Raised if the URL is malformed or names a database other than SQLite or PostgreSQL.
    """
    try:
        sa_url = sa.engine.make_url(url)
    except sa.exc.ArgumentError:
        raise BadInputError("ppdb.url", f"{url!r} is not a database URL", _FIX_URL) from None
    backend = sa_url.get_backend_name()
    if backend not in ("sqlite", "postgresql"):
        raise BadInputError("ppdb.url", f"database {backend!r} is not supported", _FIX_URL)
    if backend == "postgresql" and sa_url.drivername == "postgresql":
        sa_url = sa_url.set(drivername="postgresql+psycopg2")  # dax_ppdb's bulk COPY needs psycopg2
    if backend == "postgresql" and "connect_timeout" not in sa_url.query:
        sa_url = sa_url.update_query_dict({"connect_timeout": str(connect_timeout)})
    if backend == "sqlite" and sa_url.database and sa_url.database != ":memory:":
        Path(sa_url.database).parent.mkdir(parents=True, exist_ok=True)
    return (sa_url.render_as_string(hide_password=False), sa_url.render_as_string(hide_password=True))


def create_ppdb(url: str, *, connection_timeout: int = 10) -> Any:
    """Create the PPDB tables (``lsst-sdm-schemas`` APDB schema, as dax_ppdb makes them).

    Parameters
    ----------
    url : `str`
        SQLAlchemy URL of an existing, empty database (a SQLite file is made).
    connection_timeout : `int`
        Seconds to wait for a PostgreSQL server.

    Returns
    -------
    config : `lsst.dax.ppdb.sql.PpdbSqlConfig`
        The dax_ppdb configuration of the new PPDB.

    Raises
    ------
    BadInputError
        Raised if the URL is unsupported, the server refuses, or the PPDB exists already.
    """
    from lsst.dax.ppdb.sql import PpdbSql

    full, shown = ppdb_url(url, connection_timeout)
    if _has_ppdb(full):
        raise BadInputError("ppdb.url", f"{shown} already holds a PPDB", "choose another database")
    try:
        return PpdbSql.init_database(db_url=full)
    except Exception as exc:  # the database the user pointed us at refused: one line, their fix
        raise BadInputError("ppdb.url", f"cannot create the PPDB at {shown}: {first_line(exc)}",
                            "check the URL, credentials and that the server is running") from None


def _has_ppdb(url: str) -> bool:
    """`True` if ``url`` is reachable and has a ``PpdbReplicaChunk`` table; `False` if no such table.

    Raises
    ------
    BadInputError
        Raised if the database cannot be reached.
    """
    engine = sa.create_engine(url)
    try:
        return sa.inspect(engine).has_table("PpdbReplicaChunk")
    except Exception as exc:
        shown = sa.engine.make_url(url).render_as_string(hide_password=True)
        raise BadInputError("ppdb.url", f"cannot reach {shown}: {first_line(exc)}",
                            "check the URL, credentials and that the server is running") from None
    finally:
        engine.dispose()


def open_ppdb(url: str, *, connection_timeout: int = 10) -> Any:
    """Open an existing PPDB (`lsst.dax.ppdb.sql.PpdbSql`).

    Raises
    ------
    BadInputError
        Raised if the URL is unsupported or unreachable, or holds no PPDB.
    """
    from lsst.dax.ppdb.sql import PpdbSql, PpdbSqlConfig

    full, shown = ppdb_url(url, connection_timeout)
    if not _has_ppdb(full):
        raise BadInputError("ppdb.url", f"no PPDB at {shown}", "create one with: apbatch ppdb create")
    try:
        return PpdbSql(PpdbSqlConfig(db_url=full))
    except Exception as exc:  # schema version mismatch and the like
        raise BadInputError("ppdb.url", f"cannot open the PPDB at {shown}: {first_line(exc)}",
                            "recreate it with: apbatch ppdb create") from None


def open_apdb_replica(config_path: str | Path) -> Any:
    """Open the replication interface (`lsst.dax.apdb.ApdbReplica`) of the APDB of a config file.

    Raises
    ------
    BadInputError
        Raised if the config file does not exist.
    """
    from lsst.dax.apdb import ApdbReplica

    if not Path(config_path).is_file():
        raise BadInputError("apdb.config_file", f"no APDB config {str(config_path)!r}",
                            "create one with: apbatch apdb create")
    return ApdbReplica.from_uri(str(config_path))


class _SomeRows(ApdbTableData):
    """The rows of an `ApdbTableData` that pass a filter (a late chunk's new rows only).

    Lifetime: one PPDB store. Not thread-safe (nothing here needs it: read-only).
    """

    def __init__(self, data: ApdbTableData, rows: list[tuple]):
        self._data = data
        self._rows = rows

    def column_names(self) -> Any:
        return self._data.column_names()

    def column_defs(self) -> Any:
        return self._data.column_defs()

    def rows(self) -> list[tuple]:
        return self._rows


@dataclasses.dataclass(frozen=True)
class ChunkCopy:
    """One replica chunk committed to the PPDB."""

    chunk_id: int
    rows: dict[str, int]
    """Rows copied per table (DiaObject, DiaSource, DiaForcedSource) and ``updates``."""
    seconds: float
    late: bool = False
    """`True` if the chunk gained rows after an earlier copy (only those were added)."""


@dataclasses.dataclass
class ReplicationReport:
    """What one replication pass did."""

    copied: list[ChunkCopy] = dataclasses.field(default_factory=list)
    already: int = 0
    """Chunks of the APDB that the PPDB held already."""
    waiting: int = 0
    """Chunks not ready yet (too recent), left for a later pass."""
    deleted: int = 0
    """Chunks removed from the APDB's replica bookkeeping after the PPDB committed them."""

    @property
    def rows(self) -> int:
        """Rows copied, all tables."""
        return sum(n for c in self.copied for t, n in c.rows.items() if t in TABLES)

    def summary(self) -> str:
        """One line for the log or the terminal."""
        return (f"{len(self.copied)} chunk(s), {self.rows} row(s) copied; {self.already} already in the "
                f"PPDB; {self.waiting} waiting; {self.deleted} deleted from the APDB")


class Replicator:
    """Copies the APDB's replica chunks into the PPDB, oldest first, each in one PPDB transaction.

    Parameters
    ----------
    apdb : `lsst.dax.apdb.ApdbReplica`
        The APDB's replication interface (`open_apdb_replica`).
    ppdb : `lsst.dax.ppdb.sql.PpdbSql`
        The PPDB (`open_ppdb`).
    ppdb_engine : `sqlalchemy.engine.Engine`
        An engine on the PPDB's database: reads which rows of a late chunk it holds already.
    clock : callable
        Returns the current time, Unix seconds (UTC).
    min_wait_seconds, max_wait_seconds : `float`
        Readiness of a chunk (see the module docstring).
    max_chunks : `int`, optional
        Copy at most this many chunks per pass.
    delete_from_apdb : `bool`
        Remove committed chunks from the APDB's replica bookkeeping.
    on_chunk : callable, optional
        Called with each `ChunkCopy` after its commit (progress; tests inject failures here).

    Notes
    -----
    Lifetime: one per command (one pass, or the ``--follow`` loop); it holds the two database
    handles it was given. Not thread-safe. Two replicators on one PPDB at once cannot
    duplicate a chunk (the second insert of its ``PpdbReplicaChunk`` record fails and rolls
    back), but one of them fails: run one (cron with a lock, or one ``--follow``).
    """

    def __init__(self, apdb: Any, ppdb: Any, ppdb_engine: sa.engine.Engine, *,
                 clock: Callable[[], float] = time.time, min_wait_seconds: float = 60.0,
                 max_wait_seconds: float = 600.0,
                 max_chunks: int | None = None, delete_from_apdb: bool = False,
                 on_chunk: Callable[[ChunkCopy], None] | None = None):
        self._apdb = apdb
        self._ppdb = ppdb
        self._engine = ppdb_engine
        self._clock = clock
        self._min_wait = min_wait_seconds
        self._max_wait = max_wait_seconds
        self._max_chunks = max_chunks
        self._delete = delete_from_apdb
        self._on_chunk = on_chunk

    @classmethod
    def open(cls, apdb_config: str | Path, url: str, *, connection_timeout: int = 10,
             **kwargs: Any) -> Replicator:
        """A replicator from the APDB of a dax_apdb config file to the PPDB at ``url``.

        ``kwargs`` are the constructor's keyword arguments; `close` disposes of the engine.

        Raises
        ------
        BadInputError
            Raised if either database is missing or unreachable.
        """
        ppdb = open_ppdb(url, connection_timeout=connection_timeout)
        apdb = open_apdb_replica(apdb_config)
        return cls(apdb, ppdb, sa.create_engine(ppdb_url(url, connection_timeout)[0]), **kwargs)

    def close(self) -> None:
        """Dispose of the PPDB engine's connections."""
        self._engine.dispose()

    def _apdb_chunks(self) -> list[Any]:
        chunks = self._apdb.getReplicaChunks()
        if chunks is None:
            raise BadInputError("apdb.replication", "the APDB was created without replication",
                                "create the APDB with apdb.replication: true")
        return sorted(chunks, key=lambda c: c.id)

    def _ready(self, chunk: Any, newer: bool, now: float) -> bool:
        age = now - float(chunk.last_update_time.unix)
        return (newer and age >= self._min_wait) or age >= self._max_wait

    def run_once(self) -> ReplicationReport:
        """One pass: copy every ready chunk the PPDB lacks, in order; delete committed ones if asked.

        Raises
        ------
        BadInputError
            Raised if the APDB has no replication.
        """
        report = ReplicationReport()
        chunks = self._apdb_chunks()
        stored = {c.id: c.unique_id for c in (self._ppdb.get_replica_chunks() or [])}
        now = self._clock()
        leftover: list[int] = []  # committed by an earlier pass, which was stopped before deleting
        for i, chunk in enumerate(chunks):
            late = chunk.id in stored and stored[chunk.id] != chunk.unique_id
            if chunk.id in stored and not late:
                report.already += 1
                leftover.append(chunk.id)
                continue
            if (self._max_chunks is not None and len(report.copied) >= self._max_chunks) \
                    or not self._ready(chunk, i + 1 < len(chunks), now):
                report.waiting = len(chunks) - i
                break
            copy = self._copy(chunk, late)
            report.copied.append(copy)
            if self._delete:  # only now: the PPDB has committed the chunk
                self._apdb.deleteReplicaChunks([chunk.id])
                report.deleted += 1
            if self._on_chunk is not None:
                self._on_chunk(copy)
        if self._delete and leftover:
            self._apdb.deleteReplicaChunks(leftover)
            report.deleted += len(leftover)
        return report

    def _copy(self, chunk: Any, late: bool) -> ChunkCopy:
        from lsst.dax.apdb import ApdbTables

        start = time.perf_counter()
        data = {name: self._apdb.getTableDataChunks(getattr(ApdbTables, name), [chunk.id]) for name in TABLES}
        updates = self._apdb.getUpdateRecordChunks([chunk.id])
        if late:
            data = {name: self._new_rows(name, table) for name, table in data.items()}
            _LOG.warning("replica chunk %d gained rows after it was copied; copying the new ones", chunk.id)
        self._ppdb.store(chunk, data["DiaObject"], data["DiaSource"], data["DiaForcedSource"], updates,
                         update=late)
        rows = {name: len(table.rows()) for name, table in data.items()} | {"updates": len(updates)}
        copy = ChunkCopy(chunk.id, rows, time.perf_counter() - start, late)
        _LOG.info("replica chunk %d copied: %s", chunk.id, ", ".join(f"{n} {t}" for t, n in rows.items()))
        return copy

    def _new_rows(self, name: str, data: ApdbTableData) -> ApdbTableData:
        """The rows of ``data`` whose primary key the PPDB's ``name`` table does not hold."""
        names = list(data.column_names())
        where = [names.index(k) for k in KEYS[name]]
        rows = list(data.rows())
        table = self._ppdb.get_table(name)
        columns = [table.columns[k] for k in KEYS[name]]
        firsts = sorted({row[where[0]] for row in rows})
        held: set[tuple] = set()
        with self._engine.connect() as conn:
            for i in range(0, len(firsts), 1000):
                query = sa.select(*columns).where(columns[0].in_(firsts[i:i + 1000]))
                held.update(tuple(r) for r in conn.execute(query))
        return _SomeRows(data, [row for row in rows if tuple(row[i] for i in where) not in held])

    def follow(self, interval: float, *, stop: Callable[[], bool] = lambda: False,
               sleep: Callable[[float], None] = time.sleep,
               on_pass: Callable[[ReplicationReport], None] | None = None) -> int:
        """Run passes until ``stop()`` is true; sleep ``interval`` after a pass that copied nothing.

        Returns
        -------
        copied : `int`
            Chunks copied by all passes.
        """
        total = 0
        while not stop():
            report = self.run_once()
            total += len(report.copied)
            if on_pass is not None:
                on_pass(report)
            if not report.copied and not stop():
                sleep(interval)
        return total
