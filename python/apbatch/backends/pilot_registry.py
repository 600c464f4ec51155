"""The pilots' registry: one JSON record per pilot under ``<state dir>/pilots/``.

A pilot (:mod:`apbatch.script.pilot`) writes its record when it starts, after each item and
when it ends; :func:`pilot_records` reads them back and reports a pilot whose process (or
batch job) is gone without saying so as ``lost``. The pilot backend counts live pilots from
it, and ``apbatch status`` shows it.
"""

from __future__ import annotations

import json
import socket
from collections.abc import Callable
from pathlib import Path
from typing import Any

from .base import JobState, JobStatus
from .local import _proc_start_ticks, _write_atomic

__all__ = ["pilot_id", "pilot_records", "register_pilot"]


def pilot_id(pid: int, host: str | None = None) -> str:
    """``<host>-<pid>``: names a local pilot's record file (a batch pilot's is ``<kind>-<batch id>``)."""
    return f"{host or socket.gethostname()}-{pid}"


def register_pilot(state_dir: Path, record: dict[str, Any]) -> Path:
    """Write a pilot's record (atomically) to ``pilots/<pilot id>.json``; returns its path.

    The id is ``record["pilot"]`` if given (a batch pilot's), else `pilot_id` of its pid and host.
    """
    name = record.get("pilot") or pilot_id(record["pid"], record.get("host"))
    path = state_dir / "pilots" / f"{name}.json"
    _write_atomic(path, json.dumps({**record, "pilot": path.stem}))
    return path


def pilot_records(state_dir: Path, batch_states: Callable[[list[str]], dict[str, JobStatus]] | None = None
                  ) -> list[dict[str, Any]]:
    """The pilots' records; one whose process is gone without saying so is ``lost``.

    A local pilot on this host lives while its pid has its start ticks; a batch pilot (record
    with ``batch_id``) while ``batch_states`` says its job is queued, running or held (without
    ``batch_states`` its record is taken as written).
    """
    out: list[dict[str, Any]] = []
    folder = state_dir / "pilots"
    if not folder.is_dir():
        return out
    for path in folder.glob("*.json"):
        try:
            rec = json.loads(path.read_text())
        except (OSError, ValueError):
            continue
        here = not rec.get("batch_id") and rec.get("host") == socket.gethostname()
        if rec.get("state") not in ("ended", "lost") and here \
                and _proc_start_ticks(int(rec["pid"])) != rec.get("ticks"):
            rec = {**rec, "state": "lost", "reason": "process gone without ending (killed?)"}
        out.append(rec)
    batch = [r for r in out if r.get("batch_id") and r.get("state") not in ("ended", "lost")]
    if batch and batch_states is not None:
        states = batch_states([str(r["batch_id"]) for r in batch])
        for rec in batch:
            st = states.get(str(rec["batch_id"]))
            if st is None or st.state.finished or st.state is JobState.UNKNOWN:
                how = _how(st)
                rec.update(state="lost", reason=f"{rec['batch']} job {rec['batch_id']} {how} without ending")
    return out


def _how(status: JobStatus | None) -> str:
    """A batch job's end for a reason line: ``CANCELLED``, ``TIMEOUT: ...``, ``gone``."""
    if status is None:
        return "gone"
    return status.state.name + (f": {status.reason}" if status.reason else "")
