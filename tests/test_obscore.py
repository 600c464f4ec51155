"""Tests for apbatch.products.obscore(_records), apbatch.script.obscore and ``apbatch obscore``.

A real embargo repository (``apbatch repo create`` + register of a two-visit night, images put by
``ButlerIO.put_outputs``) is released with ``apbatch.products.embargo.release`` into a prompt
repository once per module; each test gets a fresh PostgreSQL database (pg_sphere from template1).

Night (TAI, 30 s visits):
  V1  2024-11-09 06:34  g  R22_S00 calexp + diffim; R22_S01 calexp only (no template)
  V2  2024-11-11 06:34  r  R22_S00 calexp + diffim, pointed 3 degrees east of V1
"""

import datetime
import re
import shutil
import subprocess
import sys
import uuid
from pathlib import Path

import numpy as np
import pytest
import sqlalchemy as sa
import yaml
from apbatch.butler import datasets as ds
from apbatch.butler.io import ButlerIO
from apbatch.cli import cli, main
from apbatch.config import load_config
from apbatch.config_services import ObscoreConfig
from apbatch.errors import BadInputError
from apbatch.products.embargo import purge_images, release
from apbatch.products.obscore import (
    COLUMNS,
    create_obscore_table,
    obscore_table,
    update_obscore,
)
from apbatch.products.obscore_changes import stored_images
from apbatch.products.obscore_records import SPECTRAL_RANGES
from apbatch.script import obscore as script
from apbatch.script import repo as repo_script
from astropy.io import fits
from astropy.time import Time
from click.testing import CliRunner
from lsst.daf.butler import Butler
from lsst.sphgeom import LonLat
from test_butler_images import ccd_image
from test_embargo import INSTRUMENT, ended, exposure

HOUR = datetime.timedelta(hours=1)
DEFAULTS = ObscoreConfig()
V1 = exposure(20241108, 266, "2024-11-09T06:34:00.000")
V2 = exposure(20241110, 100, "2024-11-11T06:34:00.000")
V2 |= {"ra": V1["ra"] + 3.0, "physical_filter": "r_03", "band": "r"}
RELEASED = {(V1["visit_id"], 0, 2), (V1["visit_id"], 0, 3), (V1["visit_id"], 1, 2),
            (V2["visit_id"], 0, 2), (V2["visit_id"], 0, 3)}
"""(visit, detector, calib_level) of every released image."""


@pytest.fixture(scope="module")
def prompt_repo(tmp_path_factory):
    """The prompt repository after the release of both visits (read only: copy it to change it)."""
    root = tmp_path_factory.mktemp("obscore")
    (root / "night").mkdir()
    (root / "night" / "plan.yaml").write_text(yaml.safe_dump({"exposures": [V1, V2]}))
    repo_script.create(root / "embargo")
    repo_script.register(root / "embargo", INSTRUMENT, root / "night")
    embargo = Butler.from_config(str(root / "embargo"), writeable=True)
    io = ButlerIO(embargo, INSTRUMENT)
    img = ccd_image(detector=0)
    io.put_outputs(V1["visit_id"], 0, calexp=img, diffim=img)
    io.put_outputs(V1["visit_id"], 1, calexp=img)
    io.put_outputs(V2["visit_id"], 0, calexp=img, diffim=img)
    repo_script.create(root / "prompt")
    prompt = Butler.from_config(str(root / "prompt"), writeable=True)
    assert release(embargo, prompt, ended(V2) + 81 * HOUR, 80).released == 5
    return root / "prompt"


@pytest.fixture
def prompt(prompt_repo):
    return Butler.from_config(str(prompt_repo))


@pytest.fixture
def own_prompt(prompt_repo, tmp_path):
    """A writeable copy of the prompt repository (for purges)."""
    shutil.copytree(prompt_repo, tmp_path / "prompt")
    return Butler.from_config(str(tmp_path / "prompt"), writeable=True)


def update(butler, url, **kwargs):
    return update_obscore(butler, url, obs_collection=DEFAULTS.obs_collection,
                          publisher_did=DEFAULTS.publisher_did, **kwargs)


def rows(url, where="TRUE", **bind):
    engine = sa.create_engine(url)
    try:
        with engine.connect() as conn:
            query = f"SELECT *, s_region::text AS region_text FROM ivoa.obscore WHERE {where}"
            return [dict(r) for r in conn.execute(sa.text(query), bind).mappings()]
    finally:
        engine.dispose()


def keys(records):
    return {(r["lsst_visit"], r["lsst_detector"], r["calib_level"]) for r in records}


def vertices_deg(spoly_text):
    """(lon, lat) degrees of pg_sphere's spoly output (radians, its default output mode)."""
    pairs = re.findall(r"\(\s*([-0-9.e]+)\s*,\s*([-0-9.e]+)\s*\)", spoly_text)
    return np.degrees(np.array(pairs, dtype=float))


# ---------------------------------------------------------------- the table
def test_table_has_the_sdm_schemas_columns_an_spoly_region_and_indexes(postgres_url):
    shown = create_obscore_table(postgres_url)
    assert "apbatch@127.0.0.1" in shown
    create_obscore_table(postgres_url)  # exists: nothing happens
    engine = sa.create_engine(postgres_url)
    with engine.connect() as conn:
        types = dict(conn.execute(sa.text(
            "SELECT column_name, udt_name FROM information_schema.columns "
            "WHERE table_schema = 'ivoa' AND table_name = 'obscore'")).all())
        indexes = dict(conn.execute(sa.text(
            "SELECT indexname, indexdef FROM pg_indexes WHERE schemaname = 'ivoa'")).all())
    engine.dispose()
    assert set(types) == set(COLUMNS)
    assert {"dataproduct_type", "calib_level", "obs_publisher_did", "access_url", "s_ra", "s_dec",
            "s_fov", "t_min", "t_max", "em_min", "em_max", "lsst_visit", "lsst_detector"} <= set(types)
    assert (types["s_region"], types["calib_level"], types["t_min"]) == ("spoly", "int4", "float8")
    assert "USING gist (s_region)" in indexes["obscore_s_region_gist"]
    assert "UNIQUE" in indexes["obscore_pkey"] and "(obs_publisher_did)" in indexes["obscore_pkey"]
    with pytest.raises(BadInputError, match="obscore.table"):
        obscore_table(sa.MetaData(), "ivoa", "ObsCore")


# ---------------------------------------------------------------- the records
def test_one_record_per_released_image_with_the_butlers_values(prompt, postgres_url):
    s = update(prompt, postgres_url)
    assert (s.added, s.removed, s.unchanged) == (5, 0, 0)
    assert [(v.visit, v.added) for v in s.visits] == [(V1["visit_id"], 3), (V2["visit_id"], 2)]
    records = rows(postgres_url)
    assert len(records) == 5 and keys(records) == RELEASED  # R22_S01 of V1: calibrated image only
    refs = {ref.id: ref for ref in stored_images(prompt)}
    for r in records:
        ref = refs[uuid.UUID(r["obs_publisher_did"].rsplit("=", 1)[1])]
        assert r["obs_publisher_did"] == DEFAULTS.publisher_did.format(id=ref.id)
        assert (r["lsst_visit"], r["lsst_detector"]) == (ref.dataId["visit"], ref.dataId["detector"])
        assert r["calib_level"] == {ds.CALEXP: 2, ds.DIFFIM: 3}[ref.datasetType.name]
        assert r["dataproduct_type"] == "image" and r["obs_collection"] == "LSST.Prompt"
        assert r["instrument_name"] == INSTRUMENT and r["facility_name"] == "Rubin:Simonyi"
        assert (r["s_xel1"], r["s_xel2"], r["t_exptime"]) == (4072, 4000, 30.0)
        band = ref.dataId["band"]
        assert (r["lsst_band"], r["lsst_filter"]) == (band, ref.dataId["physical_filter"])
        assert (r["em_min"], r["em_max"]) == SPECTRAL_RANGES[band]
        timespan = ref.dataId.records["visit"].timespan
        assert r["t_min"] == pytest.approx(timespan.begin.utc.mjd, abs=1e-9)
        assert r["t_max"] == pytest.approx(timespan.end.utc.mjd, abs=1e-9)
        assert r["t_max"] - r["t_min"] == pytest.approx(30 / 86400, abs=1e-9)
        region = ref.dataId.records["visit_detector_region"].region
        expected = np.array([[LonLat(v).getLon().asDegrees(), LonLat(v).getLat().asDegrees()]
                             for v in region.getVertices()])
        np.testing.assert_allclose(vertices_deg(r["region_text"]), expected, rtol=0, atol=1e-6)
        centre = LonLat(region.getBoundingCircle().getCenter())
        assert (r["s_ra"], r["s_dec"]) == pytest.approx((centre.getLon().asDegrees(),
                                                         centre.getLat().asDegrees()), abs=1e-9)
    assert {r["lsst_band"] for r in records} == {"g", "r"}


def test_access_url_is_the_file_astropy_reads(prompt, postgres_url):
    update(prompt, postgres_url)
    for r in rows(postgres_url):
        assert r["access_url"].startswith("file:///") and r["access_format"] == "image/fits"
        with fits.open(r["access_url"][len("file://"):]) as hdus:
            assert hdus["IMAGE"].data.shape == (4000, 4072)
            assert hdus["IMAGE"].data[2002, 1002] > 4000  # the star ccd_image puts there


def test_pg_sphere_point_at_a_ccd_centre_finds_exactly_that_ccds_records(prompt, postgres_url):
    update(prompt, postgres_url)
    for visit, detector in [(V1["visit_id"], 0), (V1["visit_id"], 1), (V2["visit_id"], 0)]:
        (record,) = prompt.query_dimension_records("visit_detector_region", instrument=INSTRUMENT,
                                                    visit=visit, detector=detector)
        centre = LonLat(record.region.getBoundingCircle().getCenter())
        found = rows(postgres_url, "spoint(radians(:ra), radians(:dec)) @ s_region",
                     ra=centre.getLon().asDegrees(), dec=centre.getLat().asDegrees())
        assert keys(found) == {k for k in RELEASED if k[:2] == (visit, detector)}
    assert rows(postgres_url, "spoint(radians(0.0), radians(0.0)) @ s_region") == []


# ---------------------------------------------------------------- updates
def test_second_update_changes_nothing_and_dry_run_changes_nothing(prompt, postgres_url):
    dry = update(prompt, postgres_url, dry_run=True)
    assert (dry.added, dry.dry_run) == (5, True)
    engine = sa.create_engine(postgres_url)
    assert not sa.inspect(engine).has_table("obscore", schema="ivoa")  # not even created
    engine.dispose()
    first = update(prompt, postgres_url)
    before = {r["obs_publisher_did"]: r for r in rows(postgres_url)}
    again = update(prompt, postgres_url)
    assert (first.added, again.added, again.removed, again.unchanged, again.visits) == (5, 0, 0, 5, [])
    assert {r["obs_publisher_did"]: r for r in rows(postgres_url)} == before
    assert update(prompt, postgres_url, dry_run=True).added == 0


def test_purge_then_update_removes_the_purged_images_records_only(own_prompt, postgres_url):
    update(own_prompt, postgres_url)
    engine = sa.create_engine(postgres_url)
    with engine.begin() as conn:  # a record of another publisher's: never touched
        conn.execute(sa.text("INSERT INTO ivoa.obscore (calib_level, obs_id, obs_collection, "
                             "obs_publisher_did, lsst_visit) VALUES (2, 'x', 'other', 'ivo://else?1', 1)"))
    engine.dispose()
    now = ended(V1) + datetime.timedelta(days=30, hours=1)  # V1 is 30 days old, V2 28
    assert purge_images(own_prompt, now, 30) == 3
    s = update(own_prompt, postgres_url)
    assert (s.added, s.removed, s.unchanged) == (0, 3, 2)
    assert [(v.visit, v.added, v.removed) for v in s.visits] == [(V1["visit_id"], 0, 3)]
    left = rows(postgres_url)
    assert keys(left) == {k for k in RELEASED if k[0] == V2["visit_id"]} | {(1, None, 2)}
    assert update(own_prompt, postgres_url).removed == 0


def test_an_update_killed_midway_leaves_the_table_as_it_was(own_prompt, postgres_url):
    def killed(change):
        raise KeyboardInterrupt(f"killed after visit {change.visit}")

    with pytest.raises(KeyboardInterrupt):
        update(own_prompt, postgres_url, after_visit=killed)  # V1's 3 records written, not committed
    assert rows(postgres_url) == []
    assert update(own_prompt, postgres_url).added == 5
    purge_images(own_prompt, ended(V1) + datetime.timedelta(days=30, hours=1), 30)
    with pytest.raises(KeyboardInterrupt):  # removal of V1's records rolled back too
        update(own_prompt, postgres_url, after_visit=killed)
    assert keys(rows(postgres_url)) == RELEASED
    s = update(own_prompt, postgres_url)
    assert (s.added, s.removed, s.unchanged) == (0, 3, 2)
    assert len(rows(postgres_url)) == 2  # nothing lost, nothing duplicated


# ---------------------------------------------------------------- script and CLI
def write_config(tmp_path, prompt="prompt", **sections):
    path = tmp_path / "apbatch.yaml"
    data = {"root": str(tmp_path), "embargo": {"prompt_repo": prompt}} | sections
    path.write_text(yaml.safe_dump(data))
    return path


def test_cli_create_and_update(prompt_repo, tmp_path, postgres_url):
    config = write_config(tmp_path, str(prompt_repo), ppdb={"url": postgres_url})  # obscore.url unset
    res = CliRunner().invoke(cli, ["obscore", "create", "--config", str(config)])
    assert res.exit_code == 0, res.output
    assert res.output.startswith("ObsCore table ivoa.obscore at postgresql+psycopg2://apbatch@")
    res = CliRunner().invoke(cli, ["obscore", "update", "--config", str(config), "--dry-run"])
    assert res.exit_code == 0, res.output
    assert "ivoa.obscore: would add 5 record(s), would remove 0, 0 unchanged" in res.output
    assert f"LSSTComCam visit {V1['visit_id']}: +3 -0" in res.output
    res = CliRunner().invoke(cli, ["obscore", "update", "--config", str(config), "--json"])
    assert res.exit_code == 0, res.output
    out = yaml.safe_load(res.output)
    assert (out["added"], out["table"], len(out["visits"])) == (5, "ivoa.obscore", 2)
    lines = []
    cfg = load_config([str(config)])
    again = script.update(cfg, progress=lines.append)  # from the mark the --json update left
    assert again["since"] == out["started"] and again["added"] == again["removed"] == 0 and lines == []
    full = script.update(cfg, full=True)
    assert (full["since"], full["unchanged"]) == (None, 5) and len(rows(postgres_url)) == 5
    (tmp_path / script.MARK_FILE).write_text("{not json")  # a damaged mark: a full update
    assert script.update(cfg)["since"] is None


def test_an_update_from_the_last_start_looks_only_at_new_images(own_prompt, postgres_url):
    first = update(own_prompt, postgres_url)
    no_margin = datetime.timedelta(0)
    s = update(own_prompt, postgres_url, since=Time(first.started, scale="utc"), margin=no_margin)
    assert (s.added, s.removed, s.unchanged, s.since) == (0, 0, 0, first.started)  # nothing new
    # a CCD rerun after its release: its calibrated image replaced by a new dataset (as the release does)
    run = ds.output_run(INSTRUMENT, V1["day_obs"])
    ccd = {"instrument": INSTRUMENT, "visit": V1["visit_id"], "detector": 0}
    old = own_prompt.query_datasets(ds.CALEXP, collections=run, data_id=ccd)
    own_prompt.pruneDatasets(old, disassociate=True, unstore=True, purge=True)
    ButlerIO(own_prompt, INSTRUMENT).put_outputs(V1["visit_id"], 0, calexp=ccd_image(detector=0))
    s = update(own_prompt, postgres_url, since=Time(s.started, scale="utc"), margin=no_margin)
    assert (s.added, s.removed, s.unchanged) == (1, 1, 0)
    assert keys(rows(postgres_url)) == RELEASED and len(rows(postgres_url)) == 5
    full = update(own_prompt, postgres_url)  # what a full update would have left
    assert (full.added, full.removed, full.unchanged) == (0, 0, 5)
    # purged images: only a full update (the crontab's, after --purge) notices them
    assert purge_images(own_prompt, ended(V1) + datetime.timedelta(days=30, hours=1), 30) == 3
    since = Time(full.started, scale="utc")
    assert update(own_prompt, postgres_url, since=since, margin=no_margin).removed == 0
    assert update(own_prompt, postgres_url).removed == 3


def test_obscore_url_wins_over_ppdb_url_and_sqlite_paths_resolve_under_root(tmp_path):
    cfg = load_config([str(write_config(tmp_path, ppdb={"url": "sqlite:///ppdb.sqlite3"}))])
    assert script.database_url(cfg) == (f"sqlite:///{tmp_path.resolve()}/ppdb.sqlite3", "ppdb.url")
    cfg = load_config([str(write_config(tmp_path, obscore={"url": "postgresql://u@127.0.0.1/o"}))])
    assert script.database_url(cfg) == ("postgresql://u@127.0.0.1/o", "obscore.url")


@pytest.fixture
def database_without_pg_sphere(postgres_server):
    """A database made from template0 (no pg_sphere) owned by a role that may not create it."""
    role, name = f"nosphere_{uuid.uuid4().hex[:8]}", f"nosphere_{uuid.uuid4().hex[:8]}"
    admin = sa.create_engine(f"{postgres_server}/postgres", isolation_level="AUTOCOMMIT")
    with admin.connect() as conn:
        conn.execute(sa.text(f"CREATE ROLE {role} LOGIN NOSUPERUSER"))
        conn.execute(sa.text(f"CREATE DATABASE {name} TEMPLATE template0 OWNER {role}"))
    try:
        yield f"{postgres_server.replace('apbatch@', f'{role}@')}/{name}"
    finally:
        with admin.connect() as conn:
            conn.execute(sa.text(f"DROP DATABASE IF EXISTS {name} WITH (FORCE)"))
            conn.execute(sa.text(f"DROP ROLE IF EXISTS {role}"))
        admin.dispose()


@pytest.mark.parametrize("case", ["no-prompt-repo", "missing-repo", "sqlite", "unreachable", "no-pg-sphere"])
def test_bad_input_is_one_line_and_exit_2(case, prompt_repo, tmp_path, capsys, request):
    from conftest import free_port

    prompt = {"no-prompt-repo": None, "missing-repo": "nowhere"}.get(case, str(prompt_repo))
    if case == "unreachable":
        url = f"postgresql://apbatch@127.0.0.1:{free_port()}/x?connect_timeout=2"
    elif case == "no-pg-sphere":
        url = request.getfixturevalue("database_without_pg_sphere")
    else:
        url = request.getfixturevalue("postgres_server") + "/postgres"
    sections = {"obscore": {"url": url}} if case != "sqlite" else {}
    config = write_config(tmp_path, prompt, **sections)
    with pytest.raises(SystemExit) as exc:
        main(["obscore", "update", "--config", str(config)])
    assert exc.value.code == 2
    (line,) = capsys.readouterr().err.strip().splitlines()
    expected = {"no-prompt-repo": "embargo.prompt_repo: not set",
                "missing-repo": "embargo.prompt_repo: no butler repository",
                "sqlite": "ppdb.url: sqlite:///", "unreachable": "obscore.url: cannot reach",
                "no-pg-sphere": "obscore.url: pg_sphere is not installed"}[case]
    assert line.startswith(f"error: {expected}"), line
    if case == "sqlite":
        assert "ObsCore needs PostgreSQL with pg_sphere: set obscore.url (or ppdb.url) to postgresql:" in line


def test_the_installed_command_fails_in_one_line(tmp_path):
    config = write_config(tmp_path, None)
    out = subprocess.run([str(Path(sys.executable).parent / "apbatch"), "obscore", "update", "--config",
                          str(config)], capture_output=True, text=True, timeout=120)
    assert out.returncode == 2 and out.stderr.strip() == (
        "error: embargo.prompt_repo: not set (set it to the public repository that "
        "`apbatch embargo release` fills)")

