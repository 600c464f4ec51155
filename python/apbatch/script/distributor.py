"""``apbatch distributor ...``: run the HTTP front of a distributor directory."""

from __future__ import annotations

import logging
import signal
import threading
from pathlib import Path

from ..distributor.server import make_server

__all__ = ["serve"]

log = logging.getLogger(__name__)


def serve(
    root: str | Path,
    host: str = "127.0.0.1",
    port: int = 8470,
    ready: threading.Event | None = None,
    stop: threading.Event | None = None,
) -> None:
    """Serve the distributor directory ``root`` over HTTP until SIGTERM/SIGINT (or ``stop`` is set).

    Parameters
    ----------
    root : `str` or `Path`
        Distributor directory (see `apbatch.distributor.store`).
    host, port : `str`, `int`
        Address to listen on; loopback by default. ``port=0`` picks a free port (logged).
    ready, stop : `threading.Event`, optional
        Set once listening / set to stop (for embedding and tests).

    Raises
    ------
    BadInputError
        Raised if ``root`` is not a directory or the address is taken.
    """
    server = make_server(root, host, port)
    server.start()
    log.info("distributor serving %s at %s", root, server.url)
    print(server.url, flush=True)
    stop = stop or threading.Event()
    if threading.current_thread() is threading.main_thread():
        for sig in (signal.SIGTERM, signal.SIGINT):
            signal.signal(sig, lambda *_: stop.set())
    if ready is not None:
        ready.set()
    try:
        stop.wait()
    finally:
        server.stop()
        log.info("distributor stopped")
