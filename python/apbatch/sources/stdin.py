"""`StdinSource`: one JSON event per line on standard input (or any stream)."""

from __future__ import annotations

import queue
import sys
import threading
from collections.abc import Sequence
from typing import IO, Any

from ..errors import BadInputError
from .base import DEFAULTS, HEAD_KEPT, RawEvent, size_error

__all__ = ["StdinSource"]

_EOF = object()


class StdinSource:
    """Read JSON lines from ``stream`` in a background thread, so :meth:`poll` can time out.

    Blank lines are skipped; each other line is one event, handed on undecoded (the dispatcher
    decodes it with `apbatch.sources.base.decode_json` and dead-letters what is malformed,
    not UTF-8 or nested too deeply). A line longer than ``max_event_bytes`` is never held in
    memory whole: it becomes one bad event carrying its first kilobyte. The bytes under a text
    stream are read when it has them (`sys.stdin.buffer`), so invalid UTF-8 is reported per
    line instead of ending the input. :attr:`exhausted` becomes `True` after end of input once
    every line was delivered.

    Parameters
    ----------
    stream : binary or text stream, optional
        Default `sys.stdin`.
    max_event_bytes : `int`, optional
        Longest line accepted; default ``source.max_event_bytes``.
    """

    name = "stdin"

    def __init__(self, stream: IO[Any] | None = None, max_event_bytes: int | None = None):
        self.stream = stream
        self.max_event_bytes = DEFAULTS.max_event_bytes if max_event_bytes is None else max_event_bytes
        self._queue: queue.Queue = queue.Queue()
        self._thread: threading.Thread | None = None
        self._eof = False

    def _reader(self, stream: IO[Any]) -> None:
        source = getattr(stream, "buffer", stream)
        number = 0
        try:
            while True:
                line = source.readline(self.max_event_bytes + 1)
                if not line:
                    break
                number += 1
                if len(line) > self.max_event_bytes and line[-1:] not in ("\n", b"\n"):
                    size = len(line) + self._skip_rest_of_line(source)
                    self._queue.put(RawEvent(line[:HEAD_KEPT], f"stdin:{number}",
                                             error=str(size_error(size, self.max_event_bytes))))
                elif line.strip():
                    self._queue.put(RawEvent(line.strip(), f"stdin:{number}"))
        except (OSError, ValueError) as exc:  # UnicodeDecodeError of a text-only stream, a closed pipe
            self._queue.put(RawEvent("", f"stdin:{number + 1}", error=str(BadInputError(
                "stdin", f"cannot read past line {number}: {exc}", "send UTF-8 JSON lines"))))
        finally:
            self._queue.put(_EOF)

    @staticmethod
    def _skip_rest_of_line(source: IO[Any]) -> int:
        """Read and drop the rest of an overlong line; return how many characters it had (no newline)."""
        skipped = 0
        while True:
            chunk = source.readline(1 << 16)
            skipped += len(chunk)
            if not chunk:
                return skipped
            if chunk[-1:] in ("\n", b"\n"):
                return skipped - 1

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
