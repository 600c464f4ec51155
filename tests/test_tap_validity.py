"""Tests of apbatch.tap.validity: pinning queries to a validity time (parse level, and on PostgreSQL)."""

from __future__ import annotations

import pytest
import sqlalchemy as sa
from apbatch.tap.adql import AdqlError, parse_adql, to_sql
from apbatch.tap.schema import Registry, TapColumn, TapTable
from apbatch.tap.validity import current_validity_time, mjd_tai_to_iso_utc, pin_query, pin_text

T = 61302.123456789


def _registry():
    def cols(*names):
        return tuple(TapColumn(n, "double") for n in names)

    return Registry([
        TapTable("ppdb", "DiaSource", "public", "DiaSource", "", cols("diaSourceId", "ra", "midpointMjdTai")),
        TapTable("ppdb", "DiaObject", "public", "DiaObject", "",
                 cols("diaObjectId", "ra", "validityStartMjdTai", "validityEndMjdTai")),
        TapTable("ivoa", "ObsCore", "ivoa", "obscore", "", cols("obs_id",)),
    ])


def pin(adql, now=T):
    return pin_query(parse_adql(adql, _registry()), now)


def test_every_dia_table_is_pinned_and_sql_agrees():
    adql = "SELECT o.ra, s.ra FROM ppdb.DiaObject AS o JOIN ppdb.DiaSource s ON o.ra = s.ra"
    pinned = pin(adql)
    assert pinned.validity_mjd_tai == T
    assert pinned.adql == (f"SELECT o.ra, s.ra FROM {pin_text('DiaObject', T)} AS o JOIN "
                           f"{pin_text('DiaSource', T)} AS s ON o.ra = s.ra")
    assert "validityStartMjdTai <= 61302.123456789 AND (validityEndMjdTai IS NULL OR validityEndMjdTai > " \
           "61302.123456789)" in pinned.adql
    # the SQL of the original parse with the pins equals the SQL of the pinned ADQL
    direct = to_sql(parse_adql(adql, _registry()), pinned.sql_refs)
    assert direct == to_sql(parse_adql(pinned.adql, _registry()))


def test_unaliased_table_keeps_its_name_as_qualifier():
    adql = "SELECT DiaSource.ra FROM ppdb.DiaSource WHERE DiaSource.ra > 1"
    pinned = pin(adql)
    assert pinned.adql.endswith(") AS DiaSource WHERE DiaSource.ra > 1")
    out = to_sql(parse_adql(adql, _registry()), pinned.sql_refs)
    assert ') AS "DiaSource" WHERE "DiaSource"."ra" > 1' in out


def test_pinned_query_is_a_fixed_point():
    first = pin("SELECT diaObjectId FROM ppdb.DiaObject")
    again = pin(first.adql, now=T + 5)  # a rerun later: the pin's own time wins
    assert again.adql == first.adql and again.validity_mjd_tai == T and again.sql_refs == {}
    spaced = first.adql.replace(" <= ", "<=").replace("SELECT *", "select  *")
    assert pin(spaced, now=T + 5).validity_mjd_tai == T
    # an unpinned table in a pinned query gets the query's time
    mixed = pin(f"SELECT o.ra FROM {pin_text('DiaObject', T)} AS o, ppdb.DiaSource AS s", now=T + 5)
    assert mixed.validity_mjd_tai == T and pin_text("DiaSource", T) in mixed.adql


def test_refusals():
    with pytest.raises(AdqlError, match="pins different validity times"):
        pin(f"SELECT o.ra FROM {pin_text('DiaObject', T)} AS o, {pin_text('DiaSource', T + 1)} AS s")
    with pytest.raises(AdqlError, match="qualify columns with the table name or an alias"):
        pin("SELECT ppdb.DiaSource.ra FROM ppdb.DiaSource")
    # a look-alike that is not the canonical pin is pinned again
    fake = pin(f"SELECT o.ra FROM (SELECT * FROM ppdb.DiaObject WHERE ra > {T}) AS o")
    assert pin_text("DiaObject", T) in fake.adql


def test_obscore_is_not_pinned():
    pinned = pin("SELECT obs_id FROM ivoa.ObsCore", now=None)
    assert pinned.validity_mjd_tai is None and pinned.adql == "SELECT obs_id FROM ivoa.ObsCore"


def test_iso_utc():
    assert mjd_tai_to_iso_utc(61000.0) == "2025-11-20T23:59:23.000Z"  # TAI - UTC = 37 s


@pytest.mark.postgres
def test_current_validity_time_on_postgresql(postgres_url):
    engine = sa.create_engine(postgres_url)
    try:
        with engine.begin() as conn:
            conn.execute(sa.text('CREATE TABLE "DiaSource" ("midpointMjdTai" double precision)'))
            conn.execute(sa.text('CREATE TABLE "DiaObject" ("validityStartMjdTai" double precision)'))
            assert current_validity_time(conn, _registry()) == 0.0  # empty: nothing is valid yet
            conn.execute(sa.text('INSERT INTO "DiaSource" VALUES (61000.5), (61001.25)'))
            conn.execute(sa.text('INSERT INTO "DiaObject" VALUES (61001.0)'))
            assert current_validity_time(conn, _registry()) == 61001.25
            assert current_validity_time(conn, Registry([])) == 0.0
    finally:
        engine.dispose()
