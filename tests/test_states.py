"""Tests of apbatch.states: the job-state rules, written once."""

from __future__ import annotations

import pytest
from apbatch.backends import JobState as ReexportedJobState
from apbatch.backends.base import JobStatus as ReexportedJobStatus
from apbatch.errors import ExitCode
from apbatch.ledger_schema import NOT_STARTED, UNFINISHED
from apbatch.states import (
    JobState,
    JobStatus,
    SubmissionState,
    is_retriable_exit,
    start_failure_reason,
)


def test_job_states_are_reexported_from_the_backends():
    assert ReexportedJobState is JobState and ReexportedJobStatus is JobStatus


@pytest.mark.parametrize("state, code, expected, reason", [
    (JobState.COMPLETED, 0, JobState.COMPLETED, ""),
    (JobState.COMPLETED, None, JobState.COMPLETED, ""),
    (JobState.COMPLETED, 4, JobState.FAILED, "exit code 4"),  # a non-zero exit is never success
    (JobState.COMPLETED, 137, JobState.FAILED, "exit code 137"),
    (JobState.FAILED, 5, JobState.FAILED, ""),
    (JobState.RUNNING, None, JobState.RUNNING, ""),
])
def test_settled_non_zero_exit_is_failed(state, code, expected, reason):
    st = JobStatus("1", state, code).settled()
    assert (st.state, st.exit_code, st.reason) == (expected, code, reason)
    assert st.settled() == st  # idempotent


@pytest.mark.parametrize("code, why", [(127, "was not found"), (126, "is not executable")])
def test_settled_says_why_a_job_could_not_start(code, why):
    for state in (JobState.COMPLETED, JobState.FAILED):
        st = JobStatus("1", state, code).settled()
        assert st.state is JobState.FAILED
        assert st.reason == f"cannot start: the job command {why} (exit {code}; check job.command)"
    # a scheduler's own reason is kept after ours; a reason we wrote already is not repeated
    kept = JobStatus("1", JobState.FAILED, code, "NonZeroExitCode").settled()
    assert kept.reason.startswith("cannot start") and kept.reason.endswith(": NonZeroExitCode")
    assert JobStatus("1", JobState.FAILED, code, "cannot start: x").settled().reason == "cannot start: x"


def test_retriable_exit_codes_are_those_of_exit_code_enum():
    assert [c for c in range(0, 256) if is_retriable_exit(c)] == [ExitCode.RAW_TIMEOUT, ExitCode.RETRIABLE]
    assert not is_retriable_exit(None) and start_failure_reason(4) is None


def test_submission_state_sets_match_the_sql_filters():
    assert set(UNFINISHED) == {"PENDING", "RUNNING", "HELD", "UNKNOWN"}
    assert set(NOT_STARTED) == {"CLAIMED", "SUBMIT_FAILED", "PENDING", "HELD"}
    assert {s for s in SubmissionState if s.ended} == {"COMPLETED", "FAILED", "TIMEOUT"}
    assert {SubmissionState.of(j) for j in JobState} <= set(SubmissionState)
    assert SubmissionState.FAILED == "FAILED" and f"{SubmissionState.CLAIMED}" == "CLAIMED"
