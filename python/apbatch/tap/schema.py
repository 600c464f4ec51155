"""The tables the TAP service serves: a registry of TAP names -> SQL names and column metadata.

Served tables, when present in the database:

- ``ppdb.DiaObject``, ``ppdb.DiaSource``, ``ppdb.DiaForcedSource``: the PPDB tables that
  dax_ppdb makes (quoted camelCase names, in the database's default schema); descriptions,
  units and UCDs from lsst-sdm-schemas' ``apdb.yaml`` (the schema dax_ppdb creates them from);
- ``ivoa.ObsCore``: SQL ``ivoa.obscore`` (lowercase columns, ``s_region`` a pg_sphere ``spoly``),
  metadata from ``ivoa_obscore.yaml``; reflected, so only the columns the table has are served.

`Registry.tableset_xml` is the VOSI ``/tables`` document. `create_indexes` makes the spatial
(GiST) and time indexes the service relies on (``apbatch tap init``).
"""

from __future__ import annotations

import dataclasses
import functools
import importlib.resources
import warnings
from collections.abc import Iterable
from typing import Any
from xml.etree import ElementTree as ET

import sqlalchemy as sa
import yaml

__all__ = ["PINNED_TABLES", "TapColumn", "TapTable", "Registry", "create_indexes", "load_registry",
           "quote_ident"]

PPDB_SCHEMA = "ppdb"
DIA_TABLES = ("DiaObject", "DiaSource", "DiaForcedSource")
PINNED_TABLES = DIA_TABLES
"""Tables whose rows the service pins to a validity time (`apbatch.tap.validity`)."""

_FELIS_TO_VOTABLE = {"long": "long", "int": "int", "short": "short", "byte": "unsignedByte",
                     "double": "double", "float": "float", "boolean": "boolean", "string": "char",
                     "char": "char", "text": "char", "unicode": "unicodeChar", "timestamp": "char",
                     "binary": "unsignedByte"}


def quote_ident(name: str) -> str:
    """A PostgreSQL delimited identifier."""
    return '"' + name.replace('"', '""') + '"'


@dataclasses.dataclass(frozen=True)
class TapColumn:
    """One served column: its name (TAP and SQL alike) and VOTable metadata."""

    name: str
    datatype: str
    arraysize: str | None = None
    xtype: str | None = None
    unit: str | None = None
    ucd: str | None = None
    description: str = ""


@dataclasses.dataclass(frozen=True)
class TapTable:
    """One served table: TAP ``schema.name``, where it is in SQL, and its columns."""

    schema: str
    name: str
    sql_schema: str
    sql_name: str
    description: str
    columns: tuple[TapColumn, ...]

    @property
    def tap_name(self) -> str:
        return f"{self.schema}.{self.name}"

    @property
    def sql(self) -> str:
        """The quoted SQL ``schema.table``."""
        return f"{quote_ident(self.sql_schema)}.{quote_ident(self.sql_name)}"

    def column(self, name: str) -> TapColumn | None:
        """The column called ``name`` (case-insensitive), or `None`."""
        low = name.lower()
        return next((c for c in self.columns if c.name.lower() == low), None)


class Registry:
    """The served tables, looked up case-insensitively by TAP name.

    Immutable after construction; safe to share between request threads.
    """

    def __init__(self, tables: Iterable[TapTable]):
        self.tables = tuple(tables)

    def find(self, schema: str | None, name: str) -> TapTable | None:
        """The table ``schema.name`` (``schema`` `None`: any schema, if the name is unique)."""
        hits = [t for t in self.tables if t.name.lower() == name.lower()
                and (schema is None or t.schema.lower() == schema.lower())]
        return hits[0] if len(hits) == 1 else None

    def names(self) -> list[str]:
        return [t.tap_name for t in self.tables]

    def tableset_xml(self) -> bytes:
        """The VOSI tableset (``GET /tables``): schemas, tables, columns with their metadata."""
        vosi = "http://www.ivoa.net/xml/VOSITables/v1.0"
        vs = "http://www.ivoa.net/xml/VODataService/v1.1"
        xsi = "http://www.w3.org/2001/XMLSchema-instance"
        ET.register_namespace("vosi", vosi)
        ET.register_namespace("vs", vs)
        ET.register_namespace("xsi", xsi)
        root = ET.Element(f"{{{vosi}}}tableset")
        for schema in dict.fromkeys(t.schema for t in self.tables):
            s = ET.SubElement(root, "schema")
            ET.SubElement(s, "name").text = schema
            for table in (t for t in self.tables if t.schema == schema):
                t_el = ET.SubElement(s, "table", type="table")
                ET.SubElement(t_el, "name").text = table.tap_name
                ET.SubElement(t_el, "description").text = table.description
                for col in table.columns:
                    c = ET.SubElement(t_el, "column")
                    ET.SubElement(c, "name").text = col.name
                    ET.SubElement(c, "description").text = col.description
                    if col.unit:
                        ET.SubElement(c, "unit").text = col.unit
                    if col.ucd:
                        ET.SubElement(c, "ucd").text = col.ucd
                    attrs = {f"{{{xsi}}}type": "vs:VOTableType"}
                    if col.arraysize:
                        attrs["arraysize"] = col.arraysize
                    if col.xtype:
                        attrs["extendedType"] = col.xtype
                    ET.SubElement(c, "dataType", attrs).text = col.datatype
        return ET.tostring(root, xml_declaration=True, encoding="UTF-8")


@functools.cache
def _felis_tables(filename: str) -> dict[str, dict[str, Any]]:
    """Table name -> felis table dict from an lsst-sdm-schemas yaml (cached: files never change)."""
    doc = yaml.safe_load(importlib.resources.files("lsst.sdm.schemas").joinpath(filename).read_text())
    return {t["name"]: t for t in doc["tables"]}


def _felis_column(col: dict[str, Any]) -> TapColumn:
    datatype = _FELIS_TO_VOTABLE.get(col.get("datatype", "string"), "char")
    xtype = col.get("votable:xtype") or ("timestamp" if col.get("datatype") == "timestamp" else None)
    return TapColumn(name=col["name"], datatype=datatype,
                     arraysize="*" if datatype in ("char", "unicodeChar") else None, xtype=xtype,
                     unit=col.get("ivoa:unit") or col.get("fits:tunit"), ucd=col.get("ivoa:ucd"),
                     description=" ".join(str(col.get("description", "")).split()))


def _table(schema: str, name: str, sql_schema: str, sql_name: str, felis: dict[str, Any] | None,
           sql_columns: list[str]) -> TapTable:
    """A served table: the SQL table's columns, in SQL order, described by felis where it can."""
    described = {c["name"].lower(): c for c in (felis or {}).get("columns", [])}
    columns = []
    for name_ in sql_columns:
        col = described.get(name_.lower())
        tap_col = _felis_column(col) if col else TapColumn(name=name_, datatype="char", arraysize="*")
        if tap_col.name != name_:
            tap_col = dataclasses.replace(tap_col, name=name_)
        if sql_schema == "ivoa" and name_ == "s_region":  # pg_sphere spoly, served as a DALI polygon
            tap_col = dataclasses.replace(tap_col, datatype="double", arraysize="*", xtype="polygon",
                                          unit="deg")
        columns.append(tap_col)
    description = " ".join(str((felis or {}).get("description", "")).split())
    return TapTable(schema, name, sql_schema, sql_name, description, tuple(columns))


def load_registry(engine: sa.engine.Engine, *, obscore_schema: str = "ivoa",
                  obscore_table: str = "obscore") -> Registry:
    """Find the served tables in the database.

    Parameters
    ----------
    engine : `sqlalchemy.engine.Engine`
        The PPDB database (PostgreSQL).
    obscore_schema, obscore_table : `str`, optional
        SQL schema and name of the ObsCore table (served as ``ivoa.ObsCore`` if it exists).

    Returns
    -------
    registry : `Registry`
        The Dia tables present in the default schema, and ObsCore if present.

    Raises
    ------
    sqlalchemy.exc.OperationalError
        Raised if the database cannot be reached.
    """
    inspector = sa.inspect(engine)
    default_schema = inspector.default_schema_name or "public"
    present = set(inspector.get_table_names())
    apdb = _felis_tables("apdb.yaml")
    tables = []
    for name in DIA_TABLES:
        if name in present:
            cols = [c["name"] for c in inspector.get_columns(name)]
            tables.append(_table(PPDB_SCHEMA, name, default_schema, name, apdb.get(name), cols))
    has_obscore = (obscore_schema in inspector.get_schema_names()
                   and obscore_table in inspector.get_table_names(schema=obscore_schema))
    if has_obscore:
        with warnings.catch_warnings():  # SQLAlchemy does not know pg_sphere's spoly: fine, names only
            warnings.simplefilter("ignore", sa.exc.SAWarning)
            cols = [c["name"] for c in inspector.get_columns(obscore_table, schema=obscore_schema)]
        tables.append(_table("ivoa", "ObsCore", obscore_schema, obscore_table,
                             _felis_tables("ivoa_obscore.yaml").get("ObsCore"), cols))
    return Registry(tables)


INDEXES = {
    "DiaSource": ["midpointMjdTai"],
    "DiaForcedSource": ["midpointMjdTai"],
    "DiaObject": ["validityStartMjdTai"],
}


def create_indexes(engine: sa.engine.Engine) -> list[str]:
    """Make the indexes the service relies on (idempotent); return the names of those created.

    Per Dia table, a GiST index on ``spoint(radians(ra), radians(dec))`` (the expression the ADQL
    translation of ``POINT('ICRS', ra, dec)`` produces, so ``CONTAINS`` cone searches use it) and
    a btree index on its time column (the validity time is a ``max`` of those).
    """
    created = []
    with engine.begin() as conn:
        present = set(sa.inspect(conn).get_table_names())
        for table, time_columns in INDEXES.items():
            if table not in present:
                continue
            statements = {f"{table}_tap_spoint": (
                f"USING gist (spoint(radians({quote_ident('ra')}), radians({quote_ident('dec')})))")}
            for col in time_columns:
                statements[f"{table}_tap_{col}"] = f"({quote_ident(col)})"
            for name, spec in statements.items():
                exists = conn.execute(sa.text("SELECT to_regclass(:n)"), {"n": quote_ident(name)}).scalar()
                if exists is None:
                    conn.execute(sa.text(f"CREATE INDEX {quote_ident(name)} ON {quote_ident(table)} {spec}"))
                    created.append(name)
            conn.execute(sa.text(f"ANALYZE {quote_ident(table)}"))
    return created
