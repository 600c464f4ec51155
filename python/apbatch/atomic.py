"""One home for writing files atomically: a temporary file in the same directory, renamed.

Readers see the old file or the whole new one, never half of it; a failed write leaves no
temporary file behind. :func:`replacing` is the mechanism (any writer that takes a path:
FITS, Parquet, a YAML config); :func:`write_atomic` writes text or bytes with it;
:func:`create_exclusive` creates a file whole and never replaces one.
"""

from __future__ import annotations

import contextlib
import os
import tempfile
from collections.abc import Iterator
from pathlib import Path

__all__ = ["create_exclusive", "replacing", "write_atomic"]


@contextlib.contextmanager
def replacing(path: str | os.PathLike, *, mode: int = 0o644, durable: bool = True) -> Iterator[Path]:
    """Yield a temporary path next to ``path``; on a clean exit it replaces ``path``.

    Parameters
    ----------
    path : path-like
        The file to (re)place; its directory is created if needed.
    mode : `int`
        Permission bits of the new file (exactly these: the umask does not apply).
    durable : `bool`
        Flush the file to disk before the rename (it survives a power cut); `False` for small,
        frequent state files whose loss a restart tolerates.

    Yields
    ------
    tmp : `Path`
        Where the caller writes (the file exists, empty; writers may replace it).

    Raises
    ------
    OSError
        Raised if the directory or file cannot be written; the temporary file is removed, as it
        is when the ``with`` body raises.
    """
    target = Path(path)
    target.parent.mkdir(parents=True, exist_ok=True)
    fd, name = tempfile.mkstemp(prefix=f".{target.name}.", suffix=".tmp", dir=target.parent)
    os.close(fd)
    tmp = Path(name)
    try:
        yield tmp
        os.chmod(tmp, mode)
        if durable:
            fd = os.open(tmp, os.O_RDONLY)
            try:
                os.fsync(fd)
            finally:
                os.close(fd)
        os.replace(tmp, target)
    except BaseException:
        tmp.unlink(missing_ok=True)
        raise


def write_atomic(path: str | os.PathLike, data: str | bytes, mode: int = 0o644, durable: bool = True) -> Path:
    """Write ``data`` (text as UTF-8, or bytes) to ``path`` with :func:`replacing`; returns the path."""
    with replacing(path, mode=mode, durable=durable) as tmp:
        if isinstance(data, bytes):
            tmp.write_bytes(data)
        else:
            tmp.write_text(data, encoding="utf-8")
    return Path(path)


def create_exclusive(path: str | os.PathLike, text: str, mode: int = 0o644) -> bool:
    """Create ``path`` with ``text`` (fully written, flushed), unless it exists: then `False`.

    The whole file appears at once (written under a temporary name, then hard-linked), and an
    existing file is never replaced, so readers of a file never see it change.

    Raises
    ------
    OSError
        Raised if the directory or file cannot be written.
    """
    target = Path(path)
    target.parent.mkdir(parents=True, exist_ok=True)
    fd, tmp = tempfile.mkstemp(prefix=f".{target.name}.", suffix=".tmp", dir=target.parent)
    try:
        with os.fdopen(fd, "w", encoding="utf-8") as fh:
            fh.write(text)
            fh.flush()
            os.fchmod(fh.fileno(), mode)
            os.fsync(fh.fileno())
        try:
            os.link(tmp, target)
        except FileExistsError:
            return False
        return True
    finally:
        os.unlink(tmp)
