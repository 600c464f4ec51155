"""The ledger: a database record of every event, every per-CCD submission and its state.

SQLAlchemy Core over SQLite (default; WAL mode, busy timeout, every transaction ``BEGIN
IMMEDIATE`` so that concurrent daemons serialize instead of failing) or PostgreSQL (any
``postgresql://`` URL). Tables (`apbatch.ledger_schema`):

* ``submissions``: one row per (instrument, group_id, detector) -- a UNIQUE constraint, so a
  CCD is claimed once, ever, across processes and restarts; read back as typed
  `apbatch.submission.Submission` rows whose state is an `apbatch.states.SubmissionState`.
  Timestamps are UTC unix seconds: event received, claimed, submitted, started and finished
  (as observed by polling), last polled.
* ``events``: every parsed event with its kind, group, raw payload and whether it was accepted;
  the daemon finds a group's nextVisit here when its startIntegration arrives, even after a
  restart. ``dead_letters``: events that could not be parsed. (Queries: `apbatch.ledger_events`.)

Every SQL statement on these tables is in `Ledger`: nobody else queries them.
A `Ledger` holds an engine (a connection pool) and is safe to share between threads.
"""

from __future__ import annotations

import json
import time
from collections.abc import Mapping, Sequence
from pathlib import Path
from typing import Any

import sqlalchemy as sa
from sqlalchemy.dialects import postgresql, sqlite

from .errors import BadInputError
from .ledger_events import EventTables
from .ledger_schema import (
    ADDED_COLUMNS,
    CLAIMED,
    NOT_STARTED,
    SUBMIT_FAILED,
    UNFINISHED,
    metadata,
    submissions,
)
from .states import JobState, JobStatus, SubmissionState, SubmittedJob
from .submission import Submission
from .work import CcdWork

__all__ = ["CLAIMED", "SUBMIT_FAILED", "Ledger", "NOT_STARTED", "UNFINISHED"]

_CHUNK = 200
"""Rows per statement in bulk updates (keeps bound parameters well under SQLite's limit)."""


def _sqlite_pragmas(dbapi_conn, _record) -> None:
    dbapi_conn.isolation_level = None  # let the "begin" hook below issue BEGIN IMMEDIATE
    cur = dbapi_conn.cursor()
    cur.execute("PRAGMA journal_mode=WAL")
    cur.execute("PRAGMA busy_timeout=30000")
    cur.execute("PRAGMA synchronous=NORMAL")
    cur.close()


def _no_ledger(where: str) -> BadInputError:
    return BadInputError("ledger.url", f"no ledger at {where}",
                         "check ledger.url (and root) in the --config file(s) / APBATCH_LEDGER__URL")


class Ledger(EventTables):
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
    def open(cls, url: str, *, create: bool = True) -> Ledger:
        """Connect to ``url``; create missing tables (and a SQLite file's directory) if ``create``.

        Parameters
        ----------
        url : `str`
            SQLAlchemy URL.
        create : `bool`
            If `False` (commands that only read), a missing ledger is an error, not a new one.

        Raises
        ------
        BadInputError
            Raised if the URL is malformed or names an unsupported database, or, without
            ``create``, if there is no ledger there (the message names the path).
        """
        try:
            sa_url = sa.engine.make_url(url)
        except sa.exc.ArgumentError as exc:
            raise BadInputError("ledger.url", f"{url!r} is not a database URL: {exc}") from None
        if sa_url.get_backend_name() == "sqlite":
            db = sa_url.database
            if db and db != ":memory:":
                if not create and not Path(db).is_file():
                    raise _no_ledger(db)
                if create:
                    Path(db).parent.mkdir(parents=True, exist_ok=True)
            engine = sa.create_engine(sa_url, connect_args={"timeout": 30})
            sa.event.listen(engine, "connect", _sqlite_pragmas)
            sa.event.listen(engine, "begin", lambda conn: conn.exec_driver_sql("BEGIN IMMEDIATE"))
        else:
            engine = sa.create_engine(sa_url, pool_pre_ping=True)
        ledger = cls(engine)
        if create:
            metadata.create_all(engine)
        elif not sa.inspect(engine).has_table(submissions.name):
            engine.dispose()
            raise _no_ledger(sa_url.render_as_string(hide_password=True))
        ledger._add_columns()
        return ledger

    def _add_columns(self) -> None:
        """Add the nullable columns of `ADDED_COLUMNS` that a ledger made by an older version lacks."""
        for table, names in ADDED_COLUMNS.items():
            have = {c["name"] for c in sa.inspect(self.engine).get_columns(table)}
            for name in names:
                if name not in have:
                    col = metadata.tables[table].c[name]
                    ddl = f"ALTER TABLE {table} ADD COLUMN {name} {col.type.compile(self.engine.dialect)}"
                    with self.engine.begin() as conn:
                        conn.exec_driver_sql(ddl)

    @classmethod
    def from_config(cls, config, *, create: bool = True) -> Ledger:
        """:meth:`open` the ledger ``config.ledger.url`` names (relative SQLite paths under ``root``)."""
        return cls.open(config.sqlalchemy_url(config.ledger.url), create=create)

    def close(self) -> None:
        """Release the connection pool."""
        self.engine.dispose()

    # ------------------------------------------------------------------- claims
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

    def reclaim(self, rows: Sequence[Submission], now: float | None = None) -> list[int]:
        """Claim rows again for a resubmission, each only if it is unchanged since it was read.

        A compare-and-set on ``(state, attempts, job_id, claimed_at)``, one UPDATE ... RETURNING
        per batch of rows: of two processes resubmitting the same CCD, exactly one wins it. A
        won row is ``CLAIMED`` at ``now`` until it is recorded as submitted or refused (or, if
        its process dies first, until its claim is older than the claim timeout).

        Returns
        -------
        ids : `list` [`int`]
            The ids of the rows this call claimed.
        """
        now = time.time() if now is None else now
        c = submissions.c
        won: list[int] = []
        with self.engine.begin() as conn:
            for i in range(0, len(rows), _CHUNK):
                same = [sa.and_(c.id == r.id, c.state == str(r.state), c.attempts == r.attempts,
                                c.job_id.is_(None) if r.job_id is None else c.job_id == r.job_id,
                                c.claimed_at == r.claimed_at) for r in rows[i:i + _CHUNK]]
                stmt = (submissions.update().where(sa.or_(*same)).values(state=CLAIMED, claimed_at=now)
                        .returning(c.id))
                won += [int(x) for x in conn.execute(stmt).scalars()]
        return sorted(won)

    # ------------------------------------------------------------------- outcomes
    def record_submitted(self, jobs: Sequence[SubmittedJob], backend: str, now: float | None = None,
                         command: Sequence[str] = ()) -> None:
        """Store the scheduler's job ids of submitted (or resubmitted) CCDs; counts an attempt.

        ``command`` is the job command they were submitted with (`Backend.job_command`).
        """
        if not jobs:
            return
        now = time.time() if now is None else now
        c = submissions.c
        cmd = json.dumps(list(command)) if command else None
        with self.engine.begin() as conn:
            cur = {}
            for inst, group in {(j.work.instrument, j.work.group_id) for j in jobs}:
                q = sa.select(c.detector, c.job_id, c.attempts, c.job_history).where(
                    c.instrument == inst, c.group_id == group)
                cur.update({(inst, group, r.detector): r for r in conn.execute(q)})
            values = []
            for job in jobs:
                w = job.work
                row = cur.get(w.key)
                history = json.loads(row.job_history) if row is not None else []
                if row is not None and row.job_id:
                    history.append(row.job_id)
                values.append({
                    "k_instrument": w.instrument, "k_group": w.group_id, "k_detector": w.detector,
                    "backend": backend, "job_id": job.job_id, "state": SubmissionState.PENDING.value,
                    "exit_code": None, "reason": "", "attempts": (row.attempts if row else 0) + 1,
                    "job_history": json.dumps(history), "submitted_at": now, "started_at": None,
                    "finished_at": None, "work": json.dumps(w.to_dict(), sort_keys=True), "command": cmd})
            stmt = submissions.update().where(
                c.instrument == sa.bindparam("k_instrument"), c.group_id == sa.bindparam("k_group"),
                c.detector == sa.bindparam("k_detector"))
            conn.execute(stmt, values)

    def record_submit_failed(self, works: Sequence[CcdWork], error: str, now: float | None = None) -> None:
        """Mark CCDs whose submission the scheduler refused; counts an attempt (one UPDATE per visit)."""
        now = time.time() if now is None else now
        c = submissions.c
        visits: dict[tuple[str, str], list[int]] = {}
        for w in works:
            visits.setdefault((w.instrument, w.group_id), []).append(w.detector)
        with self.engine.begin() as conn:
            for (inst, group), dets in visits.items():
                conn.execute(submissions.update().where(
                    c.instrument == inst, c.group_id == group, c.detector.in_(dets)).values(
                    state=SUBMIT_FAILED, reason=error[:2000], attempts=c.attempts + 1, submitted_at=None,
                    last_polled_at=now))

    def update_states(self, statuses: Mapping[str, JobStatus], backend: str, now: float | None = None) -> int:
        """Store polled job states (`JobStatus.settled`: a non-zero exit is FAILED); first sightings
        set ``started_at``/``finished_at``. One UPDATE per batch of jobs.

        Returns the number of rows changed.
        """
        if not statuses:
            return 0
        now = time.time() if now is None else now
        c = submissions.c
        settled = [st.settled() for st in statuses.values()]
        changed = 0
        with self.engine.begin() as conn:
            for i in range(0, len(settled), _CHUNK):
                chunk = settled[i:i + _CHUNK]

                def case(values: dict, else_, type_=None):
                    expr = sa.case(values, value=c.job_id, else_=else_)
                    return sa.cast(expr, type_) if type_ is not None else expr

                running = [st.job_id for st in chunk if st.state is JobState.RUNNING]
                finished = [st.job_id for st in chunk if st.state.finished]
                values: dict[str, Any] = {
                    "state": case({st.job_id: st.state.value for st in chunk}, c.state),
                    "exit_code": case({st.job_id: st.exit_code for st in chunk}, c.exit_code, sa.Integer),
                    "reason": case({st.job_id: st.reason for st in chunk}, c.reason),
                    "last_polled_at": now,
                }
                if running:
                    values["started_at"] = sa.case(
                        (c.job_id.in_(running), sa.func.coalesce(c.started_at, now)), else_=c.started_at)
                if finished:
                    values["finished_at"] = sa.case(
                        (c.job_id.in_(finished), sa.func.coalesce(c.finished_at, now)), else_=c.finished_at)
                res = conn.execute(submissions.update().where(
                    c.backend == backend, c.job_id.in_([st.job_id for st in chunk]),
                    c.state.in_(UNFINISHED)).values(**values))
                changed += res.rowcount
        return changed

    def mark_cancelled(self, row_ids: Sequence[int], reason: str, now: float | None = None) -> None:
        """Set rows to CANCELLED (never retried)."""
        if not row_ids:
            return
        now = time.time() if now is None else now
        with self.engine.begin() as conn:
            conn.execute(submissions.update().where(submissions.c.id.in_(list(row_ids))).values(
                state=SubmissionState.CANCELLED.value, reason=reason, retry=False,
                finished_at=sa.func.coalesce(submissions.c.finished_at, now)))

    def disable_retry(self, group_id: str, instrument: str | None = None) -> None:
        """Never resubmit any CCD of this group automatically (its nextVisit was cancelled)."""
        c = submissions.c
        q = submissions.update().where(c.group_id == group_id)
        if instrument:
            q = q.where(c.instrument == instrument)
        with self.engine.begin() as conn:
            conn.execute(q.values(retry=False))

    # ------------------------------------------------------------------- reads
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

    def claim_retriable(self, max_attempts: int, claim_timeout: float = 300.0,
                        now: float | None = None) -> list[Submission]:
        """The :meth:`retriable` rows, each claimed again (:meth:`reclaim`) for resubmission.

        Two processes asking at once (a daemon and ``night reprocess``) get each CCD once.
        Returns the rows as they were before this claim.
        """
        now = time.time() if now is None else now
        rows = self.retriable(max_attempts, claim_timeout, now)
        won = set(self.reclaim(rows, now=now))
        return [r for r in rows if r.id in won]

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
