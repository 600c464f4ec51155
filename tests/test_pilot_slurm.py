"""Tests of warm pilots as Slurm jobs (apbatch.backends.pilot_launch + pilot.py): the pilot's batch
script and liveness through faked Slurm commands, then the real single-node Slurm."""

from __future__ import annotations

import json
import subprocess
import sys
import time
from pathlib import Path

import pytest
from apbatch.backends import make_backend
from apbatch.backends.base import CommandResult, JobState
from apbatch.backends.pilot import PilotBackend, claim_next
from apbatch.backends.pilot_launch import parse_pilot_id
from apbatch.config import load_config
from apbatch.errors import BadInputError, ExitCode, SchedulerError

sys.path.insert(0, str(Path(__file__).resolve().parent))
from test_pilot_backend import _site, works_of  # noqa: E402

TOKEN = "ab" * 10


def config(tmp_path, launcher=None, **backend):
    return load_config(environ={}, overrides={
        "root": str(tmp_path / "work"),
        "backend": {"kind": "pilot", "launcher": launcher or {"kind": "slurm"}, **backend}})


class FakeSlurm:
    """sbatch hands out ids 101, 102, ...; squeue lists ``self.queue`` ({id: state code});
    sacct says accounting is off; scancel is recorded."""

    def __init__(self):
        self.calls: list[tuple[list[str], str | None]] = []
        self.queue: dict[str, str] = {}
        self.next_id = 101

    def __call__(self, argv, timeout, input=None, check=True):
        self.calls.append((list(argv), input))
        if argv[0] == "sbatch":
            job_id, self.next_id = str(self.next_id), self.next_id + 1
            self.queue[job_id] = "PD"
            return CommandResult(tuple(argv), 0, f"{job_id}\n", "")
        if argv[0] == "squeue":
            wanted = argv[argv.index("-j") + 1].split(",")
            lines = [f"{j}|{self.queue[j]}|0:0|None" for j in wanted if j in self.queue]
            return CommandResult(tuple(argv), 0, "\n".join(lines), "")
        if argv[0] == "sacct":
            result = CommandResult(tuple(argv), 1, "", "Slurm accounting storage is disabled")
            if check:
                raise SchedulerError(argv, 1, "", result.stderr)
            return result
        if argv[0] == "scancel":
            for j in argv[1:]:
                self.queue.pop(j, None)
            return CommandResult(tuple(argv), 0, "", "")
        raise AssertionError(argv)

    def count(self, program: str) -> int:
        return sum(argv[0] == program for argv, _ in self.calls)


def as_pilot(batch_id: str) -> dict:
    """The identity a Slurm pilot claims with (on some other host)."""
    return {"pid": 4242, "ticks": 1, "pilot": f"slurm-{batch_id}", "host": "node7", "batch": "slurm",
            "batch_id": batch_id}


# ------------------------------------------------------------------ config, script, submit (faked Slurm)
def test_launcher_config_shorthand_and_bad_values(tmp_path):
    assert config(tmp_path, launcher="slurm").backend.launcher.kind == "slurm"
    assert config(tmp_path, launcher=None).backend.launcher.kind == "slurm"
    with pytest.raises(BadInputError, match="backend.pilot.launcher") as info:
        config(tmp_path, launcher="pbs")
    assert "\n" not in str(info.value)
    with pytest.raises(BadInputError, match="backend.pilot.launcher.slurm.time_limit"):
        config(tmp_path, launcher={"kind": "slurm", "time_limit": "1:00"})  # it is max_lifetime
    backend = PilotBackend(config(tmp_path, launcher={"kind": "slurm", "partition": "ap; rm -rf /"}))
    with pytest.raises(BadInputError, match="config backend.launcher.partition"):
        backend.render(works_of(1))


def test_pilot_script_is_an_ordinary_slurm_job_with_lifetime_and_memory(tmp_path):
    backend = PilotBackend(config(tmp_path, launcher={"kind": "slurm", "partition": "ap", "account": "rubin"},
                                  max_lifetime="02:00:00", max_rss_mib=1536))
    script = backend.render(works_of(2))
    lines = script.splitlines()
    assert lines[0] == "#!/bin/bash"
    directives = [ln.split(" ", 1)[1] for ln in lines if ln.startswith("#SBATCH ")]
    assert directives[:2] == ["--job-name=ap-pilot-20250610",
                              '--comment="apbatch pilot day_obs=20250610 of 2"']
    state = backend.state_dir
    assert {"--time=0-02:10:00", "--no-requeue", "--mem=2560M", "--partition=ap", "--account=rubin",
            "--export=PATH,HOME,LANG", f"--output={state}/pilots/%x_%j.out"} <= set(directives)
    assert 'export APBATCH_PILOT_ID="slurm-${SLURM_JOB_ID:?not a Slurm job}"' in lines
    (run,) = [ln for ln in lines if ln.startswith("exec ")]
    assert run.endswith(" pilot --config " + str(tmp_path / "work" / "config" / "20250610.yaml"))
    assert sum(ln.startswith("#   ") and "process-ccd" in ln for ln in lines) == 2  # the CCDs, as comments


def test_submit_queues_items_and_sbatches_one_job_per_missing_pilot(tmp_path):
    slurm = FakeSlurm()
    backend = make_backend(config(tmp_path, pilots=2), runner=slurm)
    ids = [j.job_id for j in backend.submit(works_of(3), token=TOKEN)]
    assert ids == ["pilot-1", "pilot-2", "pilot-3"] and slurm.count("sbatch") == 2
    script = next(inp for argv, inp in slurm.calls if argv[0] == "sbatch")
    assert script.startswith("#!/bin/bash\n#SBATCH --job-name=ap-pilot-20250610\n")
    pilots = {p["pilot"]: p for p in backend.pilots()}
    assert set(pilots) == {"slurm-101", "slurm-102"}
    assert {(p["state"], p["batch"], p["batch_id"]) for p in pilots.values()} == \
        {("starting", "slurm", "101"), ("starting", "slurm", "102")}
    backend.submit(works_of(1, group="2025-06-10T07:32:00.000"), token=TOKEN)  # both still queued in Slurm
    assert slurm.count("sbatch") == 2


def test_item_of_a_pilot_slurm_ended_is_failed_lost_and_queued_work_gets_a_new_pilot(tmp_path):
    slurm = FakeSlurm()
    backend = make_backend(config(tmp_path, pilots=1), runner=slurm)
    first, second = [j.job_id for j in backend.submit(works_of(2), token=TOKEN)]
    assert claim_next(backend.state_dir, as_pilot("101"))[0] == first
    slurm.queue["101"] = "R"
    states = backend.status([first, second])
    assert states[first].state is JobState.RUNNING and states[second].state is JobState.PENDING
    assert slurm.count("sbatch") == 1  # its pilot lives: no new one
    del slurm.queue["101"]  # scancel'd / time limit / node gone: not in the queue, no history
    states = backend.status([first, second])
    assert states[first].state is JobState.FAILED and states[first].exit_code is None
    assert "slurm job 101" in states[first].reason and "without an exit status" in states[first].reason
    assert slurm.count("sbatch") == 2  # the second CCD, still queued, got a new pilot
    pilots = {p["pilot"]: p["state"] for p in backend.pilots()}
    assert pilots == {"slurm-101": "lost", "slurm-102": "starting"}
    # the same pilot's job in Slurm's history as TIMEOUT: still lost, never done
    slurm.queue["101"] = "TO"
    st = backend.status([first])[first]
    assert st.state is JobState.FAILED and "TIMEOUT" in st.reason


def test_sbatch_refused_means_nothing_queued_and_status_retries_later(tmp_path):
    slurm = FakeSlurm()
    backend = make_backend(config(tmp_path, pilots=1), runner=slurm)
    real = slurm.__call__

    def refusing(argv, timeout, input=None, check=True):
        if argv[0] == "sbatch":
            raise SchedulerError(argv, 1, "", "sbatch: error: Batch job submission failed: Invalid account")
        return real(argv, timeout, input=input, check=check)

    backend.runner = backend.launcher.backend.runner = refusing
    with pytest.raises(SchedulerError, match="Invalid account"):
        backend.submit(works_of(2), token=TOKEN)
    assert not (backend.state_dir / "jobs").exists() and backend.pilots() == []
    # queued work whose pilot cannot start: status still answers (and tries again next time)
    backend.launcher.backend.runner = slurm
    (job_id,) = [j.job_id for j in backend.submit(works_of(1), token=TOKEN)]
    slurm.queue.clear()
    backend.launcher.backend.runner = refusing
    assert backend.status([job_id])[job_id].state is JobState.PENDING
    backend.launcher.backend.runner = slurm
    assert backend.status([job_id])[job_id].state is JobState.PENDING and slurm.count("sbatch") == 2


def test_exit_written_before_the_pilot_ended_is_the_items_state(tmp_path):
    slurm = FakeSlurm()
    backend = make_backend(config(tmp_path, pilots=1), runner=slurm)
    (job_id,) = [j.job_id for j in backend.submit(works_of(1), token=TOKEN)]
    claim_next(backend.state_dir, as_pilot("101"))
    (backend.state_dir / "jobs" / job_id / "exit").write_text(str(int(ExitCode.RAW_TIMEOUT)))
    slurm.queue["101"] = "CD"
    st = backend.status([job_id])[job_id]
    assert (st.state, st.exit_code) == (JobState.FAILED, 3)


def test_cancel_of_a_running_item_scancels_its_pilot(tmp_path):
    slurm = FakeSlurm()
    backend = make_backend(config(tmp_path, pilots=1), runner=slurm)
    first, second = [j.job_id for j in backend.submit(works_of(2), token=TOKEN)]
    claim_next(backend.state_dir, as_pilot("101"))
    slurm.queue["101"] = "R"
    backend.cancel([first, second])
    assert (["scancel", "101"], None) in slurm.calls
    states = backend.status([first, second])
    assert {s.state for s in states.values()} == {JobState.CANCELLED}


def test_pilot_id_from_the_environment():
    assert parse_pilot_id("slurm-123") == ("slurm", "123")
    assert parse_pilot_id("htcondor-7.0") == ("htcondor", "7.0")
    assert parse_pilot_id(None) is None
    with pytest.raises(BadInputError, match="APBATCH_PILOT_ID"):
        parse_pilot_id("slurm-1; rm")


# ------------------------------------------------------------------ the real Slurm
def _wait(pred, timeout=60.0, step=0.25):
    end = time.monotonic() + timeout
    while time.monotonic() < end:
        if (value := pred()):
            return value
        time.sleep(step)
    return None


def _slurm_config(tmp_path, slurm_cluster, **backend):
    launcher = {"kind": "slurm", "jobcomp_log": str(slurm_cluster.jobcomp_log), "mem": None}
    return load_config(environ={}, overrides={"root": str(tmp_path / "work"),
                                              "backend": {"kind": "pilot", "launcher": launcher, **backend}})


@pytest.mark.slurm
def test_real_slurm_pilots_claim_each_item_once_with_process_ccds_exit_codes(slurm_cluster, tmp_path):
    """Two pilots, each a real Slurm job; no butler repository, so every CCD ends as
    `apbatch process-ccd` would: exit 2. Each item is claimed by exactly one Slurm pilot."""
    from apbatch.ledger import Ledger
    from apbatch.script.status import collect_status, format_status

    cfg = _slurm_config(tmp_path, slurm_cluster, pilots=2, idle_timeout=2)
    backend = PilotBackend(cfg)
    ids = [j.job_id for j in backend.submit(works_of(6), token=TOKEN)]
    assert _wait(lambda: all(s.state.finished for s in backend.status(ids).values()), 90), \
        (backend.state_dir / "pilots").iterdir()
    statuses = backend.status(ids)
    assert {(s.state, s.exit_code) for s in statuses.values()} == {(JobState.FAILED, int(ExitCode.BAD_INPUT))}
    claims = [json.loads((backend.state_dir / "jobs" / j / "started.json").read_text()) for j in ids]
    pilots = {p["pilot"]: p for p in backend.pilots()}
    assert {c["pilot"] for c in claims} <= set(pilots) and all(c["batch"] == "slurm" for c in claims)
    assert sum(p["done"] + p["failed"] for p in pilots.values()) == len(ids)  # each item ran once
    for job_id in ids:
        assert "error: job.repo: no butler repository" in Path(backend.log_path(job_id)).read_text()
    # squeue knows them by their readable name; status shows each pilot with its Slurm job id
    ledger = Ledger.from_config(cfg)
    ledger.claim(works_of(6))
    ledger.close()
    report = collect_status(cfg, backend=backend, live=False)
    text = format_status(report)
    assert "pilots:" in text and {p["pilot"] for p in report["pilots"]} == set(pilots)
    for p in pilots.values():
        assert p["pilot"] == f"slurm-{p['batch_id']}" and f"slurm {p['batch_id']}" in text
    assert _wait(lambda: all(p["state"] == "ended" for p in backend.pilots()), 60)
    jobs = ",".join(p["batch_id"] for p in pilots.values())
    shown = subprocess.run(["squeue", "-h", "-t", "all", "-j", jobs, "-O", "JobID:12|,Name:30"],
                           capture_output=True, text=True, check=True).stdout
    assert {tuple(x.strip() for x in ln.split("|")) for ln in shown.splitlines()} == \
        {(p["batch_id"], "ap-pilot-20250610") for p in pilots.values()}


@pytest.mark.slurm
def test_real_slurm_pilot_scancelled_mid_item_leaves_it_failed_lost(slurm_cluster, tmp_path):
    """A Slurm pilot ended by Slurm (here scancel, as a time limit would) while it runs a CCD:
    the CCD reads FAILED, never done, and the CCD still queued gets a new Slurm pilot."""
    cfg, dist = _site(tmp_path, pilots=1, idle_timeout=5,
                      launcher={"kind": "slurm", "jobcomp_log": str(slurm_cluster.jobcomp_log), "mem": None})
    backend = PilotBackend(cfg)
    first, second = [j.job_id for j in backend.submit(works_of(2, distributor=dist), token=TOKEN)]
    assert _wait(lambda: backend.status([first])[first].state is JobState.RUNNING, 60)
    claim = json.loads((backend.state_dir / "jobs" / first / "started.json").read_text())
    assert claim["batch"] == "slurm"
    subprocess.run(["scancel", claim["batch_id"]], check=True)
    # the daemon asks about every CCD not yet final: the lost one and the queued one
    st = _wait(lambda: (s := backend.status([first, second])[first]).state.finished and s, 30)
    assert st and st.state is JobState.FAILED and st.exit_code is None
    assert f"slurm job {claim['batch_id']}" in st.reason and "without an exit status" in st.reason
    # status saw queued work and no live pilot: a new Slurm pilot; cancel it (the raw never comes)
    assert _wait(lambda: [p for p in backend.pilots() if p["state"] != "lost"], 30)
    backend.cancel([second])
    assert _wait(lambda: backend.status([second])[second].state is JobState.CANCELLED, 30)
    records = {p["pilot"]: p for p in backend.pilots()}
    assert records[claim["pilot"]]["state"] == "lost" and len(records) == 2
