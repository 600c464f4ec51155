"""The ledger: a database record of every event, every per-CCD submission and its state.

SQLAlchemy Core over SQLite (default; WAL mode, busy timeout, every transaction ``BEGIN
IMMEDIATE`` so that concurrent daemons serialize instead of failing) or PostgreSQL (any
``postgresql://`` URL). Tables:

* ``submissions``: one row per (instrument, group_id, detector) -- a UNIQUE constraint, so a
  CCD is claimed once, ever, across processes and restarts. State ``CLAIMED`` (claimed, not
  yet accepted by the scheduler), ``SUBMIT_FAILED``, then the backend's `JobState` names.
  Timestamps are UTC unix seconds: event received, claimed, submitted, started and finished
  (as observed by polling), last polled.
* ``events``: every parsed event with its kind, group, raw payload and whether it was accepted;
  the daemon finds a group's nextVisit here when its startIntegration arrives, even after a
  restart.
* ``dead_letters``: events that could not be parsed, with the error.

A `Ledger` holds an engine (a connection pool) and is safe to share between threads.
"""

from __future__ import annotations

import json
import time
from collections.abc import Iterable, Mapping, Sequence
from pathlib import Path
from typing import Any

import sqlalchemy as sa
from sqlalchemy.dialects import postgresql, sqlite

from .backends.base import JobState, JobStatus, SubmittedJob
from .errors import RETRIABLE_EXIT_CODES, BadInputError
from .ledger_schema import (
    CLAIMED,
    NOT_STARTED,
    SUBMIT_FAILED,
    UNFINISHED,
    dead_letters,
    events,
    metadata,
    submissions,
)
from .work import CcdWork

__all__ = ["CLAIMED", "SUBMIT_FAILED", "Ledger", "NOT_STARTED", "UNFINISHED"]


def _sqlite_pragmas(dbapi_conn, _record) -> None:
    dbapi_conn.isolation_level = None  # let the "begin" hook below issue BEGIN IMMEDIATE
    cur = dbapi_conn.cursor()
    cur.execute("PRAGMA journal_mode=WAL")
    cur.execute("PRAGMA busy_timeout=30000")
    cur.execute("PRAGMA synchronous=NORMAL")
    cur.close()


def _payload_text(payload: Any) -> str:
    if isinstance(payload, bytes | bytearray):
        return payload.decode("utf-8", errors="replace")
    if isinstance(payload, str):
        return payload
    return json.dumps(payload, sort_keys=True, default=str)


class Ledger:
    """Record of submissions; see the module docstring.

    Parameters
    ----------
    engine : `sqlalchemy.engine.Engine`
        Use :meth:`open` to make one from a URL and create the tables.
    """

    def __init__(self, engine: sa.engine.Engine):
        self.engine = engine
        name = engine.dialect.name
        if name not in ("sqlite", "postgresql"):
            raise BadInputError("ledger.url", f"database {name!r} is not supported",
                                "use sqlite or postgresql")
        self._insert = sqlite.insert if name == "sqlite" else postgresql.insert

    @classmethod
    def open(cls, url: str) -> Ledger:
        """Connect to ``url`` (creating a SQLite file's directory) and create missing tables.

        Raises
        ------
        BadInputError
            Raised if the URL is malformed or names an unsupported database.
        """
        try:
            sa_url = sa.engine.make_url(url)
        except sa.exc.ArgumentError as exc:
            raise BadInputError("ledger.url", f"{url!r} is not a database URL: {exc}") from None
        if sa_url.get_backend_name() == "sqlite":
            db = sa_url.database
            if db and db != ":memory:":
                Path(db).parent.mkdir(parents=True, exist_ok=True)
            engine = sa.create_engine(sa_url, connect_args={"timeout": 30})
            sa.event.listen(engine, "connect", _sqlite_pragmas)
            sa.event.listen(engine, "begin", lambda conn: conn.exec_driver_sql("BEGIN IMMEDIATE"))
        else:
            engine = sa.create_engine(sa_url, pool_pre_ping=True)
        ledger = cls(engine)
        metadata.create_all(engine)
        return ledger

    @classmethod
    def from_config(cls, config) -> Ledger:
        """:meth:`open` the ledger ``config.ledger.url`` names (relative SQLite paths under ``root``)."""
        return cls.open(config.sqlalchemy_url(config.ledger.url))

    def close(self) -> None:
        """Release the connection pool."""
        self.engine.dispose()

    # ------------------------------------------------------------------- submissions
    def claim(self, works: Sequence[CcdWork], received_at: float | None = None,
              now: float | None = None) -> list[CcdWork]:
        """Claim CCDs for submission in one transaction; return those not claimed before.

        Claiming is atomic per row (``INSERT ... ON CONFLICT DO NOTHING``), so two processes
        claiming the same CCD at once get it exactly once between them.
        """
        if not works:
            return []
        now = time.time() if now is None else now
        rows = [{"instrument": w.instrument, "group_id": w.group_id, "detector": w.detector,
                 "detector_name": w.detector_name, "visit": w.visit, "day_obs": w.day_obs, "intent": w.intent,
                 "state": CLAIMED, "reason": "", "attempts": 0, "retry": True, "job_history": "[]",
                 "work": json.dumps(w.to_dict(), sort_keys=True), "event_received_at": received_at,
                 "claimed_at": now} for w in works]
        c = submissions.c
        stmt = (self._insert(submissions)
                .on_conflict_do_nothing(index_elements=["instrument", "group_id", "detector"])
                .returning(c.instrument, c.group_id, c.detector))
        with self.engine.begin() as conn:
            won = {tuple(r) for r in conn.execute(stmt, rows)}
        return [w for w in works if w.key in won]

    def _keyed_update(self, conn, values: list[dict]) -> None:
        c = submissions.c
        stmt = (submissions.update()
                .where(c.instrument == sa.bindparam("k_instrument"), c.group_id == sa.bindparam("k_group"),
                       c.detector == sa.bindparam("k_detector")))
        conn.execute(stmt, values)

    def _current(self, conn, works: Iterable[CcdWork]) -> dict[tuple, Any]:
        works = list(works)
        c = submissions.c
        groups = {(w.instrument, w.group_id) for w in works}
        out = {}
        for inst, group in groups:
            q = sa.select(c.instrument, c.group_id, c.detector, c.job_id, c.attempts, c.job_history).where(
                c.instrument == inst, c.group_id == group)
            out.update({(r.instrument, r.group_id, r.detector): r for r in conn.execute(q)})
        return out

    def record_submitted(self, jobs: Sequence[SubmittedJob], backend: str, now: float | None = None) -> None:
        """Store the scheduler's job ids of submitted (or resubmitted) CCDs; counts an attempt."""
        if not jobs:
            return
        now = time.time() if now is None else now
        with self.engine.begin() as conn:
            cur = self._current(conn, (j.work for j in jobs))
            values = []
            for job in jobs:
                w = job.work
                row = cur.get(w.key)
                history = json.loads(row.job_history) if row is not None else []
                if row is not None and row.job_id:
                    history.append(row.job_id)
                values.append({
                    "k_instrument": w.instrument, "k_group": w.group_id, "k_detector": w.detector,
                    "backend": backend, "job_id": job.job_id, "state": JobState.PENDING.value,
                    "exit_code": None, "reason": "", "attempts": (row.attempts if row else 0) + 1,
                    "job_history": json.dumps(history), "submitted_at": now, "started_at": None,
                    "finished_at": None, "work": json.dumps(w.to_dict(), sort_keys=True)})
            self._keyed_update(conn, values)

    def record_submit_failed(self, works: Sequence[CcdWork], error: str, now: float | None = None) -> None:
        """Mark CCDs whose submission the scheduler refused; counts an attempt."""
        if not works:
            return
        with self.engine.begin() as conn:
            cur = self._current(conn, works)
            self._keyed_update(conn, [
                {"k_instrument": w.instrument, "k_group": w.group_id, "k_detector": w.detector,
                 "state": SUBMIT_FAILED, "reason": error[:2000],
                 "attempts": (cur[w.key].attempts if w.key in cur else 0) + 1,
                 "submitted_at": None, "last_polled_at": time.time() if now is None else now}
                for w in works])

    def update_states(self, statuses: Mapping[str, JobStatus], backend: str, now: float | None = None) -> int:
        """Store polled job states; first sightings set ``started_at``/``finished_at``.

        Returns the number of rows changed.
        """
        if not statuses:
            return 0
        now = time.time() if now is None else now
        c = submissions.c
        running, finished = JobState.RUNNING.value, [s.value for s in JobState if s.finished]
        changed = 0
        with self.engine.begin() as conn:
            for st in statuses.values():
                state = st.state
                if state == JobState.COMPLETED and st.exit_code not in (None, 0):
                    state = JobState.FAILED  # a non-zero exit is never success
                values: dict[str, Any] = {"state": state.value, "exit_code": st.exit_code,
                                          "reason": st.reason, "last_polled_at": now}
                if state.value == running:
                    values["started_at"] = sa.func.coalesce(c.started_at, now)
                if state.value in finished:
                    values["finished_at"] = sa.func.coalesce(c.finished_at, now)
                res = conn.execute(submissions.update().where(
                    c.backend == backend, c.job_id == st.job_id, c.state.in_(UNFINISHED)).values(**values))
                changed += res.rowcount
        return changed

    def unfinished_job_ids(self, backend: str) -> list[str]:
        """Job ids the scheduler still has to report a final state for."""
        c = submissions.c
        q = sa.select(c.job_id).where(c.backend == backend, c.job_id.is_not(None), c.state.in_(UNFINISHED))
        with self.engine.connect() as conn:
            return [r.job_id for r in conn.execute(q.order_by(c.id))]

    def _retriable_query(self, columns, max_attempts: int, claim_timeout: float, now: float):
        c = submissions.c
        return sa.select(*columns).where(c.retry.is_(True), c.attempts < max_attempts, sa.or_(
            (c.state == JobState.FAILED.value) & c.exit_code.in_(sorted(RETRIABLE_EXIT_CODES)),
            c.state == SUBMIT_FAILED,
            (c.state == CLAIMED) & (c.claimed_at < now - claim_timeout))).order_by(c.id)

    def retriable(self, max_attempts: int, claim_timeout: float = 300.0,
                  now: float | None = None) -> list[CcdWork]:
        """CCDs to (re)submit: failed with a retriable exit code, refused by the scheduler, or
        claimed by a daemon that stopped before submitting (older than ``claim_timeout``).

        A read-only query; to resubmit them, use :meth:`claim_retriable`.
        """
        now = time.time() if now is None else now
        q = self._retriable_query([submissions.c.work], max_attempts, claim_timeout, now)
        with self.engine.connect() as conn:
            return [CcdWork.from_dict(json.loads(r.work)) for r in conn.execute(q)]

    def claim_retriable(self, max_attempts: int, claim_timeout: float = 300.0,
                        now: float | None = None) -> list[CcdWork]:
        """The :meth:`retriable` CCDs, each claimed again (see :meth:`reclaim`) for resubmission.

        Two processes asking at once (a daemon and ``night reprocess``) get each CCD once.
        """
        now = time.time() if now is None else now
        c = submissions.c
        q = self._retriable_query([c.id, c.state, c.attempts, c.job_id, c.claimed_at, c.work], max_attempts,
                                  claim_timeout, now)
        with self.engine.connect() as conn:
            rows = [dict(r._mapping) for r in conn.execute(q)]
        won = set(self.reclaim(rows, now=now))
        return [CcdWork.from_dict(json.loads(r["work"])) for r in rows if r["id"] in won]

    def reclaim(self, rows: Sequence[Mapping[str, Any]], now: float | None = None) -> list[int]:
        """Claim rows again for a resubmission, each only if it is unchanged since it was read.

        A compare-and-set per row on ``(state, attempts, job_id, claimed_at)``: of two processes
        resubmitting the same failed CCD, exactly one wins it. A won row is ``CLAIMED`` at ``now``
        until it is recorded as submitted or refused (or, if its process dies first, until its
        claim is older than the claim timeout).

        Parameters
        ----------
        rows : sequence of mappings
            Rows as read (:meth:`rows`): ``id``, ``state``, ``attempts``, ``job_id``, ``claimed_at``.

        Returns
        -------
        ids : `list` [`int`]
            The ids of the rows this call claimed.
        """
        now = time.time() if now is None else now
        c = submissions.c
        won = []
        with self.engine.begin() as conn:
            for r in rows:
                same_job = c.job_id.is_(None) if r["job_id"] is None else c.job_id == r["job_id"]
                res = conn.execute(submissions.update().where(
                    c.id == r["id"], c.state == r["state"], c.attempts == r["attempts"], same_job,
                    c.claimed_at == r["claimed_at"]).values(state=CLAIMED, claimed_at=now))
                if res.rowcount == 1:
                    won.append(int(r["id"]))
        return won

    def rows(self, *, instrument: str | None = None, group_id: str | None = None, visit: int | None = None,
             detector: int | None = None, states: Sequence[str] | None = None) -> list[dict[str, Any]]:
        """Submission rows matching every given filter, as dicts, in claim order."""
        c = submissions.c
        q = sa.select(submissions)
        for col, val in ((c.instrument, instrument), (c.group_id, group_id), (c.visit, visit),
                         (c.detector, detector)):
            if val is not None:
                q = q.where(col == val)
        if states is not None:
            q = q.where(c.state.in_(list(states)))
        with self.engine.connect() as conn:
            return [dict(r._mapping) for r in conn.execute(q.order_by(c.id))]

    def mark_cancelled(self, row_ids: Sequence[int], reason: str, now: float | None = None) -> None:
        """Set rows to CANCELLED (never retried)."""
        if not row_ids:
            return
        now = time.time() if now is None else now
        with self.engine.begin() as conn:
            conn.execute(submissions.update().where(submissions.c.id.in_(list(row_ids))).values(
                state=JobState.CANCELLED.value, reason=reason, retry=False,
                finished_at=sa.func.coalesce(submissions.c.finished_at, now)))

    def disable_retry(self, group_id: str, instrument: str | None = None) -> None:
        """Never resubmit any CCD of this group (its nextVisit was cancelled)."""
        c = submissions.c
        q = submissions.update().where(c.group_id == group_id)
        if instrument:
            q = q.where(c.instrument == instrument)
        with self.engine.begin() as conn:
            conn.execute(q.values(retry=False))

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

    # ------------------------------------------------------------------------ events
    def record_event(self, kind: str, payload: Any, *, instrument: str = "", group_id: str = "",
                     source: str = "", accepted: bool, reason: str = "",
                     received_at: float | None = None) -> int:
        """Store one parsed event; returns its row id."""
        with self.engine.begin() as conn:
            res = conn.execute(events.insert().values(
                received_at=time.time() if received_at is None else received_at, kind=kind,
                instrument=instrument or "", group_id=group_id or "", source=source, accepted=accepted,
                reason=reason, payload=_payload_text(payload)))
            return int(res.inserted_primary_key[0])

    def find_event(self, kind: str, instrument: str, group_id: str) -> str | None:
        """Payload of the latest accepted event of this kind for the group, or `None`."""
        e = events.c
        q = (sa.select(e.payload).where(e.kind == kind, e.instrument == instrument, e.group_id == group_id,
                                        e.accepted.is_(True)).order_by(e.id.desc()).limit(1))
        with self.engine.connect() as conn:
            return conn.execute(q).scalar()

    def event_rows(self, kind: str | None = None) -> list[dict[str, Any]]:
        """Stored events (optionally of one kind), oldest first."""
        q = sa.select(events).order_by(events.c.id)
        if kind:
            q = q.where(events.c.kind == kind)
        with self.engine.connect() as conn:
            return [dict(r._mapping) for r in conn.execute(q)]

    def record_dead_letter(self, payload: Any, error: str, source: str = "",
                           received_at: float | None = None) -> None:
        """Store an event that could not be parsed."""
        with self.engine.begin() as conn:
            conn.execute(dead_letters.insert().values(
                received_at=time.time() if received_at is None else received_at, source=source,
                error=error, payload=_payload_text(payload)))

    def dead_letter_rows(self) -> list[dict[str, Any]]:
        """Every dead letter, oldest first."""
        with self.engine.connect() as conn:
            rows = conn.execute(sa.select(dead_letters).order_by(dead_letters.c.id))
            return [dict(r._mapping) for r in rows]
