"""Tests of apbatch.tap.adql: ADQL parsing, TAP -> SQL names, refusals (no database needed)."""

from __future__ import annotations

import pytest
from apbatch.tap.adql import AdqlError, parse_adql, to_sql
from apbatch.tap.schema import Registry, TapColumn, TapTable


def _registry():
    def cols(*names):
        return tuple(TapColumn(n, "double") for n in names)

    return Registry([
        TapTable("ppdb", "DiaSource", "public", "DiaSource", "",
                 cols("diaSourceId", "diaObjectId", "ra", "dec", "midpointMjdTai", "x")),
        TapTable("ppdb", "DiaObject", "public", "DiaObject", "", cols("diaObjectId", "ra", "dec",
                                                                          "validityStartMjdTai")),
        TapTable("ivoa", "ObsCore", "ivoa", "obscore", "", cols("obs_id", "s_region")),
    ])


def sql(adql):
    return to_sql(parse_adql(adql, _registry()))


def test_names_are_mapped_and_quoted():
    assert sql("select TOP 3 s.RA, s.diasourceid AS Id FROM ppdb.diasource AS s ORDER BY Id") == (
        'select "ra", "diaSourceId" AS "Id" FROM "public"."DiaSource" AS s ORDER BY "Id" LIMIT 3'.replace(
            '"ra"', 's."ra"').replace('"diaSourceId" AS', 's."diaSourceId" AS'))
    assert sql("SELECT DiaSource.ra FROM DiaSource") == 'SELECT "DiaSource"."ra" FROM "public"."DiaSource"'
    assert sql("SELECT obs_id FROM ivoa.ObsCore") == 'SELECT "obs_id" FROM "ivoa"."obscore"'


def test_cone_search_translates_to_pg_sphere():
    out = sql("SELECT s.ra FROM ppdb.DiaSource AS s WHERE "
              "CONTAINS(POINT('ICRS', s.ra, s.dec), CIRCLE('ICRS', 10.0, -5.0, 0.1)) = 1")
    assert out == ('SELECT s."ra" FROM "public"."DiaSource" AS s WHERE '
                   'spoint(RADIANS(s."ra"), RADIANS(s."dec")) @ '
                   "scircle(spoint(RADIANS(10.0), RADIANS(-5.0)), RADIANS(0.1))")


def test_join_with_aliases_named_like_columns():
    out = sql("SELECT x.ra, o.diaObjectId FROM ppdb.DiaSource x JOIN ppdb.DiaObject o "
              "ON x.diaObjectId = o.diaObjectId WHERE x.x > 3")
    assert out == ('SELECT x."ra", o."diaObjectId" FROM "public"."DiaSource" x JOIN "public"."DiaObject" o '
                   'ON x."diaObjectId" = o."diaObjectId" WHERE x."x" > 3')


@pytest.mark.parametrize("adql, message", [
    ("SELECT nope FROM ppdb.DiaSource", "unknown column 'nope' (tables in the query: ppdb.DiaSource)"),
    ("SELECT ra FROM ppdb.Nope",
     "unknown table 'ppdb.Nope'; tables: ppdb.DiaSource, ppdb.DiaObject, ivoa.ObsCore"),
    ("SELECT q.ra FROM ppdb.DiaSource AS s", "unknown table or alias 'q'"),
    ("SELECT ra FROM", "ADQL syntax error at line 1, column 15"),
    ("DROP TABLE ppdb.DiaSource", "only SELECT queries are supported, not 'DROP'"),
    ("", "QUERY is empty"),
    ("SELECT ra FROM ppdb.DiaSource WHERE 1 = CONTAINS(POINT('ICRS', ra, dec), CIRCLE('ICRS', "
     "system('id'), 0, 1))", "function 'system' is not supported"),
])
def test_refusals_name_the_problem(adql, message):
    with pytest.raises(AdqlError) as exc:
        sql(adql)
    assert str(exc.value).startswith(message) and "\n" not in str(exc.value)


def test_tables_and_aliases_are_recorded():
    parsed = parse_adql("SELECT s.ra AS r FROM ppdb.DiaSource AS s, ppdb.DiaObject", _registry())
    assert [(r.table.tap_name, r.alias, r.in_from) for r in parsed.tables] == [
        ("ppdb.DiaSource", "s", True), ("ppdb.DiaObject", None, True)]
    assert parsed.correlation_names == {"s"} and set(parsed.select_aliases) == {"r"}
