"""Vectorised Avro (binary, schemaless) encoding of DataFrame rows for flat record schemas.

The alert schema's DiaSource, DiaForcedSource and DiaObject records are flat: every field is
``int``, ``long``, ``float``, ``double``, ``boolean`` or ``string``, optionally in a union with
``null``. Avro encodes such a record as the concatenation of its fields: a union branch as the
zigzag varint of its index, ``int``/``long`` as zigzag varints, ``float``/``double`` as 4/8
little-endian bytes, ``boolean`` as one byte, ``string`` as a varint length and UTF-8 bytes.
:class:`RecordEncoder` builds every field of every row at once with numpy (fixed-width byte
matrices, one numpy pass per field type, plus the number of bytes each row uses) and keeps the
used bytes in row order, which gives all rows' encodings back to back in one buffer.

:func:`alert_encoders` gives the encoders of the alert schema's three row types when the
schema has the layout (11.x) that ``alerts.AlertBuilder`` assembles from pieces. Which schema
version is written, and which ones can be, is `alert_schemas`' business.

The output is byte-identical to ``fastavro.schemaless_writer`` of the dicts that
:func:`records_of` makes (NaN/NA -> ``None``). Columns that fastavro would reject or treat
specially (nulls in a non-nullable field, floats in an integer field, booleans in a number
field, out-of-range ints, non-string objects in a string field) make
:meth:`RecordEncoder.encode` fall back to ``fastavro`` row by row, so errors stay fastavro's.
"""

from __future__ import annotations

import io
import warnings
from typing import Any

import fastavro
import numpy as np
import pandas as pd

__all__ = ["RecordEncoder", "UnsupportedError", "alert_encoders", "encoded_long", "record_schema",
           "records_of"]

_PRIMITIVES = {"int", "long", "float", "double", "boolean", "string"}


class UnsupportedError(ValueError):
    """A column the vectorised path does not encode (the caller falls back to fastavro)."""


def encoded_long(n: int) -> bytes:
    """Avro encoding of one ``long``/``int`` (zigzag varint)."""
    n = (n << 1) ^ (n >> 63)
    out = bytearray()
    while n > 0x7F:
        out.append((n & 0x7F) | 0x80)
        n >>= 7
    out.append(n)
    return bytes(out)


def _varints(values: np.ndarray, width: int) -> tuple[np.ndarray, np.ndarray]:
    """Zigzag varints of int64 ``values``: (n, width) bytes and the number used per row."""
    v = values.astype(np.int64)
    zz = ((v << 1) ^ (v >> 63)).view(np.uint64)
    shifts = (np.arange(width, dtype=np.uint64) * np.uint64(7))[None, :]
    groups = zz[:, None] >> shifts
    used = np.maximum((groups != 0).sum(axis=1), 1)
    out = (groups & np.uint64(0x7F)).astype(np.uint8)
    out[np.arange(width)[None, :] < (used - 1)[:, None]] |= 0x80
    return out, used


def records_of(df: pd.DataFrame, fields: list[str]) -> list[dict]:
    """DataFrame rows as Avro-ready dicts: schema fields only, NaN/NA -> None, Python scalars.

    Nullable integer columns (``Int64`` with NA, as the APDB returns them) stay ints.
    """
    n = len(df)
    if n == 0:
        return []
    columns = []
    for f in fields:
        if f not in df.columns:
            columns.append([None] * n)
            continue
        col = df[f]
        if not isinstance(col.dtype, np.dtype):  # extension dtype: to_numpy() turns Int64 with NA to float
            columns.append([None if v is None or v is pd.NA or v != v else v for v in col.tolist()])
        elif col.dtype.kind == "f":
            columns.append([v if v == v else None for v in col.to_numpy().tolist()])
        elif col.dtype.kind in "iub":
            columns.append(col.to_numpy().tolist())
        else:
            values = col.to_numpy().tolist()
            columns.append([None if v is None or v is pd.NA or v != v else v for v in values])
    return [dict(zip(fields, row, strict=False)) for row in zip(*columns, strict=False)]


def record_schema(schema: dict, name: str) -> dict:
    """The record schema of top-level field ``name`` (inside a null union and/or an array)."""
    for f in schema["fields"]:
        if f["name"] == name:
            t = f["type"]
            t = next(x for x in t if x != "null") if isinstance(t, list) else t
            return t["items"] if t.get("type") == "array" else t
    raise KeyError(name)


_LAYOUT = ("diaSourceId", "observation_reason", "target_name", "diaSource", "prvDiaSources",
           "prvDiaForcedSources", "diaObject", "ssSource", "mpc_orbits", "cutoutDifference", "cutoutScience",
           "cutoutTemplate")


def alert_encoders(schema: dict) -> tuple[RecordEncoder, RecordEncoder, RecordEncoder] | None:
    """DiaSource, DiaForcedSource and DiaObject encoders if ``schema`` has the alert layout that
    ``alerts.AlertBuilder.payloads`` assembles from pieces (11.x: null-first unions), else None."""
    fields = schema["fields"]
    if tuple(f["name"] for f in fields) != _LAYOUT or fields[0]["type"] != "long":
        return None
    if not all(isinstance(f["type"], list) and f["type"][0] == "null" and len(f["type"]) == 2
               for f in fields[1:3] + fields[4:]):
        return None
    src = fields[3]["type"]
    if (not isinstance(src, dict) or fields[4]["type"][1].get("type") != "array"
            or fields[4]["type"][1]["items"] not in (src, src.get("name"))
            or fields[5]["type"][1].get("type") != "array"
            or any(f["type"][1] != "bytes" for f in fields[9:])):
        return None
    try:
        return (RecordEncoder(src), RecordEncoder(record_schema(schema, "prvDiaForcedSources")),
                RecordEncoder(record_schema(schema, "diaObject")))
    except UnsupportedError:
        return None


class RecordEncoder:
    """Encodes DataFrame rows as one flat Avro record type.

    Parameters
    ----------
    record : `dict`
        The record schema (``{"type": "record", "fields": [...]}``), self-contained.

    Raises
    ------
    UnsupportedError
        Raised if a field is not a primitive or a union of ``null`` and one primitive.
    """

    def __init__(self, record: dict):
        # (name, primitive, null branch or None, value branch)
        self.fields: list[tuple[str, str, int | None, int]] = []
        for f in record["fields"]:
            t = f["type"]
            if isinstance(t, str) and t in _PRIMITIVES:
                self.fields.append((f["name"], t, None, 0))
            elif isinstance(t, list) and len(t) == 2 and "null" in t and all(isinstance(x, str) for x in t):
                prim = t[1 - t.index("null")]
                if prim not in _PRIMITIVES:
                    raise UnsupportedError(f"field {f['name']}: type {t}")
                self.fields.append((f["name"], prim, t.index("null"), 1 - t.index("null")))
            else:
                raise UnsupportedError(f"field {f['name']}: type {t}")
        self.names = [f[0] for f in self.fields]
        self._parsed = fastavro.parse_schema(record)

    def encode(self, df: pd.DataFrame) -> tuple[bytes, np.ndarray]:
        """All rows' encodings back to back and the row offsets (``len(df) + 1`` of them).

        Row ``i`` is ``buffer[offsets[i]:offsets[i + 1]]``.
        """
        try:
            return self._vectorised(df)
        except UnsupportedError:
            return self._fastavro(df)

    def rows(self, df: pd.DataFrame) -> list[bytes]:
        """Each row's encoding."""
        buf, off = self.encode(df)
        return [buf[a:b] for a, b in zip(off[:-1].tolist(), off[1:].tolist(), strict=True)]

    def _fastavro(self, df: pd.DataFrame) -> tuple[bytes, np.ndarray]:
        out, offsets = io.BytesIO(), [0]
        for rec in records_of(df, self.names):
            fastavro.schemaless_writer(out, self._parsed, rec)
            offsets.append(out.tell())
        return out.getvalue(), np.asarray(offsets, np.int64)

    def _vectorised(self, df: pd.DataFrame) -> tuple[bytes, np.ndarray]:
        n = len(df)
        if n == 0:
            return b"", np.zeros(1, np.int64)
        columns = _columns(df, self.names)
        pieces: dict[int, list] = {}  # field index -> [(bytes matrix, bytes used per row), ...]
        groups: dict[tuple[str, bool], list[int]] = {}
        for k, (name, prim, null_at, value_at) in enumerate(self.fields):
            data, null = columns.get(name, (None, np.ones(n, bool)))
            if null_at is None and null.any():
                raise UnsupportedError(f"{name}: null in a non-nullable field")
            if data is not None and not null.all():
                _check(name, prim, data)
            if prim == "string":  # rare: one field at a time
                pieces[k] = []
                if null_at is not None:
                    pieces[k].append((_branch(null, null_at, value_at)[:, None], np.ones(n)))
                if not null.all():
                    pieces[k] += [(b, np.where(null, 0, u)) for b, u in _strings(name, data, null)]
            else:
                groups.setdefault((prim, null_at is not None), []).append(k)
        absent = (None, np.ones(n, bool))
        for (prim, nullable), members in groups.items():  # one numpy pass per type, not per field
            null = np.stack([columns.get(self.names[k], absent)[1] for k in members], axis=1)
            data = [columns.get(self.names[k], absent)[0] for k in members]
            if prim == "int" and nullable:
                values = _stack(data, np.int64, 0, null)
                if ((values < -2**31) | (values >= 2**31)).any():
                    raise UnsupportedError(f"{[self.names[k] for k in members]}: value out of int range")
            block, nbytes = _encode_group(prim, data, null)
            if nullable:
                null_branch = np.array([self.fields[k][2] for k in members])[None, :]
                branch = _branch(null, null_branch, 1 - null_branch)
                block = np.concatenate([branch[:, :, None], block], axis=2)
                nbytes = np.where(null, 1, 1 + nbytes)
            for m, k in enumerate(members):
                pieces[k] = [(block[:, m, :], nbytes[:, m])]
        blocks = [piece for k in range(len(self.fields)) for piece in pieces[k]]
        widths = np.array([b.shape[1] for b, _ in blocks])
        matrix = np.concatenate([b for b, _ in blocks], axis=1)
        starts = np.cumsum(widths) - widths
        which = np.repeat(np.arange(len(blocks)), widths)  # block of each matrix column
        used = np.stack([u for _, u in blocks], axis=1)
        keep = (np.arange(matrix.shape[1]) - starts[which])[None, :] < used[:, which]
        offsets = np.zeros(n + 1, np.int64)
        np.cumsum(keep.sum(axis=1), out=offsets[1:])
        return matrix[keep].tobytes(), offsets


def _branch(null: np.ndarray, null_at, value_at) -> np.ndarray:
    """Union branch bytes: zigzag(index) is one byte for index 0/1."""
    return np.where(null, 2 * null_at, 2 * value_at).astype(np.uint8)


def _check(name: str, prim: str, data) -> None:
    """Refuse columns fastavro would reject or coerce (the caller then uses fastavro)."""
    kind = data.dtype.kind
    ok = {"double": "fiu", "float": "fiu", "int": "iu", "long": "iu", "boolean": "b"}.get(prim)
    if (ok is not None and kind not in ok) or (kind == "u" and data.dtype.itemsize == 8):  # uint64 > int64
        raise UnsupportedError(f"{name}: {data.dtype} for {prim}")


def _stack(data: list, dtype, fill, null: np.ndarray) -> np.ndarray:
    """(n, k) array of the columns ``data`` (None: all null) as ``dtype``, ``fill`` where null."""
    out = np.full(null.shape, fill, dtype)
    for m, d in enumerate(data):
        if d is not None and not null[:, m].all():
            out[:, m] = _as(d, dtype, fill)
    out[null] = fill
    return out


def _encode_group(prim: str, data: list, null: np.ndarray) -> tuple[np.ndarray, np.ndarray]:
    """(n, k, width) bytes and (n, k) bytes used of k columns of one primitive type."""
    n, k = null.shape
    if prim in ("double", "float"):
        with warnings.catch_warnings():
            warnings.simplefilter("ignore", RuntimeWarning)  # float overflow -> inf, like fastavro
            values = _stack(data, np.float64, 0.0, null).astype("<f8" if prim == "double" else "<f4")
        width = values.dtype.itemsize
        return values.view(np.uint8).reshape(n, k, width), np.where(null, 0, width)
    if prim in ("int", "long"):
        block, used = _varints(_stack(data, np.int64, 0, null).ravel(), 10)
        return block.reshape(n, k, 10), np.where(null, 0, used.reshape(n, k))
    return _stack(data, np.uint8, 0, null)[:, :, None], np.where(null, 0, 1)  # boolean


def _columns(df: pd.DataFrame, names: list[str]) -> dict[str, tuple]:
    """Per wanted column present: (numpy or pandas extension array, null mask).

    Numeric numpy columns come out of one 2-D array per dtype (one pandas call per dtype, not
    per column: the per-column pandas overhead dominates for a few dozen rows).
    """
    wanted = set(names)
    out: dict[str, tuple[Any, np.ndarray]] = {}
    by_dtype: dict[np.dtype, list[str]] = {}
    unique = df.columns.is_unique
    for name, dtype in zip(df.columns, df.dtypes, strict=True):
        if name not in wanted:
            continue
        if unique and isinstance(dtype, np.dtype) and dtype.kind in "fiub":
            by_dtype.setdefault(dtype, []).append(name)
            continue
        col = df[name]
        if isinstance(dtype, np.dtype):
            values = col.to_numpy()
            out[name] = values, pd.isna(values)
        else:
            values = col.array
            out[name] = values, np.asarray(values.isna(), bool)
    for dtype, group in by_dtype.items():
        block = df[group].to_numpy(dtype=dtype)
        nulls = np.isnan(block) if dtype.kind == "f" else np.zeros(block.shape, bool)
        for j, name in enumerate(group):
            out[name] = block[:, j], nulls[:, j]
    return out


def _as(data, dtype, fill) -> np.ndarray:
    if isinstance(data, np.ndarray):
        return data.astype(dtype)
    return data.to_numpy(dtype=dtype, na_value=fill)


def _strings(name: str, data, null: np.ndarray) -> list[tuple[np.ndarray, np.ndarray]]:
    """Varint lengths and UTF-8 bytes of a string column."""
    n = len(null)
    texts = _as(data, object, None)  # string: varint length, then UTF-8
    if not all(isinstance(t, str) for t, isnull in zip(texts, null, strict=True) if not isnull):
        raise UnsupportedError(f"{name}: non-string values for string")
    raw = [b"" if isnull else t.encode("utf-8") for t, isnull in zip(texts, null, strict=True)]
    sizes = np.fromiter(map(len, raw), np.int64, n)
    width = max(int(sizes.max()), 1)
    body = np.frombuffer(b"".join(r.ljust(width, b"\0") for r in raw), np.uint8).reshape(n, width)
    return [_varints(sizes, 10), (body, sizes)]
