"""``apbatch submit``: submit the jobs of one event, or of a file of events, from the shell."""

from __future__ import annotations

import os
import sys
import time
from collections.abc import Sequence
from pathlib import Path
from typing import IO, Any

from ..backends.base import Backend
from ..config import ApbatchConfig
from ..dispatcher import Dispatcher
from ..errors import BadInputError
from ..events import Event, NextVisit, NextVisitCanceled, parse_event, rejection_reason
from ..fanout import fan_out
from ..ledger import Ledger
from ..sources.base import DEFAULTS, size_error
from ..sources.spool import read_limited, split_events

__all__ = ["read_events", "submit_events"]


def read_events(path: str, stdin: IO[Any] | None = None, *, max_event_bytes: int | None = None,
                max_file_bytes: int | None = None) -> list[tuple[Event, Any, str]]:
    """Parse every event of a file (``-``: standard input) before anything is submitted.

    A file holds one JSON event, a JSON list of events, or JSON lines. The limits are those of
    the daemon's sources (`apbatch.sources.base.decode_json`): file and event size, nesting
    depth, UTF-8.

    Parameters
    ----------
    path : `str`
        The event file, or ``-`` for ``stdin``.
    stdin : binary or text stream, optional
        Default `sys.stdin` (its bytes, so that invalid UTF-8 is reported, not fatal).
    max_event_bytes, max_file_bytes : `int`, optional
        Default ``source.max_event_bytes`` and ``source.max_file_bytes``.

    Returns
    -------
    events : `list` [`tuple`]
        ``(event, payload, origin)`` per event, in file order.

    Raises
    ------
    BadInputError
        Raised if the file cannot be read, is too large, or any event in it is invalid (naming
        which one and why).
    """
    file_limit = DEFAULTS.max_file_bytes if max_file_bytes is None else max_file_bytes
    if path == "-":
        data, name, suffix = _read_stdin(stdin or sys.stdin, file_limit), "stdin", ".json"
        if len(data) > file_limit:
            raise BadInputError("stdin", f"more than {file_limit} bytes",
                                "send fewer events at once or raise source.max_file_bytes")
    else:
        p = Path(path)
        try:
            with open(p, "rb") as fh:
                data = read_limited(fh.fileno(), file_limit)
                size = os.fstat(fh.fileno()).st_size
        except OSError as exc:
            raise BadInputError("EVENT_FILE", f"cannot read {path!r}: {exc.strerror}",
                                "check the path") from None
        name, suffix = p.name, (".jsonl" if p.suffix == ".jsonl" else ".json")
        if len(data) > file_limit:
            raise size_error(max(size, len(data)), file_limit, name, "source.max_file_bytes")
    records = split_events(data, suffix, max_event_bytes)
    out = []
    for i, (payload, error) in enumerate(records):
        origin = f"{name}#{i}" if len(records) > 1 else name
        try:
            if error is not None:
                raise error
            out.append((parse_event(payload), payload, origin))
        except BadInputError as exc:
            raise BadInputError(f"{origin}: {exc.field}", exc.problem, exc.fix) from None
    if not out:
        raise BadInputError("EVENT_FILE", f"{path!r} holds no event")
    return out


def _read_stdin(stream: IO[Any], limit: int) -> bytes:
    """At most ``limit + 1`` bytes of a stream (its bytes under the text when it has them)."""
    data = getattr(stream, "buffer", stream).read(limit + 1)
    if isinstance(data, str):  # a text-only stream; lone surrogates are bytes it could not decode
        return data.encode("utf-8", "surrogateescape")
    return data


def submit_events(config: ApbatchConfig, path: str, *, dry_run: bool = False, check_age: bool = False,
                  backend: Backend | None = None, ledger: Ledger | None = None,
                  stdin: IO[Any] | None = None) -> list[dict[str, Any]]:
    """Submit the per-CCD jobs of the events in ``path`` (nextVisits are submitted at once).

    Parameters
    ----------
    config : `ApbatchConfig`
        The configuration.
    path : `str`
        Event file, or ``-`` for standard input.
    dry_run : `bool`
        Fan out and report, but neither claim nor submit.
    check_age : `bool`
        Reject events older than ``events.max_age`` (the daemon always does).
    backend, ledger : optional
        Injected for tests; default from the configuration.

    Returns
    -------
    results : `list` [`dict`]
        Per event: ``origin``, ``kind``, ``group_id``, ``action``, ``reason`` and ``jobs``
        (``job_id``, ``detector``, ``detector_name``, ``label``).

    Raises
    ------
    BadInputError
        Raised if an event is invalid; nothing is submitted then.
    """
    events = read_events(path, stdin, max_event_bytes=config.source.max_event_bytes,
                         max_file_bytes=config.source.max_file_bytes)
    if dry_run:
        return [_dry_run(config, ev, origin, events, check_age) for ev, _, origin in events]
    own_ledger = ledger is None
    ledger = ledger or Ledger.from_config(config)
    try:
        if backend is None:
            from ..backends import make_backend

            backend = make_backend(config)
        dispatcher = Dispatcher(config, ledger, backend, mode="dynamic", check_age=check_age)
        results = []
        for event, payload, origin in events:
            outcome = dispatcher.handle(event, payload, origin)
            results.append({
                "origin": origin, "kind": event.kind, "group_id": event.groupId, "action": outcome.action,
                "reason": outcome.reason,
                "jobs": [{"job_id": j.job_id, "detector": j.work.detector,
                          "detector_name": j.work.detector_name,
                           "label": j.work.label} for j in outcome.jobs]})
        return results
    finally:
        if own_ledger:
            ledger.close()


def _dry_run(config: ApbatchConfig, event: Event, origin: str, events: Sequence[tuple[Event, Any, str]],
             check_age: bool) -> dict[str, Any]:
    base: dict[str, Any] = {"origin": origin, "kind": event.kind, "group_id": event.groupId, "reason": "",
                            "jobs": []}
    reason = rejection_reason(event, config.events.max_age if check_age else None, time.time(),
                              config.events.process_calibrations)
    if reason is not None:
        return {**base, "action": "rejected", "reason": reason}
    if isinstance(event, NextVisitCanceled):
        return {**base, "action": "would-cancel"}
    visit = next((e for e, _, _ in events if isinstance(e, NextVisit) and e.groupId == event.groupId
                  and e.instrument == event.instrument), None)
    works = fan_out(event, config, next_visit=visit)
    return {**base, "action": "dry-run", "reason": f"{len(works)} job(s) would be submitted",
            "jobs": [{"job_id": None, "detector": w.detector, "detector_name": w.detector_name,
                      "label": w.label,
                          "args": w.job_args()} for w in works]}
