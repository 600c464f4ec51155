"""The shared part of every batch backend; a backend subclass declares only what differs.

Public API (used by the dispatcher, ``apbatch status``/``cancel``/``render-job``):

* ``Backend.render(works) -> str``: the exact script / submit description, without submitting;
* ``Backend.submit(works) -> list[SubmittedJob]``: one visit's CCDs as one batch submission
  (a Slurm array, an HTCondor cluster, a set of local processes); one `SubmittedJob` per CCD,
  in the order of ``works``;
* ``Backend.status(job_ids) -> dict[str, JobStatus]``: batched state query; jobs that left
  the queue are looked up in history, never assumed done;
* ``Backend.cancel(job_ids)``.

Constructors do no I/O.
"""

from __future__ import annotations

import abc
import dataclasses
import enum
from collections.abc import Sequence

from ..work import CcdWork

__all__ = ["Backend", "JobState", "JobStatus", "SubmittedJob"]


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


class Backend(abc.ABC):
    """Base of the batch backends. Subclasses: ``LocalBackend``, ``SlurmBackend``, ``HTCondorBackend``."""

    kind: str = ""

    @abc.abstractmethod
    def render(self, works: Sequence[CcdWork]) -> str:
        """The exact script or submit description that :meth:`submit` would use."""

    @abc.abstractmethod
    def submit(self, works: Sequence[CcdWork]) -> list[SubmittedJob]:
        """Submit one visit's CCDs as one batch; one `SubmittedJob` per work item, same order."""

    @abc.abstractmethod
    def status(self, job_ids: Sequence[str]) -> dict[str, JobStatus]:
        """States of the given jobs (history looked up for jobs no longer queued)."""

    @abc.abstractmethod
    def cancel(self, job_ids: Sequence[str]) -> None:
        """Cancel the given jobs."""
