"""`TapService`: runs one ADQL query on the PPDB database and makes its VOTable.

Each query: parse and resolve the ADQL (`apbatch.tap.adql`), pin the Dia tables to the current
validity time (`apbatch.tap.validity`), translate to SQL, then run it in a REPEATABLE READ, READ
ONLY transaction (T and the rows from one snapshot) with a ``statement_timeout``, reading at most
MAXREC + 1 rows through a server-side cursor. Every failure becomes a TAP error document with one
line, never a traceback.
"""

from __future__ import annotations

import dataclasses
import logging
import threading
import time
from typing import Any

import psycopg2  # type: ignore[import-untyped]
import psycopg2.errors  # type: ignore[import-untyped]
import sqlalchemy as sa

from ..errors import first_line
from .adql import AdqlError, parse_adql, to_sql
from .schema import Registry, load_registry
from .validity import current_validity_time, mjd_tai_to_iso_utc, pin_query
from .votable import ResultColumn, error_votable, result_votable

__all__ = ["QueryError", "TapLimits", "TapService"]

_LOG = logging.getLogger(__name__)
SYNC_STANDARD_ID = "ivo://ivoa.net/std/TAP#sync-1.0"


class QueryError(Exception):
    """A query failed; the message is the one line of the TAP error document."""


@dataclasses.dataclass(frozen=True)
class TapLimits:
    """Row and time limits of the service."""

    maxrec_default: int = 10000
    maxrec_limit: int = 1000000
    statement_timeout: float = 60.0
    """Seconds a query may run."""
    registry_refresh: float = 60.0
    """Seconds a table registry is reused before the database is looked at again."""


class TapService:
    """Sync TAP queries over one PostgreSQL (pg_sphere) database.

    Lifetime: the server's; `close` disposes of the connection pool. Thread-safe: each query
    takes its own connection; the table registry is replaced atomically.

    Parameters
    ----------
    url : `str`
        SQLAlchemy URL of the PPDB database.
    limits : `TapLimits`, optional
        MAXREC default and cap, statement timeout.
    obscore_schema, obscore_table : `str`, optional
        SQL name of the ObsCore table.
    """

    def __init__(self, url: str, limits: TapLimits | None = None, *, obscore_schema: str = "ivoa",
                 obscore_table: str = "obscore"):
        self.limits = limits or TapLimits()
        self._engine = sa.create_engine(url, pool_pre_ping=True)
        self._obscore = (obscore_schema, obscore_table)
        self._lock = threading.Lock()
        self._registry: tuple[float, Registry, dict[int, str]] | None = None

    def close(self) -> None:
        self._engine.dispose()

    def registry(self) -> tuple[Registry, dict[int, str]]:
        """The served tables and the OIDs of pg_sphere's types (looked up again after a while).

        Raises
        ------
        QueryError
            Raised if the database cannot be reached.
        """
        cached = self._registry
        if cached is not None and time.monotonic() - cached[0] < self.limits.registry_refresh:
            return cached[1], cached[2]
        try:
            registry = load_registry(self._engine, obscore_schema=self._obscore[0],
                                     obscore_table=self._obscore[1])
            with self._engine.connect() as conn:
                oids = {int(oid): name for oid, name in conn.execute(sa.text(
                    "SELECT oid, typname FROM pg_type WHERE typname IN ('spoly', 'spoint', 'scircle')"))}
        except sa.exc.SQLAlchemyError as exc:
            raise QueryError(f"database unavailable: {first_line(exc)}") from None
        with self._lock:
            self._registry = (time.monotonic(), registry, oids)
        return registry, oids

    def available(self) -> tuple[bool, str]:
        """Whether the database answers, and a note."""
        try:
            with self._engine.connect() as conn:
                conn.execute(sa.text("SELECT 1"))
        except sa.exc.SQLAlchemyError as exc:
            return False, f"database unavailable: {first_line(exc)}"
        return True, "database reachable"

    def parse_maxrec(self, text: str | None) -> int:
        """MAXREC as given (or the default), capped at the limit.

        Raises
        ------
        QueryError
            Raised if it is not an integer >= 0.
        """
        if text is None:
            return self.limits.maxrec_default
        try:
            value = int(text)
        except ValueError:
            raise QueryError(f"MAXREC: {text!r} is not an integer") from None
        if value < 0:
            raise QueryError(f"MAXREC: {value} is negative")
        return min(value, self.limits.maxrec_limit)

    def query(self, adql: str, maxrec: int, access_url: str) -> bytes:
        """Run one query; the result VOTable, or the error VOTable (never raises for bad input).

        Parameters
        ----------
        adql : `str`
            The ADQL query.
        maxrec : `int`
            Rows to return at most (`parse_maxrec`).
        access_url : `str`
            The ``/sync`` URL, for the reproducible-query descriptor.
        """
        try:
            return self._query(adql, maxrec, access_url)
        except QueryError as exc:
            return error_votable(str(exc))
        except AdqlError as exc:
            return error_votable(str(exc))
        except Exception as exc:  # a bug must still answer with a TAP error, never a traceback
            _LOG.exception("TAP query %r failed", adql)
            line = (str(exc).strip().splitlines() or [""])[0]
            return error_votable(f"internal error: {type(exc).__name__}: {line}")

    def _query(self, adql: str, maxrec: int, access_url: str) -> bytes:
        registry, sphere_oids = self.registry()
        parsed = parse_adql(adql, registry)
        timeout_ms = max(1, int(self.limits.statement_timeout * 1000))
        try:
            with self._engine.connect() as conn:
                # one snapshot for T and the rows; read only whatever the SQL says
                conn.exec_driver_sql("SET TRANSACTION ISOLATION LEVEL REPEATABLE READ, READ ONLY")
                conn.exec_driver_sql(f"SET LOCAL statement_timeout = {timeout_ms}")
                if sphere_oids:
                    conn.exec_driver_sql("SELECT set_sphere_output('RAD')")
                pinned_tables = any(r.table.schema == "ppdb" for r in parsed.tables)
                now = current_validity_time(conn, registry) if pinned_tables else None
                pinned = pin_query(parsed, now)
                sql = to_sql(parsed, pinned.sql_refs)
                _LOG.debug("ADQL %r -> SQL %r", adql, sql)
                # the driver's own server-side cursor, without parameters: SQLAlchemy would hand
                # psycopg2 an empty parameter dict, and a '%' in the query (LIKE) would break it
                dbapi: Any = conn.connection.dbapi_connection
                cursor = dbapi.cursor(name="tap_query")
                cursor.itersize = 1000
                cursor.execute(sql)
                rows = [tuple(r) for r in cursor.fetchmany(maxrec + 1)]
                description = cursor.description
                cursor.close()
                conn.rollback()
        except AdqlError:
            raise
        except psycopg2.errors.QueryCanceled:
            raise QueryError(f"query took longer than {self.limits.statement_timeout:g} s") from None
        except (sa.exc.OperationalError, psycopg2.OperationalError) as exc:
            text = first_line(exc)
            if "statement timeout" in text:  # in a statement run through SQLAlchemy
                raise QueryError(f"query took longer than {self.limits.statement_timeout:g} s") from None
            raise QueryError(f"database unavailable: {text}") from None
        except (sa.exc.SQLAlchemyError, psycopg2.Error) as exc:
            raise QueryError(f"query failed: {first_line(exc)}") from None
        if description is None:
            raise QueryError("the query returned no table")
        overflow = len(rows) > maxrec
        rows = rows[:maxrec]
        described = {c.name.lower(): c for t in (r.table for r in parsed.tables) for c in t.columns}
        columns = []
        for d in description:
            oid: int = d[1]  # psycopg2: type_code is the type's OID
            columns.append(ResultColumn(d[0], sphere_oids.get(oid, oid), described.get(d[0].lower())))
        validity = None
        descriptor = None
        if pinned.validity_mjd_tai is not None:
            validity = (pinned.validity_mjd_tai, mjd_tai_to_iso_utc(pinned.validity_mjd_tai))
            descriptor = {"accessURL": access_url, "standardID": SYNC_STANDARD_ID, "REQUEST": "doQuery",
                          "LANG": "ADQL", "QUERY": pinned.adql}
        return result_votable(columns, rows, query=adql, overflow=overflow, validity=validity,
                              descriptor=descriptor)
