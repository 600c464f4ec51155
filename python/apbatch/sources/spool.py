"""`SpoolSource`: events dropped as JSON files into a directory.

Producers write a file under a temporary name (``.name.tmp`` or ``name.json.tmp``) and rename
it to ``*.json`` or ``*.jsonl`` when complete; only those two suffixes are read. A file holds
one event (a JSON object), a JSON list of events, or JSON lines. Files are read oldest first;
once every event of a file has been acknowledged the file moves to ``done/``, or to
``failed/`` if any of its events was bad (the dead-letter record says which and why). A file
still in the spool directory after a crash is read again on restart; the ledger makes the
repeat harmless.
"""

from __future__ import annotations

import json
import logging
import os
import time
from collections.abc import Sequence
from pathlib import Path

from .base import RawEvent

__all__ = ["SpoolSource"]

_log = logging.getLogger(__name__)
_SUFFIXES = (".json", ".jsonl")


def split_events(data: bytes, suffix: str) -> list[object]:
    """Decode a spool file into payloads: parsed JSON values, or the text that did not parse."""
    try:
        text = data.decode("utf-8")
    except UnicodeDecodeError:
        return [data]
    if suffix == ".json":
        try:
            value = json.loads(text)
        except json.JSONDecodeError:
            lines = [ln for ln in text.splitlines() if ln.strip()]
            if len(lines) <= 1:
                return [text]
        else:
            return list(value) if isinstance(value, list) else [value]
    out: list[object] = []
    for line in text.splitlines():
        if line.strip():
            try:
                out.append(json.loads(line))
            except json.JSONDecodeError:
                out.append(line)
    return out or [text]


class SpoolSource:
    """Read events from ``directory``; see the module docstring. Not thread-safe.

    Parameters
    ----------
    directory : `str` or `Path`
        The spool directory; ``done/`` and ``failed/`` are made inside it. Created on first poll.
    max_batch : `int`
        At most this many events per :meth:`poll`.
    """

    name = "spool"

    def __init__(self, directory: str | os.PathLike, max_batch: int = 1000):
        self.directory = Path(directory)
        self.max_batch = max_batch
        self._pending: dict[str, list] = {}  # file name -> [events left to ack, any bad]

    @property
    def exhausted(self) -> bool:
        return False

    def _ready_files(self) -> list[Path]:
        files = []
        with os.scandir(self.directory) as it:
            for entry in it:
                if (entry.is_file() and not entry.name.startswith(".") and entry.name.endswith(_SUFFIXES)
                        and entry.name not in self._pending):
                    files.append((entry.stat().st_mtime, entry.name))
        return [self.directory / name for _, name in sorted(files)]

    def poll(self, timeout: float) -> list[RawEvent]:
        """Events of the next unread files; sleeps up to ``timeout`` if there are none."""
        self.directory.mkdir(parents=True, exist_ok=True)
        deadline = time.monotonic() + timeout
        while True:
            out: list[RawEvent] = []
            for path in self._ready_files():
                try:
                    payloads = split_events(path.read_bytes(), path.suffix)
                except FileNotFoundError:
                    continue  # taken by another reader
                self._pending[path.name] = [len(payloads), False]
                out += [RawEvent(p, f"spool:{path.name}#{i}", token=path.name) for i,
                        p in enumerate(payloads)]
                if len(out) >= self.max_batch:
                    break
            if out or time.monotonic() >= deadline:
                return out
            time.sleep(min(0.05, max(0.0, deadline - time.monotonic())))

    def ack(self, events: Sequence[RawEvent], ok: bool = True) -> None:
        """Count events of each file as handled; move a fully handled file out of the spool."""
        for ev in events:
            entry = self._pending.get(ev.token)
            if entry is None:
                continue
            entry[0] -= 1
            entry[1] = entry[1] or not ok
            if entry[0] <= 0:
                del self._pending[ev.token]
                self._move(ev.token, "failed" if entry[1] else "done")

    def _move(self, name: str, where: str) -> None:
        target_dir = self.directory / where
        target_dir.mkdir(exist_ok=True)
        target = target_dir / name
        if target.exists():  # a producer reused the name: keep both
            target = target_dir / f"{Path(name).stem}.{time.time_ns()}{Path(name).suffix}"
        try:
            os.replace(self.directory / name, target)
        except FileNotFoundError:
            _log.warning("spool file %s vanished before it could be moved to %s/", name, where)

    def close(self) -> None:
        """Nothing to release; unacknowledged files stay in the spool for the next run."""
        self._pending.clear()
