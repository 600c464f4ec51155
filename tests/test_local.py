"""Tests of apbatch.backends.local: real processes, a persistent queue, a concurrency cap."""

from __future__ import annotations

import json
import os
import stat
import subprocess
import sys
import time
from pathlib import Path

import pytest
from apbatch.backends.base import JobState
from apbatch.backends.local import LocalBackend, run_queue
from apbatch.config import load_config
from apbatch.errors import BadInputError
from apbatch.jobconfig import resolve_command
from apbatch.work import CcdWork

GROUP = "2025-06-10T07:31:26.692"
EVIL_GROUP = "2025-06-10T07:31:26.692; rm -rf / $(touch pwned) `touch pwned`"

# A stand-in for `apbatch process-ccd`: records its argv, start/end times and env, then exits
# with a code chosen by detector (7 -> 4), or sleeps (9), or sleeps in a child process (8).
JOB = r"""
d=; for a; do [ "$prev" = --detector ] && d=$a; prev=$a; done
printf '%s\n' "$@" > "$APTEST_OUT/$d.args"
printf '%s %s\n' "$OMP_NUM_THREADS" "${APBATCH_CONFIG:-}" > "$APTEST_OUT/$d.env"
date +%s.%N > "$APTEST_OUT/$d.start"
case "$d" in
  7) exit 4 ;;
  8) sleep 120 & echo $! > "$APTEST_OUT/8.child"; wait ;;
  9) exec sleep 120 ;;
  *) sleep "${APTEST_SLEEP:-0}" ;;
esac
date +%s.%N > "$APTEST_OUT/$d.end"
"""


def works_of(n: int, group: str = GROUP) -> list[CcdWork]:
    return [CcdWork("LSSTComCam", d, f"R22_S{d // 3}{d % 3}", group, 2025061000578, 20250610, "science",
                    30.0, 2,
                    "http://127.0.0.1:8000", 10.5, -20.25, 45.0, "r_03") for d in range(n)]


@pytest.fixture
def out(tmp_path):
    path = tmp_path / "out"
    path.mkdir()
    return path


def make(tmp_path, out, max_workers=2, sleep="0", command=None) -> LocalBackend:
    cfg = load_config(environ={}, overrides={
        "root": str(tmp_path / "work"), "backend": {"kind": "local", "max_workers": max_workers},
        "job": {"command": command or ["/bin/sh", "-c", JOB, "apjob"],
                "env": {"OMP_NUM_THREADS": "1", "APTEST_OUT": str(out), "APTEST_SLEEP": sleep}}})
    return LocalBackend(cfg)


def night_file(tmp_path) -> Path:
    return tmp_path / "work" / "config" / "20250610.yaml"


def wait_finished(backend, ids, timeout=30.0):
    deadline = time.monotonic() + timeout
    while True:
        states = backend.status(ids)
        if all(s.state.finished for s in states.values()) or time.monotonic() > deadline:
            return states
        time.sleep(0.05)


def wait_for(predicate, timeout=20.0):
    deadline = time.monotonic() + timeout
    while not predicate():
        if time.monotonic() > deadline:
            return False
        time.sleep(0.02)
    return True


def test_render_golden(tmp_path, out):
    backend = make(tmp_path, out, command=["apbatch", "process-ccd"])
    text = backend.render(works_of(2))
    cmd = f"{resolve_command(['apbatch'])[0]} process-ccd --config {night_file(tmp_path)}"
    args = ("--visit 2025061000578 --day-obs 20250610 --intent science --exposure-time 30.0 --nimages 2 "
            "--distributor http://127.0.0.1:8000 --ra 10.5 --dec -20.25 --rotation 45.0 --filter r_03")
    assert text == f"""#!/bin/bash
# apbatch local backend: 2 processes, at most 2 at once
# (each line below is one job's command line; they run concurrently)
set -euo pipefail
export OMP_NUM_THREADS=1
export APTEST_OUT={out}
export APTEST_SLEEP=0
{cmd} --instrument LSSTComCam --detector 0 --group {GROUP} {args}
{cmd} --instrument LSSTComCam --detector 1 --group {GROUP} {args}
"""
    assert not night_file(tmp_path).exists()  # render writes nothing


def test_default_cap_is_number_of_cores(tmp_path):
    cfg = load_config(environ={}, overrides={"root": str(tmp_path)})
    assert LocalBackend(cfg).max_workers == os.cpu_count()


def test_visit_runs_capped_with_states_exit_codes_and_literal_args(tmp_path, out):
    backend = make(tmp_path, out, max_workers=2, sleep="0.2")
    works = works_of(8, group=EVIL_GROUP)
    jobs = backend.submit(works)
    assert [j.job_id for j in jobs] == [f"local-{n}" for n in range(1, 9)]
    states = wait_finished(backend, [j.job_id for j in jobs])
    assert [(s.state, s.exit_code) for s in states.values()] == \
        [(JobState.COMPLETED, 0)] * 7 + [(JobState.FAILED, 4)]
    # the same command line a batch job would use, group id as literal data, job.env passed on
    for w in works:
        assert (out / f"{w.detector}.args").read_text().splitlines() == [
            "--config", str(night_file(tmp_path)), *w.job_args()]
        assert (out / f"{w.detector}.env").read_text().split()[0] == "1"
    # the config the jobs were told to read: the submitter's resolved config, not defaults
    assert stat.S_IMODE(night_file(tmp_path).stat().st_mode) == 0o640
    assert load_config(night_file(tmp_path), environ={}) == backend.config.model_copy(
        update={"root": str((tmp_path / "work").absolute())})
    assert not (tmp_path / "work" / "pwned").exists() and not Path("pwned").exists()
    # never more than 2 at once: count overlaps of [start, end] intervals
    spans = [(float((out / f"{d}.start").read_text()), float((out / f"{d}.end").read_text()))
             for d in range(7)]
    edges = sorted([(s, 1) for s, _ in spans] + [(e, -1) for _, e in spans])
    running = peak = 0
    for _, step in edges:
        running += step
        peak = max(peak, running)
    assert peak == 2
    # a second visit gets fresh ids
    assert backend.submit(works_of(1))[0].job_id == "local-9"


def test_state_survives_a_restart_and_is_readable_from_another_process(tmp_path, out):
    backend = make(tmp_path, out, max_workers=1)
    jobs = backend.submit(works_of(10)[8:])  # detectors 8, 9: both sleep; cap 1 -> 9 waits
    ids = [j.job_id for j in jobs]
    assert wait_for(lambda: backend.status(ids)[ids[0]].state is JobState.RUNNING)
    assert backend.status(ids)[ids[1]].state is JobState.PENDING
    # "restarted daemon": a new backend, and a separate process, see the same states
    fresh = make(tmp_path, out, max_workers=1)
    assert [s.state for s in fresh.status(ids).values()] == [JobState.RUNNING, JobState.PENDING]
    code = ("import sys, json; from apbatch.config import load_config;"
            "from apbatch.backends import make_backend;"
            f"cfg = load_config(environ={{}}, overrides={{'root': {str(tmp_path / 'work')!r}}});"
            f"print(json.dumps({{k: v.state.value for k, v in make_backend(cfg).status({ids!r}).items()}}))")
    other = subprocess.run([sys.executable, "-c", code], capture_output=True, text=True, check=True)
    assert json.loads(other.stdout) == {ids[0]: "RUNNING", ids[1]: "PENDING"}
    # cancelling from the other instance: the queued one never starts, the running one is killed
    fresh.cancel([ids[1]])
    assert wait_for(lambda: (out / "8.child").exists())
    child = int((out / "8.child").read_text())
    fresh.cancel([ids[0]])
    states = wait_finished(backend, ids)
    assert states[ids[0]].state is JobState.CANCELLED and states[ids[0]].exit_code == 128 + 15
    assert states[ids[1]].state is JobState.CANCELLED and states[ids[1]].exit_code is None
    assert not (out / "9.args").exists()  # cancelled while queued: never ran
    assert wait_for(lambda: not Path(f"/proc/{child}").exists() or
                    Path(f"/proc/{child}/stat").read_text().split()[2] == "Z", 5), \
        "the job's child process survived the cancel (process group not killed)"


def test_runner_exits_when_idle_and_a_new_submit_starts_another(tmp_path, out):
    backend = make(tmp_path, out)
    first = backend.submit(works_of(1))
    assert wait_finished(backend, [first[0].job_id])[first[0].job_id].state is JobState.COMPLETED
    assert wait_for(lambda: all(p.poll() is not None for p in backend._runners), 10), "runner did not exit"
    second = backend.submit(works_of(2)[1:])
    assert wait_finished(backend, [second[0].job_id])[second[0].job_id].state is JobState.COMPLETED


def test_missing_command_fails_with_127_and_says_why(tmp_path, out):
    backend = make(tmp_path, out, command=[str(tmp_path / "no-such-program")])
    job = backend.submit(works_of(1))[0].job_id
    status = wait_finished(backend, [job])[job]
    assert (status.state, status.exit_code) == (JobState.FAILED, 127)
    assert status.reason.startswith("cannot start: the job command was not found")
    assert str(tmp_path / "no-such-program") in status.reason
    log = backend.state_dir / "jobs" / job / "out.log"
    assert "cannot start" in log.read_text() and stat.S_IMODE(log.stat().st_mode) == 0o640


def test_command_that_is_not_executable_fails_with_126_and_says_why(tmp_path, out):
    script = tmp_path / "not-executable"
    script.write_text("#!/bin/sh\nexit 0\n")
    script.chmod(0o644)
    backend = make(tmp_path, out, command=[str(script)])
    job = backend.submit(works_of(1))[0].job_id
    status = wait_finished(backend, [job])[job]
    assert (status.state, status.exit_code) == (JobState.FAILED, 126)
    assert status.reason.startswith("cannot start: the job command is not executable")


def test_lost_process_is_failed_not_completed(tmp_path, out):
    """A job whose runner died: the pid is gone and no exit code was ever written."""
    backend = make(tmp_path, out)
    job_dir = backend.state_dir / "jobs" / "local-1"
    job_dir.mkdir(parents=True)
    (job_dir / "job.json").write_text(json.dumps({"argv": ["true"], "env": {}, "work": {}, "submitted": 0}))
    dead = subprocess.Popen(["true"])
    dead.wait()
    (job_dir / "started.json").write_text(json.dumps({"pid": dead.pid, "ticks": 1, "started": 0}))
    status = backend.status(["local-1"])["local-1"]
    assert status.state is JobState.FAILED and "without an exit status" in status.reason


def test_unknown_and_malformed_ids(tmp_path, out):
    backend = make(tmp_path, out)
    assert backend.status(["local-77"])["local-77"].state is JobState.UNKNOWN
    with pytest.raises(BadInputError, match="not a local job id"):
        backend.status(["../../etc"])
    with pytest.raises(BadInputError):
        backend.cancel(["local-1; rm -rf /"])
    with pytest.raises(BadInputError, match="no CCDs"):
        backend.submit([])


def test_run_queue_returns_at_once_on_an_empty_queue(tmp_path):
    (tmp_path / "queue").mkdir()
    (tmp_path / "jobs").mkdir()
    start = time.monotonic()
    run_queue(tmp_path, 2)
    assert time.monotonic() - start < 1.0


# ---------------------------------------------------------------- submission tokens (issue 11)
def test_find_submitted_by_token_and_a_job_never_queued_is_queued(tmp_path, out):
    backend = make(tmp_path, out, max_workers=4)
    token = "abcd0000abcd0000abcd"
    since = time.time()
    jobs = backend.submit(works_of(3), token=token)
    other = backend.submit(works_of(2, group="2025-06-10T07:40:00.000"), token="ffff0000ffff0000ffff")
    spec = json.loads((backend.state_dir / "jobs" / jobs[0].job_id / "job.json").read_text())
    assert spec["token"] == token
    assert backend.find_submitted(works_of(3), token, since) == jobs
    assert backend.find_submitted(works_of(3)[1:], token, since) == jobs[1:]  # only the CCDs asked about
    assert backend.find_submitted(works_of(3), "0000000000000000aaaa", since) == []
    assert backend.find_submitted(works_of(3), token, time.time() + 60) == []  # older than the claim
    assert [j.job_id for j in other] == ["local-4", "local-5"]
    # killed after writing job.json, before queueing it: found, and queued now (it runs)
    queued = backend.submit(works_of(1, group="2025-06-10T07:50:00.000"), token="eeee0000eeee0000eeee")
    assert wait_for(lambda: all(s.state.finished for s in backend.status([j.job_id for j in jobs + other
                                                                           + queued]).values()), 30)
    lone = backend.state_dir / "jobs" / "local-7"
    lone.mkdir()
    spec = json.loads((backend.state_dir / "jobs" / "local-6" / "job.json").read_text())
    (lone / "job.json").write_text(json.dumps({**spec, "token": "9999000099990000aaaa",
                                               "submitted": time.time()}))
    (backend.state_dir / "jobs" / "local-8").mkdir()  # killed before job.json: skipped
    found = backend.find_submitted(works_of(1, group="2025-06-10T07:50:00.000"), "9999000099990000aaaa",
                                   since)
    assert [j.job_id for j in found] == ["local-7"]
    assert wait_for(lambda: backend.status(["local-7"])["local-7"].state.finished, 30)
    with pytest.raises(BadInputError, match="submission token"):
        backend.find_submitted(works_of(1), "../../etc", since)


def test_jobs_get_only_the_documented_environment(tmp_path, out, monkeypatch):
    monkeypatch.setenv("APBATCH_KAFKA_PASSWORD", "hunter2-secret")  # in the daemon's environment
    backend = make(tmp_path, out, command=["/bin/sh", "-c", 'env > "$APTEST_OUT/env.txt"', "j"])
    jobs = backend.submit(works_of(1))
    assert wait_finished(backend, [j.job_id for j in jobs])[jobs[0].job_id].state is JobState.COMPLETED
    env = dict(line.split("=", 1) for line in (out / "env.txt").read_text().splitlines() if "=" in line)
    assert "APBATCH_KAFKA_PASSWORD" not in env and "hunter2-secret" not in (out / "env.txt").read_text()
    assert env["APTEST_OUT"] == str(out) and env["OMP_NUM_THREADS"] == "1"
    assert env["PATH"] == os.environ["PATH"]


PRINT_JOB_ID = "from apbatch.logs import job_id_from_env; print('job', job_id_from_env())"


def test_log_path_is_the_jobs_out_log_and_the_job_knows_its_id(tmp_path, out):
    backend = make(tmp_path, out, command=[sys.executable, "-c", PRINT_JOB_ID, "j"])
    jobs = backend.submit(works_of(2))
    states = wait_finished(backend, [j.job_id for j in jobs])
    assert {s.state for s in states.values()} == {JobState.COMPLETED}
    for job in jobs:
        path = Path(backend.log_path(job.job_id, job.work))
        assert path == tmp_path / "work" / "logs" / "local" / "jobs" / job.job_id / "out.log"
        assert path.read_text().splitlines()[-1] == f"job {job.job_id}"  # APBATCH_JOB_ID, as recorded
    assert backend.log_path("123_4") is None and backend.log_path(None) is None
