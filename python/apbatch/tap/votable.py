"""VOTable documents of the TAP service: query results and errors (astropy.io.votable).

A result holds one ``RESOURCE type="results"`` with the INFOs ``QUERY_STATUS`` (``OK``, or
``OVERFLOW`` when MAXREC cut the rows), ``QUERY`` (the ADQL as received), and for a query on
the Dia tables ``validity_mjd_tai`` / ``validity_utc`` (T, `apbatch.tap.validity`), then a
``RESOURCE type="meta" utype="adhoc:service" ID="reproducible"`` descriptor whose PARAMs
``accessURL``, ``standardID``, ``LANG`` and ``QUERY`` (the pinned ADQL) rerun the query as of T.

Column types come from PostgreSQL's type of each result column; descriptions, units and UCDs
from the served table's column of the same name. pg_sphere values are DALI geometry in degrees:
``spoly`` -> ``xtype="polygon"``, ``spoint`` -> ``point``, ``scircle`` -> ``circle``.
"""

from __future__ import annotations

import dataclasses
import datetime
import io
import math
import re
from collections.abc import Sequence
from typing import Any
from xml.sax.saxutils import escape as xml_escape

import numpy as np
from astropy.io.votable.tree import Field, Info, Param, Resource, TableElement, VOTableFile

from .schema import TapColumn

__all__ = ["ResultColumn", "error_votable", "result_votable"]

_PG_TYPES = {16: ("boolean", None), 20: ("long", None), 21: ("short", None), 23: ("int", None),
             700: ("float", None), 701: ("double", None), 1700: ("double", None)}
_NUMPY = {"boolean": np.bool_, "long": np.int64, "short": np.int16, "int": np.int32, "float": np.float32,
          "double": np.float64}
_PAIR = re.compile(r"\(\s*([-+\deE.]+)\s*(?:d|rad)?\s*,\s*([-+\deE.]+)\s*(?:d|rad)?\s*\)")


@dataclasses.dataclass(frozen=True)
class ResultColumn:
    """A result column: its name, PostgreSQL type (OID or pg_sphere type name), metadata."""

    name: str
    pg_type: int | str
    meta: TapColumn | None = None


def _sphere_degrees(text: str) -> list[float]:
    """The (lon, lat) pairs of a pg_sphere value printed in radians, in degrees, flattened."""
    return [math.degrees(float(v)) for pair in _PAIR.findall(text) for v in pair]


def _convert(values: list[Any], kind: int | str) -> tuple[dict[str, Any], np.ndarray, np.ndarray]:
    """Field attributes, a column array and its mask for one result column."""
    mask = np.array([v is None for v in values], dtype=bool)
    array: np.ndarray
    if kind in _PG_TYPES:
        datatype = _PG_TYPES[kind][0]
        dtype = _NUMPY[datatype]
        filler: Any = False if datatype == "boolean" else 0
        array = np.array([filler if v is None else v for v in values], dtype=dtype)
        if datatype in ("float", "double"):
            mask = np.zeros(len(values), dtype=bool)  # NULL is NaN
            array = np.array([np.nan if v is None else v for v in values], dtype=dtype)
        return {"datatype": datatype}, array, mask
    if kind in ("spoly", "spoint", "scircle"):
        xtype = {"spoly": "polygon", "spoint": "point", "scircle": "circle"}[kind]
        geometry: list[np.ndarray] = []
        for v in values:
            coords = [] if v is None else _sphere_degrees(str(v))
            if kind == "scircle" and v is not None:
                coords.append(math.degrees(float(str(v).rsplit(",", 1)[1].strip(" >"))))
            geometry.append(np.array(coords, dtype=np.float64))
        attrs = {"datatype": "double", "arraysize": {"spoly": "*", "spoint": "2", "scircle": "3"}[kind],
                 "xtype": xtype, "unit": "deg"}
        if kind == "spoly":
            array = np.empty(len(values), dtype=object)
            array[:] = geometry
        else:
            n = 2 if kind == "spoint" else 3
            array = np.array([c if len(c) == n else np.zeros(n) for c in geometry], dtype=np.float64)
        return attrs, array, mask
    attrs = {"datatype": "unicodeChar", "arraysize": "*"}
    text = []
    for v in values:
        if isinstance(v, datetime.datetime):
            attrs["xtype"] = "timestamp"
            v = (v.astimezone(datetime.UTC).replace(tzinfo=None) if v.tzinfo else v).isoformat()
        text.append("" if v is None else str(v))
    array = np.empty(len(values), dtype=object)
    array[:] = text
    return attrs, array, mask


def _unique(names: Sequence[str]) -> list[str]:
    seen: dict[str, int] = {}
    out = []
    for name in names:
        n = seen.get(name.lower(), 0)
        seen[name.lower()] = n + 1
        out.append(name if n == 0 else f"{name}_{n + 1}")
    return out


def _to_bytes(vot: VOTableFile) -> bytes:
    stream = io.BytesIO()
    vot.to_xml(stream)
    return stream.getvalue()


def result_votable(columns: Sequence[ResultColumn], rows: Sequence[Sequence[Any]], *, query: str,
                   overflow: bool, validity: tuple[float, str] | None = None,
                   descriptor: dict[str, str] | None = None) -> bytes:
    """The result document of a query.

    Parameters
    ----------
    columns : `~collections.abc.Sequence` [`ResultColumn`]
        The result's columns, in order.
    rows : `~collections.abc.Sequence` [`~collections.abc.Sequence`]
        The rows, as the database driver returned them.
    query : `str`
        The ADQL as received (``INFO name="QUERY"``).
    overflow : `bool`
        MAXREC cut the rows (``QUERY_STATUS`` ``OVERFLOW``).
    validity : `tuple` [`float`, `str`], optional
        T in MJD TAI and ISO UTC; `None` for a query without Dia tables.
    descriptor : `dict` [`str`, `str`], optional
        PARAMs of the ``adhoc:service`` descriptor (``accessURL``, ``QUERY``...).

    Returns
    -------
    document : `bytes`
        The VOTable (TABLEDATA).
    """
    vot = VOTableFile(version="1.4")
    res = Resource(type="results")
    vot.resources.append(res)
    # one QUERY_STATUS (astropy writes a resource's INFOs before its table; pyvo reads the first)
    res.infos.append(Info(name="QUERY_STATUS", value="OVERFLOW" if overflow else "OK"))
    res.infos.append(Info(name="QUERY", value=" ".join(query.split())))
    if validity is not None:
        info = Info(name="validity_mjd_tai", value=repr(validity[0]))
        info.content = ("rows as valid at this time (MJD TAI); the adhoc:service descriptor "
                        "'reproducible' reruns the query as of it")
        res.infos.append(info)
        res.infos.append(Info(name="validity_utc", value=validity[1]))
    table = TableElement(vot, name="result")
    res.tables.append(table)
    names = _unique([c.name for c in columns])
    converted: list[tuple[np.ndarray, np.ndarray]] = []
    for col, name in zip(columns, names, strict=True):
        attrs, array, mask = _convert([r[len(converted)] for r in rows], col.pg_type)
        meta = col.meta
        if meta is not None:
            attrs.setdefault("unit", meta.unit)
            attrs.update({k: v for k, v in (("ucd", meta.ucd),) if v})
        field = Field(vot, name=name, ID=None, **{k: v for k, v in attrs.items() if v is not None})
        if meta is not None and meta.description:
            field.description = meta.description
        table.fields.append(field)
        converted.append((array, mask))
    table.create_arrays(len(rows))
    for name, (array, mask) in zip(names, converted, strict=True):
        if len(rows):
            table.array[name] = array
            table.array.mask[name] = mask if array.ndim == 1 else mask[:, None]
    placeholders = {}
    if descriptor:
        meta_res = Resource(type="meta", utype="adhoc:service", ID="reproducible")
        for n, (key, value) in enumerate(descriptor.items()):
            # astropy 8 escapes a char PARAM's value twice ('<' -> '&amp;lt;') and reads it back
            # unescaped once: write a placeholder and put the value in escaped once
            placeholders[f"apbatch-param-{n}-placeholder"] = value
            meta_res.params.append(Param(vot, name=key, datatype="char", arraysize="*",
                                         value=f"apbatch-param-{n}-placeholder"))
        vot.resources.append(meta_res)
    document = _to_bytes(vot)
    for placeholder, value in placeholders.items():
        escaped = xml_escape(value, {'"': "&quot;", "\n": "&#10;", "\r": "&#13;", "\t": "&#9;"})
        document = document.replace(placeholder.encode(), escaped.encode())
    return document


def error_votable(message: str) -> bytes:
    """The TAP error document: ``INFO name="QUERY_STATUS" value="ERROR"`` holding ``message`` (one line)."""
    vot = VOTableFile(version="1.4")
    res = Resource(type="results")
    vot.resources.append(res)
    info = Info(name="QUERY_STATUS", value="ERROR")
    info.content = " ".join(message.split())
    res.infos.append(info)
    return _to_bytes(vot)
