"""Tests of apbatch.logs: JSON and text log lines carrying the job's visit, detector, group and
batch job id (from each batch system's environment)."""

from __future__ import annotations

import io
import json
import logging
import os
import subprocess
import sys
import threading

import apbatch.logs as logs
import pytest
from apbatch.logs import (
    clear_job_context,
    configure_logging,
    job_id_from_env,
    set_job_context,
    set_log_format,
)


@pytest.fixture
def root_logging():
    """Let a test own the root logger's handlers; restore them (and the job context) after."""
    root = logging.getLogger()
    handlers, level, explicit = list(root.handlers), root.level, logs._explicit_format
    clear_job_context()  # a job run in this process before (test_process_ccd, test_monitoring) set some
    yield
    for h in list(root.handlers):
        root.removeHandler(h)
    for h in handlers:
        root.addHandler(h)
    root.setLevel(level)
    logs._explicit_format = explicit
    clear_job_context()


def test_json_lines_carry_the_job_fields_from_every_logger_and_thread(root_logging):
    out = io.StringIO()
    configure_logging("INFO", "json", out, force=True)
    logging.getLogger("apbatch.x").info("before the job")
    set_job_context(visit=2026112600123, detector=4, group="2026-11-26T01:02:03", job_id="77_4")
    logging.getLogger("apbatch.job.task").info("step %s", "isr")
    worker = threading.Thread(target=lambda: logging.getLogger("some.library").warning("from a thread"))
    worker.start()
    worker.join()
    try:
        raise ValueError("boom")
    except ValueError:
        logging.getLogger("apbatch.y").exception("failed")
    lines = [json.loads(line) for line in out.getvalue().splitlines()]
    assert len(lines) == 4
    assert "visit" not in lines[0] and lines[0]["message"] == "before the job"
    for line in lines[1:]:
        assert (line["visit"], line["detector"], line["group"], line["job_id"]) == (
            2026112600123, 4, "2026-11-26T01:02:03", "77_4")
        assert set(line) >= {"time", "level", "logger", "message"} and line["time"].endswith("Z")
    assert (lines[1]["logger"], lines[1]["level"], lines[1]["message"]) == (
        "apbatch.job.task", "INFO", "step isr")
    assert lines[2]["logger"] == "some.library" and lines[2]["level"] == "WARNING"
    assert "ValueError: boom" in lines[3]["exception"]


def test_text_lines_append_the_fields_and_config_switches_the_format(root_logging):
    out = io.StringIO()
    configure_logging("INFO", None, out, force=True)  # the command line did not choose
    set_job_context(visit=5, detector=1)
    logging.getLogger("apbatch.a").info("hello")
    set_log_format("json")  # monitoring.log_format: json
    logging.getLogger("apbatch.a").info("again")
    first, second = out.getvalue().splitlines()
    assert first.endswith("INFO apbatch.a: hello [visit=5 detector=1]")
    assert json.loads(second)["message"] == "again" and json.loads(second)["detector"] == 1


def test_the_command_line_format_wins_over_the_config(root_logging):
    out = io.StringIO()
    configure_logging("INFO", "text", out, force=True)
    set_log_format("json")
    logging.getLogger("apbatch.a").info("plain")
    assert out.getvalue().rstrip().endswith("apbatch.a: plain")
    with pytest.raises(ValueError, match="text or json"):
        set_log_format("xml")
    with pytest.raises(ValueError, match="unknown log field"):
        set_job_context(vist=1)


def test_configure_logging_leaves_foreign_handlers_alone(root_logging):
    root = logging.getLogger()
    foreign = logging.StreamHandler(io.StringIO())
    root.addHandler(foreign)
    assert configure_logging("INFO", "json", io.StringIO()) is None
    assert foreign in root.handlers


def test_job_id_of_each_batch_system(tmp_path):
    assert job_id_from_env({"SLURM_JOB_ID": "101", "SLURM_ARRAY_JOB_ID": "100", "SLURM_ARRAY_TASK_ID": "7"}) \
        == "100_7"  # as the Slurm backend records array tasks
    assert job_id_from_env({"SLURM_JOB_ID": "55"}) == "55"
    ad = tmp_path / ".job.ad"
    ad.write_text('MyType = "Job"\nClusterId = 812\nProcId = 3\nOwner = "ap"\n')
    assert job_id_from_env({"_CONDOR_JOB_AD": str(ad)}) == "812.3"
    assert job_id_from_env({"_CONDOR_JOB_AD": str(tmp_path / "missing")}) is None
    assert job_id_from_env({"APBATCH_JOB_ID": "local-12", "SLURM_JOB_ID": "1"}) == "local-12"
    assert job_id_from_env({}) is None


def test_cli_json_logs_from_the_config_and_the_option(tmp_path):
    """``apbatch daemon`` in a process of its own: every stderr line is one JSON object."""
    env = {**os.environ, "APBATCH_ROOT": str(tmp_path), "APBATCH_MONITORING__LOG_FORMAT": "json"}
    env.pop("APBATCH_CONFIG", None)
    run = [sys.executable, "-m", "apbatch"]
    proc = subprocess.run([*run, "daemon", "--source", "stdin", "--max-seconds", "5"], input="not json\n",
                          env=env, capture_output=True, text=True, timeout=120, cwd=tmp_path)
    assert proc.returncode == 0, proc.stderr
    lines = [json.loads(line) for line in proc.stderr.splitlines()]
    messages = [line["message"] for line in lines]
    assert any(m.startswith("daemon started") for m in messages)
    assert any(m.startswith("bad event from stdin") for m in messages)
    assert all(line["logger"].startswith("apbatch") and line["level"] for line in lines)
    env["APBATCH_MONITORING__LOG_FORMAT"] = "text"
    proc = subprocess.run([*run, "--log-format", "json", "daemon", "--source", "stdin", "--max-seconds", "5"],
                          input="", env=env, capture_output=True, text=True, timeout=120, cwd=tmp_path)
    assert proc.returncode == 0 and proc.stderr.strip()
    assert all(json.loads(line)["level"] for line in proc.stderr.splitlines())
