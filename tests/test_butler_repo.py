"""Tests for apbatch.butler.repo, .ingest and .skymaps, and ``apbatch repo``: a repository in tmp_path."""

import dataclasses
from pathlib import Path

import numpy as np
import pytest
import yaml
from apbatch.butler import datasets as ds
from apbatch.butler.ingest import ingest_manifest, load_manifest
from apbatch.butler.repo import (
    create_repo,
    day_obs_timespan,
    register_exposures,
    register_instrument,
    visit_records,
)
from apbatch.cli import cli
from apbatch.errors import BadInputError
from apbatch.image import Image, write_image
from apbatch.raw import translate_header
from apbatch.skymap import SkyMap
from click.testing import CliRunner

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


@pytest.fixture
def butler(tmp_path):
    b = create_repo(tmp_path / "repo")
    register_instrument(b, "LSSTComCam")
    return b


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


def test_calibration_without_group_is_its_own_visit():
    m = dataclasses.asdict(comcam_meta(12))
    m |= {"group_id": None, "visit_id": None, "observation_type": "bias", "ra": None, "dec": None}
    visits, defs, _ = visit_records([m])
    assert visits[0]["id"] == m["exposure_id"] and defs == [
        {"instrument": "LSSTComCam", "exposure": m["exposure_id"], "visit": m["exposure_id"]}
    ]


# ---------------------------------------------------------------- manifests
def small_image(value):
    return Image(np.full((20, 30), value, np.float32), np.ones((20, 30), np.float32))


def write_calibs(directory, entries=None):
    directory.mkdir(parents=True, exist_ok=True)
    write_image(small_image(1.0), directory / "bias_old.fits", lossless=True)
    write_image(small_image(2.0), directory / "bias_new.fits", lossless=True)
    write_image(small_image(0.9), directory / "flat_g.fits", lossless=True)
    entries = (
        entries
        if entries is not None
        else [
            {
                "dataset_type": "bias",
                "file": "bias_old.fits",
                "data_id": {"detector": 4},
                "valid_from": None,
                "valid_to": "2024-11-01T00:00:00",
            },
            {
                "dataset_type": "bias",
                "file": "bias_new.fits",
                "data_id": {"detector": "R22_S11"},
                "valid_from": "2024-11-01T00:00:00",
            },
            {
                "dataset_type": "flat",
                "file": "flat_g.fits",
                "data_id": {"detector": 4, "physical_filter": "g_01"},
                "valid_from": 60000.0,
                "valid_to": None,
            },
        ]
    )
    (directory / "manifest.yaml").write_text(
        yaml.safe_dump({"instrument": "LSSTComCam", "datasets": entries})
    )
    return directory


SKYMAP = SkyMap(
    "apbatch_sim", [(10.0, -5.0), (53.0, -28.0)], patch_size=400, overlap=20, tract_radius_deg=0.05
)  # 5 x 5 patches per tract


def write_templates(directory):
    directory.mkdir(parents=True, exist_ok=True)
    (directory / "skymap.yaml").write_text(yaml.safe_dump(SKYMAP.to_dict()))
    for patch in (5, 6):
        write_image(small_image(float(patch)), directory / f"t1_p{patch}_g.fits", lossless=True)
    (directory / "manifest.yaml").write_text(
        yaml.safe_dump(
            {
                "instrument": "LSSTComCam",
                "skymap": "skymap.yaml",
                "datasets": [
                    {
                        "dataset_type": "template_coadd",
                        "file": f"t1_p{p}_g.fits",
                        "data_id": {"tract": 1, "patch": p, "band": "g"},
                    }
                    for p in (5, 6)
                ],
            }
        )
    )
    return directory


def test_ingest_calibs_with_validity_ranges(butler, tmp_path):
    from apbatch.butler.ingest import _time
    from lsst.daf.butler import Timespan

    assert ingest_manifest(butler, write_calibs(tmp_path / "calibs")) == 3
    coll = ds.calib_collection("LSSTComCam")

    def bias_at(iso):
        ref = butler.find_dataset(
            "bias",
            instrument="LSSTComCam",
            detector=4,
            collections=coll,
            timespan=Timespan.fromInstant(_time(iso, "t")),
        )
        return None if ref is None else float(butler.get(ref).image[0, 0])

    assert bias_at("2024-10-01T00:00:00") == 1.0
    assert bias_at("2024-11-08T00:00:00") == 2.0
    flat = butler.find_dataset(
        "flat",
        instrument="LSSTComCam",
        detector=4,
        physical_filter="g_01",
        collections=coll,
        timespan=Timespan.fromInstant(_time(60623.0, "t")),
    )
    assert flat is not None and butler.get(flat).image[0, 0] == pytest.approx(0.9)


def test_ingest_templates_and_skymap(butler, tmp_path):
    assert ingest_manifest(butler, write_templates(tmp_path / "templates")) == 2
    run = ds.templates_run("LSSTComCam")
    ref = butler.find_dataset(
        "template_coadd",
        skymap="apbatch_sim",
        tract=1,
        patch=6,
        band="g",
        collections=ds.defaults_collection("LSSTComCam"),
    )
    assert ref is not None and butler.get(ref).image[0, 0] == 6.0
    assert (
        SkyMap.from_dict(butler.get(ds.SKYMAP, skymap="apbatch_sim", collections=run)).to_dict()
        == SKYMAP.to_dict()
    )
    (sm,) = butler.registry.queryDimensionRecords("skymap", skymap="apbatch_sim")
    assert (sm.tract_max, sm.patch_nx_max, sm.patch_ny_max) == (2, 5, 5)
    (patch,) = butler.registry.queryDimensionRecords("patch", skymap="apbatch_sim", tract=1, patch=6)
    assert (patch.cell_x, patch.cell_y) == (1, 1)
    ra, dec = SKYMAP.patch(1, 6).wcs.pixel_to_world_values(200.0, 200.0)
    from lsst.sphgeom import LonLat, UnitVector3d

    assert patch.region.contains(UnitVector3d(LonLat.fromDegrees(float(ra), float(dec))))
    # the same sky map name with another definition is refused
    other = SkyMap("apbatch_sim", [(10.0, -5.0)], patch_size=400, overlap=20, tract_radius_deg=0.05)
    (tmp_path / "templates" / "skymap.yaml").write_text(yaml.safe_dump(other.to_dict()))
    with pytest.raises(BadInputError, match="another definition"):
        ingest_manifest(butler, tmp_path / "templates")


@pytest.mark.parametrize(
    "entry, field",
    [
        ({"dataset_type": "dark", "file": "bias_old.fits", "data_id": {"detector": 4}}, "dataset_type"),
        ({"dataset_type": "bias", "file": "missing.fits", "data_id": {"detector": 4}}, "file"),
        ({"dataset_type": "flat", "file": "flat_g.fits", "data_id": {"detector": 4}}, "physical_filter"),
        ({"dataset_type": "bias", "file": "bias_old.fits", "data_id": {"detector": 99}}, "detector"),
        (
            {
                "dataset_type": "bias",
                "file": "bias_old.fits",
                "data_id": {"detector": 4},
                "valid_from": "soon",
            },
            "valid_from",
        ),
    ],
)
def test_bad_manifest_ingests_nothing(butler, tmp_path, entry, field):
    good = {"dataset_type": "bias", "file": "bias_new.fits", "data_id": {"detector": 4}}
    directory = write_calibs(tmp_path / "calibs", [good, entry])
    with pytest.raises(BadInputError, match=field):
        ingest_manifest(butler, directory)
    assert not butler.query_datasets(
        "bias", collections="LSSTComCam/calib/run/*", find_first=False, explain=False
    )
    assert not butler.collections.query("LSSTComCam/calib/run/*")


def test_reingest_is_refused_and_rolled_back(butler, tmp_path):
    directory = write_calibs(tmp_path / "calibs")
    ingest_manifest(butler, directory)
    write_image(small_image(3.0), directory / "bias_newer.fits", lossless=True)
    manifest = yaml.safe_load((directory / "manifest.yaml").read_text())
    manifest["datasets"].insert(
        0,
        {
            "dataset_type": "bias",
            "file": "bias_newer.fits",
            "data_id": {"detector": 4},
            "valid_from": "2024-12-01T00:00:00",
        },
    )
    (directory / "manifest.yaml").write_text(yaml.safe_dump(manifest))
    with pytest.raises(BadInputError, match="already ingested"):
        ingest_manifest(butler, directory)
    refs = butler.query_datasets(
        "bias", collections="LSSTComCam/calib/run/*", find_first=False, explain=False
    )
    assert len(refs) == 2  # the new bias of the failed ingest is not there


def test_manifest_errors(tmp_path):
    with pytest.raises(BadInputError, match="no manifest"):
        load_manifest(tmp_path)
    (tmp_path / "manifest.yaml").write_text("datasets: {}\n")
    with pytest.raises(BadInputError, match="datasets"):
        load_manifest(tmp_path)
    (tmp_path / "manifest.yaml").write_text("datasets: []\n")
    with pytest.raises(BadInputError, match="instrument"):
        load_manifest(tmp_path)
    write_templates(tmp_path / "t")
    (tmp_path / "t" / "skymap.yaml").unlink()
    with pytest.raises(BadInputError, match="skymap"):
        load_manifest(tmp_path / "t")


def test_ingest_requires_registered_instrument(tmp_path):
    b = create_repo(tmp_path / "repo")
    with pytest.raises(BadInputError, match="not registered"):
        ingest_manifest(b, write_calibs(tmp_path / "calibs"))


# ---------------------------------------------------------------- command line
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
