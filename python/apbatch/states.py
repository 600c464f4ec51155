"""Job and submission states, and the rules about them, in one place.

Two state machines:

* `JobState`: what a scheduler says about one job, scheduler-independent (STYLE.md section 2);
  backends map their codes to it, and :meth:`JobStatus.settled` applies the one rule that a
  job that ended with a non-zero exit code is FAILED, whatever the scheduler called it, and
  says why a job that could not even start (exit 126/127) failed.
* `SubmissionState`: the state of one CCD's ledger row, i.e. `JobState` plus the two states
  before a scheduler knows the job, ``CLAIMED`` and ``SUBMIT_FAILED``::

      (claim) -> CLAIMED -> PENDING -> RUNNING -> COMPLETED | FAILED | TIMEOUT
                   |          |  ^                   (UNKNOWN: neither queue nor history)
                   |          v  |
                   |         HELD            CANCELLED (apbatch cancel, nextVisitCanceled)
                   v
              SUBMIT_FAILED           any ended state -> CLAIMED again by compare-and-set
                                      (a retry or an operator's resubmit), never twice at once

What may be resubmitted and when is decided on the typed ledger row,
`apbatch.submission.Submission`; the exit codes that are retriable are those of
`apbatch.errors.ExitCode`.
"""

from __future__ import annotations

import dataclasses
import enum

from .errors import RETRIABLE_EXIT_CODES
from .work import CcdWork

__all__ = [
    "JobState",
    "JobStatus",
    "START_FAILURE_EXIT_CODES",
    "SubmissionState",
    "SubmittedJob",
    "is_retriable_exit",
    "start_failure_reason",
]


START_FAILURE_EXIT_CODES: dict[int, str] = {
    126: "the job command is not executable",
    127: "the job command was not found",
}
"""Exit codes with which a shell (or the local backend) reports a job that could not start."""


class JobState(enum.Enum):
    """Scheduler-independent job state (STYLE.md section 2)."""

    PENDING = "PENDING"
    RUNNING = "RUNNING"
    HELD = "HELD"
    COMPLETED = "COMPLETED"
    FAILED = "FAILED"
    CANCELLED = "CANCELLED"
    TIMEOUT = "TIMEOUT"
    UNKNOWN = "UNKNOWN"

    @property
    def finished(self) -> bool:
        """`True` for states a job does not leave."""
        return self in (JobState.COMPLETED, JobState.FAILED, JobState.CANCELLED, JobState.TIMEOUT)


def is_retriable_exit(exit_code: int | None) -> bool:
    """`True` if a job that ended with ``exit_code`` may be resubmitted (3 raw timeout, 4 retriable)."""
    return exit_code in RETRIABLE_EXIT_CODES


def start_failure_reason(exit_code: int | None) -> str | None:
    """Why a job with this exit code could not start (126, 127), or `None`."""
    why = START_FAILURE_EXIT_CODES.get(exit_code) if exit_code is not None else None
    if why is None:
        return None
    return f"cannot start: {why} (exit {exit_code}; check job.command)"


@dataclasses.dataclass(frozen=True)
class SubmittedJob:
    """What a backend returns per CCD: the scheduler's id for that CCD's job."""

    work: CcdWork
    job_id: str


@dataclasses.dataclass(frozen=True)
class JobStatus:
    """State of one job as the scheduler (or its history) reports it."""

    job_id: str
    state: JobState
    exit_code: int | None = None
    reason: str = ""

    def settled(self) -> JobStatus:
        """This status with the rules applied: a non-zero exit is FAILED, never success.

        COMPLETED with a non-zero exit code becomes FAILED (reason ``exit code N``); a job that
        ended with exit 126 or 127 gets the reason that it could not start. Idempotent.
        """
        state, reason = self.state, self.reason
        bad_exit = self.exit_code not in (None, 0)
        if state is JobState.COMPLETED and bad_exit:
            state = JobState.FAILED
            reason = reason or f"exit code {self.exit_code}"
        if state is JobState.FAILED and (why := start_failure_reason(self.exit_code)) is not None:
            if not reason.startswith("cannot start"):
                reason = why if reason in ("", f"exit code {self.exit_code}") else f"{why}: {reason}"
        if (state, reason) == (self.state, self.reason):
            return self
        return dataclasses.replace(self, state=state, reason=reason)


class SubmissionState(enum.StrEnum):
    """State of one CCD's ledger row (see the module docstring)."""

    CLAIMED = "CLAIMED"
    SUBMIT_FAILED = "SUBMIT_FAILED"
    PENDING = "PENDING"
    RUNNING = "RUNNING"
    HELD = "HELD"
    COMPLETED = "COMPLETED"
    FAILED = "FAILED"
    CANCELLED = "CANCELLED"
    TIMEOUT = "TIMEOUT"
    UNKNOWN = "UNKNOWN"

    @classmethod
    def of(cls, state: JobState) -> SubmissionState:
        """The row state of a job state."""
        return cls(state.value)

    @property
    def unfinished(self) -> bool:
        """A job the scheduler still has to report an end for (polled)."""
        return self in _UNFINISHED

    @property
    def not_started(self) -> bool:
        """Nothing ran yet: cancelling it loses no work."""
        return self in _NOT_STARTED

    @property
    def ended(self) -> bool:
        """The job ran to an end (COMPLETED, FAILED, TIMEOUT; CANCELLED excluded)."""
        return self in (SubmissionState.COMPLETED, SubmissionState.FAILED, SubmissionState.TIMEOUT)


_UNFINISHED = frozenset({SubmissionState.PENDING, SubmissionState.RUNNING, SubmissionState.HELD,
                         SubmissionState.UNKNOWN})
_NOT_STARTED = frozenset({SubmissionState.CLAIMED, SubmissionState.SUBMIT_FAILED, SubmissionState.PENDING,
                          SubmissionState.HELD})
