"""`StdinSource`: one JSON event per line on standard input (or any text stream)."""

from __future__ import annotations

import queue
import sys
import threading
from collections.abc import Sequence
from typing import TextIO

from .base import RawEvent

__all__ = ["StdinSource"]

_EOF = object()


class StdinSource:
    """Read JSON lines from ``stream`` in a background thread, so :meth:`poll` can time out.

    Blank lines are skipped; each other line is one event (the parser reports malformed JSON).
    :attr:`exhausted` becomes `True` after end of input once every line was delivered.

    Parameters
    ----------
    stream : text stream, optional
        Default `sys.stdin`.
    """

    name = "stdin"

    def __init__(self, stream: TextIO | None = None):
        self.stream = stream
        self._queue: queue.Queue = queue.Queue()
        self._thread: threading.Thread | None = None
        self._eof = False

    def _reader(self, stream: TextIO) -> None:
        try:
            for number, line in enumerate(stream, start=1):
                if line.strip():
                    self._queue.put(RawEvent(line.strip(), f"stdin:{number}"))
        finally:
            self._queue.put(_EOF)

    @property
    def exhausted(self) -> bool:
        return self._eof and self._queue.empty()

    def poll(self, timeout: float) -> list[RawEvent]:
        """Lines read so far, waiting up to ``timeout`` for the first."""
        if self._thread is None:
            self._thread = threading.Thread(target=self._reader, args=(self.stream or sys.stdin,),
                                            name="apbatch-stdin", daemon=True)
            self._thread.start()
        out: list[RawEvent] = []
        try:
            item = self._queue.get(timeout=timeout) if not self._eof else self._queue.get_nowait()
            while True:
                if item is _EOF:
                    self._eof = True
                else:
                    out.append(item)
                item = self._queue.get_nowait()
        except queue.Empty:
            pass
        return out

    def ack(self, events: Sequence[RawEvent], ok: bool = True) -> None:
        """Nothing to commit: a pipe cannot be re-read."""

    def close(self) -> None:
        """The reader thread is a daemon thread; it ends with the input or the process."""
