"""The ledger's event tables: every event received, and those that could not be parsed.

`EventTables` is a part of `apbatch.ledger.Ledger` (a base class of it, kept in its own
module for size): every SQL statement on ``events`` and ``dead_letters`` is here.
"""

from __future__ import annotations

import json
import time
from typing import Any

import sqlalchemy as sa

from .ledger_schema import dead_letters, events

__all__ = ["EventTables"]


def _payload_text(payload: Any) -> str:
    if isinstance(payload, bytes | bytearray):
        return payload.decode("utf-8", errors="replace")
    if isinstance(payload, str):
        return payload
    return json.dumps(payload, sort_keys=True, default=str)


class EventTables:
    """Queries on the event tables; mixed into `apbatch.ledger.Ledger` (which sets ``engine``)."""

    engine: sa.engine.Engine

    def record_event(self, kind: str, payload: Any, *, instrument: str = "", group_id: str = "",
                     source: str = "", accepted: bool, reason: str = "",
                     received_at: float | None = None, day_obs: int | None = None) -> int:
        """Store one parsed event (``day_obs``: the night it belongs to); returns its row id."""
        with self.engine.begin() as conn:
            res = conn.execute(events.insert().values(
                received_at=time.time() if received_at is None else received_at, kind=kind,
                instrument=instrument or "", group_id=group_id or "", source=source, accepted=accepted,
                reason=reason, payload=_payload_text(payload), day_obs=day_obs))
            key = res.inserted_primary_key
            if key is None:  # only for an executemany, never for this single-row insert
                raise RuntimeError("inserting an event returned no row id")
            return int(key[0])

    def find_event(self, kind: str, instrument: str, group_id: str) -> str | None:
        """Payload of the latest accepted event of this kind for the group, or `None`."""
        e = events.c
        q = (sa.select(e.payload).where(e.kind == kind, e.instrument == instrument, e.group_id == group_id,
                                        e.accepted.is_(True)).order_by(e.id.desc()).limit(1))
        with self.engine.connect() as conn:
            return conn.execute(q).scalar()

    def event_rows(self, kind: str | None = None, *, accepted: bool | None = None,
                   received_from: float | None = None, received_before: float | None = None,
                   day_obs: int | None = None) -> list[dict[str, Any]]:
        """Stored events matching every given filter, oldest first.

        With ``day_obs``, the events of that night: those recorded with it, and those recorded
        without one (a nextVisitCanceled, a ledger from before the column) received in the
        ``received_from``/``received_before`` window.
        """
        e = events.c
        q = sa.select(events).order_by(e.id)
        if kind:
            q = q.where(e.kind == kind)
        if accepted is not None:
            q = q.where(e.accepted.is_(accepted))
        window = []
        if received_from is not None:
            window.append(e.received_at >= received_from)
        if received_before is not None:
            window.append(e.received_at < received_before)
        if day_obs is not None:
            q = q.where(sa.or_(e.day_obs == int(day_obs), sa.and_(e.day_obs.is_(None), *window)))
        elif window:
            q = q.where(*window)
        with self.engine.connect() as conn:
            return [dict(r._mapping) for r in conn.execute(q)]

    def record_dead_letter(self, payload: Any, error: str, source: str = "",
                           received_at: float | None = None) -> None:
        """Store an event that could not be parsed."""
        with self.engine.begin() as conn:
            conn.execute(dead_letters.insert().values(
                received_at=time.time() if received_at is None else received_at, source=source,
                error=error, payload=_payload_text(payload)))

    def dead_letter_rows(self, received_from: float | None = None,
                         received_before: float | None = None) -> list[dict[str, Any]]:
        """Dead letters (optionally received in ``[received_from, received_before)``), oldest first."""
        d = dead_letters.c
        q = sa.select(dead_letters).order_by(d.id)
        if received_from is not None:
            q = q.where(d.received_at >= received_from)
        if received_before is not None:
            q = q.where(d.received_at < received_before)
        with self.engine.connect() as conn:
            return [dict(r._mapping) for r in conn.execute(q)]
