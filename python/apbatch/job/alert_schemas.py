"""Which alert schema versions apbatch can write, and how to pick one.

The schemas are the ones the installed ``lsst-alert-packet`` ships. A version is writable when
every field it requires (non-null, without a default) is one apbatch fills: a top-level field of
:data:`ALERT_FIELDS`, or an APDB column (``lsst-sdm-schemas`` ``apdb.yaml``) of the DiaSource,
DiaForcedSource and DiaObject records. :func:`alert_schema` gives the schema
``alerts.schema_version`` names, :func:`schema_by_id` the one a framed packet's id names.
"""

from __future__ import annotations

import functools
from pathlib import Path
from typing import TYPE_CHECKING, Any

from ..errors import BadInputError
from .alert_avro import record_schema

if TYPE_CHECKING:
    from lsst.alert.packet import Schema

__all__ = ["ALERT_FIELDS", "alert_schema", "schema_by_id", "schema_versions"]

ALERT_FIELDS = ("diaSourceId", "alertId", "diaSource", "prvDiaSources", "prvDiaForcedSources", "diaObject",
                "cutoutDifference", "cutoutScience", "cutoutTemplate")
"""Top-level alert fields apbatch fills (``alertId``, of schemas before 8.0, is the diaSourceId);
the others a schema has (``ssSource``, ``observation_reason``, ...) are written as null."""

_ROWS = {"diaSource": "DiaSource", "diaObject": "DiaObject", "prvDiaForcedSources": "DiaForcedSource"}


@functools.cache
def _shipped() -> dict[str, Schema]:
    """Every alert schema the installed lsst-alert-packet ships, by ``"major.minor"``."""
    from lsst.alert.packet import Schema, get_schema_root

    root = Path(get_schema_root())
    out = {}
    for path in root.glob("*/*/lsst.v*_*.alert.avsc"):
        major, minor = path.parent.parent.name, path.parent.name
        if major.isdigit() and minor.isdigit():
            out[f"{int(major)}.{int(minor)}"] = Schema.from_file(str(path))
    return dict(sorted(out.items(), key=lambda kv: tuple(map(int, kv[0].split(".")))))


@functools.cache
def _apdb_columns() -> dict[str, frozenset[str]]:
    """Columns of the APDB tables (``lsst-sdm-schemas`` ``apdb.yaml``): what apbatch's rows can hold."""
    import lsst.sdm.schemas
    import yaml

    text = (Path(lsst.sdm.schemas.__file__).parent / "apdb.yaml").read_text()
    tables = yaml.safe_load(text)["tables"]
    return {t["name"]: frozenset(c["name"] for c in t["columns"]) for t in tables}


def _required(record: dict[str, Any]) -> list[str]:
    """Names of the fields of ``record`` that are neither nullable nor defaulted."""
    return [f["name"] for f in record["fields"]
            if not (isinstance(f["type"], list) and "null" in f["type"]) and "default" not in f]


def _unfillable(schema: Schema) -> list[str]:
    """Required (non-null, no default) fields of ``schema`` that apbatch does not produce."""
    out = [f for f in _required(schema.definition) if f not in ALERT_FIELDS]
    columns = _apdb_columns()
    for name, table in _ROWS.items():
        rec = record_schema(schema.definition, name)
        out += [f"{name}.{f}" for f in _required(rec) if f not in columns.get(table, ())]
    return out


def schema_versions() -> list[str]:
    """Alert schema versions (``"major.minor"``) apbatch can write: shipped by the installed
    lsst-alert-packet, and every field they require is one apbatch fills; oldest first."""
    return [v for v, schema in _shipped().items() if not _unfillable(schema)]


def alert_schema(version: str | None = None) -> Schema:
    """The `lsst.alert.packet.Schema` of ``version`` (``"11.0"``); default: the newest shipped.

    Raises
    ------
    BadInputError
        Raised if the version is not shipped, or requires fields apbatch does not produce;
        the message names ``alerts.schema_version`` and the versions available.
    """
    shipped = _shipped()
    if version is None:
        version = next(reversed(shipped))
    fix = f"use one of {', '.join(schema_versions())}"
    schema = shipped.get(str(version).strip())
    if schema is None:
        raise BadInputError("alerts.schema_version", f"no alert schema {version!r} in lsst-alert-packet", fix)
    missing = _unfillable(schema)
    if missing:
        raise BadInputError("alerts.schema_version", f"schema {version} requires fields apbatch does not "
                            f"produce ({', '.join(missing[:4])}{', ...' if len(missing) > 4 else ''})", fix)
    return schema


def schema_by_id(schema_id: int) -> Schema:
    """The shipped schema whose id (``major*100 + minor``, as in the framing) is ``schema_id``.

    Raises
    ------
    KeyError
        Raised if no shipped schema has that id.
    """
    for schema in _shipped().values():
        if int(schema.get_schema_id()) == int(schema_id):
            return schema
    raise KeyError(f"no shipped alert schema has id {schema_id}")
