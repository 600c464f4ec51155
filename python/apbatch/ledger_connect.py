"""Connecting to the ledger's database: URL checks, the engine, SQLite's settings and file mode.

Every problem with ``ledger.url`` becomes one `BadInputError` naming it (never the password).
"""

from __future__ import annotations

import os
from pathlib import Path

import sqlalchemy as sa

from .errors import BadInputError

__all__ = ["LEDGER_FILE_MODE", "make_engine", "no_ledger"]

LEDGER_FILE_MODE = 0o640
"""A SQLite ledger's file (and its -wal/-shm, which SQLite creates with the same mode) holds
every event: readable by its owner and group only."""


def _restrict_mode(path: str) -> None:
    """Make a database file ``LEDGER_FILE_MODE`` if it is more open (and ours to change)."""
    try:
        st = os.stat(path)
        if st.st_mode & 0o777 & ~LEDGER_FILE_MODE and st.st_uid == os.getuid():
            os.chmod(path, LEDGER_FILE_MODE)
    except OSError:
        pass  # a read-only or foreign file: the database itself reports what matters


def _sqlite_pragmas(dbapi_conn, _record) -> None:
    dbapi_conn.isolation_level = None  # let the "begin" hook below issue BEGIN IMMEDIATE
    cur = dbapi_conn.cursor()
    for _seq, _name, path in cur.execute("PRAGMA database_list").fetchall():
        if path:
            _restrict_mode(path)
    cur.execute("PRAGMA journal_mode=WAL")
    cur.execute("PRAGMA busy_timeout=30000")
    cur.execute("PRAGMA synchronous=NORMAL")
    cur.close()


def no_ledger(where: str) -> BadInputError:
    return BadInputError("ledger.url", f"no ledger at {where}",
                         "check ledger.url (and root) in the --config file(s) / APBATCH_LEDGER__URL")


def make_engine(url: str, *, create: bool) -> tuple[sa.engine.Engine, str, str | None]:
    """An engine for ``url`` (nothing is read or written yet).

    Returns
    -------
    engine : `sqlalchemy.engine.Engine`
        SQLite engines take ``BEGIN IMMEDIATE`` transactions, WAL mode and a 30 s busy timeout;
        PostgreSQL ones a 10 s connect timeout and pre-ping.
    shown : `str`
        The URL with its password hidden, for messages.
    sqlite_file : `str` or `None`
        The SQLite database file, if any.

    Raises
    ------
    BadInputError
        Raised if the URL is malformed or names an unsupported database or one whose driver is
        not installed, if a SQLite ledger's directory cannot be made, or, without ``create``,
        if there is no SQLite file.
    """
    try:
        sa_url = sa.engine.make_url(url)
    except sa.exc.ArgumentError as exc:
        raise BadInputError("ledger.url", f"{url!r} is not a database URL: {exc}",
                            "use sqlite:///PATH or postgresql://USER@HOST:PORT/DATABASE") from None
    shown = sa_url.render_as_string(hide_password=True)
    backend = sa_url.get_backend_name()
    if backend not in ("sqlite", "postgresql"):
        raise BadInputError("ledger.url", f"database {backend!r} ({shown}) is not supported",
                            "use sqlite:///PATH or postgresql://USER@HOST:PORT/DATABASE")
    sqlite_file = sa_url.database if backend == "sqlite" and sa_url.database != ":memory:" else None
    uri = bool(sqlite_file) and str(sa_url.query.get("uri", "")).lower() == "true"  # "file:PATH?mode=ro"
    if sqlite_file:
        path = sqlite_file.removeprefix("file:").split("?")[0] if uri else sqlite_file
        if not create and not Path(path).is_file():
            raise no_ledger(path)
        if create and not uri:
            try:
                Path(sqlite_file).parent.mkdir(parents=True, exist_ok=True)
            except OSError as exc:  # a parent is a regular file, or not writable
                raise BadInputError("ledger.url", f"cannot make the directory of {sqlite_file}: "
                                    f"{exc.strerror or exc}",
                                    "point ledger.url, or root, at a writable directory") from None
    try:
        if backend == "sqlite":
            engine = sa.create_engine(sa_url, connect_args={"timeout": 30})
            sa.event.listen(engine, "connect", _sqlite_pragmas)
            sa.event.listen(engine, "begin", lambda conn: conn.exec_driver_sql("BEGIN IMMEDIATE"))
        else:
            # fail in seconds, not at the TCP timeout, when the server is unreachable
            wait = ({"connect_timeout": 10} if sa_url.get_driver_name() in ("psycopg2", "psycopg")
                    and "connect_timeout" not in sa_url.query else {})
            engine = sa.create_engine(sa_url, pool_pre_ping=True, connect_args=wait)
    except (ImportError, sa.exc.ArgumentError) as exc:
        raise BadInputError("ledger.url", f"cannot use {shown}: {' '.join(str(exc).split())}",
                            "install its driver, e.g. psycopg2 for postgresql, or fix the URL") from None
    return engine, shown, sqlite_file
