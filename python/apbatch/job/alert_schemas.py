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
def _shipped_paths() -> dict[str, Path]:
    """The file of every alert schema the installed lsst-alert-packet ships, by ``"major.minor"``,
    oldest first (a directory listing: a job loads only the schema it writes)."""
    from lsst.alert.packet import get_schema_root

    out = {}
    for path in Path(get_schema_root()).glob("*/*/lsst.v*_*.alert.avsc"):
        major, minor = path.parent.parent.name, path.parent.name
        if major.isdigit() and minor.isdigit():
            out[f"{int(major)}.{int(minor)}"] = path
    return dict(sorted(out.items(), key=lambda kv: tuple(map(int, kv[0].split(".")))))


@functools.cache
def _load(version: str) -> Schema:
    """The shipped schema ``version`` (parsing one costs ~30 ms; all of them, half a second)."""
    from lsst.alert.packet import Schema

    return Schema.from_file(str(_shipped_paths()[version]))


@functools.cache
def _apdb_columns() -> dict[str, frozenset[str]]:
    """Columns of the APDB tables (``lsst-sdm-schemas`` ``apdb.yaml``): what apbatch's rows can hold."""
    import lsst.sdm.schemas
    import yaml

    text = (Path(lsst.sdm.schemas.__file__).parent / "apdb.yaml").read_text()
    loader = getattr(yaml, "CSafeLoader", yaml.SafeLoader)  # libyaml: 0.015 s instead of 0.16 s
    tables = yaml.load(text, Loader=loader)["tables"]
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
    return [v for v in _shipped_paths() if not _unfillable(_load(v))]


def alert_schema(version: str | None = None) -> Schema:
    """The `lsst.alert.packet.Schema` of ``version`` (``"11.0"``); default: the newest shipped.

    Raises
    ------
    BadInputError
        Raised if the version is not shipped, or requires fields apbatch does not produce;
        the message names ``alerts.schema_version`` and the versions available.
    """
    shipped = _shipped_paths()
    if version is None:
        version = next(reversed(shipped))
    key = str(version).strip()
    if key not in shipped:
        raise BadInputError("alerts.schema_version", f"no alert schema {version!r} in lsst-alert-packet",
                            f"use one of {', '.join(schema_versions())}")
    schema = _load(key)
    missing = _unfillable(schema)
    if missing:
        raise BadInputError("alerts.schema_version", f"schema {version} requires fields apbatch does not "
                            f"produce ({', '.join(missing[:4])}{', ...' if len(missing) > 4 else ''})",
                            f"use one of {', '.join(schema_versions())}")
    return schema


def schema_by_id(schema_id: int) -> Schema:
    """The shipped schema whose id (``major*100 + minor``, as in the framing) is ``schema_id``.

    Raises
    ------
    KeyError
        Raised if no shipped schema has that id.
    """
    for version in _shipped_paths():
        schema = _load(version)
        if int(schema.get_schema_id()) == int(schema_id):
            return schema
    raise KeyError(f"no shipped alert schema has id {schema_id}")
