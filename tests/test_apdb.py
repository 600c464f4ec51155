"""Tests of apbatch.job.apdb: APDB creation, ids, association, summaries, forced photometry, store."""

from __future__ import annotations

import itertools

import numpy as np
import pandas as pd
import pytest
import sqlalchemy as sa
from alert_synth import SMALL, make_ccd, make_images, make_sources, visit_id
from apbatch.errors import BadInputError, NonRetriableError
from apbatch.image import Image, MaskBits
from apbatch.job.apdb import (
    Association,
    create_apdb,
    forced_photometry,
    open_apdb,
    pack_id,
    unpack_id,
)


@pytest.fixture
def apdb(tmp_path):
    create_apdb(f"sqlite:///{tmp_path}/apdb.sqlite3", tmp_path / "apdb.yaml")
    return open_apdb(tmp_path / "apdb.yaml")


def _count(tmp_path, table, where=""):
    eng = sa.create_engine(f"sqlite:///{tmp_path}/apdb.sqlite3")
    with eng.connect() as conn:
        return conn.execute(sa.text(f'SELECT COUNT(*) FROM "{table}" {where}')).scalar()


def test_create_apdb_writes_schema_and_config(tmp_path):
    cfg = create_apdb(f"sqlite:///{tmp_path}/sub/apdb.sqlite3", tmp_path / "cfg" / "apdb.yaml")
    assert cfg.dia_object_index == "last_object_table"
    assert (tmp_path / "cfg" / "apdb.yaml").is_file()
    tables = set(sa.inspect(sa.create_engine(f"sqlite:///{tmp_path}/sub/apdb.sqlite3")).get_table_names())
    assert {"DiaObject", "DiaObjectLast", "DiaSource", "DiaForcedSource"} <= tables
    assert not open_apdb(tmp_path / "cfg" / "apdb.yaml").containsVisitDetector(1, 1)


def test_create_apdb_bad_input_writes_nothing(tmp_path):
    with pytest.raises(BadInputError, match="apdb.url"):
        create_apdb("mysql://host/db", tmp_path / "a.yaml")
    # psycopg2 missing or no server: one-line error, no config file
    with pytest.raises(BadInputError, match="apdb.url"):
        create_apdb("postgresql://nobody@127.0.0.1:1/none", tmp_path / "b.yaml")
    assert not (tmp_path / "a.yaml").exists() and not (tmp_path / "b.yaml").exists()
    (tmp_path / "c.yaml").write_text("x")
    with pytest.raises(BadInputError, match="already exists"):
        create_apdb(f"sqlite:///{tmp_path}/c.sqlite3", tmp_path / "c.yaml")
    with pytest.raises(BadInputError, match="apdb.config_file"):
        open_apdb(tmp_path / "missing.yaml")


def test_cli_apdb_create(tmp_path, monkeypatch):
    from apbatch.cli import main

    monkeypatch.chdir(tmp_path)
    monkeypatch.delenv("APBATCH_CONFIG", raising=False)
    with pytest.raises(SystemExit) as exc:
        main(["apdb", "create", "--url", "sqlite:///db/apdb.sqlite3", "--config-file", "apdb.yaml"])
    assert exc.value.code == 0
    assert (tmp_path / "apbatch-work" / "apdb.yaml").is_file()
    assert (tmp_path / "apbatch-work" / "db" / "apdb.sqlite3").is_file()
    with pytest.raises(SystemExit) as exc:
        main(["apdb", "create", "--url", "sqlite:///db/apdb.sqlite3", "--config-file", "apdb.yaml"])
    assert exc.value.code == 2


def test_ids_unique_and_decodable():
    visits = [visit_id(n) for n in range(0, 3000, 97)] + [2025060900578, 2025060900579, 2025061000578]
    dets = [0, 1, 93, 94, 188, 204]
    idx = np.array([0, 1, 9_999, 100_000, 2**20 - 1])
    ids = [pack_id(v, d, idx, forced=f) for v, d, f in itertools.product(visits, dets, (False, True))]
    flat = np.concatenate(ids)
    assert len(np.unique(flat)) == flat.size
    assert flat.min() > 0  # positive int64
    parts = unpack_id(int(pack_id(visits[3], 188, 12345, forced=True)))
    assert parts["detector"] == 188 and parts["index"] == 12345
    assert parts["forced"] == 1 and parts["form"] == 0
    assert unpack_id(pack_id(2025060900578, 5, 7))["form"] == 1
    # one second apart, same suffix: distinct keys; suffix 4 does not fit
    assert pack_id(visit_id(0) + 10**7, 0, 0) != pack_id(visit_id(0), 0, 0)
    with pytest.raises(BadInputError, match="visit"):
        pack_id(visit_id(0) + 4, 0, 0)
    with pytest.raises(BadInputError, match="visit"):
        pack_id(12345, 0, 0)
    with pytest.raises(BadInputError, match="dia_sources"):
        pack_id(visit_id(0), 0, 2**20)
    with pytest.raises(BadInputError, match="detector"):
        pack_id(visit_id(0), 256, 0)


def test_associate_nearest_one_to_one():
    deg = 1 / 3600.0
    objects = pd.DataFrame({"ra": [10.0, 10.0 + 5 * deg, 359.9999], "dec": [0.0, 0.0, 0.0]})
    sources = pd.DataFrame({"ra": [10.0 + 0.3 * deg, 10.0 + 0.1 * deg, 10.0 + 2.5 * deg, 0.0001, 20.0],
                            "dec": [0.0, 0.0, 0.0, 0.0, 0.0]})
    match = Association.associate(sources, objects, radius_arcsec=1.0)
    # source 1 is closer to object 0 than source 0: it wins; 2 is too far; 3 wraps RA=0
    assert match.tolist() == [-1, 0, -1, 2, -1]
    assert Association.associate(sources.iloc[:0], objects, 1.0).size == 0
    assert (Association.associate(sources, objects.iloc[:0], 1.0) == -1).all()


def test_forced_photometry_recovers_flux_and_ignores_masked():
    rng = np.random.default_rng(3)
    ny = nx = 64
    sig = 3.0 / 2.3548
    yy, xx = np.mgrid[:ny, :nx]
    img = rng.normal(0, 1.0, (ny, nx))
    truth = [(20.3, 30.7, 5000.0), (45.0, 12.2, 800.0)]
    for x, y, f in truth:
        img += f * np.exp(-0.5 * ((xx - x) ** 2 + (yy - y) ** 2) / sig**2) / (2 * np.pi * sig**2)
    mask = np.zeros((ny, nx), np.int32)
    image = Image(img, np.ones((ny, nx), np.float32), mask)
    xs, ys = np.array([t[0] for t in truth]), np.array([t[1] for t in truth])
    flux, err = forced_photometry(image, xs, ys, 3.0)
    for (_, _, f), m, e in zip(truth, flux, err, strict=False):
        assert abs(m - f) < 5 * e + 0.01 * f
    image.mask[:, :] = MaskBits.NO_DATA
    flux, err = forced_photometry(image, np.array([20.3]), np.array([30.7]), 3.0)
    assert np.isnan(flux[0]) and np.isnan(err[0])


def _run(assoc, n, cat, band="r", seed=0):
    ccd = make_ccd(n, band=band)
    imgs = make_images(np.random.default_rng(seed + n), sources=cat, shape=(SMALL, SMALL))
    return assoc.run(ccd, cat, imgs["difference"], imgs["science"], psf_fwhm_pix=3.0)


def test_three_visits_one_object_summaries(apdb, tmp_path):
    assoc = Association(apdb, radius_arcsec=1.0)
    cat = make_sources(5, np.random.default_rng(7), nx=SMALL, ny=SMALL)
    results = []
    for n, band in enumerate(["r", "r", "g"]):
        jitter = cat.copy()
        jitter["ra"] += (n - 1) * 0.1 / 3600.0  # 0.1" offsets: same transient
        jitter["psfFlux"] = cat["psfFlux"] * (1 + n)
        res = _run(assoc, n, jitter, band)
        assoc.store(res)
        results.append(res)
    first, last = results[0], results[2]
    assert first.n_new_objects == 5 and last.n_new_objects == 0
    assert (first.objects["diaObjectId"].to_numpy() == first.sources["diaSourceId"].to_numpy()).all()
    assert (last.sources["diaObjectId"].to_numpy() == first.objects["diaObjectId"].to_numpy()).all()
    assert _count(tmp_path, "DiaObjectLast") == 5
    obj = last.objects.set_index("diaObjectId").loc[first.objects["diaObjectId"].iloc[0]]
    assert obj["nDiaSources"] == 3
    assert obj["firstDiaSourceMjdTai"] == make_ccd(0).midpoint_mjd_tai
    assert obj["lastDiaSourceMjdTai"] == make_ccd(2).midpoint_mjd_tai
    assert obj["r_psfFluxNdata"] == 2 and obj["g_psfFluxNdata"] == 1 and obj["u_psfFluxNdata"] == 0
    f0 = cat["psfFlux"].iloc[0]
    assert obj["r_psfFluxMin"] == pytest.approx(f0) and obj["r_psfFluxMax"] == pytest.approx(2 * f0)
    assert obj["r_psfFluxSigma"] == pytest.approx(np.std([f0, 2 * f0], ddof=1))
    assert obj["g_psfFluxMean"] == pytest.approx(3 * f0) and np.isnan(obj["g_psfFluxSigma"])
    assert obj["ra"] == pytest.approx(cat["ra"].iloc[0], abs=1e-6)  # mean of -0.1", 0, +0.1"
    assert obj["raErr"] == pytest.approx(cat["raErr"].iloc[0] / np.sqrt(3))
    assert len(last.prv_sources) == 10 and len(last.prv_forced) == 10  # 2 earlier visits x 5 objects
    # forced photometry covers every object on the image, ids in the forced id space
    assert len(last.forced) == 5
    assert all(unpack_id(int(i))["forced"] == 1 for i in last.forced["diaForcedSourceId"])
    assert _count(tmp_path, "DiaForcedSource") == 15


def test_store_twice_is_rejected_and_rolled_back(apdb, tmp_path):
    assoc = Association(apdb)
    cat = make_sources(4, np.random.default_rng(1), nx=SMALL, ny=SMALL)
    res = _run(assoc, 0, cat)
    assert not assoc.contains(res.ccd)
    assoc.store(res)
    assert assoc.contains(res.ccd)
    before = {t: _count(tmp_path, t) for t in ("DiaSource", "DiaObject", "DiaObjectLast", "DiaForcedSource")}
    with pytest.raises(NonRetriableError, match="store"):
        assoc.store(res)
    assert {t: _count(tmp_path, t) for t in before} == before


def test_run_rejects_bad_input(apdb):
    assoc = Association(apdb)
    cat = make_sources(2, np.random.default_rng(1), nx=SMALL, ny=SMALL)
    imgs = make_images(np.random.default_rng(0), shape=(SMALL, SMALL))
    with pytest.raises(BadInputError, match="dia_sources.psfFluxErr"):
        assoc.run(make_ccd(0), cat.drop(columns=["psfFluxErr"]), imgs["difference"], imgs["science"], 3.0)
    with pytest.raises(BadInputError, match="psf_fwhm_pix"):
        assoc.run(make_ccd(0), cat, imgs["difference"], imgs["science"], 0.0)


def test_load_returns_objects_and_history(apdb):
    assoc = Association(apdb, history_days=1.5)
    cat = make_sources(3, np.random.default_rng(2), nx=SMALL, ny=SMALL)
    for n in range(3):
        assoc.store(_run(assoc, n, cat))
    objects, sources, forced = assoc.load(make_ccd(3).region, make_ccd(3).visit_time)
    assert len(objects) == 3 and (objects["nDiaSources"] == 3).all()
    # history_days=1.5 before visit 3 (1 day apart): visits 2 only... and visit 1 is 2 days back
    assert sorted(sources["visit"].unique()) == [visit_id(2)]
    assert len(forced) == 3


@pytest.mark.postgres
def test_postgresql_apdb_three_visits_and_exactly_once_store(tmp_path, postgres_url):
    """The APDB on a real PostgreSQL server (the scale tier): association over three visits,
    DPDD summaries, and a second store of the same CCD-visit rejected and rolled back."""
    create_apdb(postgres_url, tmp_path / "pg-apdb.yaml")
    assoc = Association(open_apdb(tmp_path / "pg-apdb.yaml"), radius_arcsec=1.0)
    cat = make_sources(5, np.random.default_rng(7), nx=SMALL, ny=SMALL)
    results = []
    for n in range(3):
        jitter = cat.copy()
        jitter["ra"] += (n - 1) * 0.1 / 3600.0
        res = _run(assoc, n, jitter, "r")
        assoc.store(res)
        results.append(res)
    assert results[0].n_new_objects == 5 and results[2].n_new_objects == 0
    assert len(results[2].prv_sources) == 10
    engine = sa.create_engine(postgres_url)

    def counts():
        with engine.connect() as conn:
            return {t: conn.execute(sa.text(f'SELECT COUNT(*) FROM "{t}"')).scalar()
                    for t in ("DiaSource", "DiaObjectLast", "DiaForcedSource")}

    try:
        assert counts() == {"DiaSource": 15, "DiaObjectLast": 5, "DiaForcedSource": 15}
        with pytest.raises(NonRetriableError, match="store"):
            assoc.store(results[2])
        assert counts() == {"DiaSource": 15, "DiaObjectLast": 5, "DiaForcedSource": 15}
    finally:
        engine.dispose()


def test_job_ids_are_kept_when_flagged_rows_were_left_out(apdb, tmp_path):
    """The job leaves flagged rows out (alert_policy) but keeps its table's ids: the APDB stores those."""
    assoc = Association(apdb, radius_arcsec=1.0)
    cat = make_sources(5, np.random.default_rng(3), nx=SMALL, ny=SMALL)
    ccd = make_ccd(0)
    cat["diaSourceId"] = pack_id(ccd.visit, ccd.detector, np.arange(5))
    kept = cat.iloc[[0, 2, 4]].reset_index(drop=True)
    res = _run(assoc, 0, kept)
    assoc.store(res)
    assert res.sources["diaSourceId"].tolist() == cat["diaSourceId"].iloc[[0, 2, 4]].tolist()
    eng = sa.create_engine(f"sqlite:///{tmp_path}/apdb.sqlite3")
    with eng.connect() as conn:
        stored = sorted(r[0] for r in conn.execute(sa.text('SELECT "diaSourceId" FROM "DiaSource"')))
    assert stored == sorted(cat["diaSourceId"].iloc[[0, 2, 4]].tolist())
