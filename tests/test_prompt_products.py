"""End to end, as the users of the prompt products see them: a simulated night of 3 visits run by
the real jobs (``apbatch demo``), then the cron commands as subprocesses on a real PostgreSQL with
pg_sphere -- ``ppdb create|replicate``, ``embargo release``, ``obscore update``, ``tap init``,
``tap serve`` and ``night footprint`` -- checked with the users' own tools: pyvo against the
APDB read with SQLAlchemy (no apbatch), astropy opening ObsCore's ``access_url``, mocpy reading
the MOC.
"""

from __future__ import annotations

import math
import os
import subprocess
import sys
from pathlib import Path

import numpy as np
import pandas as pd
import pytest
import sqlalchemy as sa
import yaml
from fixtures_postgres import new_database

pytestmark = pytest.mark.slow


def apbatch(*args: str, config: list[Path], timeout: float = 300) -> subprocess.CompletedProcess:
    cfg = [a for c in config for a in ("--config", str(c))]
    proc = subprocess.run([sys.executable, "-m", "apbatch", *args, *cfg], capture_output=True, text=True,
                          timeout=timeout, env={**os.environ, "APBATCH_CONFIG": ""})
    assert proc.returncode == 0, (args, proc.stdout, proc.stderr)
    return proc


@pytest.fixture(scope="module")
def night(tmp_path_factory, postgres_server):
    """The demo's night (3 ComCam visits, CCD 4) and a PPDB database on the test server."""
    from apbatch.script.demo import run_demo

    out = tmp_path_factory.mktemp("products") / "night"
    lines: list[str] = []
    summary = run_demo(out, instrument="LSSTComCam", visits=3, detectors=("4",), seed=11, speed=20.0,
                       workers=2, timeout=900, say=lines.append)
    assert summary["jobs"] == {"COMPLETED": 4}, "\n".join(lines)  # 3 visits + the bias
    with new_database(postgres_server, "ppdb") as url:
        products = out / "products.yaml"
        products.write_text(yaml.safe_dump({
            "ppdb": {"url": url, "min_wait_seconds": 0, "max_wait_seconds": 0},
            "embargo": {"prompt_repo": str(out / "prompt")}}))
        yield {"configs": [out / "apbatch.yaml", products], "out": out, "ppdb": url, "summary": summary}


def _apdb(out: Path, table: str) -> pd.DataFrame:
    cfg = yaml.safe_load((out / "apbatch.yaml").read_text())
    url = cfg.get("apdb", {}).get("url") or "sqlite:///apdb.sqlite3"
    if url.startswith("sqlite:///") and not url.startswith("sqlite:////"):
        url = f"sqlite:///{Path(cfg['root']) / url[len('sqlite:///'):]}"
    engine = sa.create_engine(url)
    try:
        with engine.connect() as conn:
            return pd.read_sql_table(table, conn)
    finally:
        engine.dispose()


@pytest.fixture(scope="module")
def tap(night):
    """`pyvo.dal.TAPService` of ``apbatch tap serve`` on a free port, after replication."""
    import pyvo

    cfg = night["configs"]
    apbatch("ppdb", "create", config=cfg)
    apbatch("ppdb", "replicate", config=cfg)
    apbatch("repo", "create", str(night["out"] / "prompt"), config=[])
    apbatch("embargo", "release", "--now", "2100-01-01T00:00:00Z", config=cfg)
    apbatch("obscore", "update", config=cfg)
    apbatch("tap", "init", config=cfg)
    proc = subprocess.Popen([sys.executable, "-m", "apbatch", "tap", "serve", "--port", "0",
                             *[a for c in cfg for a in ("--config", str(c))]],
                            stdout=subprocess.PIPE, stderr=subprocess.PIPE, text=True,
                            env={**os.environ, "APBATCH_CONFIG": ""})
    try:
        url = proc.stdout.readline().strip()
        assert url.startswith("http://127.0.0.1:"), proc.stderr.read() if proc.poll() is not None else url
        yield pyvo.dal.TAPService(url)
    finally:
        proc.terminate()
        proc.wait(timeout=30)


def test_tap_returns_the_apdb_field_for_field(night, tap):
    for table, key in (("DiaSource", "diaSourceId"), ("DiaObject", "diaObjectId")):
        apdb = _apdb(night["out"], table).sort_values([key, *(["validityStartMjdTai"] if table == "DiaObject"
                                                               else [])], ignore_index=True)
        got = tap.search(f"SELECT * FROM ppdb.{table}", maxrec=100000).to_table().to_pandas()
        assert len(apdb) > 0
        if table == "DiaObject":  # pinned: one version per object, the one valid now
            last = apdb.groupby(key)["validityStartMjdTai"].transform("max") == apdb["validityStartMjdTai"]
            apdb = apdb[last].reset_index(drop=True)
        got = got.sort_values(key, ignore_index=True)
        assert len(got) == len(apdb), table
        checked = 0
        for column in apdb.columns:
            if column not in got.columns or column in ("validityEndMjdTai",):
                continue
            a, b = apdb[column], got[column]
            if pd.api.types.is_float_dtype(a):
                # the schema's float columns are REAL (float32) in PostgreSQL, SQLite keeps 8 bytes
                rtol = 1e-6 if b.dtype == np.float32 else 1e-12
                np.testing.assert_allclose(b.astype(float), a.astype(float), rtol=rtol, equal_nan=True,
                                           err_msg=f"{table}.{column}")
            elif pd.api.types.is_integer_dtype(a) or pd.api.types.is_bool_dtype(a):
                assert list(b.astype(a.dtype)) == list(a), f"{table}.{column}"
            else:
                continue  # timestamps and strings: VOTable text forms
            checked += 1
        assert checked >= 20, (table, checked)
    # the DIA sources are as many as the demo alerted on, and their fluxes are nJy-sized
    src = _apdb(night["out"], "DiaSource")
    assert len(src) == night["summary"]["dia_sources"]


def test_cone_search_in_adql(night, tap):
    src = _apdb(night["out"], "DiaSource")
    ra0, dec0 = float(src["ra"].median()), float(src["dec"].median())
    radius = 0.05
    got = tap.search("SELECT diaSourceId, ra, dec FROM ppdb.DiaSource WHERE CONTAINS(POINT('ICRS', ra, dec), "
                     f"CIRCLE('ICRS', {ra0}, {dec0}, {radius})) = 1").to_table()
    d = np.degrees(np.arccos(np.clip(
        np.sin(np.radians(dec0)) * np.sin(np.radians(src["dec"]))
        + np.cos(np.radians(dec0)) * np.cos(np.radians(src["dec"])) * np.cos(np.radians(src["ra"] - ra0)),
        -1, 1)))
    expected = set(src["diaSourceId"][d < radius])
    assert 0 < len(expected) < len(src)
    assert {int(i) for i in got["diaSourceId"]} == expected


def test_obscore_records_open_with_astropy(night, tap):
    from astropy.io import fits
    from lsst.sphgeom import ConvexPolygon, LonLat, UnitVector3d

    every = tap.search("SELECT obs_id, calib_level, access_url, s_region, lsst_visit FROM ivoa.ObsCore",
                       maxrec=1000).to_table()
    # 3 visits of the CCD, each with a calibrated (2) and a difference (3) image
    by_visit: dict[int, list[int]] = {}
    for row in every:
        by_visit.setdefault(int(row["lsst_visit"]), []).append(int(row["calib_level"]))
    assert sorted(sorted(v) for v in by_visit.values()) == [[2, 3]] * 3
    for row in every:
        path = str(row["access_url"]).removeprefix("file://")
        with fits.open(path) as hdul:
            assert any(h.data is not None and h.data.ndim == 2 and min(h.data.shape) > 1000 for h in hdul)
    # a cone in ADQL on s_region finds exactly the images whose polygon (DALI, degrees) holds the point
    src = _apdb(night["out"], "DiaSource")
    ra0, dec0 = float(src["ra"].median()), float(src["dec"].median())
    found = tap.search("SELECT obs_id, calib_level FROM ivoa.ObsCore WHERE CONTAINS(POINT('ICRS', "
                       f"{ra0}, {dec0}), s_region) = 1").to_table()
    point = UnitVector3d(LonLat.fromDegrees(ra0, dec0))

    def holds(region) -> bool:
        v = np.asarray(region, dtype=float).reshape(-1, 2)
        return ConvexPolygon([UnitVector3d(LonLat.fromDegrees(*xy)) for xy in v]).contains(point)

    expected = {(str(r["obs_id"]), int(r["calib_level"])) for r in every if holds(r["s_region"])}
    assert 0 < len(expected) and {(str(r["obs_id"]), int(r["calib_level"])) for r in found} == expected


def test_night_footprint_moc_covers_the_ccd(night):
    from apbatch.config import load_config
    from mocpy import MOC

    cfg = load_config([str(c) for c in night["configs"]], environ={})
    day_obs = int(yaml.safe_load(apbatch("night", "footprint", "--out", str(night["out"] / "fp"), "--json",
                                         "--day-obs", str(_day_obs(cfg)), config=night["configs"]).stdout)
                  ["day_obs"])
    moc = MOC.from_fits(str(night["out"] / "fp" / f"night-{day_obs}.moc.fits"))
    src = _apdb(night["out"], "DiaSource")
    import astropy.units as u

    inside = moc.contains_lonlat(src["ra"].to_numpy() * u.deg, src["dec"].to_numpy() * u.deg)
    assert inside.all()
    far = moc.contains_lonlat((src["ra"].to_numpy()[:5] + 2.0) * u.deg, src["dec"].to_numpy()[:5] * u.deg)
    assert not far.any()
    area = moc.sky_fraction * 4 * math.pi * (180 / math.pi) ** 2
    assert 0.05 < area < 3 * 0.0504 * 1.06  # one ComCam CCD (0.0504 deg^2) in 3 dithered visits


def _day_obs(cfg) -> int:
    from apbatch.ledger import Ledger

    ledger = Ledger.from_config(cfg, create=False)
    try:
        return max(r.day_obs for r in ledger.rows())
    finally:
        ledger.close()


def test_a_second_pass_of_every_command_changes_nothing(night, tap):
    out = yaml.safe_load(apbatch("embargo", "release", "--now", "2100-01-01T00:00:00Z", "--json",
                                 config=night["configs"]).stdout)
    assert out["released"] == 0 and out["since"] is not None  # started from the first pass's mark
    out = yaml.safe_load(apbatch("obscore", "update", "--json", config=night["configs"]).stdout)
    assert (out["added"], out["removed"]) == (0, 0) and out["since"] is not None  # from the last start
    out = yaml.safe_load(apbatch("obscore", "update", "--full", "--json", config=night["configs"]).stdout)
    assert (out["added"], out["removed"], out["unchanged"], out["since"]) == (0, 0, 6, None)
    apbatch("ppdb", "replicate", config=night["configs"])
    n = len(tap.search("SELECT diaSourceId FROM ppdb.DiaSource", maxrec=100000).to_table())
    assert n == len(_apdb(night["out"], "DiaSource"))
