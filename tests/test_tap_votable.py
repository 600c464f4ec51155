"""Tests of apbatch.tap.votable: result and error documents, read back with astropy."""

from __future__ import annotations

import datetime
import io

import numpy as np
from apbatch.tap.schema import TapColumn
from apbatch.tap.votable import ResultColumn, error_votable, result_votable
from astropy.io.votable import parse


def _read(document):
    return parse(io.BytesIO(document))


def test_result_types_nulls_metadata_and_descriptor():
    ra = TapColumn("ra", "double", unit="deg", ucd="pos.eq.ra", description="Right ascension.")
    columns = [ResultColumn("id", 20), ResultColumn("ra", 701, ra), ResultColumn("flag", 16),
               ResultColumn("name", 25), ResultColumn("t", 1184), ResultColumn("region", "spoly"),
               ResultColumn("ra", 700)]
    rows = [(1, 10.5, True, "a<b", datetime.datetime(2026, 1, 2, 3, 4, 5, tzinfo=datetime.UTC),
             "{(0.1 , 0.2),(0.3 , 0.2),(0.3 , 0.4)}", 1.5),
            (None, None, None, None, None, None, None)]
    query = "SELECT x FROM y WHERE a < 'b & c'"
    vot = _read(result_votable(columns, rows, query=query, overflow=False, validity=(61000.25, "iso"),
                               descriptor={"QUERY": query + "\nAND 1 = 1", "accessURL": "http://h/sync"}))
    table = vot.get_first_table()
    assert [f.name for f in table.fields] == ["id", "ra", "flag", "name", "t", "region", "ra_2"]
    field = table.get_field_by_id("ra")
    assert (field.unit, field.ucd, field.description) == ("deg", "pos.eq.ra", "Right ascension.")
    arr = table.array
    assert arr["id"][0] == 1 and bool(arr["id"].mask[1])
    assert bool(arr["ra"].mask[1]) and arr["name"][0] == "a<b" and arr["t"][0] == "2026-01-02T03:04:05"
    np.testing.assert_allclose(arr["region"][0], np.degrees([0.1, 0.2, 0.3, 0.2, 0.3, 0.4]))
    assert table.get_field_by_id("region").xtype == "polygon"
    infos = {i.name: i.value for i in vot.resources[0].infos}
    assert infos == {"QUERY_STATUS": "OK", "QUERY": "SELECT x FROM y WHERE a < 'b & c'",
                     "validity_mjd_tai": "61000.25", "validity_utc": "iso"}
    meta = vot.resources[1]
    assert (meta.type, meta.utype, meta.ID) == ("meta", "adhoc:service", "reproducible")
    # the descriptor's values come back exactly (astropy alone would escape them twice)
    assert {p.name: p.value for p in meta.params} == {"QUERY": query + "\nAND 1 = 1", "accessURL": "http://h/sync"}


def test_overflow_and_empty_results():
    vot = _read(result_votable([ResultColumn("n", 23)], [], query="q", overflow=True))
    infos = [(i.name, i.value) for i in vot.resources[0].infos]
    assert infos == [("QUERY_STATUS", "OVERFLOW"), ("QUERY", "q")]
    assert len(vot.get_first_table().array) == 0 and len(vot.resources) == 1


def test_error_document_is_one_line():
    vot = _read(error_votable("unknown column 'x'\n  (tables: a)"))
    info = vot.resources[0].infos[0]
    assert (info.name, info.value) == ("QUERY_STATUS", "ERROR")
    assert info.content == "unknown column 'x' (tables: a)"
