"""Tests of apbatch.ledger: idempotent claims, submissions, states, events, dead letters."""

from __future__ import annotations

import concurrent.futures
import json
import multiprocessing
from pathlib import Path

import pytest
import sqlalchemy as sa
from apbatch.backends.base import JobState, JobStatus, SubmittedJob
from apbatch.errors import BadInputError
from apbatch.ledger import CLAIMED, SUBMIT_FAILED, Ledger
from apbatch.work import CcdWork

GROUP = "2025-06-10T07:31:26.692"


def works(n: int = 5, group: str = GROUP, instrument: str = "LSSTCam", visit: int = 3294702866920000):
    return [CcdWork(instrument=instrument, detector=d, detector_name=f"D{d:03d}", group_id=group, visit=visit,
                    day_obs=20250609, intent="science", exposure_time=30.0, nimages=1, distributor="/d",
                    ra=1.0, dec=2.0, rotation=3.0, physical_filter="r_57") for d in range(n)]


@pytest.fixture
def url(tmp_path):
    return f"sqlite:///{tmp_path}/sub/ledger.sqlite3"


@pytest.fixture
def ledger(url):
    led = Ledger.open(url)
    yield led
    led.close()


def submit(ledger, ws, backend="fake", prefix="j", now=100.0):
    jobs = [SubmittedJob(w, f"{prefix}{w.detector}") for w in ws]
    ledger.record_submitted(jobs, backend, now=now)
    return jobs


def test_claim_once(ledger):
    ws = works(5)
    assert ledger.claim(ws, received_at=1.0, now=2.0) == ws
    assert ledger.claim(ws) == []
    more = works(8)
    assert [w.detector for w in ledger.claim(more)] == [5, 6, 7]
    rows = ledger.rows(group_id=GROUP)
    assert len(rows) == 8 and all(r.state == CLAIMED and r.attempts == 0 for r in rows)
    assert rows[0].event_received_at == 1.0 and rows[0].claimed_at == 2.0
    assert rows[0].work == ws[0]


def test_claim_survives_restart(url):
    first = Ledger.open(url)
    assert len(first.claim(works(3))) == 3
    first.close()
    second = Ledger.open(url)
    assert second.claim(works(3)) == []
    assert len(second.claim(works(3, group="2025-06-10T07:32:00.000"))) == 3
    second.close()


def _claim_in_process(url: str) -> int:
    led = Ledger.open(url)
    try:
        return len(led.claim(works(189)))
    finally:
        led.close()


def test_concurrent_claims_across_processes(url):
    Ledger.open(url).close()
    ctx = multiprocessing.get_context("fork")  # the parent holds no open connection
    with concurrent.futures.ProcessPoolExecutor(4, mp_context=ctx) as pool:
        counts = list(pool.map(_claim_in_process, [url] * 4))
    assert sum(counts) == 189 and sorted(counts)[-1] == 189


def test_sqlite_wal_and_busy_timeout(ledger):
    with ledger.engine.connect() as conn:
        assert conn.exec_driver_sql("PRAGMA journal_mode").scalar() == "wal"
        assert conn.exec_driver_sql("PRAGMA busy_timeout").scalar() == 30000


def test_bad_url():
    with pytest.raises(BadInputError, match="ledger.url"):
        Ledger.open("not a url")


def test_unsupported_database():
    engine = sa.create_engine("sqlite://")
    engine.dialect.name = "oracle"
    with pytest.raises(BadInputError, match="ledger.url: database 'oracle' is not supported"):
        Ledger(engine)


# ---------------------------------------------------- a ledger that cannot be opened: one line, code 2
def _open_error(url: str, create: bool = True) -> str:
    with pytest.raises(BadInputError) as info:
        Ledger.open(url, create=create)
    message = str(info.value)
    assert message.startswith("ledger.url: ") and "\n" not in message and "secret" not in message
    return message


@pytest.mark.parametrize("url", ["mysql://u:secret@localhost/db", "oracle://u:secret@h/db", "mssql://u:secret@h/db"])
def test_unsupported_database_url(url):
    assert "is not supported" in _open_error(url) and "postgresql://" in _open_error(url)


def test_postgresql_driver_unknown():
    assert "cannot use postgresql+nodriver://u:***@" in _open_error("postgresql+nodriver://u:secret@127.0.0.1/db")


def test_ledger_path_under_a_regular_file(tmp_path):
    (tmp_path / "plain").write_text("not a directory")
    message = _open_error(f"sqlite:///{tmp_path}/plain/sub/ledger.sqlite3")
    assert "cannot make the directory" in message and "writable directory" in message
    assert (tmp_path / "plain").read_text() == "not a directory"


def test_ledger_path_that_is_a_directory(tmp_path):
    (tmp_path / "dir.sqlite3").mkdir()
    assert "unable to open database file" in _open_error(f"sqlite:///{tmp_path}/dir.sqlite3")


def test_read_only_ledger_is_refused_by_writers_only(url):
    led = Ledger.open(url)
    led.claim(works(2))
    led.close()
    read_only = f"sqlite:///file:{url.removeprefix('sqlite:///')}?mode=ro&uri=true"
    assert "readonly" in _open_error(read_only)  # a writer learns it at start-up, not at the first claim
    reader = Ledger.open(read_only, create=False)  # status and reports may still read it
    assert len(reader.rows()) == 2
    reader.close()


def test_unreachable_postgresql_is_bad_input():
    from conftest import free_port

    url = f"postgresql+psycopg2://apbatch:secret@127.0.0.1:{free_port()}/ledger"
    for create in (True, False):
        message = _open_error(url, create=create)
        assert "cannot open the ledger at postgresql+psycopg2://apbatch:***@127.0.0.1" in message
        assert "server is running" in message


def test_cli_exits_2_with_one_line_when_the_ledger_cannot_be_made(tmp_path, monkeypatch, capsys):
    from apbatch.cli import main

    (tmp_path / "plain").write_text("")
    monkeypatch.delenv("APBATCH_CONFIG", raising=False)
    monkeypatch.setenv("APBATCH_ROOT", str(tmp_path / "work"))
    monkeypatch.setenv("APBATCH_LEDGER__URL", f"sqlite:///{tmp_path}/plain/ledger.sqlite3")
    event = Path(__file__).parent / "data" / "events" / "nextVisit_LSSTComCam.json"
    with pytest.raises(SystemExit) as info:
        main(["submit", str(event)])
    err = [line for line in capsys.readouterr().err.splitlines() if line.strip()]
    assert info.value.code == 2 and len(err) == 1 and err[0].startswith("error: ledger.url: cannot make")
    assert list(tmp_path.rglob("*.sqlite3*")) == []  # nothing half-written


def test_record_submitted_and_states(ledger):
    ws = works(3)
    ledger.claim(ws)
    submit(ledger, ws, now=100.0)
    rows = ledger.rows(group_id=GROUP)
    assert [r.job_id for r in rows] == ["j0", "j1", "j2"]
    assert all(r.state == "PENDING" and r.attempts == 1 and r.backend == "fake"
               and r.submitted_at == 100.0 for r in rows)
    assert ledger.unfinished_job_ids("fake") == ["j0", "j1", "j2"]
    assert ledger.unfinished_job_ids("slurm") == []

    ledger.update_states({"j0": JobStatus("j0", JobState.RUNNING), "j1": JobStatus("j1", JobState.RUNNING)},
                         "fake", now=110.0)
    ledger.update_states({"j0": JobStatus("j0", JobState.COMPLETED, 0),
                          "j1": JobStatus("j1", JobState.COMPLETED, 4, "exit 4"),
                          "j2": JobStatus("j2", JobState.HELD, None, "held by admin")}, "fake", now=120.0)
    by = {r.job_id: r for r in ledger.rows(group_id=GROUP)}
    assert (by["j0"].state, by["j0"].started_at, by["j0"].finished_at) == ("COMPLETED", 110.0, 120.0)
    assert by["j1"].state == "FAILED" and by["j1"].exit_code == 4  # COMPLETED + non-zero exit = FAILED
    assert by["j2"].state == "HELD" and by["j2"].reason == "held by admin"
    assert by["j2"].started_at is None and by["j2"].last_polled_at == 120.0
    # a finished row is not changed by a later report, and another backend's job ids are not touched
    assert ledger.update_states({"j0": JobStatus("j0", JobState.RUNNING)}, "fake", now=130.0) == 0
    assert ledger.update_states({"j2": JobStatus("j2", JobState.RUNNING)}, "slurm", now=130.0) == 0
    assert ledger.unfinished_job_ids("fake") == ["j2"]


def test_retriable(ledger):
    ws = works(6)
    ledger.claim(ws, now=1000.0)
    submit(ledger, ws[:4])
    ledger.update_states({
        "j0": JobStatus("j0", JobState.FAILED, 4), "j1": JobStatus("j1", JobState.FAILED, 3),
        "j2": JobStatus("j2", JobState.FAILED, 5), "j3": JobStatus("j3", JobState.COMPLETED, 0)}, "fake")
    ledger.record_submit_failed([ws[4]], "sbatch: error: queue full")
    # ws[5] is still CLAIMED: retried only once its claim is older than the claim timeout
    assert [w.detector for w in ledger.retriable(3, claim_timeout=300, now=1100.0)] == [0, 1, 4]
    assert [w.detector for w in ledger.retriable(3, claim_timeout=300, now=1400.0)] == [0, 1, 4, 5]
    assert ledger.rows(detector=4)[0].state == SUBMIT_FAILED
    assert "queue full" in ledger.rows(detector=4)[0].reason
    # attempts count: one submission each so far -> none left with max_attempts=1
    assert [w.detector for w in ledger.retriable(1, now=1100.0)] == []
    ledger.disable_retry(GROUP)
    assert ledger.retriable(3, now=1400.0) == []


def _failed_retriably(ledger, n=4):
    ws = works(n)
    ledger.claim(ws, now=1000.0)
    submit(ledger, ws)
    failed = {f"j{w.detector}": JobStatus(f"j{w.detector}", JobState.FAILED, 4) for w in ws}
    ledger.update_states(failed, "fake")
    return ws


def test_claim_retriable_hands_each_ccd_to_one_process(ledger, url):
    _failed_retriably(ledger)
    other = Ledger.open(url)  # a second process: night reprocess next to the daemon
    try:
        read_by_other = other.rows(group_id=GROUP)
        first = ledger.claim_retriable(3, now=1100.0)
        assert [w.detector for w in first] == [0, 1, 2, 3]
        assert {r.state for r in ledger.rows(group_id=GROUP)} == {"CLAIMED"}
        # the other process read the rows before the claim: its compare-and-set wins nothing
        assert other.reclaim(read_by_other, now=1100.5) == []
        assert other.claim_retriable(3, now=1101.0) == []
    finally:
        other.close()
    # recorded as submitted, the claim ends; a new failure makes them retriable again
    submit(ledger, [r.work for r in first], prefix="k", now=1102.0)
    assert {r.state for r in ledger.rows(group_id=GROUP)} == {"PENDING"}
    assert [r.attempts for r in ledger.rows(group_id=GROUP)] == [2, 2, 2, 2]


def test_reclaim_of_a_stale_claim_is_won_once(ledger):
    ws = works(2)
    ledger.claim(ws, now=1000.0)  # claimed, never submitted (the daemon died)
    rows = ledger.rows(group_id=GROUP)
    assert ledger.reclaim(rows, now=2000.0) == [r.id for r in rows]
    # the same stale view again (a second process): claimed_at changed, so nothing is won
    assert ledger.reclaim(rows, now=2000.5) == []
    assert [r.claimed_at for r in ledger.rows(group_id=GROUP)] == [2000.0, 2000.0]


def test_resubmission_keeps_history(ledger):
    ws = works(1)
    ledger.claim(ws)
    submit(ledger, ws, prefix="a")
    ledger.update_states({"a0": JobStatus("a0", JobState.FAILED, 3)}, "fake")
    submit(ledger, ws, prefix="b", now=200.0)
    row = ledger.rows(detector=0)[0]
    assert row.job_id == "b0" and row.attempts == 2 and row.state == "PENDING"
    assert row.exit_code is None and row.finished_at is None
    assert row.job_history == ("a0",)


def test_mark_cancelled_and_visits(ledger):
    ws = works(4)
    other = works(2, group="2025-06-10T07:40:00.000", visit=3294703200000000)
    ledger.claim(ws, now=10.0)
    ledger.claim(other, now=20.0)
    submit(ledger, ws)
    ids = [r.id for r in ledger.rows(group_id=GROUP, detector=1)]
    ledger.mark_cancelled(ids, "by test", now=50.0)
    row = ledger.rows(detector=1, group_id=GROUP)[0]
    assert row.state == "CANCELLED" and not row.retry and row.finished_at == 50.0
    summary = ledger.visits()
    assert [v["group_id"] for v in summary] == ["2025-06-10T07:40:00.000", GROUP]  # newest first
    assert summary[1]["states"] == {"CANCELLED": 1, "PENDING": 3} and summary[1]["ccds"] == 4
    assert summary[0]["states"] == {CLAIMED: 2}
    assert ledger.rows(visit=3294703200000000, states=[CLAIMED])[0].detector == 0
    assert ledger.visits(instrument="LATISS") == []


def test_group_id_with_shell_metacharacters_stored_verbatim(ledger):
    nasty = "x'; DROP TABLE submissions; -- $(touch /tmp/p) `id` \"|&> é"
    ws = works(2, group=nasty)
    assert ledger.claim(ws) == ws
    assert ledger.claim(ws) == []
    assert {r.group_id for r in ledger.rows(group_id=nasty)} == {nasty}
    assert len(ledger.rows()) == 2  # the table is still there


def test_events_and_dead_letters(ledger):
    payload = {"kind": "nextVisit", "groupId": GROUP, "position": [1, 2]}
    ledger.record_event("nextVisit", payload, instrument="LSSTCam", group_id=GROUP, accepted=False,
                        reason="dome")
    assert ledger.find_event("nextVisit", "LSSTCam", GROUP) is None  # rejected events are not used
    ledger.record_event("nextVisit", payload, instrument="LSSTCam", group_id=GROUP, accepted=True, source="s")
    ledger.record_event("nextVisit", {**payload, "nimages": 2}, instrument="LSSTCam", group_id=GROUP,
                        accepted=True)
    assert json.loads(ledger.find_event("nextVisit", "LSSTCam", GROUP))["nimages"] == 2  # latest wins
    assert ledger.find_event("nextVisit", "LATISS", GROUP) is None
    assert [e["accepted"] for e in ledger.event_rows("nextVisit")] == [False, True, True]
    ledger.record_dead_letter(b'{"broken', "event: malformed JSON", "spool:x.json#0", received_at=5.0)
    dead = ledger.dead_letter_rows()
    assert dead == [{"id": 1, "received_at": 5.0, "source": "spool:x.json#0",
                     "error": "event: malformed JSON",
                         "payload": '{"broken'}]


def test_claim_of_nothing(ledger):
    assert ledger.claim([]) == []
    ledger.record_submitted([], "fake")
    ledger.record_submit_failed([], "x")
    assert ledger.update_states({}, "fake") == 0


def test_readers_never_create_a_ledger(tmp_path, url):
    missing = tmp_path / "no" / "ledger.sqlite3"
    with pytest.raises(BadInputError, match=f"no ledger at {missing}.*ledger.url"):
        Ledger.open(f"sqlite:///{missing}", create=False)
    assert not (tmp_path / "no").exists()
    Ledger.open(url).close()
    Ledger.open(url, create=False).close()  # an existing one opens


def test_ledger_of_an_older_version_gains_the_command_column(url):
    led = Ledger.open(url)
    led.claim(works(1))
    with led.engine.begin() as conn:
        conn.exec_driver_sql("ALTER TABLE submissions DROP COLUMN command")
    led.close()
    led = Ledger.open(url, create=False)
    try:
        assert led.rows()[0].command == ()
        submit(led, works(1))
        led.record_submitted([SubmittedJob(works(1)[0], "j9")], "fake", command=["/venv/bin/apbatch", "x"])
        assert led.rows()[0].command == ("/venv/bin/apbatch", "x")
    finally:
        led.close()


def _count_updates(ledger):
    seen = []
    sa.event.listen(ledger.engine, "before_cursor_execute",
                    lambda conn, cur, stmt, params, ctx, many: seen.append(stmt.split()[0]))
    return seen


def test_bulk_state_updates_are_one_statement_per_batch(ledger):
    ws = works(450)
    ledger.claim(ws)
    submit(ledger, ws)
    seen = _count_updates(ledger)
    statuses = {f"j{d}": JobStatus(f"j{d}", *((JobState.RUNNING, None) if d % 2 else (JobState.COMPLETED, 0)))
                for d in range(450)}
    assert ledger.update_states(statuses, "fake", now=500.0) == 450
    assert seen.count("UPDATE") == 3  # 450 jobs in batches of 200
    rows = ledger.rows()
    odd, even = [r for r in rows if r.detector % 2], [r for r in rows if not r.detector % 2]
    assert {(r.state, r.started_at, r.finished_at) for r in odd} == {("RUNNING", 500.0, None)}
    assert {(r.state, r.exit_code, r.finished_at) for r in even} == {("COMPLETED", 0, 500.0)}
    seen.clear()
    assert len(ledger.reclaim(rows[:250], now=600.0)) == 250 and seen.count("UPDATE") == 2
    seen.clear()
    ledger.record_submit_failed([r.work for r in rows[:250]], "refused")
    assert seen.count("UPDATE") == 1  # one visit


# ----------------------------------------------------------------------- PostgreSQL (scale tier)
@pytest.mark.postgres
def test_postgresql_claims_and_reclaims_once_across_processes(postgres_url):
    """The same guarantees on a real PostgreSQL server: every CCD claimed once by 4 processes,
    and a failed CCD won by exactly one of two processes resubmitting it."""
    Ledger.open(postgres_url).close()
    ctx = multiprocessing.get_context("fork")
    with concurrent.futures.ProcessPoolExecutor(4, mp_context=ctx) as pool:
        counts = list(pool.map(_claim_in_process, [postgres_url] * 4))
    assert sum(counts) == 189 and sorted(counts)[-1] == 189
    led = Ledger.open(postgres_url)
    try:
        ws = works(189)[:4]
        submit(led, ws)
        led.update_states({f"j{w.detector}": JobStatus(f"j{w.detector}", JobState.FAILED, 4) for w in ws},
                          "fake")
        read_by_other = [r for r in led.rows(group_id=GROUP) if r.state == "FAILED"]
        assert len(read_by_other) == 4
        other = Ledger.open(postgres_url)
        try:
            assert [w.detector for w in led.claim_retriable(3, now=5000.0)] == [0, 1, 2, 3]
            assert other.reclaim(read_by_other, now=5000.5) == []
        finally:
            other.close()
        assert led.engine.dialect.name == "postgresql"
    finally:
        led.close()


@pytest.mark.postgres
def test_postgresql_bulk_updates_and_reader(postgres_url):
    """The CASE-based state update and UPDATE ... RETURNING reclaim on a real server; a reader
    refuses an empty database."""
    with pytest.raises(BadInputError, match="no ledger at"):
        Ledger.open(postgres_url, create=False)
    led = Ledger.open(postgres_url)
    try:
        ws = works(5)
        led.claim(ws)
        submit(led, ws)
        changed = led.update_states({"j0": JobStatus("j0", JobState.COMPLETED, 4),
                                     "j1": JobStatus("j1", JobState.RUNNING),
                                     "j2": JobStatus("j2", JobState.FAILED, 127)}, "fake", now=700.0)
        by = {r.job_id: r for r in led.rows()}
        assert changed == 3
        assert (by["j0"].state, by["j0"].exit_code, by["j0"].reason) == ("FAILED", 4, "exit code 4")
        assert by["j1"].started_at == 700.0 and by["j1"].exit_code is None
        assert by["j2"].reason.startswith("cannot start") and by["j3"].state == "PENDING"
        assert led.reclaim([by["j0"], by["j2"]], now=800.0) == sorted([by["j0"].id, by["j2"].id])
        assert led.reclaim([by["j0"]], now=801.0) == []
    finally:
        led.close()


# ---------------------------------------------------------------- submission tokens (issue 11, High 2)
def test_claim_and_reclaim_store_the_visits_token_before_any_submission(ledger):
    ws = works(3)
    ledger.claim(ws, now=10.0, tokens={("LSSTCam", GROUP): "aaaa0000aaaa0000aaaa"})
    rows = ledger.rows()
    assert {r.submit_token for r in rows} == {"aaaa0000aaaa0000aaaa"} and all(r.unconfirmed for r in rows)
    assert [r.id for r in ledger.unconfirmed()] == [r.id for r in rows]
    won = ledger.reclaim(rows[:2], now=400.0, tokens={("LSSTCam", GROUP): "bbbb0000bbbb0000bbbb"})
    assert [r.submit_token for r in ledger.rows()] == ["bbbb0000bbbb0000bbbb"] * 2 + ["aaaa0000aaaa0000aaaa"]
    assert won == [rows[0].id, rows[1].id]
    ledger.claim(works(1, group="g2", visit=7), now=10.0)  # no token (an older caller): never unconfirmed
    assert not ledger.rows(group_id="g2")[0].unconfirmed and len(ledger.unconfirmed()) == 3


def test_record_submitted_under_a_token_is_a_compare_and_set(ledger):
    ws = works(3)
    ledger.claim(ws, now=10.0, tokens={("LSSTCam", GROUP): "aaaa0000aaaa0000aaaa"})
    jobs = [SubmittedJob(w, f"7_{w.detector}") for w in ws]
    assert ledger.record_submitted(jobs, "fake", now=20.0, token="bbbb0000bbbb0000bbbb") == 0  # not its claim
    assert ledger.record_submitted(jobs, "fake", now=20.0, token="aaaa0000aaaa0000aaaa") == 3
    # a second recording of the same claim (the submitter and a reconciliation) counts once
    assert ledger.record_submitted(jobs, "fake", now=30.0, token="aaaa0000aaaa0000aaaa") == 0
    assert {(r.state, r.attempts, r.submitted_at) for r in ledger.rows()} == {("PENDING", 1, 20.0)}
    assert ledger.unconfirmed() == []
    # a refused submission keeps its token: the scheduler may have accepted it after all
    ledger.claim(works(2, group="g2", visit=7), now=10.0, tokens={("LSSTCam", "g2"): "cccc0000cccc0000cccc"})
    ledger.record_submit_failed(works(2, group="g2", visit=7), "sbatch timed out")
    assert [(r.state, r.submit_token) for r in ledger.unconfirmed()] == [
        ("SUBMIT_FAILED", "cccc0000cccc0000cccc")] * 2


def test_mark_cancelled_never_relabels_a_finished_row(ledger):
    ws = works(4)
    ledger.claim(ws, now=10.0)
    jobs = submit(ledger, ws)
    ledger.update_states({"j0": JobStatus("j0", JobState.COMPLETED, 0),
                          "j1": JobStatus("j1", JobState.FAILED, 4)}, "fake", now=20.0)
    ids = [r.id for r in ledger.rows()]
    assert ledger.mark_cancelled(ids, "first cancel", now=30.0) == ids[2:]
    assert ledger.mark_cancelled(ids, "second cancel", now=40.0) == []
    rows = ledger.rows()
    assert [(r.state, r.retry, r.reason) for r in rows] == [
        ("COMPLETED", True, ""), ("FAILED", True, ""), ("CANCELLED", False, "first cancel"),
        ("CANCELLED", False, "first cancel")]
    assert rows[2].finished_at == 30.0 and len(jobs) == 4 and ledger.mark_cancelled([], "x") == []


def test_sqlite_ledger_file_is_not_world_readable(url, tmp_path):
    import os
    import stat

    path = tmp_path / "sub" / "ledger.sqlite3"
    old = os.umask(0o022)
    try:
        led = Ledger.open(url)
        led.claim(works(1))
        assert stat.S_IMODE(path.stat().st_mode) == 0o640
        for extra in (path.with_name(path.name + "-wal"), path.with_name(path.name + "-shm")):
            if extra.exists():
                assert stat.S_IMODE(extra.stat().st_mode) & 0o007 == 0
        led.close()
        path.chmod(0o666)  # a ledger made by an older version: tightened on the next open
        led = Ledger.open(url, create=False)
        led.rows()
        assert stat.S_IMODE(path.stat().st_mode) == 0o640
        led.close()
    finally:
        os.umask(old)


def test_stage_times_are_recorded_on_the_row_and_read_back(ledger, url):
    ws = works(2)
    ledger.claim(ws)
    submit(ledger, ws)
    stages = {"started": 10.0, "prepared": 12.5, "raw_available": 30.0, "alerts_sent": 36.0}
    assert ledger.record_stages(ws[1].instrument, ws[1].group_id, ws[1].detector, stages)
    assert not ledger.record_stages(ws[1].instrument, ws[1].group_id, 99, stages)  # a job run by hand
    rows = {r.detector: r for r in Ledger.open(url, create=False).rows()}
    assert rows[1].stages == stages and rows[0].stages == {}
    assert rows[1].to_dict()["stages"] == stages
    # a rerun's marks replace the earlier attempt's
    ledger.record_stages(ws[1].instrument, ws[1].group_id, 1, {"started": 50.0})
    assert ledger.rows(detector=1)[0].stages == {"started": 50.0}


def test_older_ledger_gains_the_stages_column(tmp_path):
    url = f"sqlite:///{tmp_path}/old.sqlite3"
    Ledger.open(url).close()
    eng = sa.create_engine(url)
    with eng.begin() as conn:
        conn.exec_driver_sql("ALTER TABLE submissions DROP COLUMN stages")
    led = Ledger.open(url, create=False)
    ws = works(1)
    led.claim(ws)
    assert led.record_stages(ws[0].instrument, ws[0].group_id, 0, {"started": 1.0})
    assert led.rows()[0].stages == {"started": 1.0}


def test_calibration_verdict_is_recorded_and_older_ledgers_gain_the_column(tmp_path):
    url = f"sqlite:///{tmp_path}/old.sqlite3"
    Ledger.open(url).close()
    with sa.create_engine(url).begin() as conn:
        conn.exec_driver_sql("ALTER TABLE submissions DROP COLUMN verification")
    led = Ledger.open(url, create=False)
    ws = works(2)
    led.claim(ws)
    verdict = {"passed": False, "exposures": ["CC_C_20251015_000001"],
               "failed_amps": {"C03": ["bias_offset"]},
               "metrics": {"bias_offset": {"amp": "C03", "value": 1005.5, "threshold": 5.0}}}
    assert led.record_verification(ws[1].instrument, ws[1].group_id, ws[1].detector, verdict)
    assert not led.record_verification(ws[1].instrument, ws[1].group_id, 99, verdict)  # run by hand
    rows = {r.detector: r for r in led.rows()}
    assert rows[1].verification == verdict and rows[0].verification is None
    assert rows[1].to_dict()["verification"] == verdict and rows[0].to_dict()["verification"] is None


def test_older_ledger_gains_the_events_day_obs_column(tmp_path):
    """Events recorded before the column have no night; they are found by when they arrived."""
    url = f"sqlite:///{tmp_path}/old.sqlite3"
    Ledger.open(url).close()
    eng = sa.create_engine(url)
    with eng.begin() as conn:
        conn.exec_driver_sql("DROP INDEX IF EXISTS ix_events_day_obs")
        conn.exec_driver_sql("ALTER TABLE events DROP COLUMN day_obs")
        conn.exec_driver_sql("INSERT INTO events (received_at, kind, instrument, group_id, source, accepted,"
                             " reason, payload) VALUES (100.0, 'nextVisit', '', 'old', '', 1, '', '{}')")
    led = Ledger.open(url, create=False)
    led.record_event("nextVisit", {}, group_id="new", accepted=True, received_at=5000.0, day_obs=20251015)
    assert [r["group_id"] for r in led.event_rows(day_obs=20251015, received_from=0.0,
                                                   received_before=200.0)] == ["old", "new"]
    assert [r["group_id"] for r in led.event_rows(day_obs=20251016, received_from=4000.0,
                                                   received_before=6000.0)] == []
