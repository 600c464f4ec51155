"""The `EventSource` protocol, the `RawEvent` it yields, and the one JSON decoder of every intake.

A source hands the dispatcher undecoded events (:meth:`EventSource.poll`) and is told, per
event, when it has been handled (:meth:`EventSource.ack`), so that it can commit its
position (move a spool file to ``done/``, commit a Kafka offset) only after the event was
recorded. An event whose handling was interrupted is delivered again after a restart; the
ledger makes that harmless.

Every intake (spool file, stdin line, Kafka message, ``apbatch submit``) decodes event text
with :func:`decode_json`, so one set of limits holds everywhere: at most
``source.max_event_bytes`` of UTF-8 per event and at most :data:`MAX_JSON_DEPTH` levels of
nesting. Whatever breaks them becomes a `BadInputError` naming the problem (dead-lettered by
the daemon, exit code 2 for ``apbatch submit``), never an exception that escapes the loop.
"""

from __future__ import annotations

import dataclasses
import json
from collections.abc import Sequence
from typing import Any, NamedTuple, Protocol, runtime_checkable

from ..config import SourceConfig
from ..errors import BadInputError

__all__ = ["DEFAULTS", "HEAD_KEPT", "MAX_JSON_DEPTH", "Decoded", "EventSource", "RawEvent", "decode_json",
           "json_depth", "payload_text", "size_error"]

MAX_JSON_DEPTH = 32
"""Deepest nesting of arrays/objects accepted in an event (a real one uses 3 levels)."""

DEFAULTS = SourceConfig()
"""The configured defaults, for sources made without a configuration (tests, scripts)."""

HEAD_KEPT = 1024
"""Bytes (or characters) of an oversized input kept for its dead letter."""


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
    error : `str` or `None`
        Set if the source already knows the event is bad (a symbolic link, an oversized or
        undecodable file or line): the one-line reason, and the dispatcher dead-letters it
        without parsing.
    """

    payload: Any
    origin: str
    topic: str | None = None
    token: Any = dataclasses.field(default=None, compare=False, repr=False)
    error: str | None = None


class Decoded(NamedTuple):
    """What :func:`decode_json` made of one event's text."""

    payload: Any
    """The decoded JSON value, or the (possibly shortened) input if ``error`` is set."""
    error: BadInputError | None
    """Why the input is not an event, or `None`."""


def size_error(size: int, limit: int, what: str = "event", setting: str = "source.max_event_bytes",
               ) -> BadInputError:
    """The error for an input of ``size`` bytes over ``limit``."""
    return BadInputError(what, f"{size} bytes, over the limit of {limit}",
                         f"send smaller events or raise {setting}")


def json_depth(value: Any, limit: int = MAX_JSON_DEPTH) -> int:
    """Nesting depth of a decoded JSON value (a scalar is 0), counted up to ``limit + 1``.

    Iterative, so that no input can exhaust the interpreter's stack.
    """
    deepest = 0
    stack = [(value, 0)]
    while stack:
        item, depth = stack.pop()
        if isinstance(item, dict):
            children: Any = item.values()
        elif isinstance(item, list):
            children = item
        else:
            continue
        depth += 1
        deepest = max(deepest, depth)
        if deepest > limit:
            break
        stack.extend((child, depth) for child in children)
    return deepest


def decode_json(data: str | bytes | bytearray, max_bytes: int | None = None) -> Decoded:
    """Decode one event's JSON text, never raising for bad input.

    Parameters
    ----------
    data : `str` or `bytes`
        The text of one event (a spool file, a line, a message).
    max_bytes : `int`, optional
        Longest input accepted, in bytes of UTF-8; default ``source.max_event_bytes``.

    Returns
    -------
    decoded : `Decoded`
        The value, or the input (its first kilobyte if oversized) with a `BadInputError`
        naming the problem: not UTF-8, too large, malformed JSON (numbers over Python's digit
        limit included), nested deeper than :data:`MAX_JSON_DEPTH`, an unpaired surrogate
        escape (``"\\udcff"``) in a string.
    """
    limit = DEFAULTS.max_event_bytes if max_bytes is None else max_bytes
    text: str | None = None
    if isinstance(data, str):
        try:
            raw = data.encode("utf-8")
            text = data
        except UnicodeEncodeError:  # lone surrogates: a text stream decoded with surrogateescape
            raw = _surrogates_to_bytes(data)
    else:
        raw = bytes(data)
    if len(raw) > limit:
        return Decoded(data[:HEAD_KEPT], size_error(len(raw), limit))
    if text is None:
        try:
            text = raw.decode("utf-8")
        except UnicodeDecodeError as exc:
            return Decoded(raw, BadInputError(
                "event", f"not UTF-8 text ({exc.reason} at byte {exc.start})", "send UTF-8 encoded JSON"))
    try:
        value = json.loads(text)
    except RecursionError:
        return Decoded(text, _too_deep())
    except ValueError as exc:  # JSONDecodeError, and int() over sys.get_int_max_str_digits()
        return Decoded(text, BadInputError("event", f"malformed JSON: {exc}",
                                           "send one JSON object per event"))
    if json_depth(value) > MAX_JSON_DEPTH:
        return Decoded(text, _too_deep())
    if not _encodable(value):  # "\\udcff" escapes: valid JSON, but no text any database or argv holds
        return Decoded(text, BadInputError("event", "a string holds an unpaired UTF-16 surrogate escape",
                                           "send valid Unicode text"))
    return Decoded(value, None)


def _encodable(value: Any) -> bool:
    """`True` if every string (keys included) of a decoded JSON value is valid Unicode text."""
    stack = [value]
    while stack:
        item = stack.pop()
        if isinstance(item, dict):
            stack.extend(item.keys())
            stack.extend(item.values())
        elif isinstance(item, list):
            stack.extend(item)
        elif isinstance(item, str):
            try:
                item.encode("utf-8")
            except UnicodeEncodeError:
                return False
    return True


def _surrogates_to_bytes(text: str) -> bytes:
    """The bytes a surrogateescape-decoded text came from (other lone surrogates escaped)."""
    try:
        return text.encode("utf-8", "surrogateescape")
    except UnicodeEncodeError:
        return text.encode("utf-8", "backslashreplace")


def _too_deep() -> BadInputError:
    return BadInputError("event", f"JSON nested deeper than {MAX_JSON_DEPTH} levels",
                         "send flat JSON objects")


def payload_text(payload: Any, limit: int | None = None) -> str:
    """A payload as storable text (dead letters): undecodable bytes escaped, at most ``limit`` chars.

    Bytes that are not UTF-8 (and lone surrogates) become ``\\xNN`` escapes, so the text can be
    stored in any database and JSON file; a longer text is cut and says how long it was.
    """
    limit = DEFAULTS.max_event_bytes if limit is None else limit
    if isinstance(payload, bytes | bytearray):
        text = bytes(payload).decode("utf-8", "backslashreplace")
    elif isinstance(payload, str):
        text = _surrogates_to_bytes(payload).decode("utf-8", "backslashreplace")
    else:
        try:
            text = json.dumps(payload, sort_keys=True, default=str)
        except (ValueError, TypeError, RecursionError):
            text = f"<undecodable {type(payload).__name__}>"
    if len(text) > limit:
        text = f"{text[:limit]}... [cut: {len(text)} characters in all]"
    return text


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
