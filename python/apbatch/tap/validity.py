"""Reproducible queries: every query runs "as of" a validity time T, and says so.

The validity time
-----------------
T (MJD TAI) is the newest time in the replicated data when the query runs: the greatest of
``max(DiaObject.validityStartMjdTai)``, ``max(DiaSource.midpointMjdTai)`` and
``max(DiaForcedSource.midpointMjdTai)`` (btree indexes from ``apbatch tap init`` make these
instant). An empty PPDB has T = 0 (nothing is valid yet).

The pins
--------
Every reference to a Dia table in a FROM clause is replaced by a derived table of the same name
(or the query's alias) that keeps only the rows valid at T:

- ``ppdb.DiaObject``: ``validityStartMjdTai <= T AND (validityEndMjdTai IS NULL OR
  validityEndMjdTai > T)`` -- the version of each object current at T. When a later visit
  updates an object, dax_ppdb closes the old version at the new visit's time (> T) and starts a
  new one after T, so the pinned query keeps returning the old version;
- ``ppdb.DiaSource`` and ``ppdb.DiaForcedSource``: ``midpointMjdTai <= T``: sources are never
  updated in the PPDB, and later visits only add rows after T.

The rewritten ADQL is returned in the result's service descriptor; running it again returns
the same rows. A query that already carries pins (such a rerun) keeps them: its T is theirs
(they must agree), and any Dia table it names without a pin gets the same T.

Limits (honest): rows that reach the PPDB *after* a query ran but carry times <= T break the
reproducibility of that query -- a CCD processed late (its chunk replicated late, see
`apbatch.products.ppdb`), a DiaObject whose later version has a visit time earlier than T, or
data deleted or reprocessed in the PPDB. ``ivoa.ObsCore`` is not pinned (ObsCore rows describe
released images; a rerun may see images released since).
"""

from __future__ import annotations

import dataclasses
import re
import warnings

import sqlalchemy as sa

from .adql import AdqlError, ParsedQuery
from .schema import PINNED_TABLES, Registry, TapTable, quote_ident

__all__ = ["Pinned", "current_validity_time", "mjd_tai_to_iso_utc", "pin_query", "pin_text"]

_NUM = r"([-+]?\d+(?:\.\d*)?(?:[eE][-+]?\d+)?)"
_PIN_CONDITIONS = {
    "DiaObject": ("validityStartMjdTai <= {t} AND (validityEndMjdTai IS NULL OR validityEndMjdTai > {t})"),
    "DiaSource": "midpointMjdTai <= {t}",
    "DiaForcedSource": "midpointMjdTai <= {t}",
}
_TIME_COLUMNS = {"DiaObject": "validityStartMjdTai", "DiaSource": "midpointMjdTai",
                 "DiaForcedSource": "midpointMjdTai"}


def pin_text(table: str, t: float) -> str:
    """The ADQL derived table that pins ``ppdb.<table>`` to ``t`` (without its alias)."""
    return f"(SELECT * FROM ppdb.{table} WHERE {_PIN_CONDITIONS[table].format(t=repr(float(t)))})"


def _pin_sql(table: TapTable, t: float) -> str:
    """`pin_text` with the quoted SQL names (what the service translates)."""
    condition = _PIN_CONDITIONS[table.name].format(t=repr(float(t)))
    condition = re.sub(r"\b(validityStartMjdTai|validityEndMjdTai|midpointMjdTai)\b",
                       lambda m: quote_ident(m.group(1)), condition)
    return f"(SELECT * FROM {table.sql} WHERE {condition})"


def _pin_pattern(table: str) -> re.Pattern[str]:
    """`pin_text` as a regular expression: any spacing and case, any number for T."""
    template = pin_text(table, 0.0).replace(repr(0.0), "\0")
    tokens = re.findall(r"\0|<=|[()*>]|[^\s()*<>]+", template)
    regex = r"\s*".join(_NUM if tok == "\0" else re.escape(tok) for tok in tokens)
    return re.compile(r"\A" + regex + r"\Z", re.IGNORECASE)


_PATTERNS = {t: _pin_pattern(t) for t in PINNED_TABLES}


@dataclasses.dataclass(frozen=True)
class Pinned:
    """A query pinned to a validity time."""

    adql: str
    """The rewritten ADQL (the input as is when it names no Dia table)."""
    validity_mjd_tai: float | None
    """T, or `None` when the query names no Dia table."""
    sql_refs: dict[int, str] = dataclasses.field(default_factory=dict)
    """The same pins with SQL names, by index of the table reference (for `~apbatch.tap.adql.to_sql`)."""


def current_validity_time(conn: sa.engine.Connection, registry: Registry) -> float:
    """T now: the newest replicated time in the served Dia tables (0.0 if they are empty)."""
    parts = []
    for name, column in _TIME_COLUMNS.items():
        table = registry.find("ppdb", name)
        if table is not None:
            parts.append(f"(SELECT max({quote_ident(column)}) FROM {table.sql})")
    if not parts:
        return 0.0
    value = conn.execute(sa.text(f"SELECT greatest({', '.join(parts)})")).scalar()
    return float(value) if value is not None else 0.0


def _enclosing_pin(parsed: ParsedQuery, ref_ctx: object, table: str) -> float | None:
    """T of the canonical pin ``ref_ctx`` sits in, or `None` if it is not in one."""
    ctx = getattr(ref_ctx, "parentCtx", None)
    while ctx is not None and type(ctx).__name__ != "Derived_tableContext":
        ctx = ctx.parentCtx
    if ctx is None:
        return None
    sub = ctx.table_subquery() if hasattr(ctx, "table_subquery") else ctx
    text = parsed.text[sub.start.start:sub.stop.stop + 1]
    match = _PATTERNS[table].match(text.strip())
    if match is None:
        return None
    values = {float(v) for v in match.groups()}
    return values.pop() if len(values) == 1 else None


def pin_query(parsed: ParsedQuery, now: float | None) -> Pinned:
    """Pin every Dia table of a parsed query to a validity time.

    Parameters
    ----------
    parsed : `~apbatch.tap.adql.ParsedQuery`
        The query.
    now : `float` or `None`
        T for a query without pins (`current_validity_time`); `None` is allowed only when the
        caller knows the query names no Dia table.

    Returns
    -------
    pinned : `Pinned`
        The rewritten ADQL and its T.

    Raises
    ------
    AdqlError
        Raised if the query's pins disagree on T, or it names a Dia table as a column qualifier
        with its schema (``ppdb.DiaObject.ra``: use the table name or an alias).
    """
    refs = [(n, r) for n, r in enumerate(parsed.tables)
            if r.table.schema == "ppdb" and r.table.name in PINNED_TABLES]
    if not refs:
        return Pinned(parsed.text, None)
    for _, ref in refs:
        if not ref.in_from:
            raise AdqlError("qualify columns with the table name or an alias, not "
                            f"{parsed.text[ref.start:ref.stop]!r}")
    existing = {n: _enclosing_pin(parsed, r.context, r.table.name) for n, r in refs}
    times = {t for t in existing.values() if t is not None}
    if len(times) > 1:
        raise AdqlError(f"the query pins different validity times: {sorted(times)}")
    t = times.pop() if times else now
    if t is None:
        raise AdqlError("no validity time")
    edits = []
    sql_refs = {}
    for n, ref in refs:
        if existing[n] is None:
            # without an alias the derived table takes the table's name, which is what a
            # qualifier naming the table maps to in SQL (`apbatch.tap.adql`)
            adql_alias = ref.alias or ref.table.name
            edits.append((ref.start, ref.ref_stop, f"{pin_text(ref.table.name, t)} AS {adql_alias}"))
            sql_alias = ref.alias or quote_ident(ref.table.sql_name)
            sql_refs[n] = f"{_pin_sql(ref.table, t)} AS {sql_alias}"
    text = parsed.text
    for start, stop, new in sorted(edits, reverse=True):
        text = text[:start] + new + text[stop:]
    return Pinned(text, t, sql_refs)


def mjd_tai_to_iso_utc(mjd_tai: float) -> str:
    """An MJD (TAI) as ISO 8601 UTC with milliseconds and a ``Z``."""
    from astropy.time import Time
    from erfa import ErfaWarning  # type: ignore[import-untyped]

    with warnings.catch_warnings():  # T = 0 (an empty PPDB) is in 1858: ERFA calls that dubious
        warnings.simplefilter("ignore", ErfaWarning)
        return Time(mjd_tai, format="mjd", scale="tai").utc.isot + "Z"
