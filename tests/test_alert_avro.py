"""Tests of apbatch.job.alert_avro: vectorised rows are byte-identical to fastavro's encoding."""

from __future__ import annotations

import io

import fastavro
import numpy as np
import pandas as pd
import pytest
from apbatch.job.alert_avro import (
    RecordEncoder,
    UnsupportedError,
    alert_encoders,
    encoded_long,
    record_schema,
    records_of,
)

SCHEMA = {"type": "record", "name": "t.row", "fields": [
    {"name": "id", "type": "long"},
    {"name": "n", "type": "int"},
    {"name": "x", "type": "double"},
    {"name": "f", "type": "float"},
    {"name": "ok", "type": "boolean"},
    {"name": "s", "type": "string"},
    {"name": "nid", "type": ["null", "long"]},
    {"name": "ni", "type": ["null", "int"]},
    {"name": "nd", "type": ["null", "double"]},
    {"name": "nf", "type": ["null", "float"]},
    {"name": "nb", "type": ["null", "boolean"]},
    {"name": "ns", "type": ["null", "string"]},
    {"name": "late", "type": ["double", "null"]},  # null second: branch indices swap
    {"name": "absent", "type": ["null", "float"]},  # no such column -> null
]}


def _fastavro(df: pd.DataFrame, schema: dict = SCHEMA) -> list[bytes]:
    parsed, out = fastavro.parse_schema(schema), []
    for rec in records_of(df, [f["name"] for f in schema["fields"]]):
        buf = io.BytesIO()
        fastavro.schemaless_writer(buf, parsed, rec)
        out.append(buf.getvalue())
    return out


def _masked(values: np.ndarray, nulls: np.ndarray) -> list:
    return [None if m else v for v, m in zip(values.tolist(), nulls.tolist(), strict=True)]


def _frame(n: int, rng: np.random.Generator) -> pd.DataFrame:
    big = np.array([0, -1, 1, 63, -64, 64, 2**31 - 1, -2**31, 2**62, -2**63, 2**63 - 1], np.int64)
    nulls = rng.random(n) < 0.3
    df = pd.DataFrame({
        "id": rng.choice(big, n), "n": rng.integers(-2**31, 2**31, n).astype(np.int32),
        "x": rng.normal(0, 1e10, n), "f": rng.normal(0, 1e3, n).astype(np.float32), "ok": rng.random(n) < 0.5,
        "s": rng.choice(["", "r", "ümlaut-ß", "x" * 200], n),
        "nid": pd.array(np.where(nulls, 0, rng.choice(big, n)), dtype="Int64"),
        "ni": pd.array(_masked(rng.integers(-1000, 1000, n), nulls), dtype="Int32"),
        "nd": np.where(nulls, np.nan, rng.normal(size=n)), "nf": np.where(rng.random(n) < 0.5, np.inf, 1e300),
        "nb": pd.array(_masked(rng.random(n) < 0.5, nulls), dtype="boolean"),
        "ns": pd.Series(_masked(rng.choice(["a", "bc", "€"], n), nulls), dtype=object),
        "late": np.where(nulls, np.nan, rng.normal(size=n)),
    })
    df.loc[df.index[:2], "nf"] = np.nan
    return df


@pytest.mark.parametrize("n", [1, 7, 300])
def test_rows_byte_identical_to_fastavro(n):
    df = _frame(n, np.random.default_rng(n))
    enc = RecordEncoder(SCHEMA)
    buf, off = enc._vectorised(df)  # the vectorised path itself, no fallback
    assert [buf[a:b] for a, b in zip(off[:-1], off[1:], strict=True)] == _fastavro(df)
    assert enc.rows(df) == _fastavro(df)
    assert enc.rows(df.iloc[::-1]) == _fastavro(df.iloc[::-1])  # non-default index order


def test_empty_frame():
    buf, off = RecordEncoder(SCHEMA).encode(_frame(3, np.random.default_rng(0)).iloc[:0])
    assert buf == b"" and off.tolist() == [0]


def test_encoded_long_matches_fastavro():
    parsed = fastavro.parse_schema("long")
    for v in (0, 1, -1, 63, 64, -65, 300, 2**31, -2**40, 2**63 - 1, -2**63):
        buf = io.BytesIO()
        fastavro.schemaless_writer(buf, parsed, v)
        assert encoded_long(v) == buf.getvalue()


@pytest.mark.parametrize("column,values", [
    ("nid", [5.0, 6.0, np.nan]),   # floats in a nullable long: fastavro rejects
    ("nd", [True, False, True]),  # booleans in a double: fastavro rejects
    ("x", [1.0, np.nan, 2.0]),    # null in a non-nullable field: fastavro rejects
    ("ni", [2**40, 1, 2]),        # out of int range in a union: fastavro rejects
    ("ns", ["a", 3, None]),       # not a string
])
def test_unencodable_columns_fail_as_fastavro_does(column, values):
    df = _frame(3, np.random.default_rng(1))
    df[column] = pd.Series(values, dtype=object if column == "ns" else None)
    with pytest.raises(UnsupportedError):
        RecordEncoder(SCHEMA)._vectorised(df)
    with pytest.raises((ValueError, TypeError)) as want:
        _fastavro(df)
    with pytest.raises(type(want.value)):
        RecordEncoder(SCHEMA).encode(df)


def test_fallback_keeps_fastavro_leniency():
    df = _frame(4, np.random.default_rng(2))
    df["id"] = df["id"].astype(float).clip(-1e15, 1e15).round()  # fastavro writes integral floats as long
    with pytest.raises(UnsupportedError):
        RecordEncoder(SCHEMA)._vectorised(df)
    assert RecordEncoder(SCHEMA).rows(df) == _fastavro(df)


def test_nested_types_are_unsupported():
    with pytest.raises(UnsupportedError, match="inner"):
        RecordEncoder({"type": "record", "name": "t.r", "fields": [
            {"name": "inner", "type": {"type": "array", "items": "long"}}]})
    with pytest.raises(UnsupportedError, match="u"):
        RecordEncoder({"type": "record", "name": "t.r",
                       "fields": [{"name": "u", "type": ["null", "long", "string"]}]})


def test_alert_encoders_only_for_the_assembled_layout():
    import copy
    from pathlib import Path

    from lsst.alert.packet import Schema

    latest = Schema.from_file().definition
    src, frc, obj = alert_encoders(latest)
    assert src.names == [f["name"] for f in record_schema(latest, "diaSource")["fields"]]
    assert "diaForcedSourceId" in frc.names and "diaObjectId" in obj.names
    shipped = Path(Schema.from_file.__code__.co_filename).parent / "schema"
    old = next((shipped / "7" / "4").glob("*.alert.avsc"))
    assert alert_encoders(Schema.from_file(str(old)).definition) is None  # alertId, no diaSourceId
    swapped = copy.deepcopy(latest)
    swapped["fields"][6]["type"] = swapped["fields"][6]["type"][::-1]  # diaObject: [record, null]
    assert alert_encoders(swapped) is None
