"""Fault injection on the REAL single-node Slurm: ``kill -9`` between claim and recorded submission.

Every trial is one visit (3 CCDs) submitted by a forked process that SIGKILLs itself at one
point of the claim -> sbatch -> record path (or is SIGKILLed by this process after a random
delay); then the recovery runs as in production -- the daemon's start-up and its retry of
stale claims (`Dispatcher.run`), or ``apbatch night reprocess`` run again -- and, once every
job has ended, this test counts the runs the jobs themselves wrote: every CCD ran exactly once
per attempt the ledger records, with the job id the ledger records, and no Slurm job of these
visits is unknown to the ledger (squeue, whose MinJobAge keeps ended jobs, and the jobcomp log).

Points (`apbatch.submitter.FAULT_POINTS` plus two inside the backend's command seam):
``claimed`` (after the claim transaction), ``before-sbatch``, ``after-sbatch`` (Slurm accepted
the array; its output never parsed), ``submitted`` (before the ledger update), ``recorded``
(control: nothing to recover), ``random`` (an asynchronous kill at a random moment of a
whole submission). A second test runs real daemons (`run_daemon`, spool source) on one spool
directory: one killed after its sbatch, then two at once, one of them killed after its claim.
"""

from __future__ import annotations

import collections
import json
import multiprocessing
import os
import random
import signal
import subprocess
import time
from pathlib import Path

import pytest
from apbatch.backends.base import run_command
from apbatch.backends.slurm import SlurmBackend
from apbatch.config import load_config
from apbatch.dispatcher import Dispatcher
from apbatch.ledger import Ledger
from apbatch.script.daemon import run_daemon
from apbatch.script.night import reprocess_night
from apbatch.states import SubmissionState
from apbatch.submitter import Submitter
from apbatch.work import CcdWork

pytestmark = pytest.mark.slurm

DAY_OBS = 20250610
POINTS = ("claimed", "before-sbatch", "after-sbatch", "submitted", "recorded", "random")
REPROCESS_POINTS = ("before-sbatch", "after-sbatch", "random")
# each run leaves one file <job name>.<task>.<array job>; a CCD whose .failed marker is
# absent and whose visit ends in 9 fails retriably (exit 4) once, for the reprocess trials
JOB = ('f="$APTEST_OUT/${SLURM_JOB_NAME}.${SLURM_ARRAY_TASK_ID}"; touch "$f.${SLURM_ARRAY_JOB_ID}"; '
       'case "$SLURM_JOB_NAME" in *9) [ -e "$f.failed" ] || { touch "$f.failed"; exit 4; } ;; esac; exit 0')


def works_of(visit: int) -> list[CcdWork]:
    group = f"2025-06-10T08:{visit % 60:02d}:{visit % 7:02d}.{visit}"
    return [CcdWork("LSSTComCam", d, f"R22_S{d // 3}{d % 3}", group, visit, DAY_OBS, "science", 30.0, 1,
                    "http://127.0.0.1:8000") for d in (0, 4, 8)]


class NoEvents:
    """An event source with nothing in it: the daemon starts, polls once, stops."""

    name = "none"
    exhausted = True

    def poll(self, timeout):
        return []

    def ack(self, events, ok=True):
        pass

    def close(self):
        pass


def killing_runner(point: str):
    """The real command seam, SIGKILLing this process just before or just after ``sbatch``."""
    def runner(argv, timeout, input=None, check=True):
        if argv[0] == "sbatch" and point == "before-sbatch":
            os.kill(os.getpid(), signal.SIGKILL)
        result = run_command(argv, timeout, input=input, check=check)
        if argv[0] == "sbatch" and point == "after-sbatch":
            os.kill(os.getpid(), signal.SIGKILL)
        return result
    return runner


def _child(cfg, url: str, point: str, visit: int | None, now: float | None) -> None:
    def fault(where: str) -> None:
        if where == point:
            os.kill(os.getpid(), signal.SIGKILL)

    ledger = Ledger.open(url)
    backend = SlurmBackend(cfg, runner=killing_runner(point))
    if visit is not None:  # a new visit, as the daemon submits it
        Submitter(ledger, backend, fault=fault).submit_new(works_of(visit), received_at=time.time())
    else:  # night reprocess of everything that failed retriably
        reprocess_night(cfg, day_obs=DAY_OBS, ledger=ledger, backend=backend, now=now)
    os._exit(0)


def run_killed(cfg, url: str, point: str, visit: int | None = None, now: float | None = None) -> int:
    """Run one trial in a forked process; returns its exit code (-9: killed)."""
    proc = multiprocessing.get_context("fork").Process(target=_child, args=(cfg, url, point, visit, now))
    start = time.monotonic()
    proc.start()
    if point == "random":  # anywhere in the time a whole submission takes (measured at "recorded")
        time.sleep(random.uniform(0.0, _FULL.get(visit is None, 0.05)))
        if proc.pid is not None and proc.exitcode is None:
            os.kill(proc.pid, signal.SIGKILL)
    proc.join(60)
    assert proc.exitcode is not None, "trial process hung"
    if point in ("recorded", "after-sbatch"):
        _FULL[visit is None] = time.monotonic() - start
    return proc.exitcode


_FULL: dict[bool, float] = {}
"""Seconds a trial process takes to its last kill point (per kind: reprocess or not)."""


def wait_all_ended(backend: SlurmBackend, ledger: Ledger, names: list[str], timeout: float = 60.0,
                   day_obs: int = DAY_OBS) -> None:
    """Until every job of these visits has ended, per the ledger's ids and per squeue by name."""
    deadline = time.monotonic() + timeout
    while time.monotonic() < deadline:
        ids = [r.job_id for r in ledger.rows(day_obs=day_obs) if r.job_id]
        states = backend.status(ids)
        queue = subprocess.run(["squeue", "-h", "-r", "-t", "PD,R,CG,S", "-n", ",".join(names), "-o", "%i"],
                               capture_output=True, text=True, check=True).stdout.split()
        if all(s.state.finished for s in states.values()) and not queue:
            ledger.update_states(states, "slurm")
            return
        time.sleep(1.0)
    raise AssertionError(f"jobs still unfinished after {timeout} s")


def slurm_arrays(names: list[str], jobcomp: Path) -> set[str]:
    """Every array job id Slurm knows under these job names (queue incl. ended, and jobcomp log)."""
    out = subprocess.run(["squeue", "-h", "-r", "-t", "all", "-n", ",".join(names), "-o", "%i"],
                         capture_output=True, text=True, check=True).stdout.split()
    arrays = {j.split("_")[0] for j in out}
    wanted = set(names)
    for line in jobcomp.read_text().splitlines() if jobcomp.exists() else []:
        fields = dict(f.split("=", 1) for f in line.split() if "=" in f)
        if fields.get("Name") in wanted and fields.get("ArrayJobId"):
            arrays.add(fields["ArrayJobId"])
    return arrays


def check_exactly_once(ledger: Ledger, out: Path, names: list[str], jobcomp: Path,
                       day_obs: int = DAY_OBS) -> dict[str, int]:
    """Runs per CCD == attempts in the ledger, each under a job id the ledger records; no Slurm
    job of these visits unknown to the ledger. Returns totals."""
    runs: collections.defaultdict[tuple[str, int], list[str]] = collections.defaultdict(list)
    for p in out.iterdir():
        name, task, array = p.name.rsplit(".", 2)
        if array != "failed":
            runs[(name, int(task))].append(array)
    rows = [r for r in ledger.rows(day_obs=day_obs) if r.label in names]
    known: set[str] = set()
    for r in rows:
        ids = [j for j in (*r.job_history, r.job_id) if j]
        known |= {j.split("_")[0] for j in ids}
        ran = sorted(runs.get((r.label, r.detector), []))
        assert len(ran) == r.attempts, f"{r.label} {r.detector}: {len(ran)} runs, {r.attempts} attempts: {r}"
        assert ran == sorted(j.split("_")[0] for j in ids), (r.label, r.detector, ran, ids)
        assert r.state in (SubmissionState.COMPLETED, SubmissionState.FAILED), r
    unknown = slurm_arrays(names, jobcomp) - known
    assert not unknown, f"Slurm jobs unknown to the ledger: {sorted(unknown)}"
    return {"ccds": len(rows), "runs": sum(len(v) for v in runs.values()),
            "attempts": sum(r.attempts for r in rows)}


def test_kill_9_between_claim_and_record_never_runs_twice_nor_loses_a_ccd(slurm_cluster, tmp_path):
    out = tmp_path / "runs"
    out.mkdir()
    cfg = load_config(environ={}, overrides={
        "root": str(tmp_path), "backend": {"kind": "slurm", "jobcomp_log": str(slurm_cluster.jobcomp_log),
                                           "time_limit": "00:02:00", "mem": None},
        "job": {"command": ["/bin/sh", "-c", JOB, "apjob"], "env": {"APTEST_OUT": str(out)}}})
    url = f"sqlite:///{tmp_path / 'ledger.sqlite3'}"
    ledger = Ledger.open(url)
    backend = SlurmBackend(cfg)
    base = 2025061000000 + int(time.time()) % 100000 * 100  # fresh job names on every run of the test

    # the daemon's path: 4 rounds of every point, each on a new visit (visit numbers end in 0)
    trials = [(p, base + 100 + 10 * i) for i, p in enumerate(POINTS * 4)]
    killed: collections.Counter[str] = collections.Counter()
    for point, visit in trials:
        killed[point] += run_killed(cfg, url, point, visit) == -signal.SIGKILL
    assert all(killed[p] == 4 for p in POINTS if p != "random"), killed
    left = collections.Counter(str(r.state) for r in ledger.rows(day_obs=DAY_OBS))
    assert left["CLAIMED"] >= 3 * 4 * 4, left  # claimed/before-/after-sbatch/submitted: never recorded

    # recovery: the daemon starts (reconcile) and, at its first poll, retries the stale claims
    Dispatcher(cfg, ledger, backend, NoEvents(), clock=lambda: time.time() + 400, status_interval=3600).run()
    daemon_rows = ledger.rows(day_obs=DAY_OBS)
    assert {str(r.state) for r in daemon_rows} <= {"PENDING", "RUNNING", "COMPLETED"}, \
        collections.Counter(str(r.state) for r in daemon_rows)
    assert {r.attempts for r in daemon_rows} == {1}

    # night reprocess: visits whose first run fails with exit 4 (visit numbers end in 9) ...
    re_visits = [base + 10 * i + 9 for i in range(6)]
    for v in re_visits:
        assert len(Submitter(ledger, backend).submit_new(works_of(v)).jobs) == 3
    names = [works_of(v)[0].label for _, v in trials] + [works_of(v)[0].label for v in re_visits]
    wait_all_ended(backend, ledger, names)
    # ... then reprocess killed at each point; each later one (its clock 400 s on, so the claims
    # the previous one left are stale) first recovers what the previous kill left
    re_killed: collections.Counter[str] = collections.Counter()
    now = time.time()
    for point in REPROCESS_POINTS * 2:
        now += 400
        re_killed[point] += run_killed(cfg, url, point, now=now) == -signal.SIGKILL
    assert re_killed["before-sbatch"] == re_killed["after-sbatch"] == 2, re_killed
    reprocess_night(cfg, day_obs=DAY_OBS, ledger=ledger, backend=backend, now=now + 400)
    wait_all_ended(backend, ledger, names)

    totals = check_exactly_once(ledger, out, names, slurm_cluster.jobcomp_log)
    re_rows = [r for r in ledger.rows(day_obs=DAY_OBS) if r.visit in re_visits]
    assert {(str(r.state), r.attempts) for r in re_rows} == {("COMPLETED", 2)}
    print(f"\nfault injection: {len(trials)} daemon trials {dict(killed)}, reprocess trials "
          f"{dict(re_killed)}; {totals['ccds']} CCDs, {totals['runs']} Slurm runs == {totals['attempts']} "
          "ledger attempts")
    # a random kill before the claim leaves no row (the event is still unacknowledged at its source)
    claimed_visits = {r.visit for r in ledger.rows(day_obs=DAY_OBS)} - set(re_visits)
    assert len(claimed_visits) >= len(trials) - killed["random"]
    assert totals["runs"] == totals["attempts"] == 3 * len(claimed_visits) + 2 * 3 * len(re_visits)


def _daemon(cfg, point: str | None, seconds: float) -> None:
    runner = killing_runner(point) if point else run_command
    run_daemon(cfg, backend=SlurmBackend(cfg, runner=runner), max_seconds=seconds, install_signals=False,
               status_interval=3600)
    os._exit(0)


def test_two_daemons_on_one_spool_directory_killed_mid_submission(slurm_cluster, tmp_path):
    """Daemon A is killed -9 right after its first sbatch; then B and C run at once on the same
    spool directory, C killed -9 after its first claim (before sbatch); a daemon started later
    (clock 400 s on: the claims are stale) reconciles and retries. Every event's CCDs ran once."""
    from test_dispatcher import fresh

    out = tmp_path / "runs"
    out.mkdir()
    cfg = load_config(environ={}, overrides={
        "root": str(tmp_path), "backend": {"kind": "slurm", "jobcomp_log": str(slurm_cluster.jobcomp_log),
                                           "time_limit": "00:02:00", "mem": None},
        "events": {"mode": "dynamic", "detectors": {"LSSTComCam": [0, 4, 8]}},
        "source": {"kind": "spool", "poll_interval": 0.05},
        "job": {"command": ["/bin/sh", "-c", JOB, "apjob"], "env": {"APTEST_OUT": str(out)}}})
    spool = tmp_path / "events" / "incoming"
    spool.mkdir(parents=True)
    stamp = int(time.time()) % 3600
    groups = [f"2024-11-09T06:{i:02d}:{stamp % 60:02d}.{stamp // 60:03d}" for i in range(8)]
    for i, group in enumerate(groups):
        body = fresh("nextVisit_LSSTComCam.json", time.time(), groupId=group)
        (spool / f".{i}.tmp").write_text(json.dumps(body))
        os.rename(spool / f".{i}.tmp", spool / f"{i:02d}.json")
    ctx = multiprocessing.get_context("fork")
    a = ctx.Process(target=_daemon, args=(cfg, "after-sbatch", 20.0))
    a.start()
    a.join(30)
    assert a.exitcode == -signal.SIGKILL
    b, c = (ctx.Process(target=_daemon, args=(cfg, point, 4.0)) for point in (None, "before-sbatch"))
    b.start()
    c.start()
    b.join(30)
    c.join(30)
    assert b.exitcode == 0 and c.exitcode in (0, -signal.SIGKILL)
    ledger = Ledger.from_config(cfg)
    backend = SlurmBackend(cfg)
    Dispatcher(cfg, ledger, backend, NoEvents(), clock=lambda: time.time() + 400, status_interval=3600).run()
    rows = ledger.rows()
    assert sorted({r.group_id for r in rows}) == groups and len(rows) == 3 * len(groups)  # nothing lost
    assert {str(r.state) for r in rows} <= {"PENDING", "RUNNING", "COMPLETED"}
    assert sorted(p.name for p in (spool / "done").iterdir()) == [f"{i:02d}.json" for i in range(8)]
    names = sorted({r.label for r in rows})
    day_obs = rows[0].day_obs
    wait_all_ended(backend, ledger, names, day_obs=day_obs)
    totals = check_exactly_once(ledger, out, names, slurm_cluster.jobcomp_log, day_obs=day_obs)
    assert totals["runs"] == totals["attempts"] == 3 * len(groups)
    print(f"\ntwo daemons: A killed after sbatch, C exit {c.exitcode}; {totals}")
