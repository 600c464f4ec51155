"""Tests of apbatch.events: parsing, validation and the accept/reject policy."""

from __future__ import annotations

import copy
import json
import re
from pathlib import Path

import pytest
from apbatch.errors import BadInputError
from apbatch.events import (
    TAI_MINUS_UTC,
    CoordSys,
    Dome,
    NextVisit,
    NextVisitCanceled,
    RotSys,
    StartIntegration,
    intent_of,
    parse_event,
    rejection_reason,
)

DATA = Path(__file__).parent / "data" / "events"


def load(name: str) -> dict:
    return json.loads((DATA / name).read_text())


def bare_next_visit() -> dict:
    return copy.deepcopy(load("nextVisit_LSSTCam.json")["value"])


def bare_start() -> dict:
    return copy.deepcopy(load("startIntegration_LSSTCam_snap1.json")["value"])


def test_next_visit_envelope_with_topic():
    ev = parse_event((DATA / "nextVisit_LSSTCam.json").read_text())
    assert isinstance(ev, NextVisit)
    assert ev.instrument == "LSSTCam"
    assert ev.groupId == "2025-06-10T07:31:26.692"
    assert ev.coordinateSystem is CoordSys.ICRS and ev.rotationSystem is RotSys.SKY and ev.dome is Dome.OPEN
    assert ev.position == pytest.approx((320.62687495816675, -17.94136111150278))
    assert ev.nimages == 2 and ev.salIndex == 1 and ev.scriptSalIndex == 100123
    assert ev.filter_list == ["z_20"]
    assert ev.start_datetime.isoformat().startswith("2025-06-10T07:31:46.692")


def test_next_visit_kind_field_and_sniffed():
    comcam = parse_event(load("nextVisit_LSSTComCam.json"))
    latiss = parse_event(load("nextVisit_LATISS.json"))  # no kind, no topic: guessed from fields
    assert isinstance(comcam, NextVisit) and comcam.instrument == "LSSTComCam"
    assert isinstance(latiss, NextVisit) and latiss.instrument == "LATISS"
    assert latiss.filter_list == ["SDSSr_65mm~empty"]


def test_bytes_input():
    ev = parse_event((DATA / "nextVisit_LATISS.json").read_bytes())
    assert ev.groupId == "2024-06-25T01:26:31.895#1"


def test_start_integration_key_values_rejoin_iso_group():
    ev = parse_event(load("startIntegration_LSSTCam_snap1.json"))
    assert isinstance(ev, StartIntegration)
    assert ev.instrument == "LSSTCam"
    assert ev.groupId == "2025-06-10T07:31:26.692"
    assert ev.imageType == "OBJECT" and ev.intent == "science" and not ev.is_calibration
    assert ev.reason == "field_survey_science" and ev.program == "BLOCK-365"
    assert dict(ev.additional)["stutterDelay"] == "0.0"
    assert (ev.imageIndex, ev.imagesInSequence, ev.exposureTime) == (1, 2, 15.0)


def test_start_integration_escaped_colons_and_suffix():
    d = bare_start()
    d["additionalKeys"] = "groupId:imageType:note"
    d["additionalValues"] = r"2024-06-25T01:26:31.895#1:CWFS:a\:b"
    ev = parse_event(d, topic="lsst.sal.ATCamera.logevent_startIntegration")
    assert ev.instrument == "LATISS"
    assert ev.groupId == "2024-06-25T01:26:31.895#1"
    assert ev.intent == "cwfs"
    assert dict(ev.additional)["note"] == "a:b"


def test_start_integration_calibrations():
    bias = parse_event(load("calib_bias_LSSTCam.json"))
    flat = parse_event(load("calib_flat_LSSTComCam.json"))
    assert bias.intent == "bias" and bias.is_calibration and bias.groupId is None
    assert flat.intent == "flat" and flat.instrument == "LSSTComCam"
    assert flat.groupId == "2024-11-08T20:00:00.000" and flat.reason == "daily_calibration"


@pytest.mark.parametrize(("topic", "expected"), [
    ("lsst.sal.MTCamera.logevent_startIntegration", "LSSTCam"),
    ("lsst.sal.CCCamera.logevent_startIntegration", "LSSTComCam"),
    ("lsst.sal.ATCamera.logevent_startIntegration", "LATISS"),
])
def test_instrument_from_topic(topic, expected):
    d = bare_start()
    d["imageSource"] = "XX"
    assert parse_event(d, topic=topic).instrument == expected


def test_instrument_explicit_and_from_image_source():
    d = bare_start()
    assert parse_event({**d, "instrument": "comcam"}).instrument == "LSSTComCam"
    assert parse_event(d).instrument == "LSSTCam"  # imageSource MC
    d["imageSource"] = "??"
    with pytest.raises(BadInputError, match="event.instrument"):
        parse_event(d)


@pytest.mark.parametrize(("image_type", "intent"), [
    ("OBJECT", "science"), ("SKYEXP", "science"), ("ENGTEST", "science"), ("BIAS", "bias"),
    ("dark", "dark"), ("FLAT", "flat"), ("CBP", "cbp"), ("CWFS", "cwfs"), ("ACQ", "acq"),
    (None, "unknown"), ("", "unknown"),
])
def test_intent_of(image_type, intent):
    assert intent_of(image_type) == intent


def test_next_visit_canceled():
    ev = parse_event({"topic": "lsst.sal.ScriptQueue.logevent_nextVisitCanceled",
                      "value": {"salIndex": 1, "scriptSalIndex": 5, "groupId": "2025-06-10T07:31:26.692"}})
    assert isinstance(ev, NextVisitCanceled) and ev.groupId == "2025-06-10T07:31:26.692"


# ----------------------------------------------------------------------------- bad input
def test_malformed_json():
    with pytest.raises(BadInputError, match=r"^event: malformed JSON"):
        parse_event('{"groupId": "x", ')


@pytest.mark.parametrize("value", ["[1, 2]", "42", "null"])
def test_not_an_object(value):
    with pytest.raises(BadInputError, match="expected a JSON object"):
        parse_event(value)


@pytest.mark.parametrize("field", ["salIndex", "scriptSalIndex", "groupId", "coordinateSystem", "position",
                                   "startTime", "rotationSystem", "cameraAngle", "filters", "dome",
                                   "duration", "nimages", "instrument", "survey", "totalCheckpoints"])
def test_next_visit_missing_field(field):
    d = bare_next_visit()
    del d[field]
    with pytest.raises(BadInputError, match=rf"^event\.{field}: missing"):
        parse_event({"kind": "nextVisit", **d})


@pytest.mark.parametrize("field", ["imageName", "imageIndex", "imagesInSequence", "exposureTime", "imageDate",
                                   "imageNumber"])
def test_start_integration_missing_field(field):
    d = bare_start()
    del d[field]
    with pytest.raises(BadInputError, match=rf"^event\.{field}: missing"):
        parse_event({"kind": "startIntegration", **d})


@pytest.mark.parametrize(("field", "value", "message"), [
    ("position", "320.6,-17.9", r"event\.position: expected \[ra, dec\]"),
    ("position", [320.6], r"event\.position: expected \[ra, dec\]"),
    ("position", [400.0, 10.0], r"event\.position: .* out of range"),
    ("position", [10.0, -95.0], r"event\.position: .* out of range"),
    ("position", [float("nan"), 0.0], r"event\.position"),
    ("nimages", "2", r"event\.nimages: expected an integer"),
    ("nimages", True, r"event\.nimages: expected an integer"),
    ("nimages", -1, r"event\.nimages: -1 is out of range"),
    ("nimages", 1.5, r"event\.nimages: expected an integer"),
    ("startTime", "soon", r"event\.startTime: expected a finite number"),
    ("cameraAngle", float("inf"), r"event\.cameraAngle: expected a finite number"),
    ("coordinateSystem", 9, r"event\.coordinateSystem: 9 is not a CoordSys"),
    ("rotationSystem", 0, r"event\.rotationSystem: 0 is not a RotSys"),
    ("dome", 4, r"event\.dome: 4 is not a Dome"),
    ("groupId", 12, r"event\.groupId: expected a string"),
    ("groupId", "  ", r"event\.groupId: is blank"),
    ("filters", ["r_57"], r"event\.filters: expected a string"),
])
def test_next_visit_wrong_type_or_range(field, value, message):
    d = bare_next_visit()
    d[field] = value
    with pytest.raises(BadInputError, match=message):
        parse_event({"kind": "nextVisit", **d})


@pytest.mark.parametrize(("field", "value", "message"), [
    ("imageIndex", 0, r"event\.imageIndex: 0 is out of range"),
    ("exposureTime", -1, r"event\.exposureTime: -1 is out of range"),
    ("imageDate", "2025-06-09", r"event\.imageDate: .* not YYYYMMDD"),
    ("additionalValues", "OBJECT", r"event\.additionalValues: 1 values for 8 keys"),
    ("additionalKeys", 5, r"event\.additionalKeys: expected a string"),
])
def test_start_integration_wrong_type_or_range(field, value, message):
    d = bare_start()
    d[field] = value
    with pytest.raises(BadInputError, match=message):
        parse_event({"kind": "startIntegration", **d})


def test_unknown_kind_and_topic():
    with pytest.raises(BadInputError, match=r"event\.kind: unknown kind"):
        parse_event({"kind": "endReadout", **bare_start()})
    with pytest.raises(BadInputError, match=r"event\.topic: .* not an event apbatch handles"):
        parse_event({"topic": "lsst.sal.MTCamera.logevent_endReadout", "value": bare_start()})
    with pytest.raises(BadInputError, match="cannot tell the kind"):
        parse_event({"hello": 1})


def test_group_id_with_shell_metacharacters():
    # a calibration group that is not a time is kept verbatim (the backends pass it as one argument) ...
    nasty = "bias; rm -rf / $(touch pwned) `id` \"'|&>"
    d = bare_start()
    d["additionalKeys"], d["additionalValues"] = "imageType:groupId", f"BIAS:{nasty}"
    assert parse_event(d).groupId == nasty
    # ... but a nextVisit's group is a time, and this is not one
    d = bare_next_visit()
    d["groupId"] = "2025-06-10T07:31:26.692; rm -rf / $(touch pwned)"
    with pytest.raises(BadInputError, match=r"^event\.groupId: .* not an ISO-time group id"):
        parse_event({"kind": "nextVisit", **d})


# ------------------------------------------------------------- one group string per visit id
@pytest.mark.parametrize(("group", "canonical"), [
    ("2025-06-10T07:31:26.692\n", None),  # a regex "$" matches before the newline
    (" 2025-06-10T07:31:26.692", None),
    ("2025-06-10T07:31:26.692000", "'2025-06-10T07:31:26.692'"),
    ("2025-06-10T07:31:26.6921", "'2025-06-10T07:31:26.692'"),
    ("2025-06-10T07:31:26.69", "'2025-06-10T07:31:26.690'"),
    ("2025-06-10T07:31:26", "'2025-06-10T07:31:26.000'"),
    ("2025-06-10T07:31:26.692#0", "'2025-06-10T07:31:26.692'"),
    ("2025-06-10T07:31:26.692+0", "'2025-06-10T07:31:26.692'"),
    ("2025-06-10T07:31:26.692#01", "'2025-06-10T07:31:26.692#1'"),
    ("2025-06-10T07:31:26.692+1", "'2025-06-10T07:31:26.692#1'"),
    ("2025-06-10T07:31:26.\u0666\u0669\u0662", None),  # Arabic-Indic digits
    ("2014-12-31T23:59:59.000", None),  # before the visit-id epoch: a negative visit id
])
def test_non_canonical_group_ids_are_refused(group, canonical):
    nv = bare_next_visit()
    nv["groupId"] = group
    cancel = {"kind": "nextVisitCanceled", "salIndex": 1, "scriptSalIndex": 5, "groupId": group}
    for event in ({"kind": "nextVisit", **nv}, cancel):
        with pytest.raises(BadInputError) as info:
            parse_event(event)
        assert str(info.value).startswith("event.groupId: ") and "\n" not in str(info.value)
        if canonical:
            assert f"send {canonical}" in str(info.value)
    if canonical:  # the same spellings inside a startIntegration's additionalValues
        start = bare_start()
        start["additionalValues"] = start["additionalValues"].replace("2025-06-10T07:31:26.692", group, 1)
        with pytest.raises(BadInputError, match=rf"^event\.groupId: .*send {re.escape(canonical)}"):
            parse_event(start)


def test_start_integration_values_are_stripped_so_one_group_remains():
    start = bare_start()
    start["additionalValues"] = start["additionalValues"].replace("2025-06-10T07:31:26.692",
                                                                  " 2025-06-10T07:31:26.692\n", 1)
    assert parse_event(start).groupId == "2025-06-10T07:31:26.692"


def test_canonical_group_ids_are_kept():
    for group in ("2025-06-10T07:31:26.692", "2024-06-25T01:26:31.895#1", "2024-06-25T01:26:31.895#9999"):
        d = bare_next_visit()
        d["groupId"] = group
        assert parse_event({"kind": "nextVisit", **d}).groupId == group


def test_calibration_group_with_control_character_refused():
    d = bare_start()
    d["additionalKeys"], d["additionalValues"] = "imageType:groupId", "BIAS:seq\x07-7"
    with pytest.raises(BadInputError, match=r"^event\.groupId: .* white space or control characters"):
        parse_event(d)


# ---------------------------------------------------------------- ranges the job relies on
def test_nimages_the_job_would_refuse_is_refused():
    from apbatch.work import MAX_NIMAGES

    d = bare_next_visit()
    assert parse_event({"kind": "nextVisit", **d, "nimages": MAX_NIMAGES}).nimages == MAX_NIMAGES
    with pytest.raises(BadInputError, match=rf"^event\.nimages: 1000 is out of range .*0 to {MAX_NIMAGES}"):
        parse_event({"kind": "nextVisit", **d, "nimages": 1000})
    s = bare_start()
    with pytest.raises(BadInputError, match=r"^event\.imagesInSequence: 11 is out of range"):
        parse_event({**s, "imagesInSequence": 11, "imageIndex": 1})
    with pytest.raises(BadInputError, match=r"^event\.imageIndex: 3 is out of range .*<= 2"):
        parse_event({**s, "imageIndex": 3})


@pytest.mark.parametrize("field", ["startTime", "private_sndStamp"])
@pytest.mark.parametrize("value", [1e18, 4.2e9, -1.0])
def test_times_out_of_range_are_bad_input_not_overflow(field, value):
    d = bare_next_visit()
    d[field] = value
    with pytest.raises(BadInputError, match=rf"^event\.{field}: .* out of range"):
        parse_event({"kind": "nextVisit", **d})


def test_time_of_start_integration_out_of_range():
    with pytest.raises(BadInputError, match=r"^event\.timestampAcquisitionStart: 1e\+18 is out of range"):
        parse_event({**bare_start(), "timestampAcquisitionStart": 1e18})


def test_science_exposure_time_zero_refused_bias_allowed():
    with pytest.raises(BadInputError, match=r"^event\.exposureTime: 0 s for a science image"):
        parse_event({**bare_start(), "exposureTime": 0})
    bias = load("calib_bias_LSSTCam.json")
    assert bias["exposureTime"] == 0.0 and parse_event(bias).exposureTime == 0.0


@pytest.mark.parametrize(("keys", "values", "message"), [
    # four keys, one ISO group: the pieces of the time are not taken for three more values
    ("groupId:imageType:reason:program", "2025-06-10T07:31:26.692",
     r"^event\.additionalValues: 1 values for 4 keys"),
    ("groupId:imageType", "2025-06-10T07:31:26.692:OBJECT:extra",
     r"^event\.additionalValues: 3 values for 2 keys"),
    ("groupId:groupId", "2025-06-10T07:31:26.692:2025-06-10T07:31:27.000",
     r"^event\.additionalKeys: .* repeated"),
])
def test_key_value_mismatch_reported_under_its_own_field(keys, values, message):
    with pytest.raises(BadInputError, match=message):
        parse_event({**bare_start(), "additionalKeys": keys, "additionalValues": values})


def test_deeply_nested_or_huge_json_is_bad_input():
    with pytest.raises(BadInputError, match=r"^event: JSON nested too deeply"):
        parse_event("[" * 100_000)
    with pytest.raises(BadInputError, match=r"^event: malformed JSON"):
        parse_event('{"nimages": ' + "9" * 5000 + "}")


# ---------------------------------------------------------------------------------- policy
NOW = 1_800_000_000.0


def next_visit(**changes) -> NextVisit:
    d = bare_next_visit()
    d.update(changes)
    return parse_event({"kind": "nextVisit", **d})


def test_policy_accepts_good_events():
    assert rejection_reason(next_visit(private_sndStamp=NOW + TAI_MINUS_UTC - 5), 600, NOW) is None
    assert rejection_reason(next_visit(nimages=0), None, NOW) is None  # 0 = unknown, still fine
    assert rejection_reason(next_visit(dome=3), None, NOW) is None  # EITHER


@pytest.mark.parametrize(("changes", "reason"), [
    ({"coordinateSystem": 3}, "OBSERVED, not ICRS"),
    ({"coordinateSystem": 1}, "NONE, not ICRS"),
    ({"coordinateSystem": 4}, "MOUNT, not ICRS"),
    ({"dome": 1}, "dome CLOSED"),
    ({"instrument": "HSC"}, "unknown instrument 'HSC'"),
    ({"instrument": ""}, "unknown instrument ''"),
])
def test_policy_rejects(changes, reason):
    got = rejection_reason(next_visit(**changes), None, NOW)
    assert got is not None and reason in got


def test_policy_stale_uses_tai():
    # private_sndStamp is TAI: sent 620 s ago (UTC) is stale at max_age 600; sent 580 s ago is not.
    sent_utc = NOW - 620
    assert "stale" in rejection_reason(next_visit(private_sndStamp=sent_utc + TAI_MINUS_UTC), 600, NOW)
    assert rejection_reason(next_visit(private_sndStamp=NOW - 580 + TAI_MINUS_UTC), 600, NOW) is None
    # without a limit (apbatch submit of an old event) nothing is stale
    assert rejection_reason(next_visit(private_sndStamp=1.0), None, NOW) is None


def test_policy_start_integration_intents():
    bias = parse_event(load("calib_bias_LSSTCam.json"))
    assert rejection_reason(bias, None, NOW) is None
    assert "process_calibrations" in rejection_reason(bias, None, NOW, process_calibrations=False)
    d = bare_start()
    d["additionalValues"] = d["additionalValues"].replace("OBJECT", "CWFS")
    assert "(intent 'cwfs') is not processed" in rejection_reason(parse_event(d), None, NOW)


def test_policy_unknown_camera_topic():
    ev = parse_event(bare_start(), topic="lsst.sal.GenericCamera.logevent_startIntegration")
    assert ev.instrument == "GenericCamera"
    assert "unknown instrument" in rejection_reason(ev, None, NOW)
