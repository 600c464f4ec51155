"""`Submission`: one CCD's ledger row, typed, with the rules that decide what becomes of it.

`apbatch.ledger.Ledger` returns these; the daemon's retries, ``apbatch night reprocess``,
``apbatch resubmit``, ``apbatch status`` and the night report all decide with the methods
below, so each rule is written once:

* :meth:`Submission.wants_retry` -- ended with a retriable exit code (3 raw timeout,
  4 retriable), refused by the scheduler (``SUBMIT_FAILED``) or claimed by a process that
  stopped before submitting (``CLAIMED`` for longer than ``claim_timeout``);
* :meth:`Submission.is_retriable` -- the above, retries not disabled (a cancelled
  nextVisit), fewer than ``max_attempts`` submissions: what is resubmitted automatically;
* :meth:`Submission.is_lost` -- ``UNKNOWN`` (the scheduler has it in neither its queue nor
  its history) for longer than ``lost_after`` since submission;
* :meth:`Submission.category` -- all of it as one word; :meth:`Submission.needs_attention`
  -- what a person must look at (failed for good, out of attempts, refused, lost).
"""

from __future__ import annotations

import dataclasses
import enum
import json
import time
from collections.abc import Mapping
from typing import Any

from .states import SubmissionState, is_retriable_exit
from .work import CcdWork

__all__ = ["Category", "Submission"]


class Category(enum.StrEnum):
    """What the automatic (re)submission does with a row."""

    RETRY = "retry"
    """Resubmit: failed retriably, refused, or claimed and never submitted."""
    LOST = "lost"
    """Resubmit: the scheduler has no record of the job."""
    EXHAUSTED = "exhausted"
    """Would be resubmitted, but has had ``max_attempts`` submissions."""
    COMPLETED = "completed"
    ACTIVE = "active"
    """Queued, running, held, or claimed / UNKNOWN too recently."""
    FINAL = "final"
    """Never resubmitted automatically (exit 2 or 5, no exit code, cancelled)."""


@dataclasses.dataclass(frozen=True)
class Submission:
    """One row of the ledger's ``submissions`` table (one CCD of one group).

    Immutable: a changed row is read again from the `Ledger`. Times are UTC unix seconds.
    """

    id: int
    instrument: str
    group_id: str
    detector: int
    detector_name: str
    visit: int
    day_obs: int
    intent: str
    state: SubmissionState
    attempts: int
    retry: bool
    work: CcdWork
    claimed_at: float
    backend: str | None = None
    job_id: str | None = None
    exit_code: int | None = None
    reason: str = ""
    job_history: tuple[str, ...] = ()
    command: tuple[str, ...] = ()
    submit_token: str | None = None
    event_received_at: float | None = None
    submitted_at: float | None = None
    started_at: float | None = None
    finished_at: float | None = None
    last_polled_at: float | None = None
    stages: Mapping[str, float] = dataclasses.field(default_factory=dict)
    """UTC unix seconds of each stage the job reached (`apbatch.latency.STAGES`), as the job wrote them."""
    verification: Mapping[str, Any] | None = None
    """A calibration job's verdict (`apbatch.job.calverify`): ``passed``, ``failed_amps``, ``metrics``."""

    @classmethod
    def from_row(cls, row: Mapping[str, Any]) -> Submission:
        """Build from a database row mapping (JSON columns decoded)."""
        d = dict(row)
        d["state"] = SubmissionState(d["state"])
        d["work"] = CcdWork.from_dict(json.loads(d["work"]))
        d["job_history"] = tuple(json.loads(d.get("job_history") or "[]"))
        d["command"] = tuple(json.loads(d.get("command") or "[]"))
        d["reason"] = d.get("reason") or ""
        d["stages"] = json.loads(d.get("stages") or "{}")
        d["verification"] = json.loads(d["verification"]) if d.get("verification") else None
        d["retry"] = bool(d["retry"])
        names = {f.name for f in dataclasses.fields(cls)}
        return cls(**{k: v for k, v in d.items() if k in names})

    @property
    def key(self) -> tuple[str, str, int]:
        """The idempotency key (instrument, group_id, detector)."""
        return (self.instrument, self.group_id, self.detector)

    @property
    def label(self) -> str:
        """``ap-<instrument>-<visit>``, as ops see it in the queue."""
        return self.work.label

    def to_dict(self) -> dict[str, Any]:
        """Plain-JSON form (``--json`` output)."""
        d = dataclasses.asdict(self)
        d["state"] = str(self.state)
        d["work"] = self.work.to_dict()
        d["job_history"] = list(self.job_history)
        d["command"] = list(self.command)
        d["stages"] = dict(self.stages)
        d["verification"] = dict(self.verification) if self.verification is not None else None
        return d

    # ------------------------------------------------------------------ the rules
    def wants_retry(self, claim_timeout: float, now: float) -> bool:
        """Failed retriably, refused by the scheduler, or claimed ``claim_timeout`` ago, never submitted."""
        s = self.state
        return ((s is SubmissionState.FAILED and is_retriable_exit(self.exit_code))
                or s is SubmissionState.SUBMIT_FAILED
                or (s is SubmissionState.CLAIMED and self.claimed_at < now - claim_timeout))

    @property
    def unconfirmed(self) -> bool:
        """Claimed (or refused) with a submission token: the scheduler may hold jobs the ledger
        has not recorded (the submitting process died, or the submit command failed after the
        scheduler accepted it); `apbatch.submitter.Submitter.reconcile` asks it first."""
        return bool(self.submit_token) and self.state in (SubmissionState.CLAIMED,
                                                          SubmissionState.SUBMIT_FAILED)

    def is_lost(self, lost_after: float, now: float) -> bool:
        """UNKNOWN to the scheduler (not an unknown state code) since ``lost_after`` after submission."""
        return (self.state is SubmissionState.UNKNOWN and bool(self.job_id)
                and not self.reason.startswith("unknown state code")
                and (self.submitted_at or self.claimed_at) < now - lost_after)

    def is_retriable(self, max_attempts: int, claim_timeout: float = 300.0, now: float | None = None) -> bool:
        """To be resubmitted automatically at ``now`` (default: the clock); see the module docstring."""
        now = time.time() if now is None else now
        return self.retry and self.attempts < max_attempts and self.wants_retry(claim_timeout, now)

    def category(self, *, max_attempts: int, claim_timeout: float, lost_after: float, now: float) -> Category:
        """What the automatic (re)submission does with this row (see `Category`)."""
        if self.state is SubmissionState.COMPLETED:
            return Category.COMPLETED
        lost = self.is_lost(lost_after, now)
        if lost or self.wants_retry(claim_timeout, now):
            if not self.retry:
                return Category.FINAL
            if self.attempts >= max_attempts:
                return Category.EXHAUSTED
            return Category.LOST if lost else Category.RETRY
        if self.state.unfinished or self.state is SubmissionState.CLAIMED:
            return Category.ACTIVE
        return Category.FINAL

    def needs_attention(self, *, max_attempts: int, claim_timeout: float = 300.0, lost_after: float = 3600.0,
                        now: float) -> bool:
        """A person must look at it: failed for good, out of attempts, refused by the scheduler, or lost.

        A CANCELLED row was cancelled on purpose and does not count.
        """
        if self.state is SubmissionState.SUBMIT_FAILED or self.is_lost(lost_after, now):
            return True
        cat = self.category(max_attempts=max_attempts, claim_timeout=claim_timeout, lost_after=lost_after,
                            now=now)
        return cat is Category.EXHAUSTED or (cat is Category.FINAL
                                             and self.state is not SubmissionState.CANCELLED)

    def can_resubmit_by_hand(self, claim_timeout: float, now: float) -> bool:
        """An operator may resubmit it (``apbatch resubmit``): it ended without success (CANCELLED
        included: the operator names it), was refused, is lost, or its claim is stale; never a
        COMPLETED or an active row.
        """
        s = self.state
        if s is SubmissionState.COMPLETED:
            return False
        if s is SubmissionState.CLAIMED:
            return self.claimed_at < now - claim_timeout
        if s is SubmissionState.UNKNOWN:
            return self.is_lost(0.0, now)
        return s in (SubmissionState.FAILED, SubmissionState.TIMEOUT, SubmissionState.SUBMIT_FAILED,
                     SubmissionState.CANCELLED)
