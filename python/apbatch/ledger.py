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

Every SQL statement on these tables is in `Ledger` (and its base classes, kept in their own
modules for size: `apbatch.ledger_reads`, `apbatch.ledger_events`): nobody else queries them.
A `Ledger` holds an engine (a connection pool) and is safe to share between threads.
"""

from __future__ import annotations

import json
import time
from collections.abc import Mapping, Sequence
from typing import Any

import sqlalchemy as sa
from sqlalchemy.dialects import postgresql, sqlite

from .errors import BadInputError
from .ledger_connect import make_engine, no_ledger
from .ledger_events import EventTables
from .ledger_reads import SubmissionReads
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


class Ledger(SubmissionReads, EventTables):
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
            Raised, with one line naming ``ledger.url`` and the fix (never the password), if the
            URL is malformed, names an unsupported database or one whose driver is not
            installed, if a SQLite ledger's directory cannot be made (a path under a regular
            file) or the ledger cannot be opened or written (read-only), if a server cannot be
            reached, or, without ``create``, if there is no ledger there.
        """
        engine, shown, sqlite_file = make_engine(url, create=create)
        ledger = cls(engine)
        try:
            if create:
                metadata.create_all(engine)
            elif not sa.inspect(engine).has_table(submissions.name):
                engine.dispose()
                raise no_ledger(shown)
            ledger._add_columns()
            if create:  # the caller will record submissions: find out now if it cannot (read-only)
                with engine.begin() as conn:
                    conn.execute(sa.update(submissions).where(sa.false()).values(state=submissions.c.state))
        except (sa.exc.SQLAlchemyError, engine.dialect.loaded_dbapi.Error) as exc:
            engine.dispose()
            cause = " ".join(str(getattr(exc, "orig", None) or exc).split())
            fix = ("check that the file and its directory exist and are writable by this user"
                   if sqlite_file else "check that the server is running and reachable, and the user and "
                   "database in ledger.url")
            raise BadInputError("ledger.url", f"cannot open the ledger at {shown}: {cause}", fix) from None
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
              now: float | None = None, tokens: Mapping[tuple[str, str], str] | None = None) -> list[CcdWork]:
        """Claim CCDs for submission in one transaction; return those not claimed before.

        Claiming is atomic per row (``INSERT ... ON CONFLICT DO NOTHING``), so two processes
        claiming the same CCD at once get it exactly once between them. ``tokens``: the
        submission token of each visit, ``(instrument, group_id) -> token``, stored with its
        rows before anything reaches the scheduler.
        """
        if not works:
            return []
        now = time.time() if now is None else now
        tokens = tokens or {}
        rows = [{"submit_token": tokens.get((w.instrument, w.group_id)), "instrument": w.instrument,
                 "group_id": w.group_id, "detector": w.detector, "detector_name": w.detector_name,
                 "visit": w.visit, "day_obs": w.day_obs, "intent": w.intent,
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

    def reclaim(self, rows: Sequence[Submission], now: float | None = None,
                tokens: Mapping[tuple[str, str], str] | None = None) -> list[int]:
        """Claim rows again for a resubmission, each only if it is unchanged since it was read.

        A compare-and-set on ``(state, attempts, job_id, claimed_at)``, one UPDATE ... RETURNING
        per batch of rows: of two processes resubmitting the same CCD, exactly one wins it. A
        won row is ``CLAIMED`` at ``now`` until it is recorded as submitted or refused (or, if
        its process dies first, until its claim is older than the claim timeout), with its
        visit's new submission token from ``tokens`` (see :meth:`claim`).

        Returns
        -------
        ids : `list` [`int`]
            The ids of the rows this call claimed.
        """
        now = time.time() if now is None else now
        c = submissions.c
        won: list[int] = []
        tokens = tokens or {}
        visits: dict[str | None, list[Submission]] = {}
        for r in rows:
            visits.setdefault(tokens.get((r.instrument, r.group_id)), []).append(r)
        with self.engine.begin() as conn:
            for token, batch in visits.items():
                for i in range(0, len(batch), _CHUNK):
                    same = [sa.and_(c.id == r.id, c.state == str(r.state), c.attempts == r.attempts,
                                    c.job_id.is_(None) if r.job_id is None else c.job_id == r.job_id,
                                    c.claimed_at == r.claimed_at) for r in batch[i:i + _CHUNK]]
                    stmt = (submissions.update().where(sa.or_(*same))
                            .values(state=CLAIMED, claimed_at=now, submit_token=token).returning(c.id))
                    won += [int(x) for x in conn.execute(stmt).scalars()]
        return sorted(won)

    # ------------------------------------------------------------------- outcomes
    def record_submitted(self, jobs: Sequence[SubmittedJob], backend: str, now: float | None = None,
                         command: Sequence[str] = (), token: str | None = None) -> int:
        """Store the scheduler's job ids of submitted (or resubmitted) CCDs; counts an attempt.

        ``command`` is the job command they were submitted with (`Backend.job_command`). With
        ``token`` (the claim's submission token), a compare-and-set: only rows still CLAIMED
        (or SUBMIT_FAILED) under that token are recorded, so a submission that a reconciliation
        (or the submitter itself) already recorded is never counted twice; a row refused under
        that token keeps its attempt count (the refusal was this submission).

        Returns
        -------
        recorded : `int`
            The number of rows recorded.
        """
        if not jobs:
            return 0
        now = time.time() if now is None else now
        c = submissions.c
        cmd = json.dumps(list(command)) if command else None
        with self.engine.begin() as conn:
            cur = {}
            for inst, group in {(j.work.instrument, j.work.group_id) for j in jobs}:
                q = sa.select(c.detector, c.job_id, c.attempts, c.job_history, c.state, c.submit_token).where(
                    c.instrument == inst, c.group_id == group)
                cur.update({(inst, group, r.detector): r for r in conn.execute(q)})
            values = []
            for job in jobs:
                w = job.work
                row = cur.get(w.key)
                history = json.loads(row.job_history) if row is not None else []
                if row is not None and row.job_id:
                    history.append(row.job_id)
                # refused under this very claim, yet accepted: that refusal was this attempt
                same = row is not None and token is not None and (row.state, row.submit_token) == (
                    SUBMIT_FAILED, token)
                values.append({
                    "k_instrument": w.instrument, "k_group": w.group_id, "k_detector": w.detector,
                    "backend": backend, "job_id": job.job_id, "state": SubmissionState.PENDING.value,
                    "exit_code": None, "reason": "",
                    "attempts": (row.attempts if row else 0) + (0 if same else 1),
                    "job_history": json.dumps(history), "submitted_at": now, "started_at": None,
                    "finished_at": None, "work": json.dumps(w.to_dict(), sort_keys=True), "command": cmd})
            stmt = submissions.update().where(
                c.instrument == sa.bindparam("k_instrument"), c.group_id == sa.bindparam("k_group"),
                c.detector == sa.bindparam("k_detector"))
            if token is None:
                conn.execute(stmt, values)
                return len(values)
            stmt = stmt.where(c.submit_token == token, c.state.in_([CLAIMED, SUBMIT_FAILED]))
            return sum(conn.execute(stmt, v).rowcount for v in values)

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

    def mark_cancelled(self, row_ids: Sequence[int], reason: str, now: float | None = None) -> list[int]:
        """Set rows to CANCELLED (never retried), each only if it has not finished: a row that is
        COMPLETED, FAILED, TIMEOUT or CANCELLED keeps its state. Returns the ids changed."""
        if not row_ids:
            return []
        now = time.time() if now is None else now
        c = submissions.c
        open_states = [CLAIMED, SUBMIT_FAILED, *UNFINISHED]
        changed: list[int] = []
        with self.engine.begin() as conn:
            for i in range(0, len(row_ids), _CHUNK):
                ids = list(row_ids[i:i + _CHUNK])
                stmt = (submissions.update().where(c.id.in_(ids), c.state.in_(open_states))
                        .values(state=SubmissionState.CANCELLED.value, reason=reason, retry=False,
                                finished_at=sa.func.coalesce(c.finished_at, now)).returning(c.id))
                changed += [int(x) for x in conn.execute(stmt).scalars()]
        return sorted(changed)

    def record_stages(self, instrument: str, group_id: str, detector: int,
                      stages: Mapping[str, float]) -> bool:
        """Store a job's stage times (`apbatch.latency.STAGES`) on its row; the latest attempt's win.

        Returns
        -------
        found : `bool`
            `False` if the ledger has no row for this CCD (a job run by hand).
        """
        return self._set_json(instrument, group_id, detector, stages=stages)

    def record_verification(self, instrument: str, group_id: str, detector: int,
                            verdict: Mapping[str, Any]) -> bool:
        """Store a calibration job's verification verdict (`apbatch.job.calverify`) on its row.

        Returns
        -------
        found : `bool`
            `False` if the ledger has no row for this CCD (a job run by hand).
        """
        return self._set_json(instrument, group_id, detector, verification=verdict)

    def _set_json(self, instrument: str, group_id: str, detector: int, **values: Mapping[str, Any]) -> bool:
        """Set JSON columns of one CCD's row; `False` if there is no such row."""
        c = submissions.c
        with self.engine.begin() as conn:
            res = conn.execute(submissions.update().where(
                c.instrument == instrument, c.group_id == group_id, c.detector == int(detector))
                .values(**{k: json.dumps(dict(v)) for k, v in values.items()}))
        return bool(res.rowcount)

    def disable_retry(self, group_id: str, instrument: str | None = None) -> None:
        """Never resubmit any CCD of this group automatically (its nextVisit was cancelled)."""
        c = submissions.c
        q = submissions.update().where(c.group_id == group_id)
        if instrument:
            q = q.where(c.instrument == instrument)
        with self.engine.begin() as conn:
            conn.execute(q.values(retry=False))

    def claim_retriable(self, max_attempts: int, claim_timeout: float = 300.0, now: float | None = None,
                        tokens: Mapping[tuple[str, str], str] | None = None) -> list[Submission]:
        """The :meth:`retriable` rows, each claimed again (:meth:`reclaim`, with ``tokens``) for
        resubmission.

        Two processes asking at once (a daemon and ``night reprocess``) get each CCD once.
        Returns the rows as they were before this claim.
        """
        now = time.time() if now is None else now
        rows = self.retriable(max_attempts, claim_timeout, now)
        won = set(self.reclaim(rows, now=now, tokens=tokens))
        return [r for r in rows if r.id in won]
