"""Tests of apbatch.backends.slurm: golden script, faked commands, and the real Slurm cluster."""

from __future__ import annotations

import logging
import stat
import subprocess
import sys
import time
from pathlib import Path

import pytest
from apbatch.backends.base import CommandResult, JobState, run_command
from apbatch.backends.slurm import SlurmBackend, parse_exit_code, read_jobcomp
from apbatch.config import load_config
from apbatch.errors import BadInputError, SchedulerError
from apbatch.instruments import get_instrument
from apbatch.jobconfig import resolve_command
from apbatch.work import CcdWork

GROUP = "2025-06-10T07:31:26.692"
EVIL_GROUP = "2025-06-10T07:31:26.692; rm -rf / $(touch /tmp/pwned) `touch /tmp/pwned` 'x\"y"


def works_of(instrument: str, group: str = GROUP, detectors=None) -> list[CcdWork]:
    dets = get_instrument(instrument).science_detectors
    return [CcdWork(instrument, d.id, d.name, group, 2025061000578, 20250610, "science", 30.0, 2,
                    "http://127.0.0.1:8000", 10.5, -20.25, 45.0, "r_57")
            for d in dets if detectors is None or d.id in detectors]


def make(tmp_path, runner=None, **backend) -> SlurmBackend:
    overrides = {"root": str(tmp_path), "backend": {"kind": "slurm", **backend}}
    return SlurmBackend(load_config(overrides=overrides, environ={}), runner=runner)


class FakeRunner:
    """Records every command; answers from a table of (program -> CommandResult or callable)."""

    def __init__(self, **answers):
        self.answers, self.calls = answers, []

    def __call__(self, argv, timeout, input=None, check=True):
        self.calls.append((list(argv), input))
        answer = self.answers[argv[0]]
        result = answer(argv) if callable(answer) else answer
        if check and result.returncode != 0:
            raise SchedulerError(list(argv), result.returncode, result.stdout, result.stderr)
        return result


def ok(stdout: str = "", rc: int = 0, stderr: str = "") -> CommandResult:
    return CommandResult((), rc, stdout, stderr)


# ---------------------------------------------------------------- golden script
def test_render_golden_comcam(tmp_path):
    backend = make(tmp_path, time_limit="00:05:00", max_array_parallel=4, partition="ap", requeue=False)
    script = backend.render(works_of("LSSTComCam", detectors={0, 1}), token="abcd0000abcd0000abcd")
    apbatch = resolve_command(["apbatch"])[0]  # this install's script, never the one on PATH
    args = ("--visit 2025061000578 --day-obs 20250610 --intent science --exposure-time 30.0 --nimages 2 "
            "--distributor http://127.0.0.1:8000 --ra 10.5 --dec -20.25 --rotation 45.0 --filter r_57")
    assert script == f"""#!/bin/bash
#SBATCH --job-name=ap-LSSTComCam-2025061000578
#SBATCH --array=0-1%4
#SBATCH --comment="apbatch group=2025-06-10T07:31:26.692 visit=2025061000578 detectors=0-1 n=2 token=abcd0000abcd0000abcd"
#SBATCH --export=PATH,HOME,LANG
#SBATCH --time=00:05:00
#SBATCH --no-requeue
#SBATCH --output={tmp_path}/logs/slurm/%x_%A_%a.out
#SBATCH --cpus-per-task=1
#SBATCH --partition=ap
#SBATCH --mem=4G
set -euo pipefail
export OMP_NUM_THREADS=1
export OPENBLAS_NUM_THREADS=1
export MKL_NUM_THREADS=1
umask 027
chmod 0640 "{tmp_path}/logs/slurm/${{SLURM_JOB_NAME:-}}_${{SLURM_ARRAY_JOB_ID:-}}_${{SLURM_ARRAY_TASK_ID:-}}.out" 2>/dev/null || true
case "${{SLURM_ARRAY_TASK_ID:?not a Slurm array task}}" in
  0) args=(--instrument LSSTComCam --detector 0 --group 2025-06-10T07:31:26.692 {args}) ;;
  1) args=(--instrument LSSTComCam --detector 1 --group 2025-06-10T07:31:26.692 {args}) ;;
  *) echo "apbatch: no CCD for array task $SLURM_ARRAY_TASK_ID" >&2; exit 2 ;;
esac
exec {apbatch} process-ccd --config {tmp_path}/config/20250610.yaml "${{args[@]}}"
"""  # noqa: E501


def test_render_full_lsstcam_is_one_array_of_189(tmp_path):
    script = make(tmp_path).render(works_of("LSSTCam"))
    assert "#SBATCH --array=0-188\n" in script and "#SBATCH --requeue\n" in script
    assert script.count(") args=(") == 189
    assert "#SBATCH --job-name=ap-LSSTCam-2025061000578\n" in script


def test_render_partial_focal_plane_uses_detector_ids_as_tasks(tmp_path):
    script = make(tmp_path).render(works_of("LSSTCam", detectors={3, 4, 5, 90, 188}))
    assert "#SBATCH --array=3-5,90,188\n" in script and "detectors=3-5,90,188 n=5" in script


def test_evil_group_is_literal_data_when_the_script_runs(tmp_path):
    """Run the rendered script itself (as slurmstepd would) with a job command that dumps its argv."""
    sandbox = tmp_path / "sandbox"
    sandbox.mkdir()
    dump = ["/bin/sh", "-c", 'printf "%s\\n" "$@"', "dump"]
    cfg = load_config(environ={}, overrides={"root": str(tmp_path), "backend": {"kind": "slurm"},
                                             "job": {"command": dump}})
    works = works_of("LSSTComCam", group=EVIL_GROUP)
    script = SlurmBackend(cfg).render(works)
    assert "rm -rf" not in script.split("\n#SBATCH --comment=")[1].split("\n")[0]  # comment is sanitized
    assert subprocess.run(["bash", "-n"], input=script, text=True).returncode == 0
    out = subprocess.run(["bash", "-c", script], capture_output=True, text=True, cwd=sandbox,
                         env={"PATH": "/usr/bin:/bin", "SLURM_ARRAY_TASK_ID": "7"}, check=True)
    assert out.stdout.splitlines() == ["--config", str(tmp_path / "config" / "20250610.yaml"),
                                       *works[7].job_args()]
    assert list(sandbox.iterdir()) == [] and not Path("/tmp/pwned").exists()
    bad = subprocess.run(["bash", "-c", script], capture_output=True, text=True, cwd=sandbox,
                         env={"PATH": "/usr/bin:/bin", "SLURM_ARRAY_TASK_ID": "99"})
    assert bad.returncode == 2 and "no CCD for array task 99" in bad.stderr


def test_bad_config_values_are_refused(tmp_path):
    with pytest.raises(BadInputError, match="extra_directives"):
        make(tmp_path, extra_directives=["--exclusive\necho injected"]).render(works_of("LATISS"))
    with pytest.raises(BadInputError, match="backend.log_dir"):
        make(tmp_path, log_dir="logs/with space").render(works_of("LATISS"))
    with pytest.raises(BadInputError, match="backend.partition"):
        make(tmp_path, partition="a b").render(works_of("LATISS"))


# ---------------------------------------------------------------- faked commands
def test_submit_is_one_sbatch_with_the_rendered_script(tmp_path):
    runner = FakeRunner(sbatch=ok("4242;cluster-a\n"))
    backend = make(tmp_path, runner)
    works = works_of("LSSTComCam")
    jobs = backend.submit(works)
    assert [j.job_id for j in jobs] == [f"4242_{w.detector}" for w in works]
    assert [j.work for j in jobs] == works
    assert runner.calls == [(["sbatch", "--parsable"], backend.render(works))]
    assert (tmp_path / "logs" / "slurm").is_dir()


def test_submit_failure_and_garbage_output_raise_scheduler_error(tmp_path):
    runner = FakeRunner(sbatch=ok("", 1, "sbatch: error: Batch job submission failed: Invalid partition"))
    with pytest.raises(SchedulerError) as err:
        make(tmp_path, runner).submit(works_of("LATISS"))
    assert err.value.argv == ["sbatch", "--parsable"] and err.value.returncode == 1
    assert "Invalid partition" in err.value.stderr
    with pytest.raises(SchedulerError, match="no job id"):
        make(tmp_path, FakeRunner(sbatch=ok("Submitted batch job\n"))).submit(works_of("LATISS"))


SQUEUE = """\
77_0                                            |R       |0               |None
77_1                                            |F       |1024            |NonZeroExitCode
77_2                                            |CD      |0               |None
77_3                                            |PD      |0               |JobHeldUser
77_4                                            |PD      |0               |Priority
77_5                                            |XX      |0               |None
77_6                                            |CA      |15              |None
77_7                                            |TO      |0               |TimeLimit
77_8                                            |OOM     |0               |OutOfMemory
99_0                                            |R       |0               |None
"""


def test_status_from_squeue(tmp_path, caplog):
    runner = FakeRunner(squeue=ok(SQUEUE))
    ids = [f"77_{i}" for i in range(9)]
    with caplog.at_level(logging.WARNING):
        states = make(tmp_path, runner).status(ids)
    assert [(states[j].state, states[j].exit_code) for j in ids] == [
        (JobState.RUNNING, None), (JobState.FAILED, 4), (JobState.COMPLETED, 0), (JobState.HELD, None),
        (JobState.PENDING, None), (JobState.UNKNOWN, None), (JobState.CANCELLED, 143),
        (JobState.TIMEOUT, 0), (JobState.FAILED, 0)]
    assert states["77_3"].reason == "JobHeldUser" and "'XX'" in caplog.text
    argv = runner.calls[0][0]
    assert argv[:6] == ["squeue", "-h", "-r", "-t", "all", "-j"] and argv[6] == "77"
    assert argv[7] == "-O" and "JobArrayID" in argv[8]  # explicit format: names are not cut at 8 chars


JOBCOMP = """\
JobId=501 UserId=root(0) GroupId=root(0) Name=ap-LSSTCam-1 JobState=NODE_FAIL Partition=debug \
ArrayJobId=500 ArrayTaskId=3 DerivedExitCode=0:0 ExitCode=0:0
JobId=502 UserId=root(0) Name=ap-LSSTCam-1 JobState=COMPLETED WorkDir=/a b ArrayJobId=500 ArrayTaskId=4 \
DerivedExitCode=9:0 ExitCode=0:0
JobId=503 UserId=root(0) Name=ap-LSSTCam-1 JobState=FAILED ArrayJobId=500 ArrayTaskId=5 DerivedExitCode=0:0 \
ExitCode=4:0
JobId=504 UserId=root(0) Name=wrap JobState=COMPLETED DerivedExitCode=0:0 ExitCode=0:0
JobId=501 UserId=root(0) GroupId=root(0) Name=ap-LSSTCam-1 JobState=COMPLETED Partition=debug \
ArrayJobId=500 ArrayTaskId=3 DerivedExitCode=0:0 ExitCode=0:0
"""


def test_gone_from_queue_uses_sacct_then_jobcomp(tmp_path):
    log = tmp_path / "jobcomp.txt"
    log.write_text(JOBCOMP)
    sacct_disabled = ok("", 1, "Slurm accounting storage is disabled\n")
    gone = ok("", 1, "slurm_load_jobs error: Invalid job id specified\n")
    runner = FakeRunner(squeue=gone, sacct=sacct_disabled)
    backend = make(tmp_path, runner, jobcomp_log=str(log))
    ids = ["500_3", "500_4", "500_5", "504", "500_9"]
    states = backend.status(ids)
    assert [(states[j].state, states[j].exit_code) for j in ids] == [
        (JobState.COMPLETED, 0), (JobState.COMPLETED, 0), (JobState.FAILED, 4), (JobState.COMPLETED, 0),
        (JobState.UNKNOWN, None)]  # 500_3: the last record (a requeued run) wins
    backend.status(["500_3"])
    assert [c[0][0] for c in runner.calls].count("sacct") == 1  # "disabled" is remembered


def test_sacct_answers_when_accounting_is_on(tmp_path):
    sacct = ok("600_1|CANCELLED by 0|0:15\n600_2|COMPLETED|2:0\n600_3|BOOT_FAIL|0:0\n")
    runner = FakeRunner(squeue=ok(""), sacct=sacct)
    states = make(tmp_path, runner).status(["600_1", "600_2", "600_3"])
    assert [(s.state, s.exit_code) for s in states.values()] == [
        (JobState.CANCELLED, 143), (JobState.FAILED, 2), (JobState.FAILED, 0)]
    assert runner.calls[1][0][:6] == ["sacct", "-n", "-P", "-X", "-j", "600_1,600_2,600_3"]


def test_squeue_and_sacct_failures_raise(tmp_path):
    down = ok("", 1, "slurm_load_jobs error: Unable to contact slurm controller (connect failure)")
    with pytest.raises(SchedulerError, match="Unable to contact"):
        make(tmp_path, FakeRunner(squeue=down)).status(["1_0"])
    runner = FakeRunner(squeue=ok(""), sacct=ok("", 1, "sacct: error: Problem talking to the database"))
    with pytest.raises(SchedulerError) as err:
        make(tmp_path, runner).status(["1_0"])
    assert err.value.argv[0] == "sacct" and err.value.returncode == 1


def test_cancel_batches_and_refuses_injected_ids(tmp_path):
    runner = FakeRunner(scancel=ok())
    backend = make(tmp_path, runner)
    backend.batch_size = 2
    backend.cancel(["5_0", "5_1", "6"])
    assert [c[0] for c in runner.calls] == [["scancel", "5_0", "5_1"], ["scancel", "6"]]
    with pytest.raises(BadInputError, match="not a Slurm job id"):
        backend.cancel(["5_0", "5_1; rm -rf /"])
    with pytest.raises(BadInputError):
        backend.status(["--all"])
    assert len(runner.calls) == 2


@pytest.mark.parametrize("text, code", [("0:0", 0), ("4:0", 4), ("0:9", 137), ("1024", 4), ("15", 143),
                                         ("0", 0), ("", None), ("n/a", None)])
def test_parse_exit_code(text, code):
    assert parse_exit_code(text) == code


def test_read_jobcomp_reads_backwards_in_small_blocks(tmp_path, monkeypatch):
    log = tmp_path / "jobcomp.txt"
    lines = [f"JobId={1000 + i} Name=x JobState=COMPLETED ArrayJobId=900 ArrayTaskId={i} ExitCode={i % 3}:0"
             for i in range(300)]
    log.write_text("\n".join(lines) + "\n")
    import apbatch.backends.slurm as slurm
    original = slurm._reverse_lines
    monkeypatch.setattr(slurm, "_reverse_lines", lambda path: original(path, block=37))
    found = read_jobcomp(log, ["900_0", "900_299", "900_150", "900_301"])
    assert found == {"900_0": ("COMPLETED", 0), "900_299": ("COMPLETED", 2), "900_150": ("COMPLETED", 0)}
    assert read_jobcomp(tmp_path / "missing.txt", ["1"]) == {}


# ---------------------------------------------------------------- the real cluster
DUMP_AND_EXIT = r"""
d=; for a; do [ "$prev" = --detector ] && d=$a; prev=$a; done
printf '%s\n' "$@" > "$APTEST_OUT/$d.args"
case "$d" in 7) exit 4 ;; 9) exec sleep 120 ;; esac
"""


def wait_for(predicate, timeout: float, step: float = 0.5):
    deadline = time.monotonic() + timeout
    while True:
        value = predicate()
        if value or time.monotonic() > deadline:
            return value
        time.sleep(step)


@pytest.mark.slurm
def test_real_slurm_lsstcam_visit_is_one_array_and_every_task_runs(slurm_cluster, tmp_path):
    out = tmp_path / "out"
    out.mkdir()
    cfg = load_config(environ={}, overrides={
        "root": str(tmp_path), "backend": {"kind": "slurm", "jobcomp_log": str(slurm_cluster.jobcomp_log),
                                           "time_limit": "00:05:00", "mem": None},
        "job": {"command": ["/bin/sh", "-c", DUMP_AND_EXIT, "apjob"], "env": {"APTEST_OUT": str(out)}}})
    calls = []

    def runner(argv, timeout, input=None, check=True):
        calls.append(list(argv))
        return run_command(argv, timeout, input=input, check=check)

    backend = SlurmBackend(cfg, runner=runner)
    works = works_of("LSSTCam", group=EVIL_GROUP)
    jobs = backend.submit(works)
    assert len(jobs) == 189 and calls == [["sbatch", "--parsable"]]
    array_id = jobs[0].job_id.split("_")[0]
    assert [j.job_id for j in jobs] == [f"{array_id}_{d}" for d in range(189)]
    ids = [j.job_id for j in jobs]

    assert wait_for(lambda: (out / "9.args").exists(), 60), "detector 9 never started"
    backend.cancel([f"{array_id}_9"])

    def all_finished():
        states = backend.status(ids)
        return states if all(s.state.finished for s in states.values()) else None

    states = wait_for(all_finished, 120, 1.0)
    assert states, "tasks did not finish in 120 s"
    assert (states[f"{array_id}_7"].state, states[f"{array_id}_7"].exit_code) == (JobState.FAILED, 4)
    assert states[f"{array_id}_9"].state is JobState.CANCELLED
    others = {j: s for j, s in states.items() if j not in (f"{array_id}_7", f"{array_id}_9")}
    assert {(s.state, s.exit_code) for s in others.values()} == {(JobState.COMPLETED, 0)}
    # every task ran with its own CCD's arguments, the group id arriving as literal data
    assert sorted(int(p.stem) for p in out.glob("*.args")) == list(range(189))
    night_file = tmp_path / "config" / "20250610.yaml"
    for w in (works[0], works[100], works[188]):
        assert (out / f"{w.detector}.args").read_text().splitlines() == ["--config", str(night_file),
                                                                         *w.job_args()]
    assert not Path("/tmp/pwned").exists()
    # ops see the name and a readable comment
    shown = subprocess.run(["squeue", "-h", "-t", "all", "-j", array_id, "-O", "Name:40,Comment:300"],
                           capture_output=True, text=True, check=True).stdout
    assert "ap-LSSTCam-2025061000578" in shown and "detectors=0-188 n=189" in shown

    # jobs that left the queue: found in history (sacct is disabled here -> the jobcomp log)
    def no_squeue(argv, timeout, input=None, check=True):
        if argv[0] == "squeue":
            return CommandResult(tuple(argv), 0, "", "")
        return run_command(argv, timeout, input=input, check=check)

    history = SlurmBackend(cfg, runner=no_squeue).status(ids)
    assert {j: (s.state, s.exit_code) for j, s in history.items() if j != f"{array_id}_9"} == \
        {j: (s.state, s.exit_code) for j, s in states.items() if j != f"{array_id}_9"}
    assert history[f"{array_id}_9"].state is JobState.CANCELLED


@pytest.mark.slurm
def test_real_slurm_rejects_bad_partition_with_scheduler_error(slurm_cluster, tmp_path):
    backend = make(tmp_path, partition="no_such_partition")
    with pytest.raises(SchedulerError) as err:
        backend.submit(works_of("LATISS"))
    assert err.value.argv == ["sbatch", "--parsable"] and err.value.returncode != 0
    assert "partition" in err.value.stderr.lower()


@pytest.mark.slurm
def test_real_slurm_unknown_job_is_unknown(slurm_cluster, tmp_path):
    backend = make(tmp_path, jobcomp_log=str(slurm_cluster.jobcomp_log))
    status = backend.status(["987654_3"])["987654_3"]
    assert status.state is JobState.UNKNOWN and "not in the queue" in status.reason


@pytest.mark.slurm
def test_real_slurm_job_that_cannot_start_says_why_and_jobs_get_the_resolved_config(slurm_cluster, tmp_path,
                                                                                       monkeypatch):
    """A missing job command is FAILED with exit 127 and the reason; the config file every job is
    given holds what the submitter resolved (an APBATCH_* override included), mode 0640."""
    monkeypatch.setenv("APBATCH_EVENTS__MAX_ATTEMPTS", "7")
    out = tmp_path / "out"
    out.mkdir()
    base = {"root": str(tmp_path), "backend": {"kind": "slurm", "jobcomp_log": str(slurm_cluster.jobcomp_log),
                                               "time_limit": "00:05:00", "mem": None}}
    missing = SlurmBackend(load_config(overrides={**base, "job": {
        "command": [str(tmp_path / "no-such-apbatch")]}}))
    dump = SlurmBackend(load_config(overrides={**base, "job": {
        "command": ["/bin/sh", "-c", DUMP_AND_EXIT, "apjob"], "env": {"APTEST_OUT": str(out)}}}))
    works = works_of("LSSTComCam", detectors={0, 1})
    ids = [j.job_id for j in missing.submit(works[:1])] + [j.job_id for j in dump.submit(works[1:])]

    def all_finished():
        states = dump.status(ids)
        return states if all(s.state.finished for s in states.values()) else None

    states = wait_for(all_finished, 90, 1.0)
    assert states, "tasks did not finish in 90 s"
    bad = states[ids[0]]
    assert (bad.state, bad.exit_code) == (JobState.FAILED, 127)
    assert bad.reason.startswith("cannot start: the job command was not found")
    assert (states[ids[1]].state, states[ids[1]].exit_code) == (JobState.COMPLETED, 0)
    # two configurations submitted this night: the first has <day_obs>.yaml, the second its own file
    args = (out / "1.args").read_text().splitlines()
    night_file = Path(args[1])
    assert args[0] == "--config" and night_file.parent == tmp_path / "config"
    assert night_file.name.startswith("20250610-") and (tmp_path / "config" / "20250610.yaml").is_file()
    assert oct(night_file.stat().st_mode & 0o777) == oct(0o640)
    job_config = load_config(args[1], environ={})  # what process-ccd --config reads
    assert job_config.events.max_attempts == 7 and job_config.backend.kind == "slurm"
    assert job_config.root == str(tmp_path)


# ---------------------------------------------------------------- issue 11: token, environment, file modes
TOKEN = "abcd0000abcd0000abcd"


def test_find_submitted_reads_the_token_from_squeue_then_sacct_then_jobcomp(tmp_path):
    works = works_of("LSSTComCam", detectors={0, 4})
    label = works[0].label
    mine = f"apbatch group=g visit=1 detectors=0,4 n=2 token={TOKEN}"
    other = "apbatch group=g visit=1 detectors=0 n=1 token=ffff0000ffff"
    queue = ok(f"700_0|{mine}\n700_4|{mine}\n699_0|{other}\n")
    runner = FakeRunner(squeue=queue)
    backend = make(tmp_path, runner)
    assert [j.job_id for j in backend.find_submitted(works, TOKEN, time.time())] == ["700_0", "700_4"]
    assert runner.calls[0][0] == ["squeue", "-h", "-r", "-t", "all", "-n", label,
                                  "-O", "JobArrayID:48|,Comment:400"]
    # left the queue: sacct by name since the claim (the comment is stored: AccountingStoreFlags=job_comment)
    runner = FakeRunner(squeue=ok(""), sacct=ok(f"701_0|{mine}\n701_4|{mine}\n"))
    backend = make(tmp_path, runner)
    assert [j.job_id for j in backend.find_submitted(works, TOKEN, time.time() - 5)] == ["701_0", "701_4"]
    argv = runner.calls[1][0]
    assert argv[:6] == ["sacct", "-n", "-P", "-X", "--name", label] and argv[-2:] == ["-o", "JobID,Comment"]
    # nothing anywhere: [] (the caller resubmits); a squeue or sacct failure raises (it must not)
    runner = FakeRunner(squeue=ok(""), sacct=ok(""))
    assert make(tmp_path, runner).find_submitted(works, TOKEN, time.time()) == []
    for runner in (FakeRunner(squeue=ok("", 1, "Unable to contact slurm controller")),
                   FakeRunner(squeue=ok(""), sacct=ok("", 1, "sacct: error: Problem talking to the db"))):
        with pytest.raises(SchedulerError):
            make(tmp_path, runner).find_submitted(works, TOKEN, time.time())
    with pytest.raises(BadInputError, match="submission token"):
        make(tmp_path, FakeRunner()).find_submitted(works, "x; scancel -u root", time.time())


def test_find_submitted_without_accounting_reads_the_jobcomp_log_by_name_time_and_ccds(tmp_path):
    works = works_of("LSSTComCam", detectors={0, 4})
    since = time.mktime((2026, 11, 26, 2, 30, 0, 0, 0, -1))

    def rec(job, task, name, submit, end):
        return (f"JobId={job + task} Name={name} JobState=COMPLETED SubmitTime={submit} EndTime={end} "
                f"ArrayJobId={job} ArrayTaskId={task} ExitCode=0:0")

    label = works[0].label
    log = tmp_path / "jobcomp.txt"
    log.write_text("\n".join([
        rec(800, 0, label, "2026-11-26T02:20:00", "2026-11-26T02:20:05"),   # ended before the claim
        rec(810, 0, label, "2026-11-26T02:29:00", "2026-11-26T02:30:05"),   # submitted before the claim
        rec(820, 4, label, "2026-11-26T02:30:01", "2026-11-26T02:30:09"),   # ours
        rec(830, 1, label, "2026-11-26T02:30:02", "2026-11-26T02:30:09"),   # another claim's CCD
        rec(840, 0, "ap-LSSTComCam-1", "2026-11-26T02:30:02", "2026-11-26T02:30:09"),  # another visit
    ]) + "\n")
    runner = FakeRunner(squeue=ok(""), sacct=ok("", 1, "Slurm accounting storage is disabled\n"))
    backend = make(tmp_path, runner, jobcomp_log=str(log))
    assert [j.job_id for j in backend.find_submitted(works, TOKEN, since)] == ["820_0", "820_4"]
    assert make(tmp_path, FakeRunner(squeue=ok(""), sacct=ok("", 1, "accounting storage is disabled")),
                jobcomp_log=str(tmp_path / "none.txt")).find_submitted(works, TOKEN, since) == []


@pytest.mark.slurm
def test_real_slurm_jobs_get_only_the_documented_environment_and_private_logs(slurm_cluster, tmp_path,
                                                                              monkeypatch):
    out = tmp_path / "out"
    out.mkdir()
    monkeypatch.setenv("APBATCH_KAFKA_PASSWORD", "hunter2-secret")  # in the daemon's environment
    monkeypatch.setenv("SOME_OTHER_VAR", "leaks")
    cfg = load_config(environ={}, overrides={
        "root": str(tmp_path), "backend": {"kind": "slurm", "jobcomp_log": str(slurm_cluster.jobcomp_log),
                                           "time_limit": "00:02:00", "mem": None},
        "job": {"command": ["/bin/sh", "-c", 'env > "$APTEST_OUT/$SLURM_ARRAY_TASK_ID.env"; echo logged',
                            "j"],
                "env": {"APTEST_OUT": str(out), "OMP_NUM_THREADS": "1"}}})
    backend = SlurmBackend(cfg)
    since = time.time()
    jobs = backend.submit(works_of("LSSTComCam", detectors={0, 1}), token=TOKEN)
    found = backend.find_submitted(works_of("LSSTComCam", detectors={0, 1}), TOKEN, since)
    assert [j.job_id for j in found] == [j.job_id for j in jobs]
    states = wait_for(lambda: (s := backend.status([j.job_id for j in jobs])) and all(
        v.state.finished for v in s.values()) and s, 60, 0.5)
    assert states and {v.state for v in states.values()} == {JobState.COMPLETED}
    env = dict(line.split("=", 1) for line in (out / "0.env").read_text().splitlines() if "=" in line)
    assert "APBATCH_KAFKA_PASSWORD" not in env and "SOME_OTHER_VAR" not in env
    assert "hunter2-secret" not in (out / "0.env").read_text()
    assert env["APTEST_OUT"] == str(out) and env["OMP_NUM_THREADS"] == "1" and env["PATH"]
    logs = sorted((tmp_path / "logs" / "slurm").glob("*.out"))
    assert len(logs) == 2 and all(p.read_text() == "logged\n" for p in logs)
    assert {stat.S_IMODE(p.stat().st_mode) for p in logs} == {0o640}
    assert stat.S_IMODE((tmp_path / "logs" / "slurm").stat().st_mode) == 0o750


def test_find_submitted_two_arrays_under_one_token_is_reported_and_bad_names_refused(tmp_path, caplog):
    works = works_of("LSSTComCam", detectors={0})
    mine = f"apbatch n=1 token={TOKEN}"
    runner = FakeRunner(squeue=ok(f"712_0|{mine}\n711_0|{mine}\n"))
    with caplog.at_level(logging.ERROR):
        found = make(tmp_path, runner).find_submitted(works, TOKEN, time.time())
    assert [j.job_id for j in found] == ["711_0"] and "2 Slurm arrays carry submission token" in caplog.text
    odd = [CcdWork("LSST Cam", 0, "R22_S00", GROUP, 1, 20250610, "science", 30.0, 2, "http://x")]
    with pytest.raises(BadInputError, match="not a valid Slurm job name"):
        make(tmp_path, FakeRunner()).find_submitted(odd, TOKEN, time.time())


# ---------------------------------------------------------------- per-job log paths
def test_log_path_follows_the_output_directive(tmp_path):
    backend = make(tmp_path)
    works = works_of("LSSTComCam", detectors={4})
    assert f"--output={tmp_path}/logs/slurm/%x_%A_%a.out" in backend.directives(works)
    # %x = job name (the label), %A = array job, %a = task (the detector)
    assert backend.log_path("8812_4", works[0]) == f"{tmp_path}/logs/slurm/{works[0].label}_8812_4.out"
    assert backend.log_path("8812", works[0]) is None  # not an array task
    assert backend.log_path("8812_4", None) is None and backend.log_path(None, works[0]) is None


PRINT_JOB_ID = "from apbatch.logs import job_id_from_env; print('job', job_id_from_env())"


def test_real_slurm_log_path_is_the_jobs_log_and_the_job_knows_its_id(slurm_cluster, tmp_path):
    """The job's stdout lands where log_path says, and `job_id_from_env` in the job gives the id
    the backend recorded (what JSON log lines carry)."""
    cfg = load_config(environ={}, overrides={
        "root": str(tmp_path), "backend": {"kind": "slurm", "jobcomp_log": str(slurm_cluster.jobcomp_log),
                                           "time_limit": "00:02:00", "mem": None},
        "job": {"command": [sys.executable, "-c", PRINT_JOB_ID, "j"]}})
    backend = SlurmBackend(cfg)
    works = works_of("LSSTComCam", detectors={0, 3})
    jobs = backend.submit(works, token=TOKEN)
    states = wait_for(lambda: (s := backend.status([j.job_id for j in jobs])) and all(
        v.state.finished for v in s.values()) and s, 60, 0.5)
    assert states and {v.state for v in states.values()} == {JobState.COMPLETED}
    for job in jobs:
        path = Path(backend.log_path(job.job_id, job.work))
        assert path.read_text().splitlines()[-1] == f"job {job.job_id}"
