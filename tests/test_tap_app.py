"""Tests of apbatch.tap.app (and the service under it) through a real uvicorn server with pyvo.

A simulated night of 3 visits is stored in an APDB the way jobs store it, replicated into a
PPDB on PostgreSQL (pg_sphere), and served; pyvo's answers are compared with the APDB's rows.
"""

from __future__ import annotations

import threading

import numpy as np
import pandas as pd
import pytest
import pyvo
import requests
import sqlalchemy as sa
from alert_synth import SMALL, make_ccd, make_images, make_sources
from apbatch.http_server import ServerThread
from apbatch.job.apdb import Association, create_apdb, open_apdb
from apbatch.products.ppdb import Replicator, create_ppdb
from apbatch.tap.app import make_app
from apbatch.tap.schema import create_indexes
from apbatch.tap.service import TapLimits, TapService
from fixtures_postgres import new_database
from pyvo.dal import DALQueryError

pytestmark = pytest.mark.postgres


def fill(config_path, visits, detectors=(94, 93), n_sources=4):
    """Store ``visits`` x ``detectors`` CCD-visits as jobs do (load, associate, store)."""
    assoc = Association(open_apdb(config_path), radius_arcsec=1.0)
    for n in visits:
        for det in detectors:
            cat = make_sources(n_sources, np.random.default_rng(det), detector=det, nx=SMALL, ny=SMALL)
            cat["psfFlux"] *= 1 + n
            imgs = make_images(np.random.default_rng(100 * n + det), sources=cat, shape=(SMALL, SMALL))
            assoc.store(assoc.run(make_ccd(n, detector=det), cat, imgs["difference"], imgs["science"],
                                  psf_fwhm_pix=3.0))


def read_table(url, sql):
    engine = sa.create_engine(url)
    try:
        with engine.connect() as conn:
            return pd.read_sql_query(sa.text(sql), conn)
    finally:
        engine.dispose()


@pytest.fixture(scope="module")
def night(postgres_server, tmp_path_factory):
    """APDB (3 visits x 2 CCDs) and its replicated PPDB; yields (apdb config, apdb url, ppdb url)."""
    tmp = tmp_path_factory.mktemp("tap")
    with new_database(postgres_server, "a") as apdb_url, new_database(postgres_server, "p") as ppdb_url:
        config = tmp / "apdb.yaml"
        create_apdb(apdb_url, config, replication=True)
        fill(config, range(3))
        create_ppdb(ppdb_url)
        assert len(Replicator.open(config, ppdb_url).run_once().copied) == 3
        assert create_indexes(sa.create_engine(ppdb_url))  # GiST + time indexes
        yield config, apdb_url, ppdb_url


@pytest.fixture(scope="module")
def tap_url(night):
    service = TapService(night[2])
    server = ServerThread(make_app(service), "127.0.0.1", 0).start()
    try:
        yield server.url
    finally:
        server.stop()
        service.close()


def _compare(apdb_frame, tap_table, keys):
    tap = tap_table.to_pandas()
    columns = [c for c in apdb_frame.columns if c in tap.columns and c != "validityEndMjdTai"]
    assert len(columns) >= len(apdb_frame.columns) - 2  # the APDB's pixelId is not in the PPDB
    a = apdb_frame[columns].sort_values(keys, ignore_index=True)
    b = tap[columns].sort_values(keys, ignore_index=True)
    for col in columns:
        if b[col].dtype == object or a[col].dtype == object:
            # NULL booleans are masked; a VOTable char NULL reads back as '' (no other null there)
            b[col] = b[col].astype(object).where(b[col].notna() & (b[col] != ""), None)
            a[col] = a[col].astype(object).where(a[col].notna(), None)
    pd.testing.assert_frame_equal(b, a, check_dtype=False)


def test_pyvo_returns_the_apdb_rows_field_for_field(night, tap_url):
    _, apdb_url, _ = night
    service = pyvo.dal.TAPService(tap_url)
    sources = service.search("SELECT * FROM ppdb.DiaSource")
    apdb_sources = read_table(apdb_url, 'SELECT * FROM "DiaSource"')
    assert len(sources) == len(apdb_sources) == 24
    _compare(apdb_sources, sources.to_table(), ["diaSourceId"])
    # the DiaObjects valid now: the APDB's latest version of each
    objects = service.search("SELECT * FROM ppdb.DiaObject")
    apdb_objects = read_table(apdb_url, 'SELECT * FROM "DiaObject" WHERE "validityEndMjdTai" IS NULL')
    assert len(objects) == len(apdb_objects) == 8
    _compare(apdb_objects, objects.to_table(), ["diaObjectId"])
    field = sources.fieldname_with_ucd("pos.eq.ra")
    assert field == "ra" and sources.getdesc("ra").unit == "deg"
    validity = {i.name: i.value for i in sources.votable.resources[0].infos}
    last_visit = float(apdb_sources["midpointMjdTai"].max())
    assert float(validity["validity_mjd_tai"]) == last_visit
    assert validity["validity_utc"].startswith("20") and validity["QUERY_STATUS"] == "OK"


def test_cone_search_in_adql(night, tap_url):
    _, apdb_url, _ = night
    apdb = read_table(apdb_url, 'SELECT "diaSourceId", ra, dec FROM "DiaSource"')
    ra, dec = float(apdb.ra.iloc[0]), float(apdb.dec.iloc[0])
    radius = 2.0 / 3600
    query = ("SELECT s.diaSourceId, s.ra, s.dec FROM ppdb.DiaSource AS s WHERE "
             f"CONTAINS(POINT('ICRS', s.ra, s.dec), CIRCLE('ICRS', {ra!r}, {dec!r}, {radius!r})) = 1")
    got = pyvo.dal.TAPService(tap_url).search(query).to_table()
    sep = np.degrees(np.arccos(np.clip(np.sin(np.radians(dec)) * np.sin(np.radians(apdb.dec))
                                       + np.cos(np.radians(dec)) * np.cos(np.radians(apdb.dec))
                                       * np.cos(np.radians(apdb.ra - ra)), -1, 1)))
    expected = set(apdb.diaSourceId[sep <= radius])
    assert 0 < len(expected) < len(apdb) and set(got["diaSourceId"]) == expected


def test_reproducible_query_after_two_more_visits(night, tap_url):
    config, apdb_url, ppdb_url = night
    service = pyvo.dal.TAPService(tap_url)
    query = ("SELECT o.diaObjectId, o.ra, o.nDiaSources, s.diaSourceId, s.psfFlux FROM ppdb.DiaObject AS o "
             "JOIN ppdb.DiaSource AS s ON s.diaObjectId = o.diaObjectId ORDER BY s.diaSourceId")
    first = service.search(query)
    descriptor = first.get_adhocservice_by_id("reproducible")
    params = {p.name: p.value for p in descriptor.params}
    assert params["accessURL"] == tap_url + "/sync" and params["QUERY"] != query
    assert "validityEndMjdTai IS NULL OR validityEndMjdTai >" in params["QUERY"]
    before = first.to_table()
    fill(config, [3, 4])  # two more visits, then replicate
    replicator = Replicator.open(config, ppdb_url, min_wait_seconds=0, max_wait_seconds=0)
    assert len(replicator.run_once().copied) == 2
    rerun = pyvo.dal.TAPService(params["accessURL"].removesuffix("/sync")).search(params["QUERY"])
    again = rerun.to_table()
    assert len(again) == len(before) == 24
    for col in before.colnames:
        assert list(again[col]) == list(before[col]), col
    # the rerun keeps its own validity time, and its descriptor is the same query
    infos = {i.name: i.value for i in rerun.votable.resources[0].infos}
    assert infos["validity_mjd_tai"] == {i.name: i.value for i in first.votable.resources[0].infos}[
        "validity_mjd_tai"]
    rerun_params = {p.name: p.value for p in rerun.get_adhocservice_by_id("reproducible").params}
    assert rerun_params["QUERY"] == params["QUERY"]
    # the unpinned query now sees the new visits
    now = service.search(query).to_table()
    assert len(now) == 40 and max(now["nDiaSources"]) == 5 and max(before["nDiaSources"]) == 3


@pytest.mark.parametrize("query, message", [
    ("SELECT nope FROM ppdb.DiaSource", "unknown column 'nope'"),
    ("SELECT ra FROM ppdb.Nowhere", "unknown table 'ppdb.Nowhere'"),
    ("SELECT ra FROM", "ADQL syntax error at line 1"),
    ("DELETE FROM ppdb.DiaSource", "only SELECT queries are supported, not 'DELETE'"),
    ("SELECT ra FROM ppdb.DiaSource WHERE 1 = CONTAINS(POINT('ICRS', ra, dec), "
     "CIRCLE('ICRS', print('x'), 0, 1))", "function 'print' is not supported"),
    ("SELECT ra FROM ppdb.DiaSource WHERE ra / 0 > 1", "division by zero"),
])
def test_bad_queries_give_error_votables(tap_url, query, message):
    with pytest.raises(DALQueryError) as exc:
        pyvo.dal.TAPService(tap_url).search(query)
    assert message in str(exc.value) and "Traceback" not in str(exc.value)


def test_maxrec_overflow_and_bad_parameters(night, tap_url):
    service = pyvo.dal.TAPService(tap_url)
    result = service.search("SELECT diaSourceId FROM ppdb.DiaSource", maxrec=5)
    assert len(result) == 5 and result.query_status == "OVERFLOW"
    for params, message in [({"MAXREC": "ten"}, "MAXREC: 'ten' is not an integer"),
                            ({"MAXREC": "-1"}, "MAXREC: -1 is negative"),
                            ({"LANG": "SQL"}, "LANG: 'SQL' is not supported"),
                            ({"RESPONSEFORMAT": "csv"}, "RESPONSEFORMAT: 'csv' is not supported"),
                            ({"QUERY": " "}, "QUERY: missing")]:
        data = {"LANG": "ADQL", "QUERY": "SELECT ra FROM ppdb.DiaSource", **params}
        r = requests.post(tap_url + "/sync", data=data, timeout=30)
        assert r.status_code == 200 and 'value="ERROR"' in r.text and message in r.text
    limited = TapService(night[2], TapLimits(maxrec_default=7, maxrec_limit=9))
    server = ServerThread(make_app(limited), "127.0.0.1", 0).start()
    try:
        tap = pyvo.dal.TAPService(server.url)
        with pytest.warns(pyvo.dal.DALOverflowWarning):
            assert len(tap.search("SELECT diaSourceId FROM ppdb.DiaSource")) == 7  # the default
        with pytest.warns(pyvo.dal.DALOverflowWarning):
            capped = tap.search("SELECT diaSourceId FROM ppdb.DiaSource", maxrec=10**9)
        assert len(capped) == 9 and capped.query_status == "OVERFLOW"
        assert tap.hardlimit == 9 and tap.maxrec == 7
    finally:
        server.stop()
        limited.close()


def test_timeout_and_like_patterns(night, tap_url):
    slow = TapService(night[2], TapLimits(statement_timeout=0.001))
    server = ServerThread(make_app(slow), "127.0.0.1", 0).start()
    try:
        query = "SELECT COUNT(*) AS n FROM " + ", ".join(f"ppdb.DiaSource AS s{n}" for n in range(5))
        r = requests.post(server.url + "/sync", data={"LANG": "ADQL", "QUERY": query}, timeout=30)
        assert 'value="ERROR">query took longer than 0.001 s</INFO>' in r.text
    finally:
        server.stop()
        slow.close()
    # '%' reaches PostgreSQL as is (no driver parameter formatting)
    r = requests.get(tap_url + "/sync", timeout=30, params={
        "LANG": "ADQL", "QUERY": "SELECT TOP 1 visit FROM ppdb.DiaSource "
                                 "WHERE reliabilityVersion LIKE '%' OR reliabilityVersion IS NULL"})
    assert 'value="OK"' in r.text and "<TD>" in r.text


def test_tables_capabilities_availability(tap_url):
    service = pyvo.dal.TAPService(tap_url)
    tables = service.tables
    assert {"ppdb.DiaObject", "ppdb.DiaSource", "ppdb.DiaForcedSource"} <= set(tables.keys())
    ra = {c.name: c for c in tables["ppdb.DiaSource"].columns}["ra"]
    assert ra.unit == "deg" and ra.ucd == "pos.eq.ra" and ra.datatype.content == "double"
    assert ra.description.startswith("Right ascension")
    assert "<available>true</available>" in requests.get(tap_url + "/availability", timeout=30).text
    assert any(c.standardid.startswith("ivo://ivoa.net/std/TAP") for c in service.capabilities)


def test_obscore_s_region_is_a_dali_polygon(postgres_server):
    """An ivoa.obscore with an spoly s_region is served as ivoa.ObsCore; s_region in degrees."""
    with new_database(postgres_server, "o") as url:
        engine = sa.create_engine(url)
        with engine.begin() as conn:
            conn.execute(sa.text("CREATE SCHEMA ivoa"))
            conn.execute(sa.text("CREATE TABLE ivoa.obscore (obs_id text, s_ra double precision, "
                                 "s_dec double precision, t_min double precision, s_region spoly)"))
            conn.execute(sa.text("INSERT INTO ivoa.obscore VALUES ('a', 10.5, -4.5, 61000.5, "
                                 "spoly '{(10d,-5d),(11d,-5d),(11d,-4d),(10d,-4d)}'), "
                                 "('b', 200.5, 30.5, 61000.6, spoly '{(200d,30d),(201d,30d),(201d,31d)}')"))
        engine.dispose()
        service = TapService(url)
        server = ServerThread(make_app(service), "127.0.0.1", 0).start()
        try:
            tap = pyvo.dal.TAPService(server.url)
            result = tap.search("SELECT obs_id, s_region FROM ivoa.ObsCore WHERE "
                                "CONTAINS(POINT('ICRS', 10.5, -4.5), s_region) = 1")
            assert list(result["obs_id"]) == ["a"]
            field = result.getdesc("s_region")
            assert field.xtype == "polygon" and field.unit == "deg"
            np.testing.assert_allclose(result["s_region"][0], [10, -5, 11, -5, 11, -4, 10, -4], atol=1e-9)
            assert "validity_mjd_tai" not in {i.name for i in result.votable.resources[0].infos}
            assert [r for r in result.votable.resources if r.type == "meta"] == []  # not pinned
            ucd = {c.name: c for c in tap.tables["ivoa.ObsCore"].columns}["s_ra"].ucd
            assert ucd == "pos.eq.ra"
        finally:
            server.stop()
            service.close()


def test_database_down_is_an_error_votable():
    from conftest import free_port

    service = TapService(f"postgresql+psycopg2://nobody@127.0.0.1:{free_port()}/none?connect_timeout=2")
    server = ServerThread(make_app(service), "127.0.0.1", 0).start()
    try:
        tap = pyvo.dal.TAPService(server.url)
        with pytest.raises(DALQueryError, match="database unavailable"):
            tap.search("SELECT ra FROM ppdb.DiaSource")
        assert "<available>false</available>" in requests.get(server.url + "/availability", timeout=30).text
        assert requests.get(server.url + "/tables", timeout=30).status_code == 503
    finally:
        server.stop()
        service.close()


def test_concurrent_queries(tap_url):
    """Worker threads share the service: concurrent queries each get their own answer."""
    service = pyvo.dal.TAPService(tap_url)
    counts: list[int] = []

    def one(n):
        counts.append(len(service.search(f"SELECT TOP {n} diaSourceId FROM ppdb.DiaSource")))

    threads = [threading.Thread(target=one, args=(n,)) for n in range(1, 7)]
    for t in threads:
        t.start()
    for t in threads:
        t.join()
    assert sorted(counts) == [1, 2, 3, 4, 5, 6]
