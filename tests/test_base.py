"""Tests of apbatch.backends.base (shared machinery) and apbatch.backends.make_backend."""

from __future__ import annotations

import logging
import os
import re
import subprocess

import pytest
from apbatch.backends import make_backend
from apbatch.backends.base import (
    Backend,
    CommandResult,
    JobState,
    check_visit,
    compress_ids,
    render_shell_script,
    run_command,
)
from apbatch.backends.htcondor import HTCondorBackend
from apbatch.backends.local import LocalBackend
from apbatch.backends.slurm import SlurmBackend
from apbatch.config import load_config
from apbatch.errors import BadInputError, SchedulerError
from apbatch.work import CcdWork

EVIL_GROUP = "2025-06-10T07:31:26.692; rm -rf / $(touch /tmp/pwned)"


def work(detector: int, group: str = "2025-06-10T07:31:26.692", instrument: str = "LSSTComCam") -> CcdWork:
    return CcdWork(instrument, detector, f"R22_S{detector // 3}{detector % 3}", group, 2025061000578,
                   20250610, "science", 30.0, 2, "http://127.0.0.1:8000", 10.5, -20.25, 45.0, "r_03")


class ToyBackend(Backend):
    """The smallest possible backend, to test the template machinery in isolation."""

    kind = "local"
    id_pattern = re.compile(r"^Submitted job (?P<id>\d+)$")
    state_table = {"Q": JobState.PENDING, "R": JobState.RUNNING, "C": JobState.COMPLETED}
    batch_size = 2

    def __init__(self, *args, queue=None, history=None, **kwargs):
        super().__init__(*args, **kwargs)
        self.queue, self.history, self.calls = queue or {}, history or {}, []

    def render(self, works):
        return ""

    def submit(self, works, token=None):
        return []

    def cancel(self, job_ids):
        pass

    def _query_queue(self, job_ids):
        self.calls.append(("queue", list(job_ids)))
        return {j: self.map_state(j, *self.queue[j]) for j in job_ids if j in self.queue}

    def _query_history(self, job_ids):
        self.calls.append(("history", list(job_ids)))
        return {j: self.map_state(j, *self.history[j]) for j in job_ids if j in self.history}


@pytest.fixture
def config(tmp_path):
    return load_config(overrides={"root": str(tmp_path)}, environ={})


# ---------------------------------------------------------------- run_command
def test_run_command_returns_output_and_feeds_stdin():
    result = run_command(["cat"], timeout=5, input="script body\n")
    assert isinstance(result, CommandResult)
    assert (result.returncode, result.stdout, result.argv) == (0, "script body\n", ("cat",))


def test_run_command_failure_carries_command_exit_and_stderr():
    argv = ["sh", "-c", "echo partial; echo 'sbatch: error: invalid partition' >&2; exit 3"]
    with pytest.raises(SchedulerError) as err:
        run_command(argv, timeout=5)
    exc = err.value
    assert (exc.argv, exc.returncode, exc.stdout) == (argv, 3, "partial\n")
    assert "invalid partition" in exc.stderr and "invalid partition" in str(exc)
    assert str(exc).startswith("sh exited with 3")


def test_run_command_unchecked_returns_nonzero():
    result = run_command(["sh", "-c", "echo x >&2; exit 1"], timeout=5, check=False)
    assert (result.returncode, result.stderr) == (1, "x\n")


def test_run_command_missing_program_and_timeout():
    with pytest.raises(SchedulerError) as err:
        run_command(["/nonexistent/sbatch", "--parsable"], timeout=5)
    assert err.value.returncode == 127 and "command not found" in err.value.stderr
    with pytest.raises(SchedulerError) as err:
        run_command(["sleep", "10"], timeout=0.2)
    assert err.value.returncode == -1 and "timed out" in err.value.stderr


def test_run_command_never_uses_a_shell(tmp_path):
    marker = tmp_path / "pwned"
    result = run_command(["echo", f"; touch {marker}"], timeout=5)
    assert result.stdout == f"; touch {marker}\n" and not marker.exists()


# ---------------------------------------------------------------- id, states, status template
def test_parse_job_id(config):
    assert ToyBackend.parse_job_id(["toy"], "noise\nSubmitted job 42\n") == "42"
    with pytest.raises(SchedulerError) as err:
        ToyBackend.parse_job_id(["toy", "x"], "sbatch: something odd\n")
    assert err.value.argv == ["toy", "x"] and "no job id" in str(err.value)


def test_map_state_unknown_is_unknown_with_warning(config, caplog):
    backend = ToyBackend(config)
    with caplog.at_level(logging.WARNING, logger="apbatch.backends.base"):
        status = backend.map_state("7", "ZZ")
    assert status.state is JobState.UNKNOWN and "ZZ" in status.reason
    assert "unknown scheduler state 'ZZ'" in caplog.text


def test_map_state_completed_with_nonzero_exit_is_failed(config):
    backend = ToyBackend(config)
    assert backend.map_state("1", "C", 0).state is JobState.COMPLETED
    assert backend.map_state("1", "C", None).state is JobState.COMPLETED
    failed = backend.map_state("1", "C", 4)
    assert (failed.state, failed.exit_code) == (JobState.FAILED, 4)
    # every backend (Slurm, HTCondor, local) says why a job that could not start failed
    not_found = backend.map_state("1", "C", 127)
    assert not_found.state is JobState.FAILED and "job command was not found" in not_found.reason


def test_status_queue_then_history_then_unknown_in_batches(config):
    backend = ToyBackend(config, queue={"1": ("R",), "4": ("Q",)}, history={"2": ("C", 5), "3": ("C", 0)})
    states = backend.status(["1", "2", "3", "4", "5", "1"])
    assert list(states) == ["1", "2", "3", "4", "5"]
    assert [s.state for s in states.values()] == [JobState.RUNNING, JobState.FAILED, JobState.COMPLETED,
                                                  JobState.PENDING, JobState.UNKNOWN]
    assert states["5"].reason == "not in the queue nor in history"
    # batches of batch_size=2; history asked only about what the queue did not know
    assert backend.calls == [("queue", ["1", "2"]), ("queue", ["3", "4"]), ("queue", ["5"]),
                             ("history", ["2", "3"]), ("history", ["5"])]


def test_job_state_finished():
    assert {s for s in JobState if s.finished} == {JobState.COMPLETED, JobState.FAILED, JobState.CANCELLED,
                                                   JobState.TIMEOUT}


# ---------------------------------------------------------------- helpers
def test_check_visit_rejects_bad_batches():
    check_visit([work(0), work(1)])
    with pytest.raises(BadInputError, match="no CCDs"):
        check_visit([])
    with pytest.raises(BadInputError, match="appears twice"):
        check_visit([work(0), work(0)])
    with pytest.raises(BadInputError, match="mixes visits"):
        check_visit([work(0), work(1, group="2025-06-10T08:00:00.000")])


def test_compress_ids():
    assert compress_ids(range(189)) == "0-188"
    assert compress_ids([8, 0, 1, 2, 5, 7]) == "0-2,5,7-8"
    assert compress_ids([3]) == "3"


def test_render_shell_script_keeps_values_literal(tmp_path):
    marker = tmp_path / "pwned"
    evil = f"x'; touch {marker}; echo '$(touch {marker})`touch {marker}`\nnext line"
    script = render_shell_script({"APTEST_VALUE": evil}, ['printf "%s" "$APTEST_VALUE"'], ["# header"])
    assert script.startswith("#!/bin/bash\n# header\nset -euo pipefail\n")
    out = subprocess.run(["bash", "-c", script], capture_output=True, text=True, cwd=tmp_path, check=True)
    assert out.stdout == evil and not marker.exists()


def test_backend_refuses_another_kinds_config(config):
    with pytest.raises(BadInputError, match="backend.kind"):
        SlurmBackend(config)


def test_job_env_and_command_line(config, tmp_path):
    """The job gets job.env only; its command is this install's apbatch + --config <night's file>."""
    (tmp_path / "venv" / "bin").mkdir(parents=True)
    python, script = tmp_path / "venv" / "bin" / "python", tmp_path / "venv" / "bin" / "apbatch"
    python.touch()
    backend = ToyBackend(config, executable=str(python))
    assert backend.job_env() == dict(config.job.env)
    night_file = str(config.path("config").absolute() / "20250610.yaml")
    # no apbatch script next to the interpreter: the interpreter runs the package
    assert backend.job_argv(work(4)) == [str(python), "-m", "apbatch", "process-ccd", "--config", night_file,
                                         *work(4).job_args()]
    script.write_text("#!/bin/sh\n")
    script.chmod(0o755)
    assert ToyBackend(config, executable=str(python)).job_command(20250610) == [
        str(script), "process-ccd", "--config", night_file]
    bad = load_config(overrides={"job": {"env": {"BAD NAME": "1"}}}, environ={})
    with pytest.raises(BadInputError, match="job.env.BAD NAME"):
        ToyBackend(bad).job_env()


# ---------------------------------------------------------------- make_backend, secrets
@pytest.mark.parametrize("kind, cls", [("local", LocalBackend), ("slurm", SlurmBackend),
                                       ("htcondor", HTCondorBackend)])
def test_make_backend_chooses_by_kind_without_io(tmp_path, kind, cls):
    cfg = load_config(overrides={"root": str(tmp_path / "root"), "backend": {"kind": kind}}, environ={})
    backend = make_backend(cfg, executable="/opt/py/bin/python")
    assert type(backend) is cls and backend.kind == kind and backend.executable == "/opt/py/bin/python"
    assert not (tmp_path / "root").exists()  # constructors do no I/O


@pytest.mark.parametrize("kind", ["local", "slurm", "htcondor"])
def test_rendered_jobs_hold_no_secret(tmp_path, monkeypatch, kind):
    secrets = {"APBATCH_KAFKA_PASSWORD": "kafka-pw-9f3a1c", "APBATCH_DB_SECRET": "db-secret-77e2b0",
               "ALERT_API_TOKEN": "tok-5d1e8a2b", "PGPASSWORD": "pg-pw-0c4e"}
    for name, value in secrets.items():
        monkeypatch.setenv(name, value)
    cfg = load_config(overrides={"root": str(tmp_path), "backend": {"kind": kind}})
    text = make_backend(cfg).render([work(0), work(1)])
    assert str(tmp_path / "config" / "20250610.yaml") in text and "--config" in text
    leaked = [name for name, value in os.environ.items()
              if re.search("PASSWORD|SECRET|TOKEN", name) and value and value in text]
    assert leaked == []


def test_submission_tokens_are_unique_and_checked_before_reaching_a_scheduler(config):
    from apbatch.backends.base import checked_token, new_token

    tokens = {new_token() for _ in range(1000)}
    assert len(tokens) == 1000 and all(checked_token(t) == t for t in tokens)
    for bad in ("", "ABC", "abc", "abcd0000abcd0000abcd; rm -rf /", 'a" || true || "', "g" * 20):
        with pytest.raises(BadInputError, match="submission token"):
            checked_token(bad)
    # a backend that cannot be asked finds nothing: the caller then resubmits (the old behaviour)
    assert ToyBackend(config).find_submitted([work(0), work(1)], new_token(), 0.0) == []


def test_log_path_of_a_backend_that_cannot_tell_is_none(config, tmp_path):
    assert ToyBackend(config).log_path("12", work(0)) is None
    # the real backends each name their own files (tests in test_local/test_slurm/test_htcondor)
    local = make_backend(config)
    expected = tmp_path / "logs" / "local" / "jobs" / "local-3" / "out.log"
    assert local.log_path("local-3", work(0)) == str(expected)
