"""Tests for apbatch.ocps.runner: submission through the local backend into the OCPS ledger,
resubmission of a CCD asked for again, abort, restart after submission, publishing retried.

No butler here (the runner plans from the obsid alone) and a per-CCD ``job.command`` that only
sleeps or exits: what is tested is the runner's bookkeeping, with real job processes.
"""

from __future__ import annotations

import re
import sys
import time

import pytest
from apbatch.config import load_config
from apbatch.ledger import Ledger
from apbatch.ocps.events import MemoryPublisher
from apbatch.ocps.model import DataId, Phase
from apbatch.ocps.service import Service
from apbatch.states import SubmissionState

INSTRUMENT = "LSSTComCam"


def _cfg(tmp_path, code: str = "pass", **ocps):
    return load_config(overrides={
        "root": str(tmp_path / "work"), "backend": {"kind": "local", "max_workers": 2},
        "job": {"command": [sys.executable, "-c", code], "distributor": str(tmp_path / "dist")},
        "events": {"detectors": {INSTRUMENT: [0, 4]}},
        "ocps": {"poll_interval": 0.1, **ocps}}, environ={})


def _final(svc: Service, request_id: str, timeout: float = 60.0):
    deadline = time.monotonic() + timeout
    req = svc.get(request_id)
    while not req.phase.final and time.monotonic() < deadline:
        req = svc.wait(request_id, deadline - time.monotonic())
    return req


def test_jobs_run_and_a_ccd_asked_again_is_resubmitted(tmp_path):
    pub = MemoryPublisher()
    svc = Service(_cfg(tmp_path), publisher=pub)
    svc.start()
    try:
        data = DataId(INSTRUMENT, obsid="CC_O_20251015_000042")
        a = _final(svc, svc.create("ap", data, run=True).id)
        b = _final(svc, svc.create("ap", data, run=True).id)
    finally:
        svc.stop()
    assert a.phase is b.phase is Phase.COMPLETED
    assert len(a.jobs) == len(b.jobs) == 2 and not set(a.jobs) & set(b.jobs)  # run again, new jobs
    ledger = Ledger.open(svc.config.sqlalchemy_url(svc.config.ocps.ledger_url), create=False)
    rows = ledger.rows(instrument=INSTRUMENT, group_id="CC_O_20251015_000042")
    assert [(r.detector, r.attempts, r.state, r.job_id in b.jobs) for r in rows] == [
        (0, 2, SubmissionState.COMPLETED, True), (4, 2, SubmissionState.COMPLETED, True)]
    assert [e["request_id"] for e in pub.completions] == [a.id, b.id]
    assert [(t["request_id"], t["detector"], t["exit_code"]) for t in pub.telemetries] == [
        (a.id, 0, 0), (a.id, 4, 0), (b.id, 0, 0), (b.id, 4, 0)]
    # the prompt-processing ledger was not touched: OCPS has its own
    assert not svc.config.path("ledger.sqlite3").exists()


def test_failing_jobs_end_in_error_naming_each_ccd(tmp_path):
    pub = MemoryPublisher()
    svc = Service(_cfg(tmp_path, "import sys; sys.exit(4)"), publisher=pub)
    svc.start()
    try:
        req = _final(svc, svc.create("ap", DataId(INSTRUMENT, obsid="CC_O_20251015_000043"), run=True).id)
    finally:
        svc.stop()
    assert req.phase is Phase.ERROR
    assert req.error.startswith("2 of 2 CCD(s) failed: R22_S00: exit 4 (retriable)")
    assert "R22_S11" in req.error
    (event,) = pub.completions
    assert (event["success"], event["ccds"], event["reason"]) == (False, {"done": 0, "failed": 2}, req.error)


def test_abort_cancels_the_running_jobs(tmp_path):
    pub = MemoryPublisher()
    svc = Service(_cfg(tmp_path, "import time; time.sleep(60)"), publisher=pub)
    svc.start()
    try:
        req = svc.create("ap", DataId(INSTRUMENT, obsid="CC_O_20251015_000044"), run=True)
        deadline = time.monotonic() + 30
        while len(svc.get(req.id).jobs) < 2 and time.monotonic() < deadline:
            time.sleep(0.1)
        t0 = time.monotonic()
        assert svc.abort(req.id).phase is Phase.ABORTED
        ledger = svc.ledger
        while time.monotonic() < t0 + 20:
            rows = ledger.rows(group_id="CC_O_20251015_000044")
            if all(r.state is SubmissionState.CANCELLED for r in rows):
                break
            time.sleep(0.1)
        assert [r.state for r in rows] == [SubmissionState.CANCELLED] * 2
        svc.delete(req.id)
        svc.runner.step()
    finally:
        svc.stop()
    (event,) = pub.completions
    assert event["phase"] == "ABORTED" and event["success"] is False and len(event["jobs"]) == 2
    assert svc.store.list() == [] and svc.store.unpublished() == []


def test_a_request_past_its_execution_duration_cancels_its_jobs_and_ends_in_error(tmp_path):
    pub = MemoryPublisher()
    svc = Service(_cfg(tmp_path, "import time; time.sleep(60)", execution_duration=2.0), publisher=pub)
    svc.start()
    try:
        t0 = time.monotonic()
        req = _final(svc, svc.create("ap", DataId(INSTRUMENT, obsid="CC_O_20251015_000046"), run=True).id)
        took = time.monotonic() - t0
        rows = svc.ledger.rows(group_id="CC_O_20251015_000046")
        deadline = time.monotonic() + 20
        while any(r.state is not SubmissionState.CANCELLED for r in rows) and time.monotonic() < deadline:
            time.sleep(0.1)
            rows = svc.ledger.rows(group_id="CC_O_20251015_000046")
    finally:
        svc.stop()
    assert req.phase is Phase.ERROR and 2.0 < took < 30
    # each unfinished CCD named with its last known state (RUNNING unless the machine is slow)
    assert re.fullmatch(r"executionDuration 2 s exceeded: 2 of 2 CCD\(s\) unfinished: "
                        r"R22_S00 \((RUNNING|PENDING|CLAIMED)\), R22_S11 \((RUNNING|PENDING|CLAIMED)\)",
                        req.error), req.error
    assert [r.state for r in rows] == [SubmissionState.CANCELLED] * 2  # the jobs were cancelled
    (event,) = pub.completions
    assert (event["phase"], event["success"], event["ccds"]) == ("ERROR", False, {"done": 0, "failed": 2})
    assert len(event["jobs"]) == 2


def test_restart_adopts_submitted_jobs_and_reports_once(tmp_path):
    cfg = _cfg(tmp_path, "import time; time.sleep(1.5)")
    first_pub = MemoryPublisher()
    first = Service(cfg, publisher=first_pub)
    first.start()
    req = first.create("ap", DataId(INSTRUMENT, obsid="CC_O_20251015_000045"), run=True)
    deadline = time.monotonic() + 30
    while len(first.get(req.id).jobs) < 2 and time.monotonic() < deadline:
        time.sleep(0.05)
    first.stop()  # the jobs run on without it
    jobs = first.store.get(req.id).jobs
    second_pub = MemoryPublisher()
    second = Service(cfg, publisher=second_pub)
    second.start()
    try:
        done = _final(second, req.id)
    finally:
        second.stop()
    assert done.phase is Phase.COMPLETED and done.jobs == jobs  # adopted, not submitted again
    assert first_pub.completions == [] and [e["request_id"] for e in second_pub.completions] == [req.id]
    assert sorted(t["detector"] for t in done.telemetry) == [0, 4]


class _FlakyPublisher(MemoryPublisher):
    """Refuses the first two completion events (the broker away), then accepts."""

    def __init__(self):
        super().__init__()
        self.refused = 0

    def completion(self, event):
        if self.refused < 2:
            self.refused += 1
            return False
        return super().completion(event)


def test_unacknowledged_event_is_published_later_once(tmp_path):
    pub = _FlakyPublisher()
    svc = Service(_cfg(tmp_path), publisher=pub)
    try:
        req = svc.create("gather", DataId(INSTRUMENT, group_id="2025-10-16T00:59:39.308"), run=True)
        svc.runner.step()  # starts it: no butler, so it ends in ERROR; the event is refused (twice)
        assert svc.get(req.id).phase is Phase.ERROR and pub.refused == 2 and pub.completions == []
        assert svc.store.unpublished() == [req.id]
        svc.runner.step()
        svc.runner.step()
    finally:
        svc.stop()
    assert [e["request_id"] for e in pub.completions] == [req.id]
    assert "no exposure of group" in pub.completions[0]["reason"]


def test_wait_returns_when_the_phase_moves(tmp_path):
    svc = Service(_cfg(tmp_path, "import time; time.sleep(1)"), publisher=MemoryPublisher())
    try:
        req = svc.create("ap", DataId(INSTRUMENT, obsid="CC_O_20251015_000046", detector=4))
        t0 = time.monotonic()
        assert svc.wait(req.id, 0.3).phase is Phase.PENDING and 0.25 < time.monotonic() - t0 < 2.0
        svc.start()
        svc.run(req.id)
        t0 = time.monotonic()
        moved = svc.wait(req.id, 30.0, Phase.QUEUED)
        assert moved.phase is Phase.EXECUTING and time.monotonic() - t0 < 2.0
        assert _final(svc, req.id).phase is Phase.COMPLETED
    finally:
        svc.stop()


@pytest.mark.parametrize("mode, limit", [("async", 3), ("sync", 1)])
def test_concurrency_limit(tmp_path, mode, limit):
    svc = Service(_cfg(tmp_path, "import time; time.sleep(0.5)", mode=mode, max_concurrent=limit),
                  publisher=MemoryPublisher())
    ids = [svc.create("ap", DataId(INSTRUMENT, obsid=f"CC_O_20251015_{50 + i:06d}", detector=4)).id
           for i in range(4)]
    for i in ids:
        svc.store.set_phase(i, Phase.QUEUED, expect=[Phase.PENDING])
    try:
        svc.runner.step()
        assert len(svc.list(phases=[Phase.EXECUTING])) == limit
    finally:
        svc.stop()


def test_ccd_claimed_by_a_stopped_process_is_submitted(tmp_path):
    """A claim left by a runner that stopped before submitting is reconciled, then submitted."""
    from apbatch.backends.base import new_token
    from apbatch.ocps.pipelines import get_pipeline, plan_works

    svc = Service(_cfg(tmp_path), publisher=MemoryPublisher())
    data = DataId(INSTRUMENT, obsid="CC_O_20251015_000047", detector=4)
    (work,) = plan_works(get_pipeline("ap"), data, [], distributor=str(tmp_path / "dist"))
    svc.ledger.claim([work], now=time.time() - 120, tokens={(INSTRUMENT, work.group_id): new_token()})
    svc.start()
    try:
        done = _final(svc, svc.create("ap", data, run=True).id)
    finally:
        svc.stop()
    assert done.phase is Phase.COMPLETED and len(done.jobs) == 1
    (row,) = svc.ledger.rows(group_id=work.group_id)
    assert (row.state, row.attempts, row.job_id) == (SubmissionState.COMPLETED, 1, done.jobs[0])
