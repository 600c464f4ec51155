"""Tests of apbatch.submission: the typed ledger row and its rules (retriable, lost, attention)."""

from __future__ import annotations

import dataclasses
import json

import pytest
from apbatch.states import SubmissionState as S
from apbatch.submission import Category, Submission
from apbatch.work import CcdWork

WORK = CcdWork("LSSTComCam", 4, "R22_S11", "2025-06-10T07:31:26.692", 2025061000578, 20250610, "science",
               30.0, 2, "http://127.0.0.1:8000")
RULES = {"max_attempts": 3, "claim_timeout": 300.0, "lost_after": 3600.0}


def row(state: S, **kw) -> Submission:
    base = {"id": 1, "instrument": WORK.instrument, "group_id": WORK.group_id, "detector": WORK.detector,
            "detector_name": WORK.detector_name, "visit": WORK.visit, "day_obs": WORK.day_obs,
            "intent": WORK.intent, "state": state, "attempts": 1, "retry": True, "work": WORK,
            "claimed_at": 0.0, "job_id": "42_4", "submitted_at": 10.0}
    return Submission(**{**base, **kw})


def test_from_row_decodes_json_columns_and_is_frozen():
    raw = {"id": 7, "instrument": "LSSTComCam", "group_id": WORK.group_id, "detector": 4,
           "detector_name": "R22_S11",
           "visit": WORK.visit, "day_obs": 20250610, "intent": "science", "backend": "slurm", "job_id": "9_4",
           "state": "FAILED", "exit_code": 4, "reason": None, "attempts": 2, "retry": 1,
           "job_history": '["8_4"]', "work": json.dumps(WORK.to_dict()),
           "command": '["/x/apbatch", "process-ccd"]',
           "event_received_at": 1.0, "claimed_at": 2.0, "submitted_at": 3.0, "started_at": None,
           "finished_at": 5.0, "last_polled_at": 5.0}
    r = Submission.from_row(raw)
    assert r.state is S.FAILED and r.work == WORK and r.job_history == ("8_4",) and r.retry is True
    assert r.command == ("/x/apbatch", "process-ccd") and r.reason == "" and r.key == WORK.key
    assert r.to_dict()["work"] == WORK.to_dict() and json.loads(json.dumps(r.to_dict()))["state"] == "FAILED"
    with pytest.raises(dataclasses.FrozenInstanceError):
        r.state = S.PENDING  # type: ignore[misc]


@pytest.mark.parametrize("r, now, expected", [
    (row(S.FAILED, exit_code=3), 0.0, Category.RETRY),
    (row(S.FAILED, exit_code=4), 0.0, Category.RETRY),
    (row(S.FAILED, exit_code=4, attempts=3), 0.0, Category.EXHAUSTED),
    (row(S.FAILED, exit_code=4, retry=False), 0.0, Category.FINAL),  # nextVisit cancelled
    (row(S.FAILED, exit_code=5), 0.0, Category.FINAL),
    (row(S.FAILED, exit_code=2), 0.0, Category.FINAL),
    (row(S.FAILED, exit_code=127), 0.0, Category.FINAL),  # cannot start: a person fixes job.command
    (row(S.FAILED, exit_code=None), 0.0, Category.FINAL),
    (row(S.TIMEOUT), 0.0, Category.FINAL),
    (row(S.CANCELLED), 0.0, Category.FINAL),
    (row(S.COMPLETED, exit_code=0), 0.0, Category.COMPLETED),
    (row(S.SUBMIT_FAILED, job_id=None), 0.0, Category.RETRY),
    (row(S.CLAIMED, job_id=None, attempts=0), 299.0, Category.ACTIVE),
    (row(S.CLAIMED, job_id=None, attempts=0), 301.0, Category.RETRY),
    (row(S.UNKNOWN, reason="not in the queue nor in history"), 3000.0, Category.ACTIVE),
    (row(S.UNKNOWN, reason="not in the queue nor in history"), 3611.0, Category.LOST),
    (row(S.UNKNOWN, reason="unknown state code 'XX'"), 9999.0, Category.ACTIVE),  # the job exists
    (row(S.PENDING), 0.0, Category.ACTIVE),
    (row(S.HELD), 0.0, Category.ACTIVE),
])
def test_category(r, now, expected):
    assert r.category(now=now, **RULES) is expected
    assert r.is_retriable(3, 300.0, now) == (expected is Category.RETRY)


def test_needs_attention():
    def attention(r, now=0.0):
        return r.needs_attention(max_attempts=3, now=now)

    assert attention(row(S.FAILED, exit_code=5)) and attention(row(S.TIMEOUT))
    assert attention(row(S.FAILED, exit_code=4, attempts=3))  # out of attempts
    assert attention(row(S.SUBMIT_FAILED, job_id=None))  # refused: the daemon may retry, a person looks
    assert attention(row(S.UNKNOWN, reason="gone"), now=4000.0)  # lost
    assert not attention(row(S.UNKNOWN, reason="gone"), now=100.0)
    assert not attention(row(S.CANCELLED)) and not attention(row(S.COMPLETED, exit_code=0))
    assert not attention(row(S.FAILED, exit_code=4)) and not attention(row(S.RUNNING))


def test_can_resubmit_by_hand_never_an_active_or_completed_ccd():
    yes = [row(S.FAILED, exit_code=5), row(S.FAILED, exit_code=4, attempts=3), row(S.TIMEOUT),
           row(S.CANCELLED),
           row(S.SUBMIT_FAILED, job_id=None), row(S.CLAIMED, job_id=None, claimed_at=0.0),
           row(S.UNKNOWN, reason="not in the queue nor in history")]
    no = [row(S.COMPLETED, exit_code=0), row(S.PENDING), row(S.RUNNING), row(S.HELD),
          row(S.CLAIMED, job_id=None, claimed_at=900.0), row(S.UNKNOWN, reason="unknown state code 'XX'")]
    assert [r.can_resubmit_by_hand(300.0, 1000.0) for r in yes] == [True] * len(yes)
    assert [r.can_resubmit_by_hand(300.0, 1000.0) for r in no] == [False] * len(no)
