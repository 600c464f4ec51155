"""``apbatch ocps ...``: serve OCPS requests over HTTP, and submit one as a small client.

`serve` builds the OCPS service (`apbatch.ocps.service`) from the ``ocps:`` config section,
starts its runner and serves the UWS application (`apbatch.ocps.app`) with uvicorn until
SIGTERM/SIGINT. `submit` posts one request to a running service and, with ``wait``, follows
it to its end with UWS ``WAIT`` reads (standard library HTTP only).
"""

from __future__ import annotations

import ipaddress
import json
import logging
import os
import threading
import time
import urllib.error
import urllib.parse
import urllib.request
from collections.abc import Mapping, Sequence
from pathlib import Path
from typing import Any

from ..config_sources import read_secret_file
from ..errors import BadInputError, NonRetriableError, RetriableError
from ..http_server import ServerThread, stop_on_signals

__all__ = [
    "check_exposure",
    "check_outcome",
    "describe",
    "is_loopback",
    "read_token",
    "request_params",
    "serve",
    "service_url",
    "submit",
]

log = logging.getLogger(__name__)

_FINAL = ("COMPLETED", "ERROR", "ABORTED")


def is_loopback(host: str) -> bool:
    """`True` if ``host`` is ``localhost`` or a loopback address (only these count)."""
    if host.lower() == "localhost":
        return True
    try:
        return ipaddress.ip_address(host.strip("[]")).is_loopback
    except ValueError:
        return False


def read_token(ocps: Any, root: str | Path = ".", environ: Mapping[str, str] | None = None) -> str | None:
    """The bearer token: ``$<ocps.token_env>``, else the first line of ``ocps.token_file``.

    Parameters
    ----------
    ocps : `~apbatch.config.OcpsConfig`
        The ``ocps`` config section (``token_env``, ``token_file``).
    root : `str` or `Path`
        Directory a relative ``token_file`` is resolved against (the config's ``root``).
    environ : `~collections.abc.Mapping`, optional
        Environment; default `os.environ`.

    Returns
    -------
    token : `str` or `None`
        `None` if neither is set.

    Raises
    ------
    BadInputError
        Raised if ``token_file`` is set but cannot be read or is empty.
    """
    environ = os.environ if environ is None else environ
    if ocps.token_env and environ.get(ocps.token_env, "").strip():
        return environ[ocps.token_env].strip()
    if not ocps.token_file:
        return None
    return read_secret_file("ocps.token_file", ocps.token_file, root)


def check_exposure(host: str, token: str | None, token_env: str | None = None) -> None:
    """Refuse to listen on a non-loopback ``host`` without a bearer token.

    Raises
    ------
    BadInputError
        Raised, as one line naming ``ocps.token_file`` and the environment variable, if
        ``host`` is not loopback and ``token`` is empty.
    """
    if token or is_loopback(host):
        return
    env = f"${token_env}" if token_env else "ocps.token_env"
    raise BadInputError("ocps.host", f"{host} is not a loopback address and no bearer token is configured",
                        f"set {env} or ocps.token_file, or listen on 127.0.0.1")


def _make_service(config: Any) -> Any:
    from ..ocps.service import Service  # noqa: PLC0415 (the service pulls in the ledger, Kafka...)

    return Service(config)


def serve(
    config: Any,
    *,
    host: str | None = None,
    port: int | None = None,
    service: Any = None,
    environ: Mapping[str, str] | None = None,
    ready: threading.Event | None = None,
    stop: threading.Event | None = None,
) -> None:
    """Serve OCPS requests over HTTP until SIGTERM/SIGINT (or ``stop`` is set).

    Prints the service URL (one line) once listening.

    Parameters
    ----------
    config : `~apbatch.config.ApbatchConfig`
        Configuration; the ``ocps`` section gives host, port, mode and the token.
    host, port : `str`, `int`, optional
        Override ``ocps.host`` / ``ocps.port``; ``port=0`` picks a free port.
    service : `~apbatch.ocps.model.OcpsService`, optional
        The service to serve (default: built from ``config``); started and stopped here.
    environ : `~collections.abc.Mapping`, optional
        Environment to read the token variable from; default `os.environ`.
    ready, stop : `threading.Event`, optional
        Set once listening / set to stop (for embedding and tests).

    Raises
    ------
    BadInputError
        Raised if the host is not loopback and no token is configured, the token file cannot
        be read, or the address cannot be bound.
    """
    from ..ocps.app import make_app  # noqa: PLC0415

    ocps = config.ocps
    host = ocps.host if host is None else host
    port = ocps.port if port is None else port
    token = read_token(ocps, config.root, environ)
    check_exposure(host, token, ocps.token_env)
    service = _make_service(config) if service is None else service
    app = make_app(service, token=token, execution_duration=ocps.execution_duration)
    server = ServerThread(app, host, port)
    stop = stop_on_signals(stop)
    try:
        server.start()  # bind first: a taken port fails before the runner resumes anything
        service.start()
        log.info("OCPS (%s mode) serving at %s%s", service.mode, server.url,
                 " (bearer token)" if token else "")
        print(server.url, flush=True)
        if ready is not None:
            ready.set()
        stop.wait()
    finally:
        server.stop()
        service.stop()
        log.info("OCPS stopped")


def _http(method: str, url: str, token: str | None, data: Mapping[str, str] | None = None,
          timeout: float = 30.0) -> tuple[int, dict[str, str], bytes]:
    """One HTTP exchange without following redirects; (status, headers, body)."""

    class _NoRedirect(urllib.request.HTTPRedirectHandler):
        def redirect_request(self, *args: Any, **kwargs: Any) -> None:
            return None

    body = urllib.parse.urlencode(list(data.items())).encode() if data is not None else None
    req = urllib.request.Request(url, data=body, method=method, headers={"Accept": "application/json"})
    if token:
        req.add_header("Authorization", f"Bearer {token}")
    opener = urllib.request.build_opener(_NoRedirect)
    try:
        with opener.open(req, timeout=timeout) as resp:
            return resp.status, dict(resp.headers), resp.read()
    except urllib.error.HTTPError as exc:
        return exc.code, dict(exc.headers), exc.read()
    except (urllib.error.URLError, OSError) as exc:
        reason = getattr(exc, "reason", exc)
        raise BadInputError("--url", f"cannot reach {url}: {reason}",
                            "start `apbatch ocps serve` or fix --url") from None


def _check(status: int, body: bytes, what: str) -> None:
    text = " ".join(body.decode("utf-8", "replace").split())
    if status == 409:
        raise RetriableError(f"{what}: {text}")
    if status == 401:
        raise BadInputError("token", text, "set the token variable or ocps.token_file to the service's token")
    if status >= 400:
        raise BadInputError(what, text)


def submit(
    url: str,
    params: Mapping[str, str],
    *,
    token: str | None = None,
    wait: bool = False,
    timeout: float | None = None,
    poll: float = 30.0,
) -> dict[str, Any]:
    """Create a request on a running service (``PHASE=RUN``) and optionally wait for its end.

    Parameters
    ----------
    url : `str`
        Service root, e.g. ``http://127.0.0.1:8085``.
    params : `~collections.abc.Mapping` [`str`, `str`]
        ``POST /jobs`` parameters (``pipeline``, ``instrument``, ``obsid``, ``groupId``,
        ``detector``, ``config``, ``config.<section>.<field>``).
    token : `str`, optional
        Bearer token.
    wait : `bool`
        Follow the job until COMPLETED, ERROR or ABORTED.
    timeout : `float`, optional
        Give up waiting after this many seconds (default: no limit).
    poll : `float`
        ``WAIT`` of each blocking read, seconds.

    Returns
    -------
    job : `dict`
        The job's JSON form (`apbatch.ocps.uws.request_json`).

    Raises
    ------
    BadInputError
        Raised with the service's one-line reason if it rejects the request (400/401/404),
        or if it cannot be reached.
    RetriableError
        Raised if a sync-mode service is busy (409), or ``timeout`` passed first.
    """
    root = url.rstrip("/")
    status, headers, body = _http("POST", f"{root}/jobs", token, {**params, "PHASE": "RUN"})
    _check(status, body, "request")
    location = headers.get("Location") or headers.get("location")
    if status != 303 or not location:
        raise BadInputError("--url", f"{root}/jobs answered {status}, not a UWS redirect", "check --url")
    location = urllib.parse.urljoin(f"{root}/jobs", location)
    deadline = None if timeout is None else time.monotonic() + timeout
    while True:
        query = ""
        if wait:
            left = poll if deadline is None else min(poll, max(0.0, deadline - time.monotonic()))
            query = f"?WAIT={left:.3f}"
        status, _, body = _http("GET", location + query, token, timeout=poll + 30)
        _check(status, body, "job")
        job: dict[str, Any] = json.loads(body)
        if not wait or job["phase"] in _FINAL:
            break
        if deadline is not None and time.monotonic() >= deadline:
            raise RetriableError(f"job {job['jobId']} still {job['phase']} after {timeout:g} s ({location})")
    return job


def check_outcome(job: Mapping[str, Any]) -> None:
    """Raise unless a job that was waited for ended COMPLETED.

    Raises
    ------
    NonRetriableError
        Raised, with the job's one-line error, if it ended ERROR or ABORTED.
    """
    if job["phase"] in ("ERROR", "ABORTED"):
        reason = job.get("error") or "no reason given"
        raise NonRetriableError(f"job {job['jobId']} ended {job['phase']}: {reason}")


def request_params(
    pipeline: str,
    instrument: str,
    *,
    obsid: str | None = None,
    group_id: str | None = None,
    detector: int | None = None,
    config_file: str | None = None,
    settings: Sequence[str] = (),
) -> dict[str, str]:
    """The ``POST /jobs`` parameters of a request (``settings``: ``section.field=value``).

    Raises
    ------
    BadInputError
        Raised, naming ``--set``, if a setting is not ``section.field=value``.
    """
    params = {"pipeline": pipeline, "instrument": instrument}
    given = {"obsid": obsid, "groupId": group_id, "detector": detector, "config": config_file}
    for name, value in given.items():
        if value is not None:
            params[name] = str(value)
    for setting in settings:
        key, sep, value = setting.partition("=")
        if not sep or key.count(".") < 1 or not all(key.split(".")):
            raise BadInputError("--set", f"{setting!r} is not section.field=value",
                                "e.g. --set job.threads=1")
        params[f"config.{key.strip()}"] = value
    return params


def service_url(config: Any) -> str:
    """``http://<ocps.host>:<ocps.port>`` (a wildcard address is reached on loopback)."""
    host = config.ocps.host
    host = "127.0.0.1" if host in ("0.0.0.0", "") else "[::1]" if host == "::" else host
    host = f"[{host}]" if ":" in host and not host.startswith("[") else host
    return f"http://{host}:{config.ocps.port}"


def describe(job: Mapping[str, Any]) -> str:
    """A few lines for a person: id, phase, error, results, telemetry count."""
    lines = [f"job {job['jobId']}: {job['pipeline']} {job['phase']}"]
    if job.get("error"):
        lines.append(f"  error: {job['error']}")
    for name, res in (job.get("results") or {}).items():
        shown = json.dumps(res["value"], separators=(",", ":")) if "value" in res else res["href"]
        lines.append(f"  {name}: {shown}")
    if job.get("telemetry"):
        lines.append(f"  telemetry: {len(job['telemetry'])} CCD record(s)")
    return "\n".join(lines)
