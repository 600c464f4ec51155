"""Tests for apbatch.butler.repo and ``apbatch repo``: a repository in tmp_path (the ``butler``
fixture is in conftest.py; ingest is tested in test_butler_ingest.py)."""

import dataclasses
import subprocess
import sys
from pathlib import Path

import pytest
import yaml
from apbatch.butler import datasets as ds
from apbatch.butler.ingest import ingest_manifest
from apbatch.butler.repo import (
    create_repo,
    day_obs_timespan,
    is_visit,
    register_exposures,
    register_instrument,
    visit_records,
)
from apbatch.cli import cli
from apbatch.errors import BadInputError
from apbatch.raw import translate_header
from click.testing import CliRunner
from test_butler_ingest import write_calibs, write_templates

HEADERS = Path(__file__).parent / "data" / "headers"


def comcam_meta(seq=266, index=1, n=1, group="2024-11-09T06:33:55.311", mjd=60623.27408938669):
    hdr = yaml.safe_load((HEADERS / "comCam-CC_O_20241108_000266_R22_S00.yaml").read_text())
    hdr |= {
        "SEQNUM": seq,
        "OBSID": f"CC_O_20241108_{seq:06d}",
        "CURINDEX": index,
        "MAXINDEX": n,
        "GROUPID": group,
        "MJD-BEG": mjd,
        "MJD-END": mjd + 30 / 86400,
    }
    return translate_header(hdr)


def test_create_repo_registers_dataset_types(tmp_path):
    b = create_repo(tmp_path / "repo")
    types = {dt.name: dt for dt in b.registry.queryDatasetTypes()}
    assert set(types) == {spec.name for spec in ds.DATASET_TYPES}
    assert (
        types["bias"].isCalibration() and types["flat"].isCalibration() and not types["raw"].isCalibration()
    )
    assert set(types["raw"].dimensions.required) == {"instrument", "detector", "exposure"}
    assert set(types["template_coadd"].dimensions.required) == {"skymap", "tract", "patch", "band"}
    assert types["dia_source_detector"].storageClass.name == "DataFrame"
    with pytest.raises(BadInputError, match="already holds"):
        create_repo(tmp_path / "repo")


def test_create_repo_rejects_bad_db_url(tmp_path):
    with pytest.raises(BadInputError, match="--db-url"):
        create_repo(tmp_path / "repo", db_url="mysql://x@y/z")
    assert not (tmp_path / "repo" / "butler.yaml").exists()


def test_register_instrument_is_idempotent(butler):
    assert register_instrument(butler, "comcam") == "LSSTComCam"
    dets = list(butler.registry.queryDimensionRecords("detector", instrument="LSSTComCam"))
    assert len(dets) == 9 and {d.full_name for d in dets} >= {"R22_S00", "R22_S22"}
    filters = {
        r.name: r.band
        for r in butler.registry.queryDimensionRecords("physical_filter", instrument="LSSTComCam")
    }
    assert filters["g_01"] == "g" and filters["i_06"] == "i" and "none" in filters
    chain = butler.collections.get_info(ds.defaults_collection("LSSTComCam")).children
    assert list(chain) == ["LSSTComCam/calib", "LSSTComCam/templates", "LSSTComCam/raw/all"]
    with pytest.raises(BadInputError, match="instrument"):
        register_instrument(butler, "HSC")


def test_register_sim_instrument_keeps_its_name(butler):
    assert register_instrument(butler, "LSSTCamSim") == "LSSTCamSim"
    assert len(list(butler.registry.queryDimensionRecords("detector", instrument="LSSTCamSim"))) == 205


def test_day_obs_timespan():
    ts = day_obs_timespan(20241108)
    assert ts.begin.isot.startswith("2024-11-08T12:00:00.000") and ts.end.isot.startswith(
        "2024-11-09T12:00:00.000"
    )
    assert ts.begin.scale == "tai"
    with pytest.raises(BadInputError, match="day_obs"):
        day_obs_timespan(20241399)


def test_two_snaps_make_one_visit(butler):
    snaps = [comcam_meta(266, 1, 2), comcam_meta(267, 2, 2, mjd=60623.27408938669 + 32 / 86400)]
    assert register_exposures(butler, snaps + snaps) == 2  # duplicates are fine
    register_exposures(butler, snaps)  # and so is doing it again
    (visit,) = butler.registry.queryDimensionRecords("visit", instrument="LSSTComCam")
    assert visit.id == 3110636353110000 and visit.exposure_time == 60.0 and visit.seq_num == 266
    assert visit.physical_filter == "g_01" and visit.name == "2024-11-09T06:33:55.311"
    assert visit.timespan.end.mjd == pytest.approx(60623.27408938669 + 62 / 86400, abs=1e-8)
    defs = list(butler.registry.queryDimensionRecords("visit_definition", instrument="LSSTComCam"))
    assert sorted(d.exposure for d in defs) == [2024110800266, 2024110800267]
    exp = next(
        iter(
            butler.registry.queryDimensionRecords("exposure", exposure=2024110800267, instrument="LSSTComCam")
        )
    )
    assert exp.group == "2024-11-09T06:33:55.311" and exp.obs_id == "CC_O_20241108_000267"
    assert exp.observation_type == "science" and exp.tracking_ra == pytest.approx(53.3124, abs=1e-3)
    (day,) = butler.registry.queryDimensionRecords("day_obs", instrument="LSSTComCam")
    assert day.id == 20241108 and day.timespan == day_obs_timespan(20241108)


def test_register_exposures_bad_input_inserts_nothing(butler):
    bad = dataclasses.asdict(comcam_meta(300))
    bad["physical_filter"] = None
    with pytest.raises(BadInputError, match="physical_filter"):
        register_exposures(butler, [comcam_meta(299), bad])
    assert not list(butler.registry.queryDimensionRecords("exposure", instrument="LSSTComCam"))


@pytest.mark.parametrize("obs_type", ["bias", "dark", "flat", "FLAT"])
def test_calibration_exposure_is_not_a_visit(butler, obs_type):
    m = dataclasses.asdict(comcam_meta(12))
    m |= {"group_id": None, "visit_id": None, "observation_type": obs_type, "ra": None, "dec": None}
    assert not is_visit(m)
    assert visit_records([m]) == ([], [], [], [])
    register_exposures(butler, [m, comcam_meta(266)])
    (exp_bias,) = butler.registry.queryDimensionRecords(
        "exposure", instrument="LSSTComCam", exposure=m["exposure_id"]
    )
    assert exp_bias.observation_type == obs_type
    (visit,) = butler.registry.queryDimensionRecords("visit", instrument="LSSTComCam")
    assert visit.id == 3110636353110000  # only the science exposure's
    defs = list(butler.registry.queryDimensionRecords("visit_definition", instrument="LSSTComCam"))
    assert [d.exposure for d in defs] == [2024110800266]


def test_visit_records_carry_sky_regions(butler):
    from apbatch.instruments import get_instrument
    from lsst.sphgeom import LonLat, UnitVector3d

    meta = comcam_meta(266)
    register_exposures(butler, [meta])
    (visit,) = butler.registry.queryDimensionRecords("visit", instrument="LSSTComCam")
    regions = {r.detector: r.region for r in butler.registry.queryDimensionRecords(
        "visit_detector_region", instrument="LSSTComCam", visit=visit.id)}
    cam = get_instrument("LSSTComCam")
    assert set(regions) == {d.id for d in cam.science_detectors}
    for det in cam.science_detectors:  # a CCD's centre: in its region, in the visit's, in no other CCD's
        ra, dec = cam.sky_wcs(det, meta.ra, meta.dec, meta.rotation).pixel_to_world_values(
            det.nx / 2, det.ny / 2)
        point = UnitVector3d(LonLat.fromDegrees(float(ra), float(dec)))
        assert visit.region.contains(point)
        assert [d for d, reg in regions.items() if reg.contains(point)] == [det.id]
    far = UnitVector3d(LonLat.fromDegrees(meta.ra + 1.0, meta.dec))
    assert not visit.region.contains(far)


# ---------------------------------------------------------------- manifests
def run_cli(*args):
    return CliRunner().invoke(cli, list(map(str, args)), catch_exceptions=True)


def test_cli_create_register_ingest(tmp_path):
    root = tmp_path / "repo"
    res = run_cli("repo", "create", root, "--json")
    assert res.exit_code == 0, res.output
    assert "raw" in res.output and "gen3.sqlite3" in res.output
    night = tmp_path / "night"
    night.mkdir()
    plan = [dataclasses.asdict(comcam_meta(266, 1, 2)), dataclasses.asdict(comcam_meta(267, 2, 2))]
    (night / "plan.yaml").write_text(yaml.safe_dump({"exposures": plan}))
    res = run_cli(
        "repo", "register", root, "--instrument", "LSSTComCam", "--night", night, "--day-obs", 20241109
    )
    assert res.exit_code == 0, res.output
    assert (
        "exposures: 2" in res.output
        and "LSSTComCam/prompt/20241108, LSSTComCam/prompt/20241109" in res.output
    )
    res = run_cli(
        "repo",
        "ingest",
        root,
        "--calibs",
        write_calibs(tmp_path / "c"),
        "--templates",
        write_templates(tmp_path / "t"),
    )
    assert res.exit_code == 0, res.output
    assert "calibs: 3" in res.output and "templates: 2" in res.output


def _butler_cli(*args):
    """Run daf_butler's own ``butler`` command (the one installed next to this Python)."""
    exe = Path(sys.executable).parent / "butler"
    return subprocess.run([str(exe), *map(str, args)], capture_output=True, text=True, timeout=120)


def test_butler_cli_lists_ccd_regions_and_finds_a_ccd_by_position(tmp_path):
    from apbatch.instruments import get_instrument

    root, night = tmp_path / "repo", tmp_path / "night"
    assert run_cli("repo", "create", root).exit_code == 0
    night.mkdir()
    science = dataclasses.asdict(comcam_meta(266))
    bias = dataclasses.asdict(comcam_meta(12)) | {"group_id": None, "visit_id": None,
                                                 "observation_type": "bias", "ra": None, "dec": None}
    (night / "plan.yaml").write_text(yaml.safe_dump({"exposures": [science, bias]}))
    res = run_cli("repo", "register", root, "--instrument", "LSSTComCam", "--night", night)
    assert res.exit_code == 0, res.output

    out = _butler_cli("query-dimension-records", root, "visit_detector_region")
    assert out.returncode == 0, out.stderr
    rows = [line.split() for line in out.stdout.splitlines()[2:]]
    assert sorted(int(r[1]) for r in rows) == list(range(9))  # the 9 ComCam CCDs of the one visit
    assert {r[0] for r in rows} == {"LSSTComCam"} and {r[2] for r in rows} == {"3110636353110000"}
    out = _butler_cli("query-dimension-records", root, "visit")
    assert out.returncode == 0 and "3110636353110000" in out.stdout
    assert str(bias["exposure_id"]) not in out.stdout  # the bias is an exposure, not a visit

    cam = get_instrument("LSSTComCam")
    det = cam.detector("R22_S12")
    wcs = cam.sky_wcs(det, science["ra"], science["dec"], science["rotation"])
    ra, dec = wcs.pixel_to_world_values(det.nx * 0.3, det.ny * 0.6)
    where = f"visit_detector_region.region OVERLAPS POINT({float(ra)}, {float(dec)})"
    out = _butler_cli("query-dimension-records", root, "visit_detector_region", "--where", where)
    assert out.returncode == 0, out.stderr
    assert [line.split()[:3] for line in out.stdout.splitlines()[2:]] == [
        ["LSSTComCam", str(det.id), "3110636353110000"]]
    where = f"visit_detector_region.region OVERLAPS POINT({science['ra'] + 2.0}, {science['dec']})"
    out = _butler_cli("query-dimension-records", root, "visit_detector_region", "--where", where)
    assert out.returncode == 0, out.stderr
    assert "No results" in out.stdout + out.stderr and "LSSTComCam" not in out.stdout


def test_cli_register_from_raw_headers(tmp_path):
    from test_butler_formatters import make_raw

    root = tmp_path / "repo"
    assert run_cli("repo", "create", root).exit_code == 0
    make_raw(tmp_path / "night" / "a" / "CC_O_20241108_000266_R22_S00.fits")
    res = run_cli("repo", "register", root, "--instrument", "LSSTComCam", "--night", tmp_path / "night")
    assert res.exit_code == 0, res.output
    assert "exposures: 1" in res.output


def test_cli_errors(tmp_path):
    res = run_cli("repo", "register", tmp_path, "--instrument", "LSSTComCam")
    assert isinstance(res.exception, BadInputError) and "not a butler repository" in str(res.exception)
    root = tmp_path / "repo"
    run_cli("repo", "create", root)
    res = run_cli("repo", "ingest", root)
    assert isinstance(res.exception, BadInputError) and "nothing to ingest" in str(res.exception)
    (tmp_path / "empty").mkdir()
    res = run_cli("repo", "register", root, "--instrument", "LSSTComCam", "--night", tmp_path / "empty")
    assert isinstance(res.exception, BadInputError) and "no exposures" in str(res.exception)
    night = tmp_path / "latiss"
    night.mkdir()
    (night / "plan.yaml").write_text(yaml.safe_dump({"exposures": [{"instrument": "LATISS"}]}))
    res = run_cli("repo", "register", root, "--instrument", "LSSTComCam", "--night", night)
    assert isinstance(res.exception, BadInputError) and "LATISS" in str(res.exception)


def test_cli_register_simulated_night(tmp_path):
    from apbatch.sim.night import plan_night

    plan = plan_night(
        "LSSTComCam", n_visits=3, seed=7, detectors=[4], snaps=(2,), calibrations={"BIAS": 2, "FLAT": 1}
    )
    (tmp_path / "night").mkdir()
    plan.save(tmp_path / "night" / "night.json")
    root = tmp_path / "repo"
    assert run_cli("repo", "create", root).exit_code == 0
    res = run_cli("repo", "register", root, "--instrument", "LSSTComCam", "--night", tmp_path / "night")
    assert res.exit_code == 0, res.output
    from lsst.daf.butler import Butler

    b = Butler.from_config(str(root))
    visits = {r.id: r for r in b.registry.queryDimensionRecords("visit", instrument="LSSTComCam")}
    for v in plan.visits:
        assert visits[v.visit_id].exposure_time == pytest.approx(sum(e.exptime for e in v.exposures))
    n_exp = len(plan.calibrations) + sum(len(v.exposures) for v in plan.visits)
    assert len(list(b.registry.queryDimensionRecords("exposure", instrument="LSSTComCam"))) == n_exp
    assert set(visits) == {v.visit_id for v in plan.visits}  # the bias and flat exposures are no visits


@pytest.mark.postgres
def test_postgresql_registry_with_calibration_validity_ranges(tmp_path, postgres_url):
    """The butler registry on a real PostgreSQL server (the scale tier): create, register,
    ingest certified calibrations (timespan exclusion constraints need btree_gist), find, get."""
    from apbatch.butler.ingest import _time
    from lsst.daf.butler import Timespan

    butler = create_repo(tmp_path / "pgrepo", db_url=postgres_url)
    import sqlalchemy as sa

    engine = sa.create_engine(postgres_url)
    try:  # the registry's tables are in the PostgreSQL database, not a SQLite file
        assert "dataset_type" in sa.inspect(engine).get_table_names()
    finally:
        engine.dispose()
    assert not (tmp_path / "pgrepo" / "gen3.sqlite3").exists()
    register_instrument(butler, "LSSTComCam")
    assert ingest_manifest(butler, write_calibs(tmp_path / "calibs")) == 3
    coll = ds.calib_collection("LSSTComCam")

    def bias_at(iso):
        ref = butler.find_dataset("bias", instrument="LSSTComCam", detector=4, collections=coll,
                                  timespan=Timespan.fromInstant(_time(iso, "t")))
        return None if ref is None else float(butler.get(ref).image[0, 0])

    assert bias_at("2024-10-01T00:00:00") == 1.0
    assert bias_at("2024-11-08T00:00:00") == 2.0
