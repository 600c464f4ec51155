"""``apbatch submit``: submit the jobs of one event, or of a file of events, from the shell."""

from __future__ import annotations

import sys
import time
from collections.abc import Sequence
from pathlib import Path
from typing import Any, TextIO

from ..backends.base import Backend
from ..config import ApbatchConfig
from ..dispatcher import Dispatcher
from ..errors import BadInputError
from ..events import Event, NextVisit, NextVisitCanceled, parse_event, rejection_reason
from ..fanout import fan_out
from ..ledger import Ledger
from ..sources.spool import split_events

__all__ = ["read_events", "submit_events"]


def read_events(path: str, stdin: TextIO | None = None) -> list[tuple[Event, Any, str]]:
    """Parse every event of a file (``-``: standard input) before anything is submitted.

    A file holds one JSON event, a JSON list of events, or JSON lines.

    Returns
    -------
    events : `list` [`tuple`]
        ``(event, payload, origin)`` per event, in file order.

    Raises
    ------
    BadInputError
        Raised if the file cannot be read or any event in it is invalid (naming which one).
    """
    if path == "-":
        data, name, suffix = (stdin or sys.stdin).read().encode("utf-8"), "stdin", ".json"
    else:
        p = Path(path)
        try:
            data = p.read_bytes()
        except OSError as exc:
            raise BadInputError("EVENT_FILE", f"cannot read {path!r}: {exc.strerror}",
                                "check the path") from None
        name, suffix = p.name, (".jsonl" if p.suffix == ".jsonl" else ".json")
    payloads = split_events(data, suffix)
    out = []
    for i, payload in enumerate(payloads):
        origin = f"{name}#{i}" if len(payloads) > 1 else name
        try:
            out.append((parse_event(payload), payload, origin))
        except BadInputError as exc:
            raise BadInputError(f"{origin}: {exc.field}", exc.problem, exc.fix) from None
    if not out:
        raise BadInputError("EVENT_FILE", f"{path!r} holds no event")
    return out


def submit_events(config: ApbatchConfig, path: str, *, dry_run: bool = False, check_age: bool = False,
                  backend: Backend | None = None, ledger: Ledger | None = None,
                  stdin: TextIO | None = None) -> list[dict[str, Any]]:
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
    events = read_events(path, stdin)
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
