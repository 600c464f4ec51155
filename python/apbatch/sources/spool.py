"""`SpoolSource`: events dropped as JSON files into a directory.

Producers should write a file under a temporary name (``.name.tmp`` or ``name.json.tmp``) and
rename it to ``*.json`` or ``*.jsonl`` when complete; only those two suffixes are read. A file
holds one event (a JSON object), a JSON list of events, or JSON lines. A producer that writes
the final name directly is tolerated: a file is read only once it is *stable* -- its size and
mtime unchanged for ``settle_time`` seconds -- except a ``.json`` file that already holds one
complete JSON document, which is read at once (a prefix of a JSON document never is one; so
JSON lines written in place belong in a ``.jsonl`` file, whose first line alone would be a
complete document).

Files are read oldest first; once every event of a file has been acknowledged the file moves
to ``done/``, or to ``failed/`` if any of its events was bad (the dead-letter record says which
and why). A file still in the spool directory after a crash is read again on restart; the
ledger makes the repeat harmless.

What is not an event file is refused with one dead letter and moved to ``failed/``, never
followed or read: a symbolic link (its target may be anything, ``/etc/passwd`` included),
anything but a regular file (a FIFO would block the daemon), a file over ``max_file_bytes``.
Malformed JSON is one dead letter per file (``.json``) or per run of consecutive bad lines
(``.jsonl``), not one per line.
"""

from __future__ import annotations

import errno
import json
import logging
import os
import stat
import time
from collections.abc import Sequence
from pathlib import Path

from ..errors import BadInputError
from .base import DEFAULTS, HEAD_KEPT, Decoded, RawEvent, decode_json, size_error

__all__ = ["SpoolSource", "read_limited", "split_events"]

_log = logging.getLogger(__name__)
_SUFFIXES = (".json", ".jsonl")


def split_events(data: bytes, suffix: str, max_event_bytes: int | None = None) -> list[Decoded]:
    """Decode a spool file into records: decoded events, or the text that is bad and why.

    Parameters
    ----------
    data : `bytes`
        The file's content.
    suffix : `str`
        ``.json`` (one document, a list of events, or JSON lines) or ``.jsonl`` (JSON lines).
    max_event_bytes : `int`, optional
        Largest event accepted; default ``source.max_event_bytes``.

    Returns
    -------
    records : `list` [`Decoded`]
        At least one; a record with ``error`` set is one dead letter.
    """
    limit = DEFAULTS.max_event_bytes if max_event_bytes is None else max_event_bytes
    try:
        text = data.decode("utf-8")
    except UnicodeDecodeError:
        return [decode_json(data, max(limit, len(data)))]  # reports the first bad byte
    if suffix == ".json":
        whole = decode_json(text, max(limit, len(data)))
        if whole.error is None:
            values = whole.payload if isinstance(whole.payload, list) else [whole.payload]
            return [_sized(v, limit) for v in values]
        lines = _lines(text, limit)
        if len(lines) > 1 and all(rec.error is None and isinstance(rec.payload, dict) for _, rec in lines):
            return [rec for _, rec in lines]  # JSON lines in a .json file
        size = len(data.strip())
        if size > limit:  # too big and bad: the size is what to fix first (and is the cheaper news)
            return [Decoded(text[:HEAD_KEPT], size_error(size, limit))]
        return [whole]
    return _merge_bad_runs(_lines(text, limit)) or [decode_json(text, limit)]


def _sized(value: object, limit: int) -> Decoded:
    """One event of a JSON list, refused if its JSON text is over ``limit`` bytes."""
    size = len(json.dumps(value).encode("utf-8"))
    if size <= limit:
        return Decoded(value, None)
    return Decoded(json.dumps(value)[:HEAD_KEPT], size_error(size, limit))


def _lines(text: str, limit: int) -> list[tuple[int, Decoded]]:
    numbered = enumerate(text.splitlines(), start=1)
    return [(n, decode_json(line, limit)) for n, line in numbered if line.strip()]


def _merge_bad_runs(lines: list[tuple[int, Decoded]]) -> list[Decoded]:
    """One record per event line; consecutive lines that are no event (malformed JSON, or JSON
    but not an object: pretty-printed JSON, a text file) are one record, one dead letter."""
    out: list[Decoded] = []
    run: list[tuple[int, Decoded]] = []

    def flush() -> None:
        if len(run) == 1:
            out.append(run[0][1])
        elif run:
            first = next((rec.error for _, rec in run if rec.error is not None), None) or BadInputError(
                "event", "expected a JSON object per line", "send one JSON object per line")
            text = "\n".join(rec.payload if rec.error else json.dumps(rec.payload) for _, rec in run)
            out.append(Decoded(text, BadInputError(f"{first.field} (lines {run[0][0]}-{run[-1][0]})",
                                                   first.problem, first.fix)))
        run.clear()

    for number, rec in lines:
        malformed = rec.error is not None and rec.error.problem.startswith("malformed JSON")
        if malformed or (rec.error is None and not isinstance(rec.payload, dict)):
            run.append((number, rec))
            continue
        flush()
        out.append(rec)
    flush()
    return out


def read_limited(fd: int, limit: int) -> bytes:
    """Read at most ``limit + 1`` bytes of an open file (one more than allowed tells it is too big)."""
    chunks, size = [], 0
    while size <= limit:
        chunk = os.read(fd, min(1 << 20, limit + 1 - size))
        if not chunk:
            break
        chunks.append(chunk)
        size += len(chunk)
    return b"".join(chunks)


class SpoolSource:
    """Read events from ``directory``; see the module docstring. Not thread-safe.

    Parameters
    ----------
    directory : `str` or `Path`
        The spool directory; ``done/`` and ``failed/`` are made inside it. Created on first poll.
    max_batch : `int`
        At most this many events per :meth:`poll`.
    settle_time : `float`, optional
        Seconds a file must stay unchanged before it is read; default ``source.settle_time``.
    max_event_bytes, max_file_bytes : `int`, optional
        Largest event and largest file; defaults from `apbatch.config.SourceConfig`.
    """

    name = "spool"

    def __init__(self, directory: str | os.PathLike, max_batch: int = 1000, *,
                 settle_time: float | None = None, max_event_bytes: int | None = None,
                 max_file_bytes: int | None = None):
        self.directory = Path(directory)
        self.max_batch = max_batch
        self.settle_time = DEFAULTS.settle_time if settle_time is None else settle_time
        self.max_event_bytes = DEFAULTS.max_event_bytes if max_event_bytes is None else max_event_bytes
        self.max_file_bytes = DEFAULTS.max_file_bytes if max_file_bytes is None else max_file_bytes
        self._pending: dict[str, list] = {}  # file name -> [events left to ack, any bad]
        # file name -> [(inode, size, mtime_ns), monotonic time since when unchanged, content checked]
        self._seen: dict[str, list] = {}

    @property
    def exhausted(self) -> bool:
        return False

    def _candidates(self) -> list[tuple[str, os.stat_result]]:
        """Event files not yet delivered, oldest first, with their ``lstat`` (links not followed)."""
        files = []
        with os.scandir(self.directory) as it:
            for entry in it:
                name = entry.name
                if name.startswith(".") or not name.endswith(_SUFFIXES) or name in self._pending:
                    continue
                try:
                    files.append((entry.stat(follow_symlinks=False), entry.name))
                except FileNotFoundError:
                    continue
        files.sort(key=lambda f: (f[0].st_mtime_ns, f[1]))
        present = {name for _, name in files}
        for name in list(self._seen):
            if name not in present:
                del self._seen[name]
        return [(name, st) for st, name in files]

    def _stable(self, name: str, st: os.stat_result) -> bool:
        """`True` once the file has not changed for ``settle_time`` (or is a complete .json document)."""
        now = time.monotonic()
        key = (st.st_ino, st.st_size, st.st_mtime_ns)
        seen = self._seen.get(name)
        if seen is None or seen[0] != key:
            age = max(0.0, time.time() - st.st_mtime)  # the last write was this long ago
            seen = self._seen[name] = [key, now - age, False]
        if now - seen[1] >= self.settle_time:
            return True
        if seen[2] or not name.endswith(".json") or st.st_size > self.max_file_bytes:
            return False
        seen[2] = True  # read once per version: is it one complete JSON document already?
        data = self._open_and_read(name, key)
        return isinstance(data, bytes) and decode_json(data, len(data)).error is None

    def _open_and_read(self, name: str, key: tuple[int, int, int]) -> bytes | BadInputError | None:
        """The bytes of a file (up to one over the limit), never through a link.

        `None` if the file vanished or is no longer the version ``key`` (still being written).
        """
        path = self.directory / name
        try:
            fd = os.open(path, os.O_RDONLY | os.O_NOFOLLOW | os.O_NONBLOCK | os.O_CLOEXEC)
        except FileNotFoundError:
            return None
        except OSError as exc:
            if exc.errno == errno.ELOOP:  # replaced by a link since it was listed
                return _link_error(name, path)
            return BadInputError(_printable(name), f"cannot open: {exc.strerror}", "check its permissions")
        try:
            st = os.fstat(fd)
            if (st.st_ino, st.st_size, st.st_mtime_ns) != key:
                return None
            if not stat.S_ISREG(st.st_mode):
                return _not_regular(name)
            return read_limited(fd, self.max_file_bytes)
        finally:
            os.close(fd)

    def _read(self, name: str, key: tuple[int, int, int]) -> list[Decoded] | None:
        """The records of a file; `None` if it vanished or changed since ``key``."""
        data = self._open_and_read(name, key)
        if data is None:
            return None
        if isinstance(data, BadInputError):
            return [Decoded("", data)]
        if len(data) > self.max_file_bytes:
            error = size_error(key[1], self.max_file_bytes, _printable(name), "source.max_file_bytes")
            return [Decoded(data[:HEAD_KEPT], error)]
        return split_events(data, Path(name).suffix, self.max_event_bytes)

    def _records(self, name: str, st: os.stat_result) -> list[Decoded] | None:
        if stat.S_ISLNK(st.st_mode):
            return [Decoded("", _link_error(name, self.directory / name))]
        if not stat.S_ISREG(st.st_mode):
            return [Decoded("", _not_regular(name))]
        if not self._stable(name, st):
            return None
        records = self._read(name, (st.st_ino, st.st_size, st.st_mtime_ns))
        if records is None:
            self._seen.pop(name, None)
        return records

    def poll(self, timeout: float) -> list[RawEvent]:
        """Events of the next stable unread files; sleeps up to ``timeout`` if there are none."""
        self.directory.mkdir(parents=True, exist_ok=True)
        deadline = time.monotonic() + timeout
        while True:
            out: list[RawEvent] = []
            for name, st in self._candidates():
                records = self._records(name, st)
                if records is None:
                    continue
                self._seen.pop(name, None)
                self._pending[name] = [len(records), False]
                out += [RawEvent(rec.payload, f"spool:{_printable(name)}#{i}", token=name,
                                 error=None if rec.error is None else str(rec.error))
                        for i, rec in enumerate(records)]
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
        """Move a file (or the link itself, never its target) to ``done/`` or ``failed/``."""
        target_dir = self.directory / where
        target_dir.mkdir(exist_ok=True)
        target = target_dir / name
        if os.path.lexists(target):  # a producer reused the name: keep both
            target = target_dir / f"{Path(name).stem}.{time.time_ns()}{Path(name).suffix}"
        try:
            os.replace(self.directory / name, target)
        except FileNotFoundError:
            _log.warning("spool file %s vanished before it could be moved to %s/", name, where)

    def close(self) -> None:
        """Nothing to release; unacknowledged files stay in the spool for the next run."""
        self._pending.clear()
        self._seen.clear()


def _printable(name: str) -> str:
    """A file name fit for a log line and a database: undecodable bytes and control characters escaped."""
    text = name.encode("utf-8", "surrogateescape").decode("utf-8", "backslashreplace")
    return "".join(c if c.isprintable() else repr(c)[1:-1] for c in text)


def _link_error(name: str, path: Path) -> BadInputError:
    try:
        target = os.readlink(path)
    except OSError:
        target = "?"
    return BadInputError(_printable(name), f"is a symbolic link (to {target!r}); links are not followed",
                         "write regular files into the spool directory")


def _not_regular(name: str) -> BadInputError:
    return BadInputError(_printable(name), "is not a regular file",
                         "write regular files into the spool directory")
