"""Tests of apbatch.submitter: claim -> one batch per visit -> submit -> record, and resubmission
by compare-and-set (two concurrent resubmitters: exactly one submits each CCD), on SQLite and
on a real PostgreSQL server."""

from __future__ import annotations

import multiprocessing
from pathlib import Path

import pytest
from apbatch.ledger import Ledger
from apbatch.states import JobState, JobStatus, SubmissionState
from apbatch.submitter import Submitter, group_by_visit
from apbatch.work import CcdWork
from test_dispatcher import FakeBackend

GROUPS = ("2025-06-10T07:31:26.692", "2025-06-10T07:32:01.000")


def works(group: str = GROUPS[0], n: int = 4) -> list[CcdWork]:
    return [CcdWork("LSSTComCam", d, f"R22_S{d // 3}{d % 3}", group, 2025061000578, 20250610, "science", 30.0,
                    2, "http://127.0.0.1:8000") for d in range(n)]


class RefusingBackend(FakeBackend):
    """Refuses the visits of ``refuse`` (a scheduler error), accepts the others."""

    def __init__(self, refuse: set[str]):
        super().__init__()
        self.refuse = refuse

    def submit(self, ws, token=None):
        if ws[0].group_id in self.refuse:
            self.fail_submits = 1
        return super().submit(ws, token)


@pytest.fixture
def sqlite_url(tmp_path):
    return f"sqlite:///{tmp_path / 'ledger.sqlite3'}"


def test_group_by_visit_keeps_order():
    mixed = [works(GROUPS[0])[0], works(GROUPS[1])[0], works(GROUPS[0])[1]]
    batches = group_by_visit(mixed)
    assert [[w.key for w in b] for b in batches] == [[mixed[0].key, mixed[2].key], [mixed[1].key]]


def test_submit_new_is_one_batch_per_visit_recorded_once(sqlite_url):
    ledger, backend = Ledger.open(sqlite_url), RefusingBackend(refuse={GROUPS[1]})
    sub = Submitter(ledger, backend, clock=lambda: 100.0)
    res = sub.submit_new(works(GROUPS[0]) + works(GROUPS[1]), received_at=99.0)
    assert len(backend.batches) == 1 and len(res.jobs) == 4 and len(res.claimed) == 8
    assert len(res.errors) == 1 and "Batch job submission failed" in res.errors[0]
    rows = {(r.group_id, r.detector): r for r in ledger.rows()}
    ok, refused = rows[(GROUPS[0], 0)], rows[(GROUPS[1], 0)]
    assert (ok.state, ok.attempts, ok.backend, ok.submitted_at, ok.event_received_at) == (
        SubmissionState.PENDING, 1, "fake", 100.0, 99.0)
    assert ok.command == ("fake-job", "--config", "/night/20250610.yaml")  # what the jobs were started with
    assert (refused.state, refused.attempts, refused.job_id) == (SubmissionState.SUBMIT_FAILED, 1, None)
    # nothing twice: a second submission of the same CCDs claims nothing
    again = sub.submit_new(works(GROUPS[0]))
    assert again.claimed == [] and again.jobs == [] and len(backend.batches) == 1


def test_resubmit_is_a_new_attempt_and_stale_rows_are_left_alone(sqlite_url):
    ledger, backend = Ledger.open(sqlite_url), FakeBackend()
    sub = Submitter(ledger, backend, clock=lambda: 100.0)
    first = sub.submit_new(works()).jobs
    ledger.update_states({j.job_id: JobStatus(j.job_id, JobState.FAILED, 5) for j in first}, "fake",
                         now=150.0)
    failed = ledger.rows()
    res = sub.resubmit(failed[:3])
    assert [j.work.detector for j in res.jobs] == [0, 1, 2] and len(backend.batches) == 2
    after = ledger.rows()
    assert [(r.state, r.attempts) for r in after[:3]] == [(SubmissionState.PENDING, 2)] * 3
    assert after[0].job_history == (first[0].job_id,) and after[3].state is SubmissionState.FAILED
    # the same (now stale) view again: every compare-and-set fails, nothing is submitted
    assert sub.resubmit(failed[:3]).jobs == [] and len(backend.batches) == 2


def _resubmit_in_process(url: str, barrier, out: Path, prefix: str) -> None:
    ledger = Ledger.open(url)
    rows = ledger.rows()  # both processes read the same FAILED rows ...
    barrier.wait(30)  # ... then race
    backend = FakeBackend()
    backend._n = 1000 if prefix == "b" else 0
    jobs = Submitter(ledger, backend).resubmit(rows).jobs
    out.write_text("\n".join(f"{j.work.detector} {j.job_id}" for j in jobs))
    ledger.close()


def _two_resubmitters_race(url: str, tmp_path: Path, n: int = 30) -> None:
    ledger = Ledger.open(url)
    sub = Submitter(ledger, FakeBackend())
    jobs = sub.submit_new(works(n=n)).jobs
    ledger.update_states({j.job_id: JobStatus(j.job_id, JobState.FAILED, 5) for j in jobs}, "fake")
    ctx = multiprocessing.get_context("fork")
    barrier = ctx.Barrier(2)
    outs = [tmp_path / "a.txt", tmp_path / "b.txt"]
    procs = [ctx.Process(target=_resubmit_in_process, args=(url, barrier, out, out.stem)) for out in outs]
    for p in procs:
        p.start()
    for p in procs:
        p.join(60)
        assert p.exitcode == 0
    won = [dict(line.split() for line in out.read_text().splitlines()) if out.read_text() else {}
           for out in outs]
    assert not set(won[0]) & set(won[1]), "a CCD was resubmitted by both processes"
    assert len(won[0]) + len(won[1]) == n  # and every CCD by one of them
    rows = ledger.rows()
    assert {(r.state, r.attempts) for r in rows} == {(SubmissionState.PENDING, 2)}
    assert {str(r.detector): r.job_id for r in rows} == {**won[0], **won[1]}
    ledger.close()


def test_two_concurrent_resubmitters_sqlite_exactly_one_wins(sqlite_url, tmp_path):
    _two_resubmitters_race(sqlite_url, tmp_path)


@pytest.mark.postgres
def test_two_concurrent_resubmitters_postgresql_exactly_one_wins(postgres_url, tmp_path):
    _two_resubmitters_race(postgres_url, tmp_path)


# ---------------------------------------------------------------- crash between claim and record (issue 11)
class Crash(BaseException):
    """Stands for kill -9 at a fault point (nothing after it runs in this Submitter call)."""


def crash_at(point: str):
    def fault(where: str) -> None:
        if where == point:
            raise Crash(point)
    return fault


@pytest.mark.parametrize("point,accepted", [("claimed", False), ("submitted", True)])
def test_a_claim_whose_submitter_died_is_reconciled_before_any_resubmission(sqlite_url, point, accepted):
    ledger, backend = Ledger.open(sqlite_url), FakeBackend()
    with pytest.raises(Crash):
        Submitter(ledger, backend, clock=lambda: 100.0, fault=crash_at(point)).submit_new(works())
    rows = ledger.rows()
    assert {(r.state, r.attempts) for r in rows} == {(SubmissionState.CLAIMED, 0)}
    token = rows[0].submit_token
    assert token and all(r.unconfirmed and r.submit_token == token for r in rows)
    assert (token in backend.tokens) is accepted  # the token went to the "scheduler" with the jobs
    # the claim goes stale; the daemon's retry resubmits through Submitter.resubmit
    stale = ledger.retriable(3, claim_timeout=300.0, now=500.0)
    res = Submitter(ledger, backend, clock=lambda: 500.0).resubmit(stale)
    assert backend.finds == [token]  # asked first
    after = ledger.rows()
    if accepted:  # recorded as submitted, not run again
        assert len(backend.batches) == 1 and res.jobs == [] and len(res.recovered) == 4
        assert [r.job_id for r in after] == [j.job_id for j in backend.tokens[token]]
    else:  # nothing at the scheduler: submitted now, under a new token
        assert len(backend.batches) == 1 and len(res.jobs) == 4 and res.recovered == []
        assert {r.submit_token for r in after} != {token}
    assert {(r.state, r.attempts) for r in after} == {(SubmissionState.PENDING, 1)}
    assert ledger.unconfirmed() == []


def test_daemon_start_reconciles_every_unconfirmed_claim_at_once(sqlite_url):
    ledger, backend = Ledger.open(sqlite_url), FakeBackend()
    with pytest.raises(Crash):
        Submitter(ledger, backend, fault=crash_at("submitted")).submit_new(works(GROUPS[0]))
    with pytest.raises(Crash):
        Submitter(ledger, backend, fault=crash_at("claimed")).submit_new(works(GROUPS[1]))
    recovered, held = Submitter(ledger, backend).reconcile()  # what Dispatcher.run does first
    assert {j.work.group_id for j in recovered} == {GROUPS[0]} and len(held) == 4
    states = {(r.group_id, str(r.state)) for r in ledger.rows()}
    assert states == {(GROUPS[0], "PENDING"), (GROUPS[1], "CLAIMED")}  # the other waits for its timeout


def test_a_scheduler_that_cannot_be_asked_holds_the_resubmission(sqlite_url, caplog):
    ledger, backend = Ledger.open(sqlite_url), FakeBackend()
    with pytest.raises(Crash):
        Submitter(ledger, backend, clock=lambda: 100.0, fault=crash_at("submitted")).submit_new(works())
    backend.find_error = RuntimeError("squeue: slurm_load_jobs error: Unable to contact slurm controller")
    res = Submitter(ledger, backend, clock=lambda: 500.0).resubmit(ledger.retriable(3, now=500.0))
    assert res.jobs == [] and res.claimed == [] and len(backend.batches) == 1
    assert "cannot ask the scheduler" in caplog.text and "Unable to contact" in caplog.text
    assert {str(r.state) for r in ledger.rows()} == {"CLAIMED"}
    backend.find_error = None  # the next retry finds them
    assert len(Submitter(ledger, backend, clock=lambda: 600.0).resubmit(
        ledger.retriable(3, now=600.0)).recovered) == 4


def test_a_refused_submission_that_the_scheduler_accepted_after_all_is_recorded(sqlite_url):
    """sbatch timed out (SUBMIT_FAILED) after slurmctld had queued the array."""
    ledger = Ledger.open(sqlite_url)

    class LateAccept(FakeBackend):
        def submit(self, ws, token=None):
            super().submit(ws, token)
            raise RuntimeError("sbatch timed out after 30 s")

    backend = LateAccept()
    Submitter(ledger, backend, clock=lambda: 100.0).submit_new(works())
    assert {(str(r.state), r.attempts) for r in ledger.rows()} == {("SUBMIT_FAILED", 1)}
    res = Submitter(ledger, backend, clock=lambda: 200.0).resubmit(ledger.rows())
    assert len(res.recovered) == 4 and res.jobs == [] and len(backend.batches) == 1  # recorded, not rerun
    assert {(str(r.state), r.attempts, r.reason) for r in ledger.rows()} == {("PENDING", 1, "")}


def test_jobs_for_rows_cancelled_during_the_scheduler_call_are_cancelled(sqlite_url):
    ledger, backend = Ledger.open(sqlite_url), FakeBackend()

    def cancel_meanwhile(where: str) -> None:
        if where == "submitted":  # `apbatch cancel` lands while sbatch runs
            ledger.mark_cancelled([r.id for r in ledger.rows()[:2]], "cancelled by apbatch cancel")

    res = Submitter(ledger, backend, fault=cancel_meanwhile).submit_new(works())
    assert backend.cancelled == ["fake-1", "fake-2"]  # no job the ledger does not know keeps running
    assert [j.job_id for j in res.jobs] == ["fake-3", "fake-4"]
    assert [str(r.state) for r in ledger.rows()] == ["CANCELLED", "CANCELLED", "PENDING", "PENDING"]


def test_an_orphan_that_cannot_be_cancelled_is_logged_and_not_returned(sqlite_url, caplog):
    ledger, backend = Ledger.open(sqlite_url), FakeBackend()

    def cancel_meanwhile(where: str) -> None:
        if where == "submitted":
            ledger.mark_cancelled([ledger.rows()[0].id], "cancelled by apbatch cancel")

    def refuse(job_ids):
        raise RuntimeError("scancel: error: Kill job error on job id fake-1")

    backend.cancel = refuse
    res = Submitter(ledger, backend, fault=cancel_meanwhile).submit_new(works(n=2))
    assert [j.job_id for j in res.jobs] == ["fake-2"] and "could not cancel fake-1" in caplog.text
