"""The ledger's read-only queries on ``submissions``: rows, unconfirmed claims, what to poll,
what to retry, per-visit summaries.

`SubmissionReads` is a part of `apbatch.ledger.Ledger` (a base class of it, kept in its own
module for size); the writes (claims, outcomes) are in `apbatch.ledger`.
"""

from __future__ import annotations

import time
from collections.abc import Sequence
from typing import Any

import sqlalchemy as sa

from .ledger_schema import CLAIMED, SUBMIT_FAILED, UNFINISHED, submissions
from .states import SubmissionState
from .submission import Submission

__all__ = ["SubmissionReads"]


class SubmissionReads:
    """Queries on ``submissions``; mixed into `apbatch.ledger.Ledger` (which sets ``engine``)."""

    engine: sa.engine.Engine

    def rows(self, *, instrument: str | None = None, group_id: str | None = None, visit: int | None = None,
             detector: int | None = None, day_obs: int | None = None, states: Sequence[str] | None = None,
             retry: bool | None = None, max_attempts: int | None = None) -> list[Submission]:
        """Submission rows matching every given filter, in claim order.

        ``max_attempts`` keeps rows with fewer submissions than that.
        """
        c = submissions.c
        q = sa.select(submissions)
        for col, val in ((c.instrument, instrument), (c.group_id, group_id), (c.visit, visit),
                         (c.detector, detector), (c.day_obs, day_obs)):
            if val is not None:
                q = q.where(col == val)
        if states is not None:
            q = q.where(c.state.in_([str(s) for s in states]))
        if retry is not None:
            q = q.where(c.retry.is_(retry))
        if max_attempts is not None:
            q = q.where(c.attempts < max_attempts)
        with self.engine.connect() as conn:
            return [Submission.from_row(dict(r._mapping)) for r in conn.execute(q.order_by(c.id))]

    def unconfirmed(self) -> list[Submission]:
        """Rows claimed (or refused) under a submission token (`Submission.unconfirmed`): the
        scheduler may hold their jobs; `apbatch.submitter.Submitter.reconcile` asks it."""
        c = submissions.c
        q = sa.select(submissions).where(c.submit_token.is_not(None), c.state.in_([CLAIMED, SUBMIT_FAILED]))
        with self.engine.connect() as conn:
            return [Submission.from_row(dict(r._mapping)) for r in conn.execute(q.order_by(c.id))]

    def unfinished_job_ids(self, backend: str) -> list[str]:
        """Job ids the scheduler still has to report a final state for."""
        c = submissions.c
        q = sa.select(c.job_id).where(c.backend == backend, c.job_id.is_not(None), c.state.in_(UNFINISHED))
        with self.engine.connect() as conn:
            return [r.job_id for r in conn.execute(q.order_by(c.id))]

    def retriable(self, max_attempts: int, claim_timeout: float = 300.0,
                  now: float | None = None) -> list[Submission]:
        """Rows to resubmit automatically now (`Submission.is_retriable`); a read-only query.

        To resubmit them, use :meth:`claim_retriable`.
        """
        now = time.time() if now is None else now
        # SQL narrows to the candidates; the rule itself is Submission.is_retriable, in one place
        rows = self.rows(states=[CLAIMED, SUBMIT_FAILED, SubmissionState.FAILED.value], retry=True,
                         max_attempts=max_attempts)
        return [r for r in rows if r.is_retriable(max_attempts, claim_timeout, now)]

    def existing_keys(self, group_ids: Sequence[str]) -> set[tuple[str, str, int]]:
        """``(instrument, group_id, detector)`` of every submission row of these groups."""
        groups = sorted(set(group_ids))
        c = submissions.c
        out: set[tuple[str, str, int]] = set()
        with self.engine.connect() as conn:
            for i in range(0, len(groups), 500):
                q = sa.select(c.instrument, c.group_id, c.detector).where(c.group_id.in_(groups[i:i + 500]))
                out.update((r.instrument, r.group_id, int(r.detector)) for r in conn.execute(q))
        return out

    def nights(self, limit: int = 10) -> dict[int, int]:
        """The latest nights with submission rows: ``day_obs -> CCDs``, newest first."""
        c = submissions.c
        q = (sa.select(c.day_obs, sa.func.count()).group_by(c.day_obs).order_by(c.day_obs.desc())
             .limit(limit))
        with self.engine.connect() as conn:
            return {int(d): int(n) for d, n in conn.execute(q)}

    def visits(self, instrument: str | None = None, limit: int = 50) -> list[dict[str, Any]]:
        """Per-visit summary, newest first: counts per state, attempts, first/last times."""
        c = submissions.c
        keys = (c.instrument, c.group_id, c.visit)
        q = (sa.select(*keys, sa.func.count().label("ccds"), sa.func.min(c.claimed_at).label("claimed_at"),
                       sa.func.max(c.finished_at).label("last_finished_at"),
                       sa.func.max(c.attempts).label("max_attempts"), sa.func.min(c.intent).label("intent"))
             .group_by(*keys).order_by(sa.func.min(c.claimed_at).desc(), c.visit.desc()).limit(limit))
        if instrument:
            q = q.where(c.instrument == instrument)
        out = []
        with self.engine.connect() as conn:
            for r in conn.execute(q):
                d = dict(r._mapping)
                counts = conn.execute(sa.select(c.state, sa.func.count()).where(
                    c.instrument == r.instrument, c.group_id == r.group_id).group_by(c.state))
                d["states"] = dict(counts.all())
                out.append(d)
        return out
