"""HTTP front of a distributor directory, for jobs on hosts that do not share its file system.

Endpoints (all ``GET``; names are checked against ``[A-Za-z0-9._-]``, the group is URL-quoted):

``/raw/<instrument>/<group>/<detector>?n=N&wait=S[&names=a,b]``
    Long-poll: answers as soon as ``N`` complete raws of that CCD (or exactly the named
    images) are in the store, or after ``S`` seconds (at most 60) with what there is.
    Body: ``{"raws": [sidecar dicts with a "file" key], "complete": bool}``.
``/file/<instrument>/<group_key>/<file>``
    The raw, streamed, with ``Content-Length`` and ``X-Checksum-SHA256`` from its sidecar.
``/health``
    ``{"status": "ok"}``.

The server listens on 127.0.0.1 unless told otherwise. One thread per request
(`ThreadingHTTPServer`); long-polls re-list the group directory every 50 ms.
"""

from __future__ import annotations

import json
import logging
import math
import shutil
import threading
import time
import urllib.parse
from http import HTTPStatus
from http.server import BaseHTTPRequestHandler, ThreadingHTTPServer
from pathlib import Path

from ..errors import BadInputError
from .client import select_raws
from .store import DistributorStore, RawEntry, check_name

__all__ = ["DistributorServer", "make_server"]

log = logging.getLogger(__name__)

_MAX_WAIT = 60.0
_POLL = 0.05


def _count_and_wait(query: dict[str, list[str]]) -> tuple[int, float]:
    """``n`` (an integer >= 1) and ``wait`` (finite seconds >= 0, capped at 60) of a ``/raw`` query.

    Raises
    ------
    BadInputError
        Raised if either is not such a number: ``wait=nan`` would otherwise never end the
        long-poll (every comparison with NaN is false), ``n=-5`` asks for nothing.
    """
    text_n, text_wait = query.get("n", ["1"])[0], query.get("wait", ["0"])[0]
    try:
        n = int(text_n)
    except ValueError:
        n = 0
    if n < 1:
        raise BadInputError("n", f"{text_n!r} is not a number of raws", "a whole number >= 1, e.g. ?n=2")
    try:
        wait = float(text_wait)
    except ValueError:
        wait = math.nan
    if not (math.isfinite(wait) and wait >= 0.0):
        raise BadInputError("wait", f"{text_wait!r} is not a number of seconds",
                            f"a finite number >= 0 (at most {_MAX_WAIT:g} is used), e.g. ?wait=20")
    return n, min(wait, _MAX_WAIT)


class _Handler(BaseHTTPRequestHandler):
    server: DistributorServer
    protocol_version = "HTTP/1.1"

    def log_message(self, fmt, *args):  # route access logs through logging, at DEBUG
        log.debug("%s " + fmt, self.address_string(), *args)

    def do_GET(self):  # noqa: N802 (http.server API)
        url = urllib.parse.urlsplit(self.path)
        parts = [urllib.parse.unquote(p) for p in url.path.strip("/").split("/")]
        query = urllib.parse.parse_qs(url.query)
        try:
            if parts == ["health"]:
                self._json({"status": "ok"})
            elif len(parts) == 4 and parts[0] == "raw":
                self._raws(parts[1], parts[2], parts[3], query)
            elif len(parts) == 4 and parts[0] == "file":
                self._file(parts[1], parts[2], parts[3])
            else:
                self._json({"error": f"no such endpoint {url.path!r}"}, HTTPStatus.NOT_FOUND)
        except BadInputError as exc:
            self._json({"error": str(exc)}, HTTPStatus.BAD_REQUEST)
        except (BrokenPipeError, ConnectionResetError):
            log.debug("client went away during %s", self.path)

    def _json(self, body: dict, status: HTTPStatus = HTTPStatus.OK) -> None:
        data = json.dumps(body).encode()
        self.send_response(status)
        self.send_header("Content-Type", "application/json")
        self.send_header("Content-Length", str(len(data)))
        self.end_headers()
        self.wfile.write(data)

    def _raws(self, instrument: str, group_id: str, detector: str, query: dict) -> None:
        store = self.server.store
        check_name(detector, "detector")
        n, wait = _count_and_wait(query)
        names = tuple(x for x in query.get("names", [""])[0].split(",") if x)
        for name in names:
            check_name(name, "names")
        want = len(names) if names else n
        deadline = time.monotonic() + wait
        while True:
            ready = [e for e in store.list_group(instrument, group_id, detector) if e.is_complete()]
            chosen = select_raws(ready, n, names)
            if len(chosen) >= want or time.monotonic() >= deadline or self.server.stopping.is_set():
                break
            time.sleep(_POLL)
        self._json({"raws": [e.to_dict() for e in chosen], "complete": len(chosen) >= want})

    def _file(self, instrument: str, gkey: str, filename: str) -> None:
        check_name(instrument, "instrument")
        check_name(gkey, "group")
        check_name(filename, "file")
        if not filename.endswith(".fits"):
            raise BadInputError("file", f"{filename!r} is not a raw", "ask for a .fits file")
        path = self.server.store.root / instrument / gkey / filename
        sidecar = path.with_suffix(".json")
        try:
            entry = RawEntry.from_sidecar(sidecar)
            f = open(path, "rb")  # noqa: SIM115 (closed below)
        except FileNotFoundError:
            self._json({"error": f"{instrument}/{gkey}/{filename} not delivered"}, HTTPStatus.NOT_FOUND)
            return
        with f:
            size = Path(f.name).stat().st_size
            self.send_response(HTTPStatus.OK)
            self.send_header("Content-Type", "application/fits")
            self.send_header("Content-Length", str(size))
            self.send_header("X-Checksum-SHA256", entry.sha256)
            self.end_headers()
            shutil.copyfileobj(f, self.wfile, 1 << 20)


class DistributorServer(ThreadingHTTPServer):
    """Threaded HTTP server over a `DistributorStore`.

    Lifetime: create, then `serve_forever` (or `start` for a background thread), then
    `stop`. Thread-safe: handlers share only the stateless store.
    """

    daemon_threads = True

    def __init__(self, store: DistributorStore, host: str = "127.0.0.1", port: int = 0):
        self.store = store
        self.stopping = threading.Event()
        super().__init__((host, port), _Handler)
        self._thread: threading.Thread | None = None

    @property
    def url(self) -> str:
        """``http://host:port`` the server answers on."""
        host, port = self.server_address[:2]
        if isinstance(host, bytes):  # typeshed allows bytes (AF_UNIX); a TCP server has str
            host = host.decode()
        return f"http://{host}:{port}"

    def start(self) -> DistributorServer:
        """Serve in a daemon thread; returns ``self``."""
        self._thread = threading.Thread(
            target=self.serve_forever, kwargs={"poll_interval": 0.1}, name="distributor-http", daemon=True
        )
        self._thread.start()
        return self

    def stop(self) -> None:
        """Stop serving, wake long-polls and close the socket."""
        self.stopping.set()
        self.shutdown()
        self.server_close()
        if self._thread is not None:
            self._thread.join(timeout=5)


def make_server(root: str | Path, host: str = "127.0.0.1", port: int = 0) -> DistributorServer:
    """A `DistributorServer` for directory ``root`` (``port=0``: any free port).

    Raises
    ------
    BadInputError
        Raised if ``root`` is not a directory or the address cannot be bound.
    """
    root = Path(root)
    if not root.is_dir():
        raise BadInputError(
            "--root", f"{str(root)!r} is not a directory", "create it or pass the distributor dir"
        )
    if host not in ("127.0.0.1", "localhost", "::1"):
        log.warning("distributor listening on %s: reachable from other hosts, with no authentication", host)
    try:
        return DistributorServer(DistributorStore(root), host, port)
    except OSError as exc:
        raise BadInputError(
            "--port",
            f"cannot listen on {host}:{port}: {exc.strerror}",
            "pick another port or stop the other server",
        ) from None
