"""The OCPS HTTP service: an IVOA UWS 1.1 job list of ``processData`` requests (FastAPI).

Endpoints (the job list is ``/jobs``; documents from `apbatch.ocps.uws`)::

    POST   /jobs                    create: pipeline, instrument, obsid, groupId, detector, config,
                                    config.<section>.<field>=value, PHASE=RUN -> 303 /jobs/{id}
    GET    /jobs                    job list (PHASE=..., repeatable; AFTER=ISO 8601; LAST=n)
    GET    /jobs/{id}               the job (UWS XML; JSON for Accept: application/json);
                                    WAIT=n[&PHASE=p] blocks until the phase changes (<= max_wait)
    POST   /jobs/{id}               ACTION=DELETE -> 303 /jobs
    DELETE /jobs/{id}               abort if running, forget -> 303 /jobs
    GET    /jobs/{id}/phase         text/plain
    POST   /jobs/{id}/phase         PHASE=RUN | PHASE=ABORT -> 303 /jobs/{id}
    GET    /jobs/{id}/results       UWS results; each at /jobs/{id}/results/{name} (file or JSON)
    GET    /jobs/{id}/error         text/plain, one line (404 unless the job has an error)
    GET    /jobs/{id}/parameters    UWS parameters
    GET    /jobs/{id}/owner|quote|executionduration|destruction   text/plain (UWS 1.1)
    GET    /availability            VOSI availability
    GET    /healthz                 {"status": "ok", "mode": ...}

Parameters come from the query string and from an ``application/x-www-form-urlencoded`` body
(what pyvo and ``curl -d`` send); UWS parameter names (``PHASE``, ``WAIT``, ``ACTION``...) and
the request's own ones are case-insensitive, the ``<section>.<field>`` of an override is not.
Bad input is ``400`` with one line naming the parameter (`~apbatch.errors.BadInputError`), a
busy sync-mode service ``409``, an unknown job ``404``. With a token, every request needs
``Authorization: Bearer <token>`` (``401`` otherwise).
"""

from __future__ import annotations

import datetime
import hmac
import os
import time
from typing import Any
from urllib.parse import parse_qsl

import anyio
import anyio.to_thread
from fastapi import FastAPI, Request
from fastapi.responses import FileResponse, JSONResponse, PlainTextResponse, RedirectResponse, Response
from starlette.concurrency import run_in_threadpool
from starlette.types import ASGIApp, Receive, Scope, Send
from vo_models.uws.types import ExecutionPhase

from ..errors import BadInputError
from . import uws
from .model import BusyError, OcpsRequest, OcpsService, Phase, UnknownRequestError
from .params import Params, parse_job_parameters

__all__ = ["make_app"]

XML = "application/xml"


class _BearerAuth:
    """ASGI middleware: every HTTP request needs ``Authorization: Bearer <token>``.

    Lifetime: the app's; stateless after construction, so safe for concurrent requests. The
    token is compared in constant time.
    """

    def __init__(self, app: ASGIApp, token: str):
        self.app = app
        self.token = token.encode()

    async def __call__(self, scope: Scope, receive: Receive, send: Send) -> None:
        if scope["type"] == "http":
            header = dict(scope["headers"]).get(b"authorization", b"")
            scheme, _, given = header.partition(b" ")
            if scheme.lower() != b"bearer" or not hmac.compare_digest(given.strip(), self.token):
                response = PlainTextResponse(
                    "Authorization: a bearer token is required (send 'Authorization: Bearer <token>')",
                    status_code=401, headers={"WWW-Authenticate": 'Bearer realm="apbatch-ocps"'})
                await response(scope, receive, send)
                return
        await self.app(scope, receive, send)


async def _params(request: Request) -> list[tuple[str, str]]:
    """Query parameters plus, for a POST, the form-encoded body."""
    items = list(request.query_params.multi_items())
    body = await request.body() if request.method == "POST" else b""
    if body:
        ctype = request.headers.get("content-type", "").split(";")[0].strip().lower()
        if ctype not in ("application/x-www-form-urlencoded", ""):
            raise BadInputError("Content-Type", f"{ctype!r} is not supported",
                                "send application/x-www-form-urlencoded fields or query parameters")
        try:
            items += parse_qsl(body.decode("utf-8"), keep_blank_values=True, strict_parsing=False)
        except UnicodeDecodeError:
            raise BadInputError("body", "is not UTF-8", "send UTF-8 form fields") from None
    return items


def _phase(value: str, name: str = "PHASE") -> Phase | None:
    """A UWS phase name -> `Phase`; `None` for UWS phases OCPS never uses (HELD, ARCHIVED...)."""
    try:
        return Phase(value.upper())
    except ValueError:
        pass
    if value.upper() in ExecutionPhase.__members__:
        return None
    raise BadInputError(name, f"{value!r} is not a UWS phase", f"use one of {', '.join(Phase)}")


def _http_field(field: str) -> str:
    """The service's name of a field -> the ``POST /jobs`` parameter a client sent."""
    if field.startswith("overrides."):
        return "config." + field[len("overrides."):]
    return {"group_id": "groupId", "config_file": "config", "data_id.group_id": "groupId"}.get(
        field, field.removeprefix("data_id."))


def _wants_json(request: Request) -> bool:
    accept = request.headers.get("accept", "").lower()
    return "application/json" in accept and "xml" not in accept


def _xml(content: bytes, status_code: int = 200) -> Response:
    return Response(content, status_code=status_code, media_type=XML)


def make_app(service: OcpsService, *, token: str | None, max_wait: float = 60.0,
             max_waiting: int = 200, execution_duration: float = 0) -> FastAPI:
    """Build the HTTP application over ``service``.

    Parameters
    ----------
    service : `~apbatch.ocps.model.OcpsService`
        The request service; started and stopped by the caller.
    token : `str` or `None`
        Bearer token every request must carry; `None`: no authentication (loopback only:
        `apbatch.script.ocps.serve` refuses another address without one).
    max_wait : `float`, optional
        Cap of ``WAIT`` in seconds (also what ``WAIT=-1`` means).
    max_waiting : `int`, optional
        Blocking reads waiting at once (more queue). Each waits in a worker thread counted
        apart from the 40 the other requests share, so waiting clients never starve them.
    execution_duration : `float`, optional
        The UWS ``executionDuration`` shown (``ocps.execution_duration``; 0: no limit).

    Returns
    -------
    app : `fastapi.FastAPI`
        The ASGI application; it holds no state besides ``service`` and may be served by
        several worker threads (the service is thread-safe by contract).
    """
    app = FastAPI(title="apbatch OCPS", summary="processData requests as UWS 1.1 jobs",
                  docs_url=None, redoc_url=None)
    up_since = time.time()
    wait_limiter: list[anyio.CapacityLimiter] = []  # made on first use: it needs the event loop
    if token:
        app.add_middleware(_BearerAuth, token=token)

    @app.exception_handler(BadInputError)
    async def bad_input(request: Request, exc: BadInputError) -> Response:
        named = BadInputError(_http_field(exc.field), exc.problem, exc.fix)
        return PlainTextResponse(" ".join(str(named).split()), status_code=400)

    @app.exception_handler(BusyError)
    async def busy(request: Request, exc: BusyError) -> Response:
        text = " ".join(str(exc).split()) or "another request is running"
        return PlainTextResponse(f"busy: {text}", status_code=409)

    @app.exception_handler(UnknownRequestError)
    async def unknown(request: Request, exc: UnknownRequestError) -> Response:
        job_id = request.path_params.get("job_id", exc.args[0] if exc.args else "?")
        return PlainTextResponse(f"jobId: no job {job_id!r}", status_code=404)

    def base(request: Request) -> str:
        return str(request.base_url)

    def job_location(request: Request, job_id: str) -> str:
        return str(request.url_for("get_job", job_id=job_id))

    async def get(job_id: str) -> OcpsRequest:
        return await run_in_threadpool(service.get, job_id)

    @app.post("/jobs")
    async def create_job(request: Request) -> Response:
        params = parse_job_parameters(await _params(request))
        created = await run_in_threadpool(
            lambda: service.create(params.pipeline, params.data_id, overrides=params.overrides,
                                   config_file=params.config_file, run=params.run))
        return RedirectResponse(job_location(request, created.id), status_code=303)

    @app.get("/jobs")
    async def list_jobs(request: Request) -> Response:
        p = Params(await _params(request))
        p.unknown(["PHASE", "AFTER", "LAST"])
        phases = [_phase(v) for v in p.all("phase")]
        after = last = None
        if (text := p.one("after", label="AFTER")) is not None:
            try:
                dt = datetime.datetime.fromisoformat(text)
            except ValueError:
                raise BadInputError("AFTER", f"{text!r} is not an ISO 8601 time",
                                    "e.g. AFTER=2025-10-15T03:00:00Z") from None
            after = (dt if dt.tzinfo else dt.replace(tzinfo=datetime.UTC)).timestamp()
        if (text := p.one("last", label="LAST")) is not None:
            if not text.isdigit() or int(text) < 1:
                raise BadInputError("LAST", f"{text!r} is not a positive integer", "e.g. LAST=20")
            last = int(text)
        if phases and all(ph is None for ph in phases):
            requests: list[OcpsRequest] = []  # only phases OCPS never uses were asked for
        else:
            wanted = [ph for ph in phases if ph is not None]
            requests = await run_in_threadpool(lambda: service.list(phases=wanted, after=after, last=last))
        if _wants_json(request):
            return JSONResponse([uws.request_json(r, base(request)) for r in requests])
        return _xml(uws.job_list_xml(requests, base(request)))

    @app.get("/jobs/{job_id}")
    async def get_job(job_id: str, request: Request) -> Response:
        p = Params(await _params(request))
        p.unknown(["WAIT", "PHASE"])
        job = await get(job_id)
        if (text := p.one("wait", label="WAIT")) is not None:
            try:
                wait = float(text)
            except ValueError:
                raise BadInputError("WAIT", f"{text!r} is not a number of seconds", "e.g. WAIT=30") from None
            if wait < 0 and wait != -1:
                raise BadInputError("WAIT", f"{text!r} is negative",
                                    "give seconds, or -1 for the longest wait")
            timeout = max_wait if wait == -1 else min(wait, max_wait)
            phase_text = p.one("phase", label="PHASE")
            phase = _phase(phase_text) if phase_text is not None else None
            if timeout > 0 and not job.phase.final:
                # The service's wait blocks: in a worker thread, never on the event loop.
                if not wait_limiter:
                    wait_limiter.append(anyio.CapacityLimiter(max_waiting))
                job = await anyio.to_thread.run_sync(service.wait, job_id, timeout, phase or job.phase,
                                                     limiter=wait_limiter[0])
        if _wants_json(request):
            return JSONResponse(uws.request_json(job, base(request)))
        return _xml(uws.job_xml(job, base(request), execution_duration))

    @app.post("/jobs/{job_id}")
    async def post_job(job_id: str, request: Request) -> Response:
        p = Params(await _params(request))
        p.unknown(["ACTION"])
        action = p.one("action", label="ACTION")
        if action is None or action.upper() != "DELETE":
            raise BadInputError("ACTION", f"{action!r} is not supported", "give ACTION=DELETE")
        await run_in_threadpool(service.delete, job_id)
        return RedirectResponse(str(request.url_for("list_jobs")), status_code=303)

    @app.delete("/jobs/{job_id}")
    async def delete_job(job_id: str, request: Request) -> Response:
        await run_in_threadpool(service.delete, job_id)
        return RedirectResponse(str(request.url_for("list_jobs")), status_code=303)

    @app.get("/jobs/{job_id}/phase")
    async def get_phase(job_id: str) -> Response:
        return PlainTextResponse(str((await get(job_id)).phase))

    @app.post("/jobs/{job_id}/phase")
    async def post_phase(job_id: str, request: Request) -> Response:
        p = Params(await _params(request))
        p.unknown(["PHASE"])
        phase = (p.one("phase", label="PHASE") or "").upper()
        if phase == "RUN":
            await run_in_threadpool(service.run, job_id)
        elif phase == "ABORT":
            await run_in_threadpool(service.abort, job_id)
        else:
            raise BadInputError("PHASE", f"{phase or 'nothing'!r} is not an action",
                                "give PHASE=RUN or PHASE=ABORT")
        return RedirectResponse(job_location(request, job_id), status_code=303)

    @app.get("/jobs/{job_id}/results")
    async def get_results(job_id: str, request: Request) -> Response:
        return _xml(uws.results_xml(await get(job_id), base(request)))

    @app.get("/jobs/{job_id}/results/{name}")
    async def get_result(job_id: str, name: str) -> Response:
        entry = {e.name: e for e in uws.result_entries(await get(job_id))}.get(name)
        if entry is None:
            return PlainTextResponse(f"result: job {job_id!r} has no result {name!r}", status_code=404)
        if entry.path is None:
            return JSONResponse(uws.jsonable(entry.value))
        if not os.path.isfile(entry.path):
            return PlainTextResponse(f"result: {name!r} file is gone", status_code=404)
        return FileResponse(entry.path, media_type=entry.mime_type, filename=os.path.basename(entry.path))

    @app.get("/jobs/{job_id}/error")
    async def get_error(job_id: str) -> Response:
        job = await get(job_id)
        if job.phase != Phase.ERROR or not job.error:
            return PlainTextResponse(f"error: job {job_id!r} has no error (phase {job.phase})",
                                     status_code=404)
        return PlainTextResponse(" ".join(job.error.split()))

    @app.get("/jobs/{job_id}/parameters")
    async def get_parameters(job_id: str) -> Response:
        return _xml(uws.parameters_xml(await get(job_id)))

    @app.get("/jobs/{job_id}/{prop}")
    async def get_property(job_id: str, prop: str) -> Response:
        job = await get(job_id)
        values: dict[str, Any] = {"owner": job.owner, "quote": "",
                                  "executionduration": f"{execution_duration:.0f}",
                                  "destruction": ""}
        if prop not in values:
            return PlainTextResponse(f"{prop}: no such job resource", status_code=404)
        return PlainTextResponse(str(values[prop]))

    @app.get("/availability")
    async def availability() -> Response:
        return _xml(uws.availability_xml(True, up_since, f"mode: {service.mode}"))

    @app.get("/healthz")
    async def healthz() -> Response:
        return JSONResponse({"status": "ok", "mode": service.mode})

    return app
