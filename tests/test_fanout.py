"""Tests of apbatch.fanout: event -> per-CCD work items."""

from __future__ import annotations

import dataclasses
import json
from pathlib import Path

import pytest
from apbatch.config import load_config
from apbatch.errors import BadInputError
from apbatch.events import parse_event
from apbatch.fanout import anticipated_exposure_time, fan_out, select_detectors
from apbatch.ids import parse_obs_id, visit_id_from_group
from apbatch.instruments import get_instrument

DATA = Path(__file__).parent / "data" / "events"


def event(name: str, **changes):
    d = json.loads((DATA / name).read_text())
    if changes:
        body = d["value"] if "value" in d else d
        body.update(changes)
    return parse_event(d)


@pytest.fixture
def config(tmp_path):
    return load_config(environ={}, overrides={"root": str(tmp_path)})


@pytest.mark.parametrize(("name", "n"), [("nextVisit_LATISS.json", 1), ("nextVisit_LSSTComCam.json", 9),
                                         ("nextVisit_LSSTCam.json", 189)])
def test_ccd_counts_and_ids(config, name, n):
    ev = event(name)
    works = fan_out(ev, config)
    inst = get_instrument(ev.instrument)
    assert len(works) == n
    assert len({w.detector for w in works}) == n
    for w in works:
        det = inst.detector(w.detector)
        assert det.is_science and det.name == w.detector_name
    assert {w.key for w in works} == {(ev.instrument, ev.groupId, d.id) for d in inst.science_detectors}


def test_lsstcam_next_visit_fields(config, tmp_path):
    works = fan_out(event("nextVisit_LSSTCam.json"), config)
    w = works[0]
    assert w.visit == 3294702866920000  # obs_lsst's visit id of this GROUPID
    assert w.day_obs == 20250609
    assert (w.ra, w.dec, w.rotation) == pytest.approx((320.62687495816675, -17.94136111150278,
                                                       131.35723576573005))
    assert w.physical_filter == "z_20" and w.intent == "science" and w.nimages == 2
    assert w.image_names == () and w.survey == "BLOCK-365"
    assert w.exposure_time == 30.0  # anticipated: the configured default
    assert w.distributor == str((tmp_path / "distributor").absolute())
    assert not (tmp_path / "distributor").exists()  # pure: nothing created
    assert all(x.visit == w.visit and x.group_id == w.group_id for x in works)


def test_latiss_and_comcam_visit_ids(config):
    assert fan_out(event("nextVisit_LATISS.json"), config)[0].visit == 2992083918950001
    assert fan_out(event("nextVisit_LSSTComCam.json"), config)[0].visit == 3110636353110000
    assert fan_out(event("nextVisit_LSSTComCam.json"), config)[0].day_obs == 20241108


def test_retimed_next_visit_keeps_its_groups_day_obs(config):
    """A replay moves nextVisit's times to now; the visit stays in its group's night (one night)."""
    ev = event("nextVisit_LSSTComCam.json")
    later = dataclasses.replace(ev, startTime=ev.startTime + 400 * 86400.0)
    assert later.start_datetime.year == 2025
    assert fan_out(later, config)[0].day_obs == 20241108


def test_anticipated_exposure_time_precedence(tmp_path):
    cfg = load_config(environ={}, overrides={"events": {"anticipated_exposure_time": {
        "BLOCK-365": 15.0, "LSSTCam": 20.0, "default": 30.0}}})
    assert anticipated_exposure_time(cfg, "BLOCK-365", "LSSTCam") == 15.0
    assert anticipated_exposure_time(cfg, "other", "LSSTCam") == 20.0
    assert anticipated_exposure_time(cfg, "other", "LATISS") == 30.0
    assert fan_out(event("nextVisit_LSSTCam.json"), cfg)[0].exposure_time == 15.0
    nodefault = load_config(environ={},
                            overrides={"events": {"anticipated_exposure_time": {"LSSTCam": 20.0}}})
    with pytest.raises(BadInputError, match="events.anticipated_exposure_time"):
        anticipated_exposure_time(nodefault, "x", "LATISS")


@pytest.mark.parametrize(("filters", "expected"), [("", None), ("g_01,r_03", None), (" r_03 ", "r_03"),
                                                   ("g_01,", "g_01")])
def test_filters(config, filters, expected):
    assert fan_out(event("nextVisit_LSSTComCam.json", filters=filters), config)[0].physical_filter == expected


def test_rotation_only_in_sky_system(config):
    w = fan_out(event("nextVisit_LSSTComCam.json", rotationSystem=3), config)[0]
    assert w.rotation is None and w.ra == pytest.approx(53.1255)


def test_science_start_integration_with_and_without_next_visit(config):
    nv = event("nextVisit_LSSTCam.json")
    snap = event("startIntegration_LSSTCam_snap1.json")
    with_nv = fan_out(snap, config, next_visit=nv)
    assert len(with_nv) == 189
    w = with_nv[0]
    assert (w.ra, w.dec, w.physical_filter) == (nv.position[0], nv.position[1], "z_20")
    assert w.exposure_time == 15.0 and w.nimages == 2 and w.image_names == ()  # 2 snaps: wait by group
    assert w.group_id == nv.groupId and w.visit == 3294702866920000 and w.day_obs == 20250609
    alone = fan_out(snap, config)[0]
    assert alone.ra is None and alone.physical_filter is None
    other = dataclasses.replace(nv, groupId="2025-06-10T08:00:00.000")
    assert fan_out(snap, config, next_visit=other)[0].ra is None  # another group's nextVisit is ignored


def test_single_image_start_integration_names_its_image(config):
    ev = event("startIntegration_LSSTCam_snap1.json", imagesInSequence=1)
    assert fan_out(ev, config)[0].image_names == ("MC_O_20250609_000578",)


def test_bias_without_group_uses_exposure_id(config):
    ev = event("calib_bias_LSSTCam.json")
    works = fan_out(ev, config)
    expo = parse_obs_id("MC_C_20250425_000032").exposure_id
    assert len(works) == 189
    w = works[0]
    assert w.group_id == str(expo) == "2025042500032" and w.visit == expo
    assert w.intent == "bias" and w.exposure_time == 0.0 and w.day_obs == 20250425
    assert (w.ra, w.dec, w.rotation, w.physical_filter) == (None, None, None, None)
    assert w.image_names == ("MC_C_20250425_000032",)


def test_calibration_without_group_in_a_sequence_is_one_image(config):
    """The 2nd of 5 biases without groupId is a group of its own: the job must not wait for 5 raws of
    it (it waited out its 120 s timeout for images that belong to other groups)."""
    ev = event("calib_bias_LSSTCam.json", imagesInSequence=5, imageIndex=2)
    w = fan_out(ev, config)[0]
    assert w.group_id == "2025042500032" and w.nimages == 1
    assert w.image_names == ("MC_C_20250425_000032",)
    # with a shared groupId the job waits for the whole sequence, like snaps
    ev = event("calib_bias_LSSTCam.json", imagesInSequence=5, imageIndex=2,
               additionalKeys="imageType:groupId", additionalValues="BIAS:bias-seq-7")
    w = fan_out(ev, config)[0]
    assert w.group_id == "bias-seq-7" and w.nimages == 5 and w.image_names == ()


def test_flat_with_group(config):
    works = fan_out(event("calib_flat_LSSTComCam.json"), config)
    assert len(works) == 9
    assert works[0].group_id == "2024-11-08T20:00:00.000"
    assert works[0].visit == visit_id_from_group("2024-11-08T20:00:00.000")
    assert works[0].intent == "flat"


def test_calibration_with_non_iso_group_falls_back_to_exposure_id(config):
    ev = event("calib_bias_LSSTCam.json", additionalKeys="imageType:groupId",
               additionalValues="BIAS:bias-seq-7")
    w = fan_out(ev, config)[0]
    assert w.group_id == "bias-seq-7" and w.visit == 2025042500032


def test_detector_subset_from_config_and_only():
    cfg = load_config(environ={}, overrides={"events": {"detectors": {"LSSTCam": [90, 94, 0]}}})
    ev = event("nextVisit_LSSTCam.json")
    assert [w.detector for w in fan_out(ev, cfg)] == [0, 90, 94]
    assert [w.detector_name for w in fan_out(ev, cfg, only=["R22_S11"])] == ["R22_S11"]
    assert [w.detector for w in fan_out(ev, cfg, only=[1])] == []  # outside the configured subset
    assert len(fan_out(event("nextVisit_LSSTComCam.json"), cfg)) == 9  # other cameras untouched


@pytest.mark.parametrize("only", [["R00_SG0"], [300]])  # a guider CCD, no such CCD
def test_unknown_or_non_science_detector(config, only):
    # (a bad events.detectors subset fails at load_config: tests/test_config.py)
    with pytest.raises(BadInputError, match=r"^--detector: "):
        select_detectors(config, "LSSTCam", only)


def test_unknown_instrument(config):
    with pytest.raises(BadInputError, match="unknown instrument 'HSC'"):
        fan_out(event("nextVisit_LSSTCam.json", instrument="HSC"), config)


def test_bad_group_and_image_names(config):
    with pytest.raises(BadInputError, match=r"^event\.groupId: .* not an ISO-time group id"):
        fan_out(event("nextVisit_LSSTCam.json", groupId="2025-06-10T07:31:26.692; rm -rf /"), config)
    with pytest.raises(BadInputError, match=r"^event\.imageName: "):
        fan_out(event("calib_bias_LSSTCam.json", imageName="not-a-name"), config)
    with pytest.raises(BadInputError, match=r"^event\.imageName: .* not an LSSTComCam image name"):
        fan_out(event("calib_bias_LSSTCam.json", instrument="LSSTComCam"), config)
    with pytest.raises(BadInputError, match=r"^event\.imageDate: "):
        fan_out(event("calib_bias_LSSTCam.json", imageDate="20250426"), config)
    ev = event("startIntegration_LSSTCam_snap1.json", additionalKeys="imageType", additionalValues="OBJECT")
    with pytest.raises(BadInputError, match="has no groupId"):
        fan_out(ev, config)


def test_shell_metacharacters_stay_one_argument(config):
    nasty = "seq; touch /tmp/pwned $(id) `id` | cat > x"
    ev = event("calib_bias_LSSTCam.json", additionalKeys="imageType:groupId",
               additionalValues=f"BIAS:{nasty}")
    w = fan_out(ev, config, only=[94])[0]
    args = w.job_args()
    assert args[args.index("--group") + 1] == nasty


def test_pure_and_deterministic(config):
    ev = event("nextVisit_LSSTCam.json")
    assert fan_out(ev, config) == fan_out(ev, config)
