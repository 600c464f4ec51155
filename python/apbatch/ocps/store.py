"""Persistent OCPS requests: one table in the OCPS ledger's database, every change a transaction.

Table ``ocps_requests`` (SQLAlchemy Core; SQLite or PostgreSQL, the engine of the OCPS
`apbatch.ledger.Ledger`, so requests and their jobs' rows live in one database): one row per
request with the fields of `apbatch.ocps.model.OcpsRequest` (JSON columns for the mappings),
and three of the runner's own:

* ``ccds``: per CCD of the request, ``{"key": [instrument, group, detector], "work": {...},
  "job_id", "state", "exit_code", "reason", "ended"}``;
* ``event``: the completion event, written in the same transaction as the final phase;
* ``published_at``: set by compare-and-set (``WHERE published_at IS NULL``) once the broker
  acknowledged the event, so a restarted runner re-publishes only events never acknowledged.

Phase changes are compare-and-set on the phase read (:meth:`RequestStore.set_phase`): a request
aborted while the runner was starting it stays aborted.
"""

from __future__ import annotations

import builtins
import dataclasses
import json
import time
from collections.abc import Mapping, Sequence
from typing import Any

import sqlalchemy as sa

from .model import DataId, OcpsRequest, Phase, UnknownRequestError

__all__ = ["RequestStore", "requests_table"]

_metadata = sa.MetaData()

requests_table = sa.Table(
    "ocps_requests", _metadata,
    sa.Column("id", sa.String(64), primary_key=True),
    sa.Column("seq", sa.Integer, nullable=False, index=True),
    sa.Column("pipeline", sa.String(64), nullable=False),
    sa.Column("data_id", sa.Text, nullable=False),
    sa.Column("overrides", sa.Text, nullable=False),
    sa.Column("config_file", sa.Text),
    sa.Column("mode", sa.String(8), nullable=False),
    sa.Column("phase", sa.String(16), nullable=False, index=True),
    sa.Column("created_at", sa.Float, nullable=False),
    sa.Column("started_at", sa.Float),
    sa.Column("ended_at", sa.Float),
    sa.Column("error", sa.Text),
    sa.Column("results", sa.Text, nullable=False, default="{}"),
    sa.Column("jobs", sa.Text, nullable=False, default="[]"),
    sa.Column("telemetry", sa.Text, nullable=False, default="[]"),
    sa.Column("owner", sa.String(128), nullable=False),
    sa.Column("ccds", sa.Text, nullable=False, default="[]"),
    sa.Column("event", sa.Text),
    sa.Column("published_at", sa.Float),
    sa.Column("deleted", sa.Boolean, nullable=False, default=False),
)


def _request(row: Mapping[str, Any]) -> OcpsRequest:
    return OcpsRequest(
        id=row["id"], pipeline=row["pipeline"], data_id=DataId(**json.loads(row["data_id"])),
        overrides=json.loads(row["overrides"]), config_file=row["config_file"], mode=row["mode"],
        phase=Phase(row["phase"]), created_at=row["created_at"], started_at=row["started_at"],
        ended_at=row["ended_at"], error=row["error"], results=json.loads(row["results"] or "{}"),
        jobs=tuple(json.loads(row["jobs"] or "[]")), telemetry=tuple(json.loads(row["telemetry"] or "[]")),
        owner=row["owner"])


class RequestStore:
    """The ``ocps_requests`` table; see the module docstring.

    Parameters
    ----------
    engine : `sqlalchemy.engine.Engine`
        The OCPS ledger's engine (`apbatch.ledger.Ledger.engine`); the table is created if missing.

    Notes
    -----
    Lifetime: the service's. Thread-safe (each call is its own transaction on a pooled engine).
    """

    def __init__(self, engine: sa.engine.Engine):
        self.engine = engine
        _metadata.create_all(engine)

    # ------------------------------------------------------------------ writes
    def insert(self, request: OcpsRequest) -> OcpsRequest:
        """Store a new request."""
        t = requests_table
        with self.engine.begin() as conn:
            seq = conn.execute(sa.select(sa.func.coalesce(sa.func.max(t.c.seq), 0))).scalar_one() + 1
            conn.execute(t.insert().values(
                id=request.id, seq=seq, pipeline=request.pipeline,
                data_id=json.dumps(dataclasses.asdict(request.data_id)),
                overrides=json.dumps(dict(request.overrides)), config_file=request.config_file,
                mode=request.mode, phase=str(request.phase), created_at=request.created_at,
                started_at=request.started_at, ended_at=request.ended_at, error=request.error,
                results=json.dumps(dict(request.results)), jobs=json.dumps(list(request.jobs)),
                telemetry=json.dumps([dict(x) for x in request.telemetry]), owner=request.owner,
                ccds="[]", deleted=False))
        return request

    def set_phase(self, request_id: str, new: Phase, *, expect: Sequence[Phase], **values: Any) -> bool:
        """Move a request to ``new`` if its phase is one of ``expect`` (compare-and-set).

        ``values``: other columns to set in the same transaction (``started_at``, ``error``,
        ``results``, ``event``...; mappings and lists are stored as JSON).

        Returns
        -------
        changed : `bool`
            `False` if the request is gone or its phase is not in ``expect``.
        """
        t = requests_table
        enc = {k: json.dumps(v, default=str) if isinstance(v, dict | list | tuple) else v
               for k, v in values.items()}
        with self.engine.begin() as conn:
            res = conn.execute(t.update().where(t.c.id == request_id, t.c.phase.in_([str(p) for p in expect]))
                               .values(phase=str(new), **enc))
        return bool(res.rowcount)

    def update(self, request_id: str, **values: Any) -> None:
        """Set columns (JSON-encoding mappings and lists) without a phase change."""
        t = requests_table
        enc = {k: json.dumps(v, default=str) if isinstance(v, dict | list | tuple) else v
               for k, v in values.items()}
        with self.engine.begin() as conn:
            conn.execute(t.update().where(t.c.id == request_id).values(**enc))

    def mark_published(self, request_id: str, now: float | None = None) -> bool:
        """Record that the completion event was acknowledged; `True` only the first time."""
        t = requests_table
        with self.engine.begin() as conn:
            res = conn.execute(t.update().where(t.c.id == request_id, t.c.published_at.is_(None))
                               .values(published_at=time.time() if now is None else now))
        return bool(res.rowcount)

    def delete(self, request_id: str) -> bool:
        """Hide a request from :meth:`get` and :meth:`list`; `False` if there was none.

        The row stays until its completion event (if any) is published: :meth:`purge`.
        """
        t = requests_table
        with self.engine.begin() as conn:
            return bool(conn.execute(t.update().where(t.c.id == request_id, t.c.deleted.is_(False))
                                     .values(deleted=True)).rowcount)

    def purge(self) -> int:
        """Remove deleted requests that have nothing left to publish; returns how many."""
        t = requests_table
        with self.engine.begin() as conn:
            return conn.execute(t.delete().where(t.c.deleted.is_(True), sa.or_(
                t.c.event.is_(None), t.c.published_at.is_not(None)), t.c.phase.in_(
                [str(p) for p in Phase if p.final or p is Phase.PENDING]))).rowcount

    # ------------------------------------------------------------------ reads
    def _row(self, request_id: str, deleted: bool = False) -> Mapping[str, Any]:
        t = requests_table
        with self.engine.connect() as conn:
            row = conn.execute(sa.select(t).where(t.c.id == request_id)).mappings().first()
        if row is None or (row["deleted"] and not deleted):
            raise UnknownRequestError(request_id)
        return dict(row)

    def get(self, request_id: str, deleted: bool = False) -> OcpsRequest:
        """The request (a deleted one only if ``deleted``); `UnknownRequestError` if there is none."""
        return _request(self._row(request_id, deleted))

    def ccds(self, request_id: str) -> builtins.list[dict[str, Any]]:
        """The runner's per-CCD records of a request."""
        return json.loads(self._row(request_id, deleted=True)["ccds"] or "[]")

    def event(self, request_id: str) -> tuple[dict[str, Any] | None, float | None]:
        """The stored completion event and when it was acknowledged (`None`: not yet)."""
        row = self._row(request_id, deleted=True)
        return (json.loads(row["event"]) if row["event"] else None), row["published_at"]

    def list(self, *, phases: Sequence[Phase] = (), after: float | None = None,
             last: int | None = None) -> list[OcpsRequest]:
        """Requests in creation order, filtered as UWS job lists are (``last``: the newest n).
        Deleted requests (aborted first, so never running) are left out.
        """
        t = requests_table
        q = sa.select(t).where(t.c.deleted.is_(False))
        if phases:
            q = q.where(t.c.phase.in_([str(p) for p in phases]))
        if after is not None:
            q = q.where(t.c.created_at > after)
        if last is not None:
            q = q.order_by(t.c.seq.desc()).limit(max(int(last), 0))
        else:
            q = q.order_by(t.c.seq)
        with self.engine.connect() as conn:
            rows = [_request(dict(r)) for r in conn.execute(q).mappings()]
        return rows if last is None else rows[::-1]

    def unpublished(self) -> builtins.list[str]:
        """Ids of requests in a final phase whose completion event was never acknowledged."""
        t = requests_table
        with self.engine.connect() as conn:
            return list(conn.execute(sa.select(t.c.id).where(
                t.c.event.is_not(None), t.c.published_at.is_(None)).order_by(t.c.seq)).scalars())
