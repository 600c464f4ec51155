"""The `EventSource` protocol and the `RawEvent` it yields.

A source hands the dispatcher undecoded events (:meth:`EventSource.poll`) and is told, per
event, when it has been handled (:meth:`EventSource.ack`), so that it can commit its
position (move a spool file to ``done/``, commit a Kafka offset) only after the event was
recorded. An event whose handling was interrupted is delivered again after a restart; the
ledger makes that harmless.
"""

from __future__ import annotations

import dataclasses
from collections.abc import Sequence
from typing import Any, Protocol, runtime_checkable

__all__ = ["EventSource", "RawEvent"]


@dataclasses.dataclass(frozen=True)
class RawEvent:
    """One event as received, before validation.

    Attributes
    ----------
    payload : `dict`, `list`, `str` or `bytes`
        A decoded JSON value, or the text/bytes that failed to decode (the parser reports why).
    origin : `str`
        Where it came from, for logs and the dead-letter record (``spool:file.json#2``,
        ``kafka:topic[0]@41``, ``stdin:7``).
    topic : `str` or `None`
        Kafka topic (tells the event kind and the camera).
    token : `object`
        Source-private handle used by :meth:`EventSource.ack`.
    """

    payload: Any
    origin: str
    topic: str | None = None
    token: Any = dataclasses.field(default=None, compare=False, repr=False)


@runtime_checkable
class EventSource(Protocol):
    """Where the daemon's events come from. Used from one thread."""

    name: str

    def poll(self, timeout: float) -> list[RawEvent]:
        """Return the events available now, waiting up to ``timeout`` seconds for one."""

    def ack(self, events: Sequence[RawEvent], ok: bool = True) -> None:
        """Tell the source these events were handled (``ok=False``: they were bad input)."""

    @property
    def exhausted(self) -> bool:
        """`True` when no event will ever come again (end of stdin)."""

    def close(self) -> None:
        """Release files, threads or connections."""
