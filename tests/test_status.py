"""Tests of apbatch.script.status (``apbatch status``): stage latencies from the ledger's stage marks.

The job states, tables and exit codes of ``status`` are tested with the other commands in
test_cli_submit.py; here the ledger rows carry stage marks (`Ledger.record_stages`) and the
report must show them per CCD and summarised per interval.
"""

from __future__ import annotations

import io
import json
from pathlib import Path

import apbatch.backends
import pytest
import yaml
from apbatch.backends.base import JobState, JobStatus
from apbatch.cli import main
from apbatch.config import load_config
from apbatch.events import TAI_MINUS_UTC, parse_event
from apbatch.fanout import fan_out
from apbatch.latency import STAGES
from apbatch.ledger import Ledger
from apbatch.script.status import CLEAR, collect_status, format_status, latency_lines, watch_status
from test_dispatcher import FakeBackend

ROOT = Path(__file__).resolve().parent.parent
NV = json.loads((ROOT / "tests" / "data" / "events" / "nextVisit_LSSTComCam.json").read_text())  # 9 CCDs
T0 = NV["private_sndStamp"] - TAI_MINUS_UTC
VISIT = 3110636353110000
# raw available -> alerts sent of detectors 0-4 (one late alert), prepare of 0-4 and of detector 5,
# which never got its raw (so it has no raw_to_alerts); detectors 6-8 recorded nothing
RAW_TO_ALERTS = (4.0, 5.0, 6.0, 8.0, 70.0)
PREPARE = (10.0, 12.0, 14.0, 16.0, 18.0, 20.0)


def marks(i: int, base: float = T0 + 10.0) -> dict[str, float]:
    """Stage marks of detector ``i`` (`RAW_TO_ALERTS`, `PREPARE`), as a job would record them."""
    m = {"started": base, "prepared": base + PREPARE[i]}
    if i < len(RAW_TO_ALERTS):
        raw = base + 30.0
        m |= {"raw_available": raw, "raw_read": raw + 0.5, "isr_done": raw + 1.5,
              "difference_done": raw + 3.0, "apdb_stored": raw + 3.5, "alerts_sent": raw + RAW_TO_ALERTS[i]}
        m["finished"] = m["alerts_sent"] + 1.0
    return m


@pytest.fixture
def env(tmp_path, monkeypatch):
    """A config file rooted in tmp_path with its (real, SQLite) ledger; make_backend patched."""
    monkeypatch.delenv("APBATCH_CONFIG", raising=False)
    cfg_file = tmp_path / "apbatch.yaml"
    cfg_file.write_text(yaml.safe_dump({"root": str(tmp_path / "work")}))
    cfg = load_config(str(cfg_file), environ={})
    backend = FakeBackend()
    monkeypatch.setattr(apbatch.backends, "make_backend", lambda config, **deps: backend)
    ledger = Ledger.open(cfg.sqlalchemy_url(cfg.ledger.url))
    yield cfg, str(cfg_file), ledger, backend
    ledger.close()


def submit(cfg, ledger: Ledger, backend: FakeBackend, payload: dict, at: float):
    works = fan_out(parse_event(payload), cfg)
    assert len(ledger.claim(works, received_at=at, now=at)) == len(works)
    jobs = backend.submit(works)
    ledger.record_submitted(jobs, "fake", now=at + 1.0)
    return works, [j.job_id for j in jobs]


def with_marks(env, states: bool = True):
    """The ComCam visit, 9 CCDs: detectors 0-5 recorded stage marks, 0-4 completed (if ``states``)."""
    cfg, _, ledger, backend = env
    works, ids = submit(cfg, ledger, backend, NV, T0)
    if states:
        done = {ids[i]: JobStatus(ids[i], JobState.COMPLETED, 0) for i in range(5)}
        assert ledger.update_states(done, "fake", now=T0 + 60.0) == 5
        backend.states.update(done)
    for i in range(6):
        assert ledger.record_stages(works[i].instrument, works[i].group_id, works[i].detector, marks(i))
    return works


def test_ccds_carry_their_marks_and_the_report_summarises_them(env):
    cfg, _, ledger, _ = env
    works = with_marks(env)
    rep = collect_status(cfg, visit=VISIT, live=False, ledger=ledger)
    ccds = {c["detector"]: c for c in rep["ccds"]}
    assert len(ccds) == 9
    first = ccds[works[0].detector]
    assert first["stages"] == marks(0) and list(first["stages"]) == list(STAGES)
    assert first["intervals"] == {"prepare": 10.0, "raw_to_read": 0.5, "read_to_isr": 1.0,
                                  "isr_to_difference": 1.5, "difference_to_apdb": 0.5,
                                  "apdb_to_alerts": 0.5, "raw_to_alerts": 4.0, "alerts_to_finished": 1.0}
    assert ccds[works[4].detector]["intervals"]["raw_to_alerts"] == 70.0
    assert ccds[works[5].detector]["intervals"] == {"prepare": 20.0}  # never got its raw
    for w in works[6:]:  # no marks recorded: empty, not missing
        assert ccds[w.detector]["stages"] == {} and ccds[w.detector]["intervals"] == {}

    lat = rep["latency"]
    # 4, 5, 6, 8, 70 s: numpy's linear p95 is 8 + 0.8 * (70 - 8)
    assert lat["raw_to_alerts"] == {"n": 5, "p50": 6.0, "p95": 57.6, "max": 70.0, "within_requirement": 0.8}
    # 10..20 s over six CCDs: p50 between 14 and 16, p95 18 + 0.75 * 2
    assert lat["prepare"] == {"n": 6, "p50": 15.0, "p95": 19.5, "max": 20.0}
    assert lat["raw_to_read"] == {"n": 5, "p50": 0.5, "p95": 0.5, "max": 0.5}
    assert list(lat) == ["prepare", "raw_to_read", "read_to_isr", "isr_to_difference", "difference_to_apdb",
                         "apdb_to_alerts", "raw_to_alerts", "alerts_to_finished"]
    assert json.loads(json.dumps(rep, default=str))["latency"] == lat

    text = format_status(rep)
    lines = text.splitlines()
    assert "stage latency (CCDs shown that recorded stage times):" in lines
    row = next(line for line in lines if line.startswith("raw_to_alerts "))
    assert row.split() == ["raw_to_alerts", "raw_available", "->", "alerts_sent", "5", "6.0", "57.6", "70.0"]
    row = next(line for line in lines if line.startswith("prepare "))
    assert row.split() == ["prepare", "started", "->", "prepared", "6", "15.0", "19.5", "20.0"]
    assert "raw available -> alerts sent: p50 6.0 s, p95 57.6 s, 80.00% of 5 within 60 s" in lines
    # the per-CCD table has each CCD's raw -> alerts, "-" without it
    header = next(line for line in lines if line.startswith("DETECTOR"))
    assert "RAW->ALERTS" in header.split()
    late = next(line for line in lines if line.split()[1:2] == [works[4].detector_name])
    assert "70.0 s" in late
    unmarked = next(line for line in lines if line.split()[1:2] == [works[8].detector_name])
    assert " - " in unmarked and " s " not in unmarked


def test_latency_is_over_the_rows_shown(env):
    cfg, _, ledger, backend = env
    with_marks(env)
    # a later visit whose two CCDs alerted in 2 s and 3 s
    later = {**NV, "groupId": "2024-11-09T06:40:55.311", "private_sndStamp": NV["private_sndStamp"] + 420.0}
    works, _ = submit(cfg, ledger, backend, later, T0 + 420.0)
    for w, sec in zip(works[:2], (2.0, 3.0), strict=True):
        ledger.record_stages(w.instrument, w.group_id, w.detector,
                             {"raw_available": T0 + 450.0, "alerts_sent": T0 + 450.0 + sec})
    both = collect_status(cfg, live=False, ledger=ledger)
    assert both["latency"]["raw_to_alerts"]["n"] == 7 and both["latency"]["raw_to_alerts"]["p50"] == 5.0
    assert "ccds" not in both  # per-CCD rows only with --visit/--group
    newest = collect_status(cfg, live=False, ledger=ledger, limit=1)
    assert [v["group_id"] for v in newest["visits"]] == [later["groupId"]]
    assert newest["latency"] == {"raw_to_alerts": {"n": 2, "p50": 2.5, "p95": 2.95, "max": 3.0,
                                                   "within_requirement": 1.0}}
    text = format_status(newest)
    assert "raw available -> alerts sent: p50 2.5 s, p95 3.0 s, 100.00% of 2 within 60 s" in text.splitlines()
    one = collect_status(cfg, group=later["groupId"], live=False, ledger=ledger)
    assert one["latency"] == newest["latency"]


def test_no_marks_no_latency_section(env):
    cfg, _, ledger, backend = env
    submit(cfg, ledger, backend, NV, T0)
    rep = collect_status(cfg, visit=VISIT, live=False, ledger=ledger)
    assert rep["latency"] == {} and all(c["stages"] == {} and c["intervals"] == {} for c in rep["ccds"])
    text = format_status(rep)
    assert "latency" not in text and "alerts sent" not in text and "PENDING=9" in text
    assert latency_lines({}) == []


def test_marks_without_raw_to_alerts_say_so():
    summary = {"prepare": {"n": 2, "p50": 9.0, "p95": 9.9, "max": 10.0}}
    assert latency_lines(summary, "  ") == [
        "  INTERVAL  FROM -> TO           N  P50 (s)  P95 (s)  MAX (s)",
        "  prepare   started -> prepared  2  9.0      9.9      10.0",
        "  raw available -> alerts sent: no CCD has both marks yet"]


def test_live_states_keep_the_marks(env):
    cfg, _, ledger, backend = env
    works = with_marks(env, states=False)  # the ledger says PENDING; the scheduler knows better
    for job_id in list(backend.states)[:5]:
        backend.states[job_id] = JobStatus(job_id, JobState.COMPLETED, 0)
    rep = collect_status(cfg, visit=VISIT, ledger=ledger, backend=backend)
    assert rep["live"] is True and rep["visits"][0]["states"] == {"COMPLETED": 5, "PENDING": 4}
    assert rep["ccds"][0]["stages"] == marks(0) and rep["ccds"][0]["detector"] == works[0].detector
    assert rep["latency"]["raw_to_alerts"]["p95"] == 57.6


def run(capsys, *args):
    with pytest.raises(SystemExit) as exc:
        main(list(args))
    out, err = capsys.readouterr()
    return exc.value.code, out, err


def test_cli_json_and_text_show_the_stages(env, capsys):
    _, cfg_file, _, _ = env
    works = with_marks(env)
    code, out, _ = run(capsys, "status", "--config", cfg_file, "--visit", str(VISIT), "--json")
    rep = json.loads(out)
    assert code == 0
    assert rep["latency"]["raw_to_alerts"] == {"n": 5, "p50": 6.0, "p95": 57.6, "max": 70.0,
                                               "within_requirement": 0.8}
    by_name = {c["detector_name"]: c for c in rep["ccds"]}
    assert by_name[works[2].detector_name]["stages"] == marks(2)
    assert by_name[works[2].detector_name]["intervals"]["raw_to_alerts"] == 6.0
    assert by_name[works[7].detector_name]["stages"] == {}
    code, out, _ = run(capsys, "status", "--config", cfg_file, "--no-live")
    assert code == 0 and "raw available -> alerts sent: p50 6.0 s, p95 57.6 s, 80.00% of 5 within 60 s" in out


# ---------------------------------------------------------------- job log paths, --watch
class LoggingBackend(FakeBackend):
    """A fake whose jobs log to ``/logs/<job id>.out``."""

    def log_path(self, job_id, work=None):
        return f"/logs/{work.detector_name}/{job_id}.out"


def test_failed_and_running_ccds_name_their_job_log(env):
    cfg, _, ledger, _ = env
    backend = LoggingBackend()
    works, ids = submit(cfg, ledger, backend, NV, T0)
    ledger.update_states({ids[0]: JobStatus(ids[0], JobState.FAILED, 5, "after APDB store"),
                          ids[1]: JobStatus(ids[1], JobState.RUNNING),
                          ids[2]: JobStatus(ids[2], JobState.COMPLETED, 0)}, "fake", now=T0 + 30)
    rep = collect_status(cfg, visit=VISIT, live=False, ledger=ledger, backend=backend)
    logs = {c["detector"]: c["log_path"] for c in rep["ccds"]}
    assert logs[works[0].detector] == f"/logs/{works[0].detector_name}/{ids[0]}.out"
    assert logs[works[1].detector] == f"/logs/{works[1].detector_name}/{ids[1]}.out"
    assert all(logs[w.detector] is None for w in works[2:])  # completed or still pending
    assert [c["log_path"] for c in rep["attention"]] == [logs[works[0].detector]]
    lines = format_status(rep).splitlines()
    at = lines.index("job logs (failed and running CCDs):")
    assert lines[at + 1].split() == [works[0].detector_name, "FAILED", logs[works[0].detector]]
    assert lines[at + 2].split() == [works[1].detector_name, "RUNNING", logs[works[1].detector]]
    overview = format_status(collect_status(cfg, live=False, ledger=ledger, backend=backend))
    assert f"  log: {logs[works[0].detector]}" in overview.splitlines()  # under "needs attention"
    other = collect_status(cfg, visit=VISIT, live=False, ledger=ledger, backend=FakeBackend())
    assert all(c["log_path"] is None for c in other["ccds"])  # a backend that cannot tell


def reports(env, n: int):
    """``n`` reports of the visit: the first two identical, then one more CCD running each time."""
    cfg, _, ledger, backend = env
    _, ids = submit(cfg, ledger, backend, NV, T0)
    out = []
    for i in range(n):
        running = max(0, i - 1)
        ledger.update_states({j: JobStatus(j, JobState.RUNNING) for j in ids[:running]}, "fake", now=T0 + i)
        out.append(collect_status(cfg, visit=VISIT, live=False, ledger=ledger))
    return out


def test_watch_off_a_terminal_prints_a_snapshot_only_when_something_changed(env):
    snapshots = iter(reports(env, 4))
    slept: list[float] = []
    out = io.StringIO()
    code = watch_status(lambda: next(snapshots), 3.0, out=out, is_tty=False, sleep=slept.append,
                        clock=lambda: T0, iterations=4)
    text = out.getvalue()
    assert code == 0 and slept == [3.0, 3.0, 3.0] and "\x1b" not in text
    heads = [line for line in text.splitlines() if line.startswith("Every 3s: apbatch status")]
    assert len(heads) == 3  # snapshot 2 equals snapshot 1: not printed again
    assert "PENDING=9" in text and "PENDING=8 RUNNING=1" in text and "PENDING=7 RUNNING=2" in text


def test_watch_on_a_terminal_redraws_and_ctrl_c_exits_0(env):
    snapshots = iter(reports(env, 2))
    calls = []

    def sleep(sec):
        calls.append(sec)
        if len(calls) == 2:
            raise KeyboardInterrupt

    out = io.StringIO()
    code = watch_status(lambda: next(snapshots), 1.5, out=out, is_tty=True, sleep=sleep, clock=lambda: T0)
    assert code == 0 and calls == [1.5, 1.5]
    assert out.getvalue().count(CLEAR) == 2  # the same view drawn twice: a terminal always redraws


def test_cli_watch_json_until_ctrl_c(env, capsys, monkeypatch):
    import apbatch.script.status as status_mod

    _, cfg_file, _, _ = env
    with_marks(env)
    real = status_mod.watch_status
    seen = {}

    def interrupted_after_two(collect, interval, **kw):
        seen["interval"] = interval

        def sleep(sec):
            if seen.setdefault("sleeps", 0) >= 1:
                raise KeyboardInterrupt
            seen["sleeps"] += 1

        return real(collect, interval, sleep=sleep, **kw)

    monkeypatch.setattr(status_mod, "watch_status", interrupted_after_two)
    code, out, _ = run(capsys, "status", "--config", cfg_file, "--visit", str(VISIT), "--json", "--watch")
    assert code == 0 and seen["interval"] == 2.0
    docs = out.strip().split("\n}\n")
    assert len(docs) == 1 and json.loads(out)["visits"][0]["states"] == {"COMPLETED": 5, "PENDING": 4}
    code, out, _ = run(capsys, "status", "--config", cfg_file, "--watch", "0.5", "--no-live")
    assert code == 0 and seen["interval"] == 0.5 and "needs attention" not in out


def test_calibration_verification_is_shown_per_ccd(env, capsys):
    """A flat's verification verdicts: counted, each failed amp named with its metrics, in --json too."""
    cfg, cfg_file, ledger, backend = env
    payload = json.loads((ROOT / "tests" / "data" / "events" / "calib_flat_LSSTComCam.json").read_text())
    works, _ = submit(cfg, ledger, backend, payload, T0)
    assert len(works) == 9
    bad = {"passed": False, "failed_amps": {"C03": ["flat_level"], "C14": ["bias_level", "read_noise"]}}
    for w in works:
        assert ledger.record_verification(w.instrument, w.group_id, w.detector,
                                          bad if w.detector == 4 else {"passed": True, "failed_amps": {}})
    rep = collect_status(cfg, ledger=ledger, backend=backend)
    assert len(rep["calibrations"]) == 9
    (failed,) = [c for c in rep["calibrations"] if not c["passed"]]
    assert failed["detector_name"] == "R22_S11" and failed["failed_amps"] == bad["failed_amps"]
    text = format_status(rep)
    assert "calibration verification: 8 passed, 1 failed" in text
    assert "C03: flat_level; C14: bias_level, read_noise" in text
    with pytest.raises(SystemExit):
        main(["status", "--config", cfg_file, "--json", "--group", works[0].group_id])
    out = json.loads(capsys.readouterr().out)
    assert [c["verification"]["passed"] for c in out["ccds"]].count(False) == 1
