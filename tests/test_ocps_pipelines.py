"""Tests for apbatch.ocps.pipelines: the registry, dataId checks, planning CCD work, request configs."""

from __future__ import annotations

import pytest
from apbatch.config import load_config
from apbatch.errors import BadInputError
from apbatch.ocps.model import DataId
from apbatch.ocps.pipelines import (
    Exposure,
    ExposureLookup,
    check_data_id,
    exposure_from_obsid,
    get_pipeline,
    plan_works,
    request_config,
)

OBSID = "MC_O_20251015_000007"
GROUP = "2025-10-16T01:02:03.456"


@pytest.mark.parametrize("pipeline, data_id, field", [
    ("nope", DataId("LSSTComCam", obsid=OBSID), "pipeline"),
    ("ap", DataId("HSC", obsid=OBSID), "instrument"),
    ("ap", DataId("LSSTComCam", obsid="MC_20251015"), "obsid"),
    ("ap", DataId("LSSTComCam"), "obsid"),
    ("ap", DataId("LSSTComCam", obsid=OBSID, detector=99), "detector"),
    ("ap", DataId("LSSTCam", obsid=OBSID, detector=189), "detector"),  # a wavefront CCD
    ("gather", DataId("LSSTComCam", obsid=OBSID), "group_id"),
])
def test_bad_requests_name_the_field(pipeline, data_id, field):
    with pytest.raises(BadInputError) as info:
        check_data_id(get_pipeline(pipeline), data_id)
    assert info.value.field == field and "\n" not in str(info.value)


def test_instrument_is_normalized():
    assert check_data_id(get_pipeline("ap"), DataId("lsstcomcam", obsid=OBSID)).instrument == "LSSTComCam"


def test_obsid_never_registered_plans_every_configured_ccd_without_pointing():
    exp = exposure_from_obsid("LSSTComCam", OBSID)
    works = plan_works(get_pipeline("ap"), DataId("LSSTComCam", obsid=OBSID), [], distributor="/d",
                       default_detectors=[0, 4, 8], default_exposure_time=15.0)
    assert [w.detector for w in works] == [0, 4, 8]
    w = works[1]
    assert (w.group_id, w.visit, w.day_obs, w.intent, w.image_names) == (OBSID, exp.exposure_id, 20251015,
                                                                       "science", (OBSID,))
    assert (w.ra, w.dec, w.physical_filter, w.exposure_time, w.nimages) == (None, None, None, 15.0, 1)
    # the job reads its pointing from the header: no --ra/--dec on its command line
    assert "--ra" not in w.job_args() and "--image" in w.job_args()


def _exp(seq, obs_type="science", dets=()):
    return Exposure(instrument="LSSTComCam", obs_id=f"MC_O_20251015_{seq:06d}",
                    exposure_id=2025101500000 + seq, group_id=GROUP, visit=3405059767890000,
                    day_obs=20251015, observation_type=obs_type,
                    exposure_time=15.0, physical_filter="r_03", ra=53.0, dec=-28.0, rotation=10.0,
                    detectors=dets)


def test_registered_group_is_one_job_per_ccd_with_every_snap():
    snaps = [_exp(7, dets=(4,)), _exp(8, dets=(4, 5))]
    works = plan_works(get_pipeline("ap"), DataId("LSSTComCam", group_id=GROUP), snaps, distributor="/d")
    assert [w.detector for w in works] == [4, 5]  # the CCDs that have raws
    assert works[0].image_names == (snaps[0].obs_id, snaps[1].obs_id) and works[0].nimages == 2
    assert (works[0].ra, works[0].physical_filter, works[0].detector_name) == (53.0, "r_03", "R22_S11")
    one = plan_works(get_pipeline("ap"), DataId("LSSTComCam", group_id=GROUP, detector=0), snaps,
                     distributor="/d")
    assert [w.detector for w in one] == [0]


def test_calib_verify_takes_the_exposure_intent_and_refuses_science():
    bias = dataclasses_replace(_exp(3, "bias"), group_id="2025101500003")
    (w,) = plan_works(get_pipeline("calib-verify"), DataId("LSSTComCam", obsid=bias.obs_id, detector=4),
                      [bias], distributor="/d")
    assert w.intent == "bias" and w.physical_filter is None
    with pytest.raises(BadInputError, match="not a calibration"):
        plan_works(get_pipeline("calib-verify"), DataId("LSSTComCam", obsid=OBSID), [_exp(7)],
                   distributor="/d")
    with pytest.raises(BadInputError, match="not a calibration"):  # type unknown: never registered
        plan_works(get_pipeline("calib-verify"), DataId("LSSTComCam", obsid=OBSID), [], distributor="/d")
    with pytest.raises(BadInputError) as info:
        plan_works(get_pipeline("ap"), DataId("LSSTComCam", group_id=GROUP), [], distributor="/d")
    assert info.value.field == "group_id"


def dataclasses_replace(obj, **kw):
    import dataclasses

    return dataclasses.replace(obj, **kw)


def test_request_config_uses_the_ocps_ledger_run_and_no_association(tmp_path):
    base = load_config(overrides={"root": str(tmp_path)}, environ={})
    cfg = request_config(base, {"job.raw_timeout": "2.5", "calib_verify.max_bias_drift": "20"})
    assert cfg.ledger.url == f"sqlite:///{tmp_path}/ocps/ledger.sqlite3"
    assert cfg.job.output_run == "{instrument}/ocps/{day_obs}" and cfg.job.associate is False
    assert cfg.job.raw_timeout == 2.5 and cfg.calib_verify.max_bias_drift == 20.0
    assert base.job.associate is True  # prompt processing associates
    assert request_config(base, {"job.associate": "true"}).job.associate is True


@pytest.mark.parametrize("overrides, field", [
    ({"job.nope": "1"}, "overrides.job.nope"),
    ({"job.raw_timeout": "-1"}, "overrides.job.raw_timeout"),
    ({"ledger.url": "sqlite:///x"}, "overrides.ledger.url"),
    ({"threads": "2"}, "overrides.threads"),
])
def test_bad_override_names_the_key(tmp_path, overrides, field):
    base = load_config(overrides={"root": str(tmp_path)}, environ={})
    with pytest.raises(BadInputError) as info:
        request_config(base, overrides)
    assert info.value.field == field, str(info.value)


def test_config_file_and_its_errors(tmp_path):
    base = load_config(overrides={"root": str(tmp_path)}, environ={})
    good = tmp_path / "req.yaml"
    good.write_text("job: {raw_timeout: 7}\n")
    assert request_config(base, {}, str(good)).job.raw_timeout == 7.0
    assert request_config(base, {"job.raw_timeout": "3"}, str(good)).job.raw_timeout == 3.0  # overrides win
    bad = tmp_path / "bad.yaml"
    bad.write_text("job: {threads: 0}\n")
    with pytest.raises(BadInputError, match=r"^config_file job.threads"):
        request_config(base, {}, str(bad))
    with pytest.raises(BadInputError, match=r"^config_file"):
        request_config(base, {}, str(tmp_path / "absent.yaml"))


def test_lookup_finds_registered_exposures(tmp_path):
    from apbatch.butler.repo import create_repo, register_exposures, register_instrument

    butler = create_repo(tmp_path / "butler")
    register_instrument(butler, "LSSTComCam")
    metas = [{"instrument": "LSSTComCam", "exposure_id": 2025101500000 + s,
              "obs_id": f"MC_O_20251015_{s:06d}", "day_obs": 20251015, "seq_num": s,
              "physical_filter": "r_03", "exposure_time": 15.0,
              "group_id": GROUP, "visit_id": 3405059767890000, "observation_type": "science",
              "ra": 53.0, "dec": -28.0, "rotation": 10.0, "mjd_begin": 60964.04, "mjd_end": 60964.0402}
             for s in (7, 8)]
    register_exposures(butler, metas)
    butler.close()
    lookup = ExposureLookup(tmp_path / "butler")
    try:
        by_group = lookup.find(DataId("LSSTComCam", group_id=GROUP))
        assert [e.obs_id for e in by_group] == ["MC_O_20251015_000007", "MC_O_20251015_000008"]
        (one,) = lookup.find(DataId("LSSTComCam", obsid="MC_O_20251015_000008"))
        assert (one.group_id, one.physical_filter, one.exposure_time) == (GROUP, "r_03", 15.0)
        assert one.detectors == ()  # registered, no raw ingested yet
        assert one.ra == pytest.approx(53.0) and one.visit == by_group[0].visit
        assert lookup.find(DataId("LSSTComCam", obsid="MC_O_20251015_000099")) == []
        lookup.register_run("LSSTComCam/ocps/20251015")
        assert "LSSTComCam/ocps/20251015" in lookup.butler().collections.query("*/ocps/*")
    finally:
        lookup.close()
    assert ExposureLookup(tmp_path / "nothing").find(DataId("LSSTComCam", obsid=OBSID)) == []
