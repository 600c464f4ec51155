"""Tests of apbatch.backends.pilot: config, render, exactly-once claims, lost pilots, real pilots."""

from __future__ import annotations

import json
import multiprocessing
import os
import signal
import subprocess
import sys
import time
from pathlib import Path

import pytest
from apbatch.backends import make_backend
from apbatch.backends.base import JobState
from apbatch.backends.local import _proc_start_ticks
from apbatch.backends.pilot import PilotBackend, claim_next, pilot_records, register_pilot
from apbatch.config import load_config
from apbatch.errors import BadInputError, ExitCode
from apbatch.work import CcdWork

GROUP = "2025-06-10T07:31:26.692"


def works_of(n: int, group: str = GROUP, distributor: str = "http://127.0.0.1:9") -> list[CcdWork]:
    return [CcdWork("LSSTComCam", d, f"R22_S{d // 3}{d % 3}", group, 2025061000578, 20250610, "science",
                    30.0, 1, distributor, 10.5, -20.25, 45.0, "r_03") for d in range(n)]


def config(tmp_path, **backend):
    return load_config(environ={}, overrides={"root": str(tmp_path / "work"),
                                              "backend": {"kind": "pilot", **backend}})


def queue_only(backend: PilotBackend, works) -> list[str]:
    """``submit`` without starting pilots (the test plays the pilots)."""
    backend._ensure_runner = lambda: None  # type: ignore[method-assign]
    return [j.job_id for j in backend.submit(works, token="ab" * 10)]


# ------------------------------------------------------------------ config
def test_config_kind_and_defaults(tmp_path):
    cfg = config(tmp_path, pilots=3)
    backend = make_backend(cfg)
    assert isinstance(backend, PilotBackend) and backend.kind == "pilot"
    assert cfg.backend.pilots == 3 and cfg.backend.idle_timeout > 0 and cfg.backend.log_dir == "logs/pilot"


@pytest.mark.parametrize("over, field", [
    ({"pilots": 0}, "backend.pilot.pilots"),
    ({"idle_timeout": 0}, "backend.pilot.idle_timeout"),
    ({"max_lifetime": "soon"}, "backend.pilot.max_lifetime"),
    ({"calib_cache": -1}, "backend.pilot.calib_cache"),
    ({"command": []}, "backend.pilot.command"),
    ({"max_workers": 4}, "backend.max_workers"),  # a local backend's field
])
def test_bad_config_names_the_field(tmp_path, over, field):
    with pytest.raises(BadInputError) as info:
        config(tmp_path, **over)
    assert field in str(info.value) and "\n" not in str(info.value)


def test_render_shows_the_pilot_command_and_each_ccds_work(tmp_path):
    backend = PilotBackend(config(tmp_path, pilots=2))
    text = backend.render(works_of(2))
    lines = text.splitlines()
    command = [ln for ln in lines if not ln.startswith(("#", "export", "set "))]
    assert len(command) == 1 and " pilot --config " in command[0]
    assert command[0].endswith("config/apbatch-20250610.yaml") or "20250610" in command[0]
    assert sum("process-ccd" in ln and "--detector" in ln for ln in lines if ln.startswith("#")) == 2
    assert not (tmp_path / "work" / "logs").exists()  # rendering queues nothing


def test_bad_pilot_command_is_refused_before_anything_is_queued(tmp_path):
    backend = PilotBackend(config(tmp_path, command=["/nonexistent/apbatch-pilot"]))
    with pytest.raises(BadInputError, match="config backend.command"):
        backend.submit(works_of(2), token="ab" * 10)
    assert not (backend.state_dir / "queue").exists() and not (backend.state_dir / "jobs").exists()


# ------------------------------------------------------------------ claims
def _claimer(state_dir: str, n: int, out) -> None:
    ident = {"pid": os.getpid(), "ticks": _proc_start_ticks(os.getpid()), "pilot": f"t-{n}", "host": "x"}
    got = []
    while (c := claim_next(Path(state_dir), ident)) is not None:
        got.append(c[0])
    out.put(got)


def test_racing_pilots_claim_every_item_exactly_once(tmp_path):
    backend = PilotBackend(config(tmp_path))
    ids = []
    for g in range(6):  # 6 visits x 8 CCDs
        ids += queue_only(backend, works_of(8, group=f"{GROUP[:-3]}{g:03d}"))
    ctx = multiprocessing.get_context("fork")
    out = ctx.Queue()
    procs = [ctx.Process(target=_claimer, args=(str(backend.state_dir), n, out)) for n in range(4)]
    for p in procs:
        p.start()
    claims = [out.get(timeout=60) for _ in procs]
    for p in procs:
        p.join(timeout=60)
    flat = [j for c in claims for j in c]
    assert sorted(flat) == sorted(ids) and len(set(flat)) == len(flat)
    assert not any((backend.state_dir / "queue").iterdir())
    for job_id in ids:  # each claim names its claimer's process
        started = json.loads((backend.state_dir / "jobs" / job_id / "started.json").read_text())
        assert started["pilot"].startswith("t-")


def test_item_of_a_dead_pilot_is_failed_never_done(tmp_path):
    backend = PilotBackend(config(tmp_path))
    (job_id,) = queue_only(backend, works_of(1))
    proc = subprocess.Popen([sys.executable, "-c", "import time; time.sleep(60)"])
    try:
        ident = {"pid": proc.pid, "ticks": _proc_start_ticks(proc.pid), "pilot": "dying", "host": "x"}
        assert claim_next(backend.state_dir, ident)[0] == job_id
        assert backend.status([job_id])[job_id].state is JobState.RUNNING
    finally:
        proc.kill()
        proc.wait()
    st = backend.status([job_id])[job_id]
    assert st.state is JobState.FAILED and "without an exit status" in st.reason


def test_cancelled_item_is_never_claimed(tmp_path):
    backend = PilotBackend(config(tmp_path))
    a, b = queue_only(backend, works_of(2))
    backend.cancel([a])
    ident = {"pid": os.getpid(), "ticks": _proc_start_ticks(os.getpid()), "pilot": "me", "host": "x"}
    assert claim_next(backend.state_dir, ident)[0] == b
    assert claim_next(backend.state_dir, ident) is None
    assert backend.status([a])[a].state is JobState.CANCELLED


def test_apbatch_status_looks_without_starting_pilots(tmp_path):
    from apbatch.ledger import Ledger
    from apbatch.script.status import collect_status

    cfg = config(tmp_path)
    backend = PilotBackend(cfg)
    works = works_of(1)
    ledger = Ledger.from_config(cfg)
    ledger.claim(works)
    backend._ensure_runner = lambda: None  # type: ignore[method-assign]
    jobs = backend.submit(works)
    ledger.record_submitted(jobs, backend.kind)
    ledger.close()
    job_id = jobs[0].job_id
    started = []
    backend._ensure_runner = lambda: started.append(1)  # type: ignore[method-assign]
    report = collect_status(cfg, backend=backend, live=True)
    assert report["live"] and not started  # queued work, no pilot, and the viewer started none
    # the daemon's poll does start one
    assert backend.status([job_id])[job_id].state is JobState.PENDING and started == [1]


def test_pilot_records_report_a_vanished_pilot_as_lost(tmp_path):
    import socket

    state = tmp_path / "s"
    (state / "pilots").mkdir(parents=True)
    proc = subprocess.Popen([sys.executable, "-c", "pass"])
    proc.wait()
    register_pilot(state, {"pid": proc.pid, "ticks": 1, "host": socket.gethostname(), "state": "idle",
                           "item": None, "done": 3, "failed": 0, "started": 1.0})
    (rec,) = pilot_records(state)
    assert rec["state"] == "lost" and rec["done"] == 3


# ------------------------------------------------------------------ real pilots, started by submit
def _wait(pred, timeout=120.0):
    end = time.monotonic() + timeout
    while time.monotonic() < end:
        if pred():
            return True
        time.sleep(0.2)
    return False


def test_submit_starts_pilots_that_end_items_with_process_ccds_exit_code(tmp_path):
    """No butler repository: `apbatch process-ccd` exits 2 for these CCDs; so must each item,
    run by real pilots (started by submit), which then end when idle."""
    from apbatch.cli import main

    cfg = config(tmp_path, pilots=2, idle_timeout=3)
    backend = PilotBackend(cfg)
    jobs = backend.submit(works_of(3), token="cd" * 10)
    ids = [j.job_id for j in jobs]
    assert _wait(lambda: all(s.state.finished for s in backend.status(ids).values()))
    statuses = backend.status(ids)
    assert {s.exit_code for s in statuses.values()} == {int(ExitCode.BAD_INPUT)}
    for job_id in ids:
        text = Path(backend.log_path(job_id)).read_text()
        assert "error: job.repo: no butler repository" in text
    pilots = backend.pilots()
    assert 1 <= len(pilots) <= 2 and sum(p["done"] + p["failed"] for p in pilots) == 3
    assert _wait(lambda: all(p["state"] == "ended" for p in backend.pilots()), timeout=60)
    assert all("idle" in p["reason"] for p in backend.pilots())
    # the same CCD as its own process: the same exit code
    snapshot = json.loads((backend.state_dir / "jobs" / ids[0] / "job.json").read_text())["config"]
    with pytest.raises(SystemExit) as info:
        main(["process-ccd", "--config", snapshot, *works_of(1)[0].job_args()])
    assert info.value.code == statuses[ids[0]].exit_code


def test_sigterm_ends_an_idle_pilot_cleanly(tmp_path):
    cfg = config(tmp_path, pilots=1, idle_timeout=60)
    backend = PilotBackend(cfg)
    with _locked_queue(backend):
        backend._day_obs = 20250610
        backend.prepare(works_of(1))
        backend._ensure_runner()
    assert _wait(lambda: backend.pilots()[0]["state"] == "idle", timeout=60)
    os.kill(int(backend.pilots()[0]["pid"]), signal.SIGTERM)
    assert _wait(lambda: backend.pilots()[0]["state"] != "idle", timeout=30)
    (p,) = backend.pilots()
    assert (p["state"], p["reason"]) == ("ended", "terminated")


def _locked_queue(backend):
    from apbatch.backends.local import _locked

    (backend.state_dir / "queue").mkdir(parents=True, exist_ok=True)
    return _locked(backend.state_dir / "queue.lock")


def _site(tmp_path, **backend):
    """A butler repository and an APDB, and an empty distributor directory (no raw ever comes)."""
    from apbatch.script import apdb as apdb_script
    from apbatch.script import repo as repo_script

    cfg = load_config(environ={}, overrides={"root": str(tmp_path / "work"), "job": {"raw_timeout": 15},
                                              "alerts": {"sink": "file"},
                                              "backend": {"kind": "pilot", **backend}})
    repo_script.create(cfg.path(cfg.job.repo))
    repo_script.register(cfg.path(cfg.job.repo), "LSSTComCam", None, (20250610,))
    apdb_script.create(cfg)
    (tmp_path / "dist").mkdir()
    return cfg, str(tmp_path / "dist")


def test_cancel_of_a_running_item_ends_its_pilot_and_the_queue_goes_on(tmp_path):
    cfg, dist = _site(tmp_path, pilots=1, idle_timeout=5)
    backend = PilotBackend(cfg)
    first, second = [j.job_id for j in backend.submit(works_of(2, distributor=dist), token="ef" * 10)]
    assert _wait(lambda: backend.status([first])[first].state is JobState.RUNNING, timeout=60)
    (pilot,) = backend.pilots()
    assert pilot["item"] == first
    backend.cancel([first])
    assert backend.status([first])[first].state is JobState.CANCELLED
    assert _wait(lambda: backend.status([second])[second].state.finished, timeout=120)
    st = backend.status([second])[second]
    assert st.state is JobState.FAILED and st.exit_code == ExitCode.RAW_TIMEOUT  # as process-ccd: exit 3
    records = {p["pilot"]: p for p in backend.pilots()}
    assert records[pilot["pilot"]]["state"] in ("lost", "ended")  # the cancelled item's pilot is gone
    assert any(p["failed"] == 1 for p in records.values())  # a new pilot ran the second CCD


def test_status_shows_the_pilots(tmp_path):
    import socket

    from apbatch.ledger import Ledger
    from apbatch.script.status import collect_status, format_status

    cfg = config(tmp_path)
    backend = PilotBackend(cfg)
    ledger = Ledger.from_config(cfg)
    ledger.claim(works_of(1))
    ledger.close()
    (backend.state_dir / "pilots").mkdir(parents=True)
    register_pilot(backend.state_dir, {"pid": os.getpid(), "ticks": _proc_start_ticks(os.getpid()),
                                       "host": socket.gethostname(), "state": "running", "item": "pilot-7",
                                       "done": 4, "failed": 1, "started": time.time(), "rss_mib": 900.0})
    report = collect_status(cfg, backend=backend, live=False)
    (p,) = report["pilots"]
    assert (p["state"], p["item"], p["done"], p["failed"]) == ("running", "pilot-7", 4, 1)
    text = format_status(report)
    assert "pilots:" in text and f"{socket.gethostname()}-{os.getpid()}" in text and "pilot-7" in text
