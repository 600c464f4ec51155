"""Tests of apbatch.dispatcher (and apbatch.script.daemon): events -> claims -> submissions -> states."""

from __future__ import annotations

import io
import json
import os
import signal
import subprocess
import sys
import threading
import time
from collections.abc import Sequence
from pathlib import Path

import pytest
from apbatch.backends.base import Backend, JobState, JobStatus, SubmittedJob
from apbatch.config import load_config
from apbatch.dispatcher import Dispatcher
from apbatch.errors import SchedulerError
from apbatch.events import TAI_MINUS_UTC, parse_event
from apbatch.ledger import SUBMIT_FAILED, Ledger
from apbatch.script.daemon import run_daemon
from apbatch.sources.spool import SpoolSource
from apbatch.sources.stdin import StdinSource
from apbatch.work import CcdWork

DATA = Path(__file__).parent / "data" / "events"


class FakeBackend(Backend):
    """Records what it is asked; job states come from ``self.states``."""

    kind = "fake"

    def __init__(self, fail_submits: int = 0):  # no super().__init__: no config needed
        self.batches: list[list[CcdWork]] = []
        self.cancelled: list[str] = []
        self.states: dict[str, JobStatus] = {}
        self.status_calls = 0
        self.fail_submits = fail_submits
        self._n = 0
        self.tokens: dict[str, list[SubmittedJob]] = {}  # what the "scheduler" holds per submission token
        self.finds: list[str] = []
        self.find_error: Exception | None = None

    def job_command(self, day_obs: int) -> list[str]:
        return ["fake-job", "--config", f"/night/{day_obs}.yaml"]

    def render(self, works: Sequence[CcdWork]) -> str:
        return "\n".join(" ".join(["fake-job", w.label, w.detector_name,
                                   *w.job_args()]) for w in works) + "\n"

    def submit(self, works: Sequence[CcdWork], token: str | None = None) -> list[SubmittedJob]:
        if self.fail_submits:
            self.fail_submits -= 1
            raise SchedulerError(["sbatch"], 1, "", "sbatch: error: Batch job submission failed")
        self.batches.append(list(works))
        jobs = []
        for w in works:
            self._n += 1
            jobs.append(SubmittedJob(w, f"fake-{self._n}"))
            self.states[f"fake-{self._n}"] = JobStatus(f"fake-{self._n}", JobState.PENDING)
        if token is not None:
            self.tokens[token] = jobs
        return jobs

    def find_submitted(self, works: Sequence[CcdWork], token: str, since: float) -> list[SubmittedJob]:
        self.finds.append(token)
        if self.find_error is not None:
            raise self.find_error
        keys = {w.key for w in works}
        return [j for j in self.tokens.get(token, []) if j.work.key in keys]

    def status(self, job_ids: Sequence[str]) -> dict[str, JobStatus]:
        self.status_calls += 1
        return {j: self.states.get(j, JobStatus(j, JobState.UNKNOWN)) for j in job_ids}

    def cancel(self, job_ids: Sequence[str]) -> None:
        self.cancelled += list(job_ids)
        for j in job_ids:
            self.states[j] = JobStatus(j, JobState.CANCELLED)


def payload(name: str, **changes) -> dict:
    d = json.loads((DATA / name).read_text())
    body = d["value"] if "value" in d else d
    body.update(changes)
    return d


def fresh(name: str, now: float, **changes) -> dict:
    """A sample event sent 1 s before ``now`` (UTC) -- its stamp is TAI."""
    return payload(name, private_sndStamp=now + TAI_MINUS_UTC - 1.0, **changes)


NOW = 1_800_000_000.0


@pytest.fixture
def setup(tmp_path):
    def make(mode="dynamic", **events):
        cfg = load_config(environ={}, overrides={"root": str(tmp_path), "events": {"mode": mode, **events}})
        ledger = Ledger.from_config(cfg)
        backend = FakeBackend()
        clock = [NOW]
        disp = Dispatcher(cfg, ledger, backend, clock=lambda: clock[0])
        return disp, ledger, backend, clock

    return make


def handle(disp, name, **changes):
    return disp.handle(parse_event(fresh(name, disp.clock(), **changes)))


def test_dynamic_mode_submits_at_next_visit_once(setup):
    disp, ledger, backend, _ = setup()
    out = handle(disp, "nextVisit_LSSTCam.json")
    assert out.action == "submitted" and len(out.jobs) == 189
    assert len(backend.batches) == 1 and len(backend.batches[0]) == 189  # one batch per visit
    for name in ("startIntegration_LSSTCam_snap1.json", "startIntegration_LSSTCam_snap2.json",
                 "nextVisit_LSSTCam.json"):
        assert handle(disp, name).action == "duplicate"
    assert len(backend.batches) == 1
    rows = ledger.rows()
    assert len(rows) == 189 and {r.state for r in rows} == {"PENDING"}
    assert {r.backend for r in rows} == {"fake"} and rows[0].event_received_at == NOW
    assert [e["kind"] for e in ledger.event_rows()] == ["nextVisit", "startIntegration", "startIntegration",
                                                        "nextVisit"]


def test_batch_mode_submits_at_start_integration_with_next_visit_pointing(setup, tmp_path):
    disp, ledger, backend, clock = setup("batch")
    assert handle(disp, "nextVisit_LSSTCam.json").action == "deferred"
    assert backend.batches == []
    # a restart between nextVisit and startIntegration: the nextVisit is found in the ledger
    disp2 = Dispatcher(disp.config, Ledger.from_config(disp.config), backend, clock=lambda: clock[0])
    out = handle(disp2, "startIntegration_LSSTCam_snap1.json")
    assert out.action == "submitted" and len(out.jobs) == 189
    w = backend.batches[0][0]
    assert (w.ra, w.physical_filter, w.exposure_time, w.nimages) == (320.62687495816675, "z_20", 15.0, 2)
    assert handle(disp2, "startIntegration_LSSTCam_snap2.json").action == "duplicate"
    assert len(backend.batches) == 1


def test_calibrations_at_start_integration(setup):
    disp, ledger, backend, _ = setup()
    out = handle(disp, "calib_bias_LSSTCam.json")
    assert out.action == "submitted" and len(out.jobs) == 189
    assert backend.batches[0][0].intent == "bias" and backend.batches[0][0].group_id == "2025042500032"
    assert handle(disp, "calib_flat_LSSTComCam.json").action == "submitted"
    assert handle(disp, "calib_bias_LSSTCam.json").action == "duplicate"


@pytest.mark.parametrize(("name", "changes", "reason"), [
    ("nextVisit_LSSTCam.json", {"dome": 1}, "dome CLOSED"),
    ("nextVisit_LSSTCam.json", {"coordinateSystem": 3}, "not ICRS"),
    ("nextVisit_LSSTCam.json", {"instrument": "HSC"}, "unknown instrument"),
    ("startIntegration_LSSTCam_snap1.json", {"additionalValues": "CWFS:2025-06-10T07:31:26.692:x:0:0:0:r:p"},
     "not processed"),
])
def test_rejected_events_are_recorded_not_submitted(setup, name, changes, reason):
    disp, ledger, backend, _ = setup()
    out = handle(disp, name, **changes)
    assert out.action == "rejected" and reason in out.reason
    assert backend.batches == [] and ledger.rows() == []
    (ev,) = ledger.event_rows()
    assert ev["accepted"] is False and reason in ev["reason"]


def test_stale_event_rejected(setup):
    disp, ledger, backend, _ = setup()
    old = payload("nextVisit_LSSTComCam.json", private_sndStamp=NOW + TAI_MINUS_UTC - 601)
    out = disp.handle(parse_event(old))
    assert out.action == "rejected" and "stale" in out.reason and backend.batches == []


def test_bad_events_dead_lettered_and_loop_goes_on(setup, tmp_path):
    disp, ledger, backend, _ = setup()
    spool = tmp_path / "events" / "incoming"
    spool.mkdir(parents=True)
    good = fresh("nextVisit_LSSTComCam.json", NOW)
    nasty = fresh("nextVisit_LATISS.json", NOW, groupId="2024-06-25T01:26:31.895; touch /tmp/x")
    missing = fresh("nextVisit_LATISS.json", NOW)
    del missing["position"]
    (spool / "1.json").write_text('{"kind": "nextVisit", "groupId": ')
    (spool / "2.jsonl").write_text("\n".join(json.dumps(x) for x in (missing, nasty, good)))
    os.utime(spool / "1.json", (1, 1))
    disp.source = SpoolSource(spool)
    counts = disp.run(max_events=4, max_seconds=10)
    assert counts == {"bad": 3, "submitted": 1}
    assert len(backend.batches) == 1 and len(backend.batches[0]) == 9
    dead = [json.loads(line) for line in disp.dead_letter_path.read_text().splitlines()]
    assert [d["error"].split(":")[0] for d in dead] == ["event", "event.position", "event.groupId"]
    assert dead[0]["payload"] == '{"kind": "nextVisit", "groupId": ' and dead[0]["origin"] == "spool:1.json#0"
    assert "malformed JSON" in dead[0]["error"]
    assert len(ledger.dead_letter_rows()) == 3
    assert (spool / "failed" / "1.json").exists() and (spool / "failed" / "2.jsonl").exists()


def test_shell_metacharacters_in_group_are_harmless(setup, tmp_path):
    disp, ledger, backend, _ = setup()
    marker = tmp_path / "pwned"
    nasty = f"bias; touch {marker} $(touch {marker}) `touch {marker}` | tee {marker}"
    out = handle(disp, "calib_bias_LSSTCam.json", additionalKeys="imageType:groupId",
                 additionalValues=f"BIAS:{nasty}")
    assert out.action == "submitted"
    assert {r.group_id for r in ledger.rows()} == {nasty}
    argv = [sys.executable, "-c", "import sys, json; print(json.dumps(sys.argv[1:]))",
            *out.jobs[0].work.job_args()]
    seen = json.loads(subprocess.run(argv, capture_output=True, text=True, check=True).stdout)
    assert seen[seen.index("--group") + 1] == nasty
    assert not marker.exists()


def test_next_visit_canceled_cancels_not_started_jobs(setup):
    disp, ledger, backend, _ = setup()
    out = handle(disp, "nextVisit_LSSTComCam.json")
    ids = [j.job_id for j in out.jobs]
    backend.states[ids[0]] = JobStatus(ids[0], JobState.RUNNING)
    disp.poll_jobs()
    cancel = {"topic": "lsst.sal.ScriptQueue.logevent_nextVisitCanceled",
              "value": {"salIndex": 1, "scriptSalIndex": 1, "groupId": "2024-11-09T06:33:55.311",
                        "private_sndStamp": NOW + TAI_MINUS_UTC}}
    res = disp.handle(parse_event(cancel))
    assert res.action == "cancelled" and sorted(backend.cancelled) == sorted(ids[1:])
    states = {r.job_id: r.state for r in ledger.rows()}
    assert states[ids[0]] == "RUNNING" and {states[i] for i in ids[1:]} == {"CANCELLED"}
    # the running one may still process images, but is never retried
    backend.states[ids[0]] = JobStatus(ids[0], JobState.FAILED, 3)
    assert disp.poll_jobs()["resubmitted"] == 0


def test_poll_updates_states_and_retries_retriable_failures(setup):
    disp, ledger, backend, clock = setup(max_attempts=3)
    ids = [j.job_id for j in handle(disp, "nextVisit_LSSTComCam.json").jobs]
    backend.states[ids[0]] = JobStatus(ids[0], JobState.FAILED, 4, "retriable")
    backend.states[ids[1]] = JobStatus(ids[1], JobState.FAILED, 5, "after APDB store")
    backend.states[ids[2]] = JobStatus(ids[2], JobState.COMPLETED, 0)
    backend.states[ids[3]] = JobStatus(ids[3], JobState.RUNNING)
    clock[0] += 10
    result = disp.poll_jobs()
    assert result == {"polled": 9, "updated": 9, "resubmitted": 1}
    assert [w.detector for w in backend.batches[-1]] == [0]
    row = ledger.rows(detector=0)[0]
    assert row.attempts == 2 and row.state == "PENDING" and row.job_id != ids[0]
    assert ledger.rows(detector=1)[0].state == "FAILED"
    assert ledger.rows(detector=2)[0].finished_at == NOW + 10
    assert ledger.rows(detector=3)[0].started_at == NOW + 10
    for _ in range(3):  # keeps failing with exit 3: resubmitted until 3 submissions in all
        job = ledger.rows(detector=0)[0].job_id
        backend.states[job] = JobStatus(job, JobState.FAILED, 3)
        disp.poll_jobs()
    assert ledger.rows(detector=0)[0].attempts == 3 and ledger.rows(detector=0)[0].state == "FAILED"
    assert len(backend.batches) == 3


def test_scheduler_failure_is_recorded_and_retried(setup):
    disp, ledger, backend, _ = setup()
    backend.fail_submits = 1
    out = handle(disp, "nextVisit_LSSTComCam.json")
    assert out.action == "submit-failed" and "sbatch exited with 1" in out.reason
    assert {r.state for r in ledger.rows()} == {SUBMIT_FAILED}
    repeat = handle(disp, "nextVisit_LSSTComCam.json")  # not resubmitted by a repeat event
    assert repeat.action == "already-failed" and "SUBMIT_FAILED=9" in repeat.reason
    assert disp.poll_jobs()["resubmitted"] == 9
    assert {(r.state, r.attempts) for r in ledger.rows()} == {("PENDING", 2)}


def test_orphaned_claims_are_submitted_after_the_claim_timeout(setup):
    disp, ledger, backend, clock = setup()
    ev = parse_event(fresh("nextVisit_LATISS.json", NOW))
    from apbatch.fanout import fan_out

    ledger.claim(fan_out(ev, disp.config), now=NOW)  # a daemon died right after claiming
    assert disp.poll_jobs()["resubmitted"] == 0
    clock[0] += disp.claim_timeout + 1
    assert disp.poll_jobs()["resubmitted"] == 1


def test_run_stops_on_stop_event_and_max_seconds(setup, tmp_path):
    disp, ledger, backend, _ = setup()
    disp.source = SpoolSource(tmp_path / "spool")
    stop = threading.Event()
    threading.Timer(0.3, stop.set).start()
    t0 = time.monotonic()
    assert disp.run(stop_event=stop) == {}
    assert time.monotonic() - t0 < 3
    t0 = time.monotonic()
    disp.run(max_seconds=0.4)
    assert 0.35 < time.monotonic() - t0 < 3
    assert backend.status_calls == 0  # nothing unfinished: the scheduler is not bothered


def test_run_daemon_stdin_to_end_of_input(setup, tmp_path):
    disp, ledger, backend, _ = setup()
    lines = "\n".join(json.dumps(fresh(n, time.time())) for n in ("nextVisit_LATISS.json",
                                                                  "nextVisit_LSSTComCam.json"))
    counts = run_daemon(disp.config, source=StdinSource(io.StringIO(lines + "\nnot json\n")), backend=backend,
                        ledger=ledger, install_signals=False, max_seconds=20)
    assert counts == {"submitted": 2, "bad": 1}
    assert backend.status_calls >= 1  # final poll of the submitted jobs
    assert len(ledger.rows()) == 10


def test_run_daemon_stops_gracefully_on_sigterm(setup, tmp_path):
    disp, ledger, backend, _ = setup()
    before = signal.getsignal(signal.SIGTERM)
    threading.Timer(0.5, os.kill, (os.getpid(), signal.SIGTERM)).start()
    t0 = time.monotonic()
    counts = run_daemon(disp.config, backend=backend, ledger=ledger, max_seconds=20)
    assert counts == {} and time.monotonic() - t0 < 5
    assert signal.getsignal(signal.SIGTERM) == before  # handler restored after the run


DUMP = r'printf "%s\n" "$@" > "$APTEST_OUT/args"; exit 127'


def test_daemon_jobs_get_the_resolved_config_and_a_start_failure_is_explained(tmp_path, monkeypatch):
    """The real local backend: the job's --config file holds every --config file and APBATCH_*
    override the daemon was started with; a job whose command cannot start (exit 127) is FAILED
    with that reason in the ledger, and is not retried."""
    from apbatch.backends.local import LocalBackend

    out = tmp_path / "out"
    out.mkdir()
    a, b = tmp_path / "a.yaml", tmp_path / "b.yaml"
    a.write_text(json.dumps({"root": str(tmp_path / "work"), "job": {
        "command": ["/bin/sh", "-c", DUMP, "apjob"], "env": {"APTEST_OUT": str(out)}}}))
    b.write_text(json.dumps({"alerts": {"topic": "site-b"}}))
    cfg = load_config([a, b], environ={"APBATCH_EVENTS__MAX_ATTEMPTS": "2"})
    ledger = Ledger.from_config(cfg)
    disp = Dispatcher(cfg, ledger, LocalBackend(cfg), status_interval=0.1)
    lines = json.dumps(fresh("nextVisit_LATISS.json", time.time()))
    disp.source = StdinSource(io.StringIO(lines + "\n"))
    assert disp.run(max_seconds=20) == {"submitted": 1}
    deadline = time.monotonic() + 30
    while ledger.rows()[0].state.unfinished and time.monotonic() < deadline:
        disp.poll_jobs()
        time.sleep(0.1)
    args = (out / "args").read_text().splitlines()
    assert args[0] == "--config"
    job_cfg = load_config(args[1], environ={})
    assert job_cfg.alerts.topic == "site-b" and job_cfg.events.max_attempts == 2
    assert job_cfg.root == str(tmp_path / "work") and job_cfg == cfg
    row = ledger.rows()[0]
    assert (row.state, row.exit_code) == ("FAILED", 127) and row.reason.startswith("cannot start")
    assert row.command == ("/bin/sh", "-c", DUMP, "apjob", "--config", args[1])
    assert disp.poll_jobs()["resubmitted"] == 0  # cannot start: a person fixes job.command
    ledger.close()


# ---------------------------------------------------------------- issue 11: cancel, start-up reconciliation
def test_cancel_acts_on_the_schedulers_states_and_never_relabels_finished_rows(setup):
    from apbatch.script.cancel import cancel_jobs

    disp, ledger, backend, _ = setup()
    out = handle(disp, "nextVisit_LSSTComCam.json")
    ids = [j.job_id for j in out.jobs]
    # the scheduler is ahead of the ledger (not polled since): 0 done, 1 failed retriably, 2 running
    backend.states[ids[0]] = JobStatus(ids[0], JobState.COMPLETED, 0)
    backend.states[ids[1]] = JobStatus(ids[1], JobState.FAILED, 4)
    backend.states[ids[2]] = JobStatus(ids[2], JobState.RUNNING)
    visit = out.jobs[0].work.visit
    cancelled = cancel_jobs(disp.config, visit=visit, backend=backend, ledger=ledger)
    assert sorted(backend.cancelled) == sorted(ids[2:]) and len(cancelled) == len(ids) - 2
    rows = {r.job_id: r for r in ledger.rows()}
    assert (rows[ids[0]].state, rows[ids[0]].exit_code) == ("COMPLETED", 0)
    assert (rows[ids[1]].state, rows[ids[1]].exit_code, rows[ids[1]].retry) == ("FAILED", 4, True)
    assert {rows[i].state for i in ids[2:]} == {"CANCELLED"}
    # a second cancel finds nothing unfinished and changes nothing
    backend.cancelled.clear()
    assert cancel_jobs(disp.config, visit=visit, backend=backend, ledger=ledger) == []
    assert backend.cancelled == [] and {r.job_id: r.state for r in ledger.rows()} == {
        i: r.state for i, r in rows.items()}
    assert disp.poll_jobs()["resubmitted"] == 1  # the exit-4 neighbour is still retried


def test_cancel_refuses_to_touch_the_ledger_when_the_scheduler_cannot_be_asked(setup):
    from apbatch.script.cancel import cancel_jobs

    disp, ledger, backend, _ = setup()
    out = handle(disp, "nextVisit_LSSTComCam.json")

    def down(job_ids):
        raise SchedulerError(["squeue"], 1, "", "slurm_load_jobs error: Unable to contact slurm controller")

    backend.status = down
    with pytest.raises(SchedulerError):
        cancel_jobs(disp.config, visit=out.jobs[0].work.visit, backend=backend, ledger=ledger)
    assert {r.state for r in ledger.rows()} == {"PENDING"} and backend.cancelled == []


def test_daemon_start_records_jobs_a_killed_daemon_submitted_but_never_recorded(setup, tmp_path, caplog):
    from apbatch.submitter import Submitter

    disp, ledger, backend, _ = setup()
    ev = parse_event(fresh("nextVisit_LSSTComCam.json", NOW))
    from apbatch.fanout import fan_out

    class Killed(BaseException):
        pass

    def kill(point):
        if point == "submitted":
            raise Killed

    with pytest.raises(Killed):  # sbatch accepted the array; the daemon died before the ledger update
        Submitter(ledger, backend, clock=lambda: NOW, fault=kill).submit_new(fan_out(ev, disp.config))
    assert {r.state for r in ledger.rows()} == {"CLAIMED"}
    disp.source = SpoolSource(tmp_path / "spool")
    disp.run(max_seconds=0.1)  # a new daemon starts
    rows = ledger.rows()
    assert {r.state for r in rows} == {"PENDING"} and {r.attempts for r in rows} == {1}
    assert [r.job_id for r in rows] == [f"fake-{i}" for i in range(1, len(rows) + 1)]
    assert len(backend.batches) == 1 and "recorded now, not resubmitted" in caplog.text
    # a scheduler that is down at start-up: logged, the daemon still runs
    backend.find_error = SchedulerError(["squeue"], 1, "", "controller down")
    lat = parse_event(fresh("nextVisit_LATISS.json", NOW))
    ledger.claim(fan_out(lat, disp.config), now=NOW, tokens={("LATISS", lat.groupId): "dddd0000dddd0000dddd"})
    assert disp.run(max_seconds=0.1) == {}
    assert "controller down" in caplog.text and ledger.rows(instrument="LATISS")[0].state == "CLAIMED"


class QueueSource:
    """Events handed over by the test through a queue (no file-system delays)."""

    name = "queue"
    exhausted = False

    def __init__(self):
        import queue

        self.q: queue.Queue = queue.Queue()

    def poll(self, timeout):
        import queue

        try:
            return [self.q.get(timeout=timeout)]
        except queue.Empty:
            return []

    def ack(self, events, ok=True):
        pass

    def close(self):
        pass


def test_intake_never_waits_on_a_slow_poll(setup):
    from apbatch.sources.base import RawEvent

    disp, ledger, backend, clock = setup()
    handle(disp, "nextVisit_LSSTComCam.json")  # 9 unfinished jobs to poll
    in_status, real_status = threading.Event(), backend.status

    def slow_status(job_ids):
        in_status.set()
        time.sleep(1.5)  # squeue + sacct for a thousand jobs
        return real_status(job_ids)

    backend.status = slow_status
    disp.source, disp.status_interval = QueueSource(), 0.01
    stop = threading.Event()
    loop = threading.Thread(target=disp.run, kwargs={"stop_event": stop})
    loop.start()
    try:
        assert in_status.wait(5), "the poll never started"
        t0 = time.monotonic()
        body = fresh("nextVisit_LSSTCam.json", clock[0])
        disp.source.q.put(RawEvent(body, origin="test"))
        while len(backend.batches) < 2 and time.monotonic() - t0 < 5:
            time.sleep(0.005)
        took = time.monotonic() - t0
        assert len(backend.batches) == 2 and len(backend.batches[1]) == 189
        assert took < 0.5, f"intake waited {took:.2f} s on the poll"
    finally:
        stop.set()
        loop.join(10)
    assert not loop.is_alive()
