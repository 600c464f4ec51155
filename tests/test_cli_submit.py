"""Tests of the commands submit, daemon, status, cancel and render-job (CLI + script functions)."""

from __future__ import annotations

import io
import json
from pathlib import Path

import apbatch.backends
import pytest
import yaml
from apbatch.backends.base import JobState, JobStatus
from apbatch.cli import main
from apbatch.config import ApbatchConfig, load_config
from apbatch.jobconfig import resolve_command
from apbatch.ledger import Ledger
from test_dispatcher import FakeBackend

ROOT = Path(__file__).resolve().parent.parent
DATA = ROOT / "tests" / "data" / "events"


@pytest.fixture
def env(tmp_path, monkeypatch):
    """A config file rooted in tmp_path, and make_backend patched to one shared FakeBackend."""
    monkeypatch.delenv("APBATCH_CONFIG", raising=False)
    cfg_file = tmp_path / "apbatch.yaml"
    cfg_file.write_text(yaml.safe_dump({"root": str(tmp_path / "work")}))
    backend = FakeBackend()
    made = []

    def fake_make_backend(config, **deps):
        made.append(deps)
        return backend

    monkeypatch.setattr(apbatch.backends, "make_backend", fake_make_backend)
    return {"config": str(cfg_file), "backend": backend, "made": made, "root": tmp_path / "work"}


def run(capsys, *args):
    with pytest.raises(SystemExit) as exc:
        main(list(args))
    out, err = capsys.readouterr()
    return exc.value.code, out, err


def ledger_of(env):
    return Ledger.from_config(load_config(env["config"], environ={}))


# ---------------------------------------------------------------------------------- submit
def test_submit_prints_job_ids_once(env, capsys):
    code, out, err = run(capsys, "submit", str(DATA / "nextVisit_LSSTCam.json"), "--config", env["config"])
    assert code == 0
    lines = out.splitlines()
    assert len(lines) == 189 and lines[0] == "fake-1\tap-LSSTCam-3294702866920000\tR01_S00"
    # the ledger records the command the jobs were submitted with (FakeBackend.job_command)
    assert ledger_of(env).rows()[0].command == ("fake-job", "--config", "/night/20250609.yaml")
    code, out, err = run(capsys, "submit", str(DATA / "nextVisit_LSSTCam.json"), "--config", env["config"])
    assert code == 0 and out == "" and "duplicate" in err
    assert len(env["backend"].batches) == 1 and len(ledger_of(env).rows()) == 189


def test_submit_file_of_events_and_stdin(env, capsys, monkeypatch):
    events = [json.loads((DATA / n).read_text()) for n in ("nextVisit_LSSTComCam.json",
                                                           "calib_bias_LSSTCam.json")]
    f = env["root"].parent / "two.json"
    f.write_text(json.dumps(events))
    code, out, _ = run(capsys, "submit", str(f), "--config", env["config"])
    assert code == 0 and len(out.splitlines()) == 9 + 189
    monkeypatch.setattr("sys.stdin", io.StringIO((DATA / "nextVisit_LATISS.json").read_text()))
    code, out, _ = run(capsys, "submit", "-", "--config", env["config"], "--json")
    (res,) = json.loads(out)
    assert code == 0 and res["action"] == "submitted" and res["jobs"][0]["detector_name"] == "RXX_S00"


def test_submit_dry_run_submits_nothing(env, capsys):
    code, out, _ = run(capsys, "submit", str(DATA / "nextVisit_LSSTComCam.json"), "--dry-run",
                       "--config", env["config"])
    assert code == 0 and len(out.splitlines()) == 9 and out.startswith("-\tap-LSSTComCam-3110636353110000")
    assert env["backend"].batches == [] and not (env["root"] / "ledger.sqlite3").exists()


@pytest.mark.parametrize(("text", "message"), [
    ('{"kind": "nextVisit", "groupId": ', "event: malformed JSON"),
    ('{"kind": "nextVisit", "groupId": "2025-06-10T07:31:26.692"}', "event.salIndex: missing"),
    ('[{"imageName": "MC_O_20250609_000578"}]', "event.imageDate: missing"),
])
def test_submit_bad_event_one_line_error(env, capsys, text, message):
    f = env["root"].parent / "bad.json"
    f.write_text(text)
    code, out, err = run(capsys, "submit", str(f), "--config", env["config"])
    assert code == 2 and out == "" and message in err and len(err.strip().splitlines()) == 1
    assert err.startswith("error: bad.json")
    assert env["backend"].batches == []


def test_submit_nothing_submitted_when_one_event_of_a_file_is_bad(env, capsys):
    good = json.loads((DATA / "nextVisit_LSSTComCam.json").read_text())
    bad = dict(good, position=[1.0])
    f = env["root"].parent / "mixed.jsonl"
    f.write_text(json.dumps(good) + "\n" + json.dumps(bad) + "\n")
    code, _, err = run(capsys, "submit", str(f), "--config", env["config"])
    assert code == 2 and "mixed.jsonl#1: event.position" in err and env["backend"].batches == []


def test_submit_missing_file_and_rejected_event(env, capsys):
    code, _, err = run(capsys, "submit", "/nonexistent/ev.json", "--config", env["config"])
    assert code == 2 and "EVENT_FILE: cannot read" in err
    closed = json.loads((DATA / "nextVisit_LSSTComCam.json").read_text()) | {"dome": 1}
    f = env["root"].parent / "closed.json"
    f.write_text(json.dumps(closed))
    code, out, err = run(capsys, "submit", str(f), "--config", env["config"])
    assert code == 2 and out == "" and "dome CLOSED" in err


def test_submit_stale_only_with_check_age(env, capsys):
    args = ("submit", str(DATA / "nextVisit_LATISS.json"), "--config", env["config"])
    code, _, err = run(capsys, *args, "--check-age", "--dry-run")
    assert code == 2 and "stale" in err
    assert run(capsys, *args)[0] == 0


def test_submit_scheduler_failure_exit_code(env, capsys):
    env["backend"].fail_submits = 1
    code, _, err = run(capsys, "submit", str(DATA / "nextVisit_LATISS.json"), "--config", env["config"])
    assert code == 4 and "submission failed" in err
    # the same event again: not "duplicate" and exit 0, but what happened and what to do
    code, out, err = run(capsys, "submit", str(DATA / "nextVisit_LATISS.json"), "--config", env["config"])
    assert code == 4 and out == "" and "SUBMIT_FAILED=1" in err and "apbatch resubmit" in err
    assert len(env["backend"].batches) == 0  # nothing was submitted the second time either
    # a visit that was submitted is a plain duplicate
    run(capsys, "submit", str(DATA / "nextVisit_LSSTComCam.json"), "--config", env["config"])
    code, _, err = run(capsys, "submit", str(DATA / "nextVisit_LSSTComCam.json"), "--config", env["config"])
    assert code == 0 and "duplicate" in err and "PENDING=9" in err


# ---------------------------------------------------------------------------------- status
def test_status_table_json_and_live(env, capsys):
    run(capsys, "submit", str(DATA / "nextVisit_LSSTComCam.json"), "--config", env["config"])
    backend = env["backend"]
    backend.states["fake-1"] = JobStatus("fake-1", JobState.RUNNING)
    backend.states["fake-2"] = JobStatus("fake-2", JobState.COMPLETED, 5)
    code, out, _ = run(capsys, "status", "--config", env["config"])
    assert code == 6  # a CCD failed for good (exit 5): needs attention
    assert "needs attention: 1 CCD(s)" in out and "R22_S01  FAILED  exit 5" in out
    header, row, total = out.splitlines()[:3]
    assert header.split()[:6] == ["INSTRUMENT", "VISIT", "GROUP", "INTENT", "CCDS", "STATES"]
    assert "3110636353110000" in row and "FAILED=1 PENDING=7 RUNNING=1" in row
    assert total.startswith("total: 1 visit(s), 9 CCD(s)")
    code, out, _ = run(capsys, "status", "--config", env["config"], "--no-live")
    assert code == 0 and "PENDING=9" in out  # the ledger alone
    code, out, _ = run(capsys, "status", "--config", env["config"], "--visit", "3110636353110000", "--json")
    report = json.loads(out)
    assert report["live"] is True and len(report["ccds"]) == 9
    assert report["ccds"][1]["state"] == "FAILED" and report["ccds"][1]["exit_code"] == 5
    code, out, _ = run(capsys, "status", "--config", env["config"], "--group", "2024-11-09T06:33:55.311")
    assert "R22_S00" in out and "fake-1" in out and "RUNNING" in out


def test_status_empty_and_scheduler_down(env, capsys):
    ledger_file = env["root"] / "ledger.sqlite3"
    code, out, err = run(capsys, "status", "--config", env["config"])
    assert code == 2 and out == "" and len(err.splitlines()) == 1
    assert f"no ledger at {ledger_file}" in err and "ledger.url" in err and "--config" in err
    assert not ledger_file.exists() and not env["root"].exists()  # a reader creates nothing
    ledger_of(env).close()  # an empty ledger
    assert run(capsys, "status", "--config", env["config"])[1].strip() == "no submissions recorded"
    run(capsys, "submit", str(DATA / "nextVisit_LATISS.json"), "--config", env["config"])

    def broken(job_ids):
        raise RuntimeError("squeue: error: cannot reach slurmctld")

    env["backend"].status = broken
    code, out, _ = run(capsys, "status", "--config", env["config"])
    assert code == 0 and "PENDING=1" in out and "scheduler not queried" in out


# ---------------------------------------------------------------------------------- cancel
def test_cancel_visit_and_detector(env, capsys):
    run(capsys, "submit", str(DATA / "nextVisit_LSSTComCam.json"), "--config", env["config"])
    code, out, _ = run(capsys, "cancel", "--visit", "3110636353110000", "--detector", "R22_S11",
                       "--config", env["config"])
    assert code == 0 and out.split("\t")[0] == "fake-5" and env["backend"].cancelled == ["fake-5"]
    code, out, _ = run(capsys, "cancel", "--group", "2024-11-09T06:33:55.311", "--config", env["config"])
    assert code == 0 and len(out.splitlines()) == 8 and len(env["backend"].cancelled) == 9
    code, out, err = run(capsys, "cancel", "--group", "2024-11-09T06:33:55.311", "--config", env["config"])
    assert code == 0 and out == "" and "nothing to cancel" in err
    rows = ledger_of(env).rows()
    assert {r.state for r in rows} == {"CANCELLED"} and not any(r.retry for r in rows)


@pytest.mark.parametrize(("args", "message"), [
    ((), "--group/--visit: give exactly one"),
    (("--group", "g", "--visit", "1"), "--group/--visit: give exactly one"),
    (("--visit", "42"), "--visit: no submissions recorded for visit 42"),
    (("--visit", "3110636353110000", "--detector", "R99_S99"), "--detector: visit 3110636353110000 has no"),
])
def test_cancel_bad_arguments(env, capsys, args, message):
    run(capsys, "submit", str(DATA / "nextVisit_LSSTComCam.json"), "--config", env["config"])
    code, _, err = run(capsys, "cancel", *args, "--config", env["config"])
    assert code == 2 and message in err and env["backend"].cancelled == []


# ---------------------------------------------------------------------------------- render-job
def test_render_job(env, capsys):
    code, out, _ = run(capsys, "render-job", str(DATA / "nextVisit_LSSTComCam.json"), "--config",
                       env["config"])
    assert code == 0 and len(out.splitlines()) == 9 and "--group 2024-11-09T06:33:55.311" in out
    code, out, _ = run(capsys, "render-job", str(DATA / "nextVisit_LSSTCam.json"), "--detector", "94",
                       "--config", env["config"])
    assert code == 0 and out.splitlines() == [out.splitlines()[0]] and "R22_S11" in out
    assert env["backend"].batches == [] and not (env["root"] / "ledger.sqlite3").exists()


def test_render_job_uses_next_visit_of_same_file(env, capsys):
    f = env["root"].parent / "pair.jsonl"
    f.write_text("\n".join((DATA / n).read_text().replace("\n", "") for n in (
        "startIntegration_LSSTCam_snap1.json", "nextVisit_LSSTCam.json")))
    code, out, _ = run(capsys, "render-job", str(f), "--detector", "R22_S11", "--config", env["config"])
    assert code == 0 and "--filter" not in out  # the startIntegration came first: no nextVisit yet
    f.write_text("\n".join((DATA / n).read_text().replace("\n", "") for n in (
        "nextVisit_LSSTCam.json", "startIntegration_LSSTCam_snap1.json")))
    code, out, _ = run(capsys, "render-job", str(f), "--detector", "R22_S11", "--config", env["config"])
    assert "--filter z_20" in out and "--exposure-time 30.0" in out  # the first event: the nextVisit


@pytest.mark.parametrize(("detector", "message"), [("R99_S99", "--detector: LSSTCam has no detector"),
                                                    ("R00_SW0", "--detector: R00_SW0 (191) is a wavefront")])
def test_render_job_bad_detector(env, capsys, detector, message):
    code, _, err = run(capsys, "render-job", str(DATA / "nextVisit_LSSTCam.json"), "--detector", detector,
                       "--config", env["config"])
    assert code == 2 and message in err


def test_render_job_with_the_real_local_backend(tmp_path, capsys, monkeypatch):
    """No fake: make_backend builds the configured (local) backend; render-job does no I/O."""
    monkeypatch.delenv("APBATCH_CONFIG", raising=False)
    cfg = tmp_path / "c.yaml"
    cfg.write_text(yaml.safe_dump({"root": str(tmp_path / "w")}))
    code, out, _ = run(capsys, "render-job", str(DATA / "nextVisit_LATISS.json"), "--config", str(cfg))
    assert code == 0 and "process-ccd" in out and "2024-06-25T01:26:31.895#1" in out
    # the command a job runs: this install's apbatch (absolute), with the night's resolved config
    night_file = tmp_path / "w" / "config" / "20240624.yaml"
    assert f"{resolve_command(['apbatch'])[0]} process-ccd --config {night_file} --instrument LATISS" in out
    assert not (tmp_path / "w").exists()  # nothing written: no ledger, no config file


# ---------------------------------------------------------------------------------- daemon
def test_daemon_command_spool(env, capsys):
    spool = env["root"] / "events" / "incoming"
    spool.mkdir(parents=True)
    (spool / "a.json").write_text((DATA / "nextVisit_LATISS.json").read_text())
    (spool / "b.json").write_text("{broken")
    code, out, _ = run(capsys, "daemon", "--config", env["config"], "--max-events", "2", "--max-seconds",
                       "20")
    counts = json.loads(out)
    # the sample event is years old: the daemon drops it as stale, and dead-letters the broken one
    assert code == 0 and counts == {"bad": 1, "rejected": 1}
    assert (spool / "done" / "a.json").exists() and (spool / "failed" / "b.json").exists()
    assert "malformed JSON" in (env["root"] / "events" / "dead-letter.jsonl").read_text()


# ---------------------------------------------------------------------------------- config files
def test_shipped_config_files():
    assert load_config(ROOT / "config" / "apbatch.yaml", environ={}) == ApbatchConfig()
    assert load_config(ROOT / "config" / "slurm.yaml", environ={}).backend.kind == "slurm"
    assert load_config(ROOT / "config" / "htcondor.yaml", environ={}).backend.kind == "htcondor"
