"""`ServerThread`: uvicorn serving an ASGI application (OCPS, TAP) from a background thread."""

from __future__ import annotations

import signal
import socket
import threading
import time
from typing import Any

from .errors import BadInputError

__all__ = ["ServerThread", "stop_on_signals"]


class ServerThread:
    """uvicorn serving an ASGI app from a background thread, on a socket bound up front.

    Lifetime: `start` binds and serves, `stop` ends it; one use. Thread-safe for `stop` from
    any thread. Binding first makes ``port=0`` (a free port) and "address taken" plain.

    Parameters
    ----------
    app : ASGI application
        What to serve.
    host : `str`
        Address to bind.
    port : `int`
        Port; 0 picks a free one (see `url`).
    section : `str`
        The config section the address comes from (``ocps``, ``tap``), named in errors.
    """

    def __init__(self, app: Any, host: str = "127.0.0.1", port: int = 0, *, section: str = "ocps"):
        import uvicorn  # noqa: PLC0415 (only the serving process needs it)

        self.host = host
        self.section = section
        # log_config=None: apbatch's logging set-up (text or JSON lines) stays in charge
        self._config = uvicorn.Config(app, host=host, port=port, log_config=None, log_level="warning",
                                      access_log=False, lifespan="off", timeout_graceful_shutdown=5)
        self._server = uvicorn.Server(self._config)
        self._port = port
        self._thread: threading.Thread | None = None
        self._sock: socket.socket | None = None

    @property
    def url(self) -> str:
        """``http://host:port`` of the bound socket."""
        host = f"[{self.host}]" if ":" in self.host else self.host
        return f"http://{host}:{self._port}"

    def start(self, timeout: float = 10.0) -> ServerThread:
        """Bind and start serving; return once uvicorn accepts connections.

        Raises
        ------
        BadInputError
            Raised if the address cannot be bound (naming ``<section>.port``/``<section>.host``).
        """
        family = socket.AF_INET6 if ":" in self.host else socket.AF_INET
        # IPPROTO_TCP, not 0: asyncio sets TCP_NODELAY on accepted connections only when the
        # listening socket names its protocol; without it each keep-alive response waits ~40 ms
        # on delayed ACKs (measured: /capabilities 44 ms -> 2 ms on a reused connection)
        sock = socket.socket(family, socket.SOCK_STREAM, socket.IPPROTO_TCP)
        sock.setsockopt(socket.SOL_SOCKET, socket.SO_REUSEADDR, 1)
        try:
            sock.bind((self.host, self._port))
        except OSError as exc:
            sock.close()
            raise BadInputError(f"{self.section}.port",
                                f"cannot listen on {self.host}:{self._port}: {exc.strerror}",
                                f"pick a free port (0: any) or another {self.section}.host") from None
        self._sock = sock
        self._port = sock.getsockname()[1]
        self._thread = threading.Thread(target=self._server.run, kwargs={"sockets": [sock]},
                                        name=f"{self.section}-http", daemon=True)
        self._thread.start()
        deadline = time.monotonic() + timeout
        while not self._server.started:
            if not self._thread.is_alive() or time.monotonic() > deadline:
                self.stop()
                raise BadInputError(f"{self.section}.port", f"the HTTP server did not start on {self.url}",
                                    "see the log above")
            time.sleep(0.01)
        return self

    def stop(self) -> None:
        """Ask uvicorn to exit and wait for its thread (at most ~10 s)."""
        self._server.should_exit = True
        if self._thread is not None:
            self._thread.join(timeout=10)
        if self._sock is not None:
            self._sock.close()


def stop_on_signals(stop: threading.Event | None = None) -> threading.Event:
    """``stop`` (a new event if `None`), set by SIGTERM or SIGINT when called from the main thread.

    A serving command waits on it; an embedding caller (a test, another thread) passes its own
    and sets it itself (signal handlers can only be installed from the main thread).
    """
    stop = stop or threading.Event()
    if threading.current_thread() is threading.main_thread():
        for sig in (signal.SIGTERM, signal.SIGINT):
            signal.signal(sig, lambda *_: stop.set())
    return stop
