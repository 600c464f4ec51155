"""Tests of apbatch.night and apbatch.script.night (``apbatch night reprocess|report``)."""

from __future__ import annotations

import calendar
import json
import os
import random
from dataclasses import replace
from pathlib import Path
from types import SimpleNamespace

import apbatch.backends
import numpy as np
import pytest
import yaml
from apbatch.backends.base import JobState, JobStatus
from apbatch.cli import main
from apbatch.config import load_config
from apbatch.dispatcher import Dispatcher
from apbatch.errors import BadInputError, RetriableError, SchedulerError
from apbatch.events import TAI_MINUS_UTC, parse_event
from apbatch.fanout import fan_out
from apbatch.ledger import Ledger
from apbatch.night import classify, default_day_obs, night_span, parse_day_obs, percentile
from apbatch.script.night import format_report, night_report, reprocess_night, write_atomic
from apbatch.states import SubmissionState
from apbatch.submission import Submission
from test_dispatcher import FakeBackend

ROOT = Path(__file__).resolve().parent.parent
DATA = ROOT / "tests" / "data" / "events"
NV = json.loads((DATA / "nextVisit_LSSTComCam.json").read_text())  # 9 CCDs, day_obs 20241108
DAY = 20241108
SENT = NV["private_sndStamp"] - TAI_MINUS_UTC  # UTC unix time the nextVisit was sent
LATER = SENT + 7200.0  # the morning after: every job is older than lost_after


def next_visit(minute: int, **changes) -> dict:
    """The ComCam nextVisit moved to another group (and visit) of the same night."""
    shift = (minute - 33) * 60.0
    return {**NV, "groupId": f"2024-11-09T06:{minute:02d}:55.311", "startTime": NV["startTime"] + shift,
            "private_sndStamp": NV["private_sndStamp"] + shift, **changes}


class StatusDownBackend(FakeBackend):
    """A scheduler that accepts submissions but whose status query fails."""

    def status(self, job_ids):
        raise SchedulerError(["squeue", "-j", ",".join(job_ids)], 1, "",
                             "slurm_load_jobs error: Unable to contact slurm controller")


@pytest.fixture
def night(tmp_path):
    def make(mode: str = "dynamic", backend: FakeBackend | None = None):
        cfg = load_config(environ={}, overrides={"root": str(tmp_path), "events": {"mode": mode}})
        ledger = Ledger.from_config(cfg)
        backend = backend or FakeBackend()
        disp = Dispatcher(cfg, ledger, backend, clock=lambda: SENT + 1.0, check_age=False)
        return SimpleNamespace(cfg=cfg, ledger=ledger, backend=backend, disp=disp)

    return make


def submit_visit(n, payload: dict) -> list[str]:
    out = n.disp.handle(parse_event(payload), payload, "test", received_at=payload["private_sndStamp"]
                        - TAI_MINUS_UTC)
    assert out.action == "submitted"
    return [j.job_id for j in out.jobs]


def set_states(backend: FakeBackend, table: dict[str, tuple[JobState, int | None] | None]) -> None:
    for job_id, st in table.items():
        if st is None:
            backend.states.pop(job_id)  # the scheduler has no record of it: lost
        else:
            backend.states[job_id] = JobStatus(job_id, st[0], st[1])


def reprocess(n, **kw):
    kw.setdefault("now", LATER)
    return reprocess_night(n.cfg, day_obs=kw.pop("day_obs", DAY), backend=n.backend, ledger=n.ledger, **kw)


def by_detector(ledger: Ledger) -> dict[str, dict]:
    return {r.detector_name: r for r in ledger.rows()}


MIXED = {"fake-1": (JobState.COMPLETED, 0), "fake-2": (JobState.FAILED, 4), "fake-3": (JobState.FAILED, 3),
         "fake-4": (JobState.FAILED, 5), "fake-5": (JobState.FAILED, 2), "fake-6": (JobState.FAILED, None),
         "fake-7": (JobState.RUNNING, None), "fake-8": None, "fake-9": (JobState.PENDING, None)}


# ------------------------------------------------------------------------------- reprocess
def test_retriable_and_lost_resubmitted_once_others_never(night):
    n = night()
    ids = submit_visit(n, NV)
    assert ids == [f"fake-{i}" for i in range(1, 10)]
    set_states(n.backend, MIXED)
    before = by_detector(n.ledger)
    res = reprocess(n)
    assert res["polled"] == 9 and res["updated"] == 8  # fake-9 is still PENDING: not rewritten
    assert res["errors"] == [] and res["missed"] == []
    assert res["counts"] == {"completed": 1, "retry": 2, "final": 3, "active": 2, "lost": 1}
    redone = {before[i["detector_name"]].job_id: i["job_id"] for i in res["resubmitted"]}
    assert redone == {"fake-2": "fake-10", "fake-3": "fake-11", "fake-8": "fake-12"}
    assert len(n.backend.batches) == 2 and len(n.backend.batches[1]) == 3  # one batch for the visit
    after = by_detector(n.ledger)
    for name, row in after.items():
        old = before[name].job_id
        if old in redone:
            assert (row.job_id, row.state, row.attempts) == (redone[old], "PENDING", 2)
            assert row.job_history == (old,) and row.submitted_at == LATER
        else:
            assert row.job_id == old and row.attempts == 1
    assert after["R22_S10"].state == "FAILED" and after["R22_S10"].exit_code == 5  # fake-4
    assert after["R22_S00"].state == "COMPLETED"
    # a second run the same morning submits nothing
    again = reprocess(n, now=LATER + 60)
    assert again["resubmitted"] == [] and again["missed"] == [] and len(n.backend.batches) == 2
    assert again["counts"] == {"completed": 1, "final": 3, "active": 5}


def test_include_final_reruns_what_failed_for_good_once_fixed(night):
    """After a person fixed the cause: --include-final resubmits FAILED 2/5/no code (and the
    exhausted), as a new attempt each, never an active, completed or cancelled CCD."""
    n = night()
    ids = submit_visit(n, NV)
    set_states(n.backend, MIXED)
    reprocess(n)  # the ordinary run: retries 3/4 and the lost one
    n.ledger.mark_cancelled([n.ledger.rows(detector=8)[0].id], "by hand")  # fake-9, R22_S22
    dry = reprocess(n, now=LATER + 60, include_final=True, dry_run=True)
    assert sorted(i["detector_name"] for i in dry["resubmitted"]) == ["R22_S10", "R22_S11", "R22_S12"]
    batches = len(n.backend.batches)
    res = reprocess(n, now=LATER + 60, include_final=True)
    assert sorted(i["why"] for i in res["resubmitted"]) == [
        "final: FAILED exit 2", "final: FAILED exit 5", "final: FAILED exit None"]
    assert len(n.backend.batches) == batches + 1
    rows = by_detector(n.ledger)
    assert {rows[d].attempts for d in ("R22_S10", "R22_S11", "R22_S12")} == {2}
    assert rows["R22_S22"].state == "CANCELLED" and rows["R22_S00"].state == "COMPLETED"
    assert ids[0] == rows["R22_S00"].job_id
    # run again: the reruns are active now, nothing is submitted twice
    assert reprocess(n, now=LATER + 120, include_final=True)["resubmitted"] == []


def test_reprocess_leaves_a_ccd_to_the_daemon_that_claimed_it_first(night):
    """The daemon's retry and the morning reprocess race for the same failed CCDs: each CCD
    is resubmitted once (compare-and-set in the ledger), never twice."""
    n = night()
    submit_visit(n, NV)
    set_states(n.backend, MIXED)
    real_reclaim = n.ledger.reclaim
    daemon_won = []

    def daemon_first(rows, now=None, tokens=None):
        # the daemon's poll lands between reprocess reading the rows and claiming them
        n.ledger.reclaim = real_reclaim
        daemon_won.extend(w.detector_name for w in n.ledger.claim_retriable(3, now=LATER - 1))
        return real_reclaim(rows, now=now, tokens=tokens)

    n.ledger.reclaim = daemon_first
    res = reprocess(n)
    assert sorted(daemon_won) == ["R22_S01", "R22_S02"]  # fake-2, fake-3: FAILED with exit 4, 3
    assert [i["detector_name"] for i in res["resubmitted"]] == ["R22_S21"]  # fake-8, lost: only ours
    assert len(n.backend.batches) == 2 and len(n.backend.batches[1]) == 1
    states = {k: r.state for k, r in by_detector(n.ledger).items()}
    assert states["R22_S01"] == states["R22_S02"] == "CLAIMED"  # the daemon submits them next


def test_max_attempts_respected(night):
    n = night()
    submit_visit(n, NV)
    set_states(n.backend, MIXED)
    res = reprocess(n, max_attempts=1)
    assert res["resubmitted"] == [] and res["counts"]["exhausted"] == 3 and len(n.backend.batches) == 1
    res = reprocess(n, max_attempts=2)
    assert len(res["resubmitted"]) == 3
    set_states(n.backend, {"fake-10": (JobState.FAILED, 4), "fake-11": (JobState.COMPLETED, 0)})
    res = reprocess(n, max_attempts=2, now=LATER + 100)
    assert res["resubmitted"] == [] and res["counts"]["exhausted"] == 1
    res = reprocess(n, max_attempts=3, now=LATER + 200)
    assert [(i["detector_name"], i["job_id"]) for i in res["resubmitted"]] == [("R22_S01", "fake-13")]
    assert by_detector(n.ledger)["R22_S01"].attempts == 3
    with pytest.raises(BadInputError, match="--max-attempts"):
        reprocess(n, max_attempts=0)


def test_dry_run_submits_and_writes_nothing(night):
    n = night()
    submit_visit(n, NV)
    set_states(n.backend, MIXED)
    missed = next_visit(40)
    n.ledger.record_event("nextVisit", missed, instrument="LSSTComCam", group_id=missed["groupId"],
                          accepted=True, received_at=SENT + 400)
    before = n.ledger.rows()
    res = reprocess(n, dry_run=True)
    assert res["dry_run"] and res["updated"] == 0
    assert sorted(i["detector_name"] for i in res["resubmitted"]) == ["R22_S01", "R22_S02", "R22_S21"]
    assert {i["job_id"] for i in res["resubmitted"] + res["missed"]} == {None} and len(res["missed"]) == 9
    assert n.ledger.rows() == before and len(n.backend.batches) == 1


def test_missed_events_fanned_out_and_submitted(night):
    n = night()
    submit_visit(n, NV)  # handled normally: nothing missing
    missed, cancelled, rejected = next_visit(40), next_visit(45), next_visit(50)
    for payload, accepted, at in ((missed, True, 400), (cancelled, True, 500), (rejected, False, 600)):
        n.ledger.record_event("nextVisit", payload, instrument="LSSTComCam", group_id=payload["groupId"],
                              accepted=accepted, received_at=SENT + at)
    cancel = {"kind": "nextVisitCanceled", "groupId": cancelled["groupId"], "salIndex": 1,
              "scriptSalIndex": 2}
    n.ledger.record_event("nextVisitCanceled", cancel, group_id=cancelled["groupId"], accepted=True,
                          received_at=SENT + 510)
    res = reprocess(n)
    assert res["resubmitted"] == [] and len(res["missed"]) == 9
    assert {i["group_id"] for i in res["missed"]} == {missed["groupId"]}
    rows = n.ledger.rows(group_id=missed["groupId"])
    assert len(rows) == 9 and {(r.state, r.attempts) for r in rows} == {("PENDING", 1)}
    assert {r.event_received_at for r in rows} == {SENT + 400}
    assert len(n.backend.batches) == 2
    again = reprocess(n, now=LATER + 60)
    assert again["missed"] == [] and len(n.backend.batches) == 2
    assert reprocess(n, day_obs=DAY + 1)["missed"] == []


def test_batch_mode_missed_uses_start_integration_with_next_visit(night):
    n = night("batch")
    nv = json.loads((DATA / "nextVisit_LSSTCam.json").read_text())
    si = json.loads((DATA / "startIntegration_LSSTCam_snap1.json").read_text())
    group = nv["value"]["groupId"]  # Kafka envelopes, as stored by the daemon
    sent = nv["value"]["private_sndStamp"] - TAI_MINUS_UTC
    n.ledger.record_event("nextVisit", nv, instrument="LSSTCam", group_id=group, accepted=True,
                          received_at=sent)
    day = 20250609
    assert reprocess(n, day_obs=day, now=sent + 7200)["missed"] == []  # no exposure seen: not missed
    n.ledger.record_event("startIntegration", si, instrument="LSSTCam", group_id=group, accepted=True,
                          received_at=sent + 30)
    res = reprocess(n, day_obs=day, now=sent + 7200)
    assert len(res["missed"]) == 189 and len(n.backend.batches) == 1
    w = n.backend.batches[0][0]
    assert (w.ra, w.dec) == tuple(nv["value"]["position"]) and w.exposure_time == parse_event(si).exposureTime
    assert w.nimages == 2 and w.physical_filter == "z_20"


def test_status_query_failure_changes_nothing(night):
    n = night(backend=StatusDownBackend())
    submit_visit(n, NV)
    before = n.ledger.rows()
    with pytest.raises(RetriableError, match="status query of 9 job.*not changed"):
        reprocess(n)
    assert n.ledger.rows() == before and len(n.backend.batches) == 1


def test_classify_rules():
    """night.classify is Submission.category (one rule, tested in full in test_submission.py)."""
    work = fan_out(parse_event(NV), load_config(environ={}))[0]
    base = Submission(id=1, instrument=work.instrument, group_id=work.group_id, detector=work.detector,
                      detector_name=work.detector_name, visit=work.visit, day_obs=work.day_obs,
                      intent=work.intent, state=SubmissionState.UNKNOWN, attempts=1, retry=True, work=work,
                      claimed_at=0.0, job_id="7", reason="not in the queue nor in history", submitted_at=0.0)
    kw = {"max_attempts": 3, "claim_timeout": 300.0, "lost_after": 3600.0}
    assert classify(base, now=4000.0, **kw) == "lost"
    assert classify(base, now=1000.0, **kw) == "active"  # too recent to call lost
    assert classify(replace(base, reason="unknown state code 'XX'"), now=4000.0, **kw) == "active"
    assert classify(replace(base, retry=False), now=4000.0, **kw) == "final"  # group cancelled
    claimed = replace(base, state=SubmissionState.CLAIMED, job_id=None)
    assert classify(claimed, now=301.0, **kw) == "retry"
    assert classify(claimed, now=299.0, **kw) == "active"
    refused = replace(base, state=SubmissionState.SUBMIT_FAILED, attempts=3)
    assert classify(refused, now=1.0, **kw) == "exhausted"
    assert classify(replace(base, state=SubmissionState.TIMEOUT), now=1.0, **kw) == "final"


# ---------------------------------------------------------------------------------- report
def test_report_numbers_from_constructed_ledger(night):
    n = night()
    t0 = night_span(DAY)[0] + 8 * 3600.0
    works = fan_out(parse_event(NV), n.cfg)
    n.ledger.record_event("nextVisit", NV, instrument="LSSTComCam", group_id=NV["groupId"], accepted=True,
                          received_at=t0)
    assert len(n.ledger.claim(works[:4], received_at=t0, now=t0 + 1)) == 4
    for i, (w, dt) in enumerate(zip(works[:4], (2.0, 4.0, 6.0, 10.0), strict=True)):
        n.ledger.record_submitted([apbatch.backends.SubmittedJob(w, f"j{i}")], "fake", now=t0 + dt)
    for job, state, code, at in (("j0", JobState.COMPLETED, 0, t0 + 102),
                                 ("j1", JobState.FAILED, 4, t0 + 54),
                                 ("j2", JobState.FAILED, 5, t0 + 206),
                                 ("j3", JobState.RUNNING, None, t0 + 50)):
        n.ledger.update_states({job: JobStatus(job, state, code)}, "fake", now=at)
    n.ledger.record_submitted([apbatch.backends.SubmittedJob(works[1], "j1b")], "fake", now=t0 + 300)
    other = fan_out(parse_event(next_visit(40)), n.cfg)[0]  # a visit whose event is not in the ledger
    n.ledger.claim([other], received_at=t0, now=t0)
    n.ledger.record_submitted([apbatch.backends.SubmittedJob(other, "c1")], "fake", now=t0 + 1)
    n.ledger.mark_cancelled([r.id for r in n.ledger.rows(group_id=other.group_id)], "test", now=t0 + 5)
    for at in (t0, t0 + 60, night_span(DAY)[1] + 10):
        n.ledger.record_dead_letter("{bad", "malformed JSON", received_at=at)

    rep = night_report(n.cfg, day_obs=DAY, ledger=n.ledger)
    assert rep["events"] == {"nextVisit": 1} and rep["visits"] == 2
    assert rep["ccds"] == 5 and rep["submitted"] == 5
    assert rep["states"] == {"CANCELLED": 1, "COMPLETED": 1, "FAILED": 1, "PENDING": 1, "RUNNING": 1}
    assert rep["exit_codes"] == {"0": 1, "5": 1} and rep["attempts"] == {"1": 4, "2": 1}
    assert rep["resubmissions"] == 1 and rep["needs_attention"] == 1 and rep["to_resubmit"] == 0
    assert rep["dead_letters"] == 2 and rep["missing_ccds"] == 5
    lat = rep["latency"]
    # first submissions 2, 6, 10 s and the cancelled visit's 1 s (j1 was resubmitted: left out)
    assert lat["event_to_submit"] == {"n": 4, "median": 4.0, "p95": pytest.approx(9.4)}
    assert lat["submit_to_finish"] == {"n": 2, "median": 150.0, "p95": pytest.approx(195.0)}  # 100, 200
    text = format_report(rep)
    assert "needs attention 1" in text and "missing CCDs    5" in text
    # the sky covered by the 5 submitted science CCDs, 1 completed: ComCam CCDs are 0.0504 deg^2,
    # their MOC at order 14 ~4-5% more; the cancelled visit's CCD lies on works[0]'s: counted once
    fp = rep["footprint"]
    assert fp["ccds_observed"] == 5 and fp["ccds_processed"] == 1
    assert fp["processed_deg2"] == pytest.approx(0.0504 * 1.045, rel=0.015)
    assert fp["observed_deg2"] == pytest.approx(4 * fp["processed_deg2"], rel=0.015)
    assert (f"  sky covered     {fp['observed_deg2']:.2f} deg^2 observed, {fp['processed_deg2']:.2f} deg^2 "
            "processed") in text.splitlines()
    assert "submitted -> finished median 150.0 s, p95 195.0 s (n=2)" in text
    assert json.loads(json.dumps(rep)) == rep  # JSON-clean


def test_replayed_night_is_one_night(night):
    """A replay a year later (events retimed to now, groups and image names kept) is filed under
    the simulated night: its CCDs, its events and its missed CCDs, and nothing under today's."""
    n = night()
    year = 365 * 86400.0
    seen, missed = (dict(next_visit(m), startTime=next_visit(m)["startTime"] + year,
                         private_sndStamp=next_visit(m)["private_sndStamp"] + year) for m in (40, 45))
    submit_visit(n, seen)
    n.ledger.record_event("nextVisit", missed, instrument="LSSTComCam", group_id=missed["groupId"],
                          accepted=True, received_at=SENT + year + 60, day_obs=DAY)
    assert {r.day_obs for r in n.ledger.rows()} == {DAY}
    rep = night_report(n.cfg, day_obs=DAY, ledger=n.ledger)
    assert rep["ccds"] == 9 and rep["events"] == {"nextVisit": 2} and rep["missing_ccds"] == 9
    replay_day = int(parse_event(seen).start_datetime.strftime("%Y%m%d"))
    today = night_report(n.cfg, day_obs=replay_day, ledger=n.ledger)
    assert today["ccds"] == 0 and today["events"] == {} and today["missing_ccds"] == 0
    assert today["other_nights"] == {str(DAY): 9} and rep["other_nights"] == {}
    assert f"the ledger's latest nights (--day-obs): {DAY} (9 CCDs)" in format_report(today)


def test_report_lists_calibration_verification(night):
    """The night report names each calibration CCD's verdict and the failed amplifiers."""
    n = night()
    flat = json.loads((DATA / "calib_flat_LSSTComCam.json").read_text())
    out = n.disp.handle(parse_event(flat), flat, "test", received_at=SENT)
    assert out.action == "submitted"
    works = [j.work for j in out.jobs]
    day = works[0].day_obs
    n.ledger.record_verification(works[0].instrument, works[0].group_id, works[0].detector,
                                 {"passed": False, "failed_amps": {"C10": ["dark_current"]}})
    n.ledger.record_verification(works[1].instrument, works[1].group_id, works[1].detector,
                                 {"passed": True, "failed_amps": {}})
    rep = night_report(n.cfg, day_obs=day, ledger=n.ledger)
    assert [(c["detector_name"], c["passed"]) for c in rep["calibrations"]] == [
        (works[0].detector_name, False), (works[1].detector_name, True)]
    text = format_report(rep)
    assert "calibration verification: 1 passed, 1 failed" in text and "C10: dark_current" in text


def test_report_stage_latency_of_science_ccds(night):
    """Stage marks in the ledger: per-interval p50/p95 over the night's science CCDs, and per visit."""
    n = night()
    t0 = night_span(DAY)[0] + 8 * 3600.0
    flat = json.loads((DATA / "calib_flat_LSSTComCam.json").read_text())
    visits = {}
    for minute, payload in ((33, NV), (40, next_visit(40)), (45, next_visit(45)), (0, flat)):
        works = fan_out(parse_event(payload), n.cfg)
        n.ledger.claim(works, received_at=t0, now=t0)
        n.ledger.record_submitted(n.backend.submit(works), "fake", now=t0 + 1)
        visits[minute] = works
    # raw available -> alerts sent: 4, 6, 8, 70 s in the first visit, 2 and 3 s in the second;
    # the third visit recorded nothing; a flat's marks are not about alerts and are left out
    for minute, seconds in ((33, (4.0, 6.0, 8.0, 70.0)), (40, (2.0, 3.0)), (0, (500.0,))):
        for w, sec in zip(visits[minute], seconds, strict=False):
            raw = t0 + 60.0
            stages = {"started": raw - 25.0, "prepared": raw - 15.0, "raw_available": raw,
                      "alerts_sent": raw + sec}
            assert n.ledger.record_stages(w.instrument, w.group_id, w.detector, stages)
    rep = night_report(n.cfg, day_obs=DAY, ledger=n.ledger)
    lat = rep["stage_latency"]
    assert set(lat) == {"prepare", "raw_to_alerts"}
    # 2, 3, 4, 6, 8, 70 s: p50 (4 + 6) / 2, numpy's linear p95 8 + 0.75 * 62
    assert lat["raw_to_alerts"] == {"n": 6, "p50": 5.0, "p95": 54.5, "max": 70.0,
                                    "within_requirement": pytest.approx(5 / 6, abs=1e-4)}
    assert lat["prepare"] == {"n": 6, "p50": 10.0, "p95": 10.0, "max": 10.0}
    assert rep["latency"]["event_to_submit"]["n"] == 9 * 3 + 9  # the older keys are unchanged
    per = {v["group_id"]: v for v in rep["per_visit"]}
    # 4, 6, 8, 70 s: p95 8 + 0.85 * 62
    assert per[NV["groupId"]]["raw_to_alerts"] == {"n": 4, "p50": 7.0, "p95": 60.7,
                                                   "max": 70.0, "within_requirement": 0.75}
    assert per[next_visit(40)["groupId"]]["raw_to_alerts"] == {"n": 2, "p50": 2.5, "p95": pytest.approx(2.95),
                                                               "max": 3.0, "within_requirement": 1.0}
    assert per[next_visit(45)["groupId"]]["raw_to_alerts"] is None
    assert per[visits[0][0].group_id]["raw_to_alerts"] is None  # the flat
    assert json.loads(json.dumps(rep)) == rep

    text = format_report(rep)
    lines = text.splitlines()
    assert "  raw available -> alerts sent: p50 5.0 s, p95 54.5 s, 83.33% of 6 within 60 s" in lines
    assert next(x for x in lines if x.startswith("  raw_to_alerts ")).split() == [
        "raw_to_alerts", "raw_available", "->", "alerts_sent", "6", "5.0", "54.5", "70.0"]
    header = next(x for x in lines if x.startswith("INSTRUMENT"))
    assert header.split()[5:10] == ["RESUB", "ALERT", "P50", "ALERT", "P95"]
    row = {x.split()[2]: x.split() for x in lines if x.startswith("LSSTComCam")}
    assert row[NV["groupId"]][6:8] == ["7.0", "60.7"]
    assert row[next_visit(40)["groupId"]][6:8] == ["2.5", "3.0"]  # 2.95 printed with one decimal
    assert row[next_visit(45)["groupId"]][6:8] == ["-", "-"]


def test_report_without_stage_marks_prints_no_stage_section(night):
    n = night()
    works = fan_out(parse_event(NV), n.cfg)
    n.ledger.claim(works, received_at=SENT, now=SENT)
    n.ledger.record_submitted(n.backend.submit(works), "fake", now=SENT + 1)
    rep = night_report(n.cfg, day_obs=DAY, ledger=n.ledger)
    assert set(rep["latency"]) == {"event_to_submit", "submit_to_finish"} and rep["stage_latency"] == {}
    assert rep["per_visit"][0]["raw_to_alerts"] is None
    text = format_report(rep)
    assert "stage latency" not in text and "alerts sent" not in text


def test_percentile_matches_numpy():
    rng = random.Random(5)
    for size in (1, 2, 7, 100):
        v = [rng.uniform(0, 100) for _ in range(size)]
        for q in (0, 50, 95, 100):
            assert percentile(v, q) == pytest.approx(float(np.percentile(v, q)))
    assert percentile([], 50) is None


def test_day_obs_default_and_validation():
    def utc(*t):
        return float(calendar.timegm(t))

    assert default_day_obs(utc(2025, 6, 10, 13, 0, 0, 0, 0, 0)) == 20250609  # 10:00 in Chile
    assert default_day_obs(utc(2025, 6, 10, 23, 0, 0, 0, 0, 0)) == 20250609  # night of 0610 under way
    assert default_day_obs(utc(2025, 6, 11, 11, 0, 0, 0, 0, 0)) == 20250610
    assert parse_day_obs("20240229") == 20240229
    for bad in ("2024110", "20241332", "20230229", "yesterday", "2024-11-08"):
        with pytest.raises(BadInputError, match="--day-obs"):
            parse_day_obs(bad)


def test_write_atomic(tmp_path):
    path = write_atomic(str(tmp_path / "r" / "night-{day_obs}.txt"), "hello\n", 20241108)
    assert path == tmp_path / "r" / "night-20241108.txt" and path.read_text() == "hello\n"
    (tmp_path / "f").write_text("x")
    with pytest.raises(BadInputError, match="--out"):
        write_atomic(str(tmp_path / "f" / "out.txt"), "x")
    assert sorted(p.name for p in (tmp_path / "r").iterdir()) == ["night-20241108.txt"]


# ------------------------------------------------------------------------------------- CLI
@pytest.fixture
def env(tmp_path, monkeypatch):
    monkeypatch.delenv("APBATCH_CONFIG", raising=False)
    cfg_file = tmp_path / "apbatch.yaml"
    cfg_file.write_text(yaml.safe_dump({"root": str(tmp_path / "work")}))
    holder = {"backend": FakeBackend()}
    monkeypatch.setattr(apbatch.backends, "make_backend", lambda config, **deps: holder["backend"])
    return SimpleNamespace(config=str(cfg_file), holder=holder, root=tmp_path / "work")


def run(capsys, *args):
    with pytest.raises(SystemExit) as exc:
        main(list(args))
    out, err = capsys.readouterr()
    return exc.value.code, out, err


def test_cli_bad_day_obs_is_one_line_exit_2(env, capsys):
    for cmd in ("reprocess", "report"):
        code, out, err = run(capsys, "night", cmd, "--day-obs", "2024-11-08", "--config", env.config)
        assert code == 2 and out == ""
        assert err.strip().splitlines() == ["error: --day-obs: '2024-11-08' is not a date YYYYMMDD "
                                            "(e.g. --day-obs 20250609)"]
    assert not env.root.exists()  # nothing was opened or written


def test_cli_reprocess_then_report(env, capsys):
    ledger = Ledger.from_config(load_config(env.config, environ={}))
    ledger.record_event("nextVisit", NV, instrument="LSSTComCam", group_id=NV["groupId"], accepted=True,
                        received_at=SENT)
    args = ["--day-obs", str(DAY), "--config", env.config]
    code, out, err = run(capsys, "night", "reprocess", *args, "--json")
    res = json.loads(out)
    assert code == 0 and len(res["missed"]) == 9 and len(env.holder["backend"].batches) == 1
    code, out, _ = run(capsys, "night", "reprocess", *args)
    assert code == 0 and out.startswith(f"night {DAY}: polled 9 job(s)")
    assert "submitted 0 resubmission(s) and 0 missed" in out
    target = env.root / "reports" / "night-{day_obs}.json"
    code, out, err = run(capsys, "night", "report", *args, "--json", "--out", str(target))
    written = env.root / "reports" / f"night-{DAY}.json"
    assert code == 0 and out == "" and str(written) in err
    rep = json.loads(written.read_text())
    assert rep["ccds"] == 9 and rep["states"] == {"PENDING": 9} and rep["missing_ccds"] == 0
    assert os.listdir(written.parent) == [written.name]


def test_cli_status_failure_exit_4(env, capsys):
    env.holder["backend"] = StatusDownBackend()
    ledger = Ledger.from_config(load_config(env.config, environ={}))
    works = fan_out(parse_event(NV), load_config(env.config, environ={}))
    ledger.claim(works, received_at=SENT, now=SENT)
    ledger.record_submitted(env.holder["backend"].submit(works), "fake", now=SENT + 1)
    before = ledger.rows()
    code, out, err = run(capsys, "night", "reprocess", "--day-obs", str(DAY), "--config", env.config)
    assert code == 4 and out == "" and len(err.strip().splitlines()) == 1
    assert "Unable to contact slurm controller" in err and "ledger was not changed" in err
    assert ledger.rows() == before


def test_cli_report_exit_6_when_ccds_need_attention_and_2_without_ledger(env, capsys):
    args = ["--day-obs", str(DAY), "--config", env.config]
    code, out, err = run(capsys, "night", "report", *args)
    ledger_file = env.root / "ledger.sqlite3"
    assert code == 2 and out == "" and err.strip().splitlines() == [
        f"error: ledger.url: no ledger at {ledger_file} (check ledger.url (and root) in the --config file(s) "
        "/ APBATCH_LEDGER__URL)"]
    assert not env.root.exists()
    cfg = load_config(env.config, environ={})
    ledger = Ledger.from_config(cfg)
    works = fan_out(parse_event(NV), cfg)
    ledger.claim(works, received_at=SENT, now=SENT)
    ledger.record_submitted(env.holder["backend"].submit(works), "fake", now=SENT + 1)
    assert run(capsys, "night", "report", *args)[0] == 0
    ledger.update_states({"fake-2": JobStatus("fake-2", JobState.COMPLETED, 5)}, "fake", now=SENT + 60)
    code, out, _ = run(capsys, "night", "report", *args)
    assert code == 6 and "needs attention 1" in out and "R22_S01  FAILED  exit 5" in out
    code, out, _ = run(capsys, "night", "report", *args, "--json")
    assert code == 6 and json.loads(out)["attention"][0]["detector_name"] == "R22_S01"


def test_cli_report_json_and_text_carry_stage_latency(env, capsys):
    cfg = load_config(env.config, environ={})
    ledger = Ledger.from_config(cfg)
    works = fan_out(parse_event(NV), cfg)
    ledger.claim(works, received_at=SENT, now=SENT)
    ledger.record_submitted(env.holder["backend"].submit(works), "fake", now=SENT + 1)
    for w, sec in zip(works, (5.0, 7.0, 9.0), strict=False):
        ledger.record_stages(w.instrument, w.group_id, w.detector, {"raw_available": SENT + 40.0,
                                                                     "alerts_sent": SENT + 40.0 + sec})
    args = ["--day-obs", str(DAY), "--config", env.config]
    code, out, _ = run(capsys, "night", "report", *args, "--json")
    rep = json.loads(out)
    assert code == 0 and rep["stage_latency"]["raw_to_alerts"] == {"n": 3, "p50": 7.0, "p95": 8.8, "max": 9.0,
                                                             "within_requirement": 1.0}
    assert rep["per_visit"][0]["raw_to_alerts"]["p50"] == 7.0
    code, out, _ = run(capsys, "night", "report", *args)
    line = "  raw available -> alerts sent: p50 7.0 s, p95 8.8 s, 100.00% of 3 within 60 s"
    assert code == 0 and line in out.splitlines()
