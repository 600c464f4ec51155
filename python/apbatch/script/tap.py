"""``apbatch tap``: serve sync TAP over the PPDB and ObsCore; make the indexes it relies on."""

from __future__ import annotations

import logging
import threading
from typing import Any

import sqlalchemy as sa

from ..errors import BadInputError

__all__ = ["database_url", "init", "serve"]

log = logging.getLogger(__name__)

_FIX = "set tap.url (or ppdb.url) to postgresql+psycopg2://USER@HOST:PORT/DATABASE with pg_sphere"


def database_url(config: Any) -> tuple[str, str]:
    """The database the service reads: ``tap.url``, else ``ppdb.url``; and the field it came from.

    Raises
    ------
    BadInputError
        Raised if it is not a PostgreSQL URL (TAP needs pg_sphere).
    """
    field = "tap.url" if config.tap.url else "ppdb.url"
    url = config.sqlalchemy_url(config.tap.url or config.ppdb.url)
    try:
        backend = sa.engine.make_url(url).get_backend_name()
    except sa.exc.ArgumentError:
        raise BadInputError(field, f"{url!r} is not a database URL", _FIX) from None
    if backend != "postgresql":
        raise BadInputError(field, f"is a {backend} database; TAP needs PostgreSQL with pg_sphere", _FIX)
    from ..products.ppdb import ppdb_url  # noqa: PLC0415

    return ppdb_url(url, config.ppdb.connection_timeout)[0], field


def _service(config: Any) -> Any:
    from ..tap.service import TapLimits, TapService  # noqa: PLC0415

    url, _ = database_url(config)
    tap = config.tap
    limits = TapLimits(maxrec_default=tap.maxrec_default, maxrec_limit=tap.maxrec_limit,
                       statement_timeout=tap.statement_timeout)
    return TapService(url, limits, obscore_schema=config.obscore.schema_name,
                      obscore_table=config.obscore.table)


def init(config: Any) -> list[str]:
    """Make the spatial (GiST) and time indexes of the PPDB tables; return those created.

    Raises
    ------
    BadInputError
        Raised if the URL is not PostgreSQL, the database cannot be reached or lacks pg_sphere.
    """
    from ..tap.schema import create_indexes  # noqa: PLC0415

    url, field = database_url(config)
    engine = sa.create_engine(url)
    try:
        return create_indexes(engine)
    except sa.exc.SQLAlchemyError as exc:
        line = (str(getattr(exc, "orig", exc)).strip().splitlines() or [type(exc).__name__])[0]
        raise BadInputError(field, f"cannot make the indexes: {line}",
                            "check the server is up and has pg_sphere (CREATE EXTENSION pg_sphere)") from None
    finally:
        engine.dispose()


def serve(config: Any, *, host: str | None = None, port: int | None = None,
          ready: threading.Event | None = None, stop: threading.Event | None = None) -> None:
    """Serve TAP until SIGTERM/SIGINT (or ``stop`` is set); print the URL once listening.

    Parameters
    ----------
    config : `~apbatch.config.ApbatchConfig`
        Configuration (``tap``, ``ppdb.url``, ``obscore`` table name).
    host, port : `str`, `int`, optional
        Override ``tap.host`` / ``tap.port``; ``port=0`` picks a free port.
    ready, stop : `threading.Event`, optional
        Set once listening / set to stop (for embedding and tests).

    Raises
    ------
    BadInputError
        Raised if the database URL is not PostgreSQL or the address cannot be bound.
    """
    from ..http_server import ServerThread, stop_on_signals  # noqa: PLC0415 (the server OCPS uses)
    from ..tap.app import make_app  # noqa: PLC0415

    host = config.tap.host if host is None else host
    port = config.tap.port if port is None else port
    service = _service(config)
    server = ServerThread(make_app(service), host, port, section="tap")
    stop = stop_on_signals(stop)
    try:
        server.start()  # BadInputError naming tap.port if the address is taken
        log.info("TAP serving at %s", server.url)
        print(server.url, flush=True)
        if ready is not None:
            ready.set()
        stop.wait()
    finally:
        server.stop()
        service.close()
        log.info("TAP stopped")
