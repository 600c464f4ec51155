"""UWS 1.1 documents for OCPS requests, written with ``vo-models``; pure functions, no I/O.

An `~apbatch.ocps.model.OcpsRequest` is shown to UWS clients (pyvo, a browser, ``curl``) as a
UWS job. The request's fields map to UWS as follows:

==================  ===============================================================
UWS                 OCPS request
==================  ===============================================================
``jobId``           ``id``
``ownerId``         ``owner``
``phase``           ``phase`` (PENDING, QUEUED, EXECUTING, COMPLETED, ERROR, ABORTED)
``creationTime``    ``created_at``; ``startTime`` / ``endTime`` likewise (nil until set)
``parameters``      ``pipeline``, ``instrument``, ``obsid``, ``groupId``, ``detector``,
                    ``config`` (the request's config file), ``config.<section>.<field>``
``results``         one ``result`` per entry of ``results``, each at
                    ``/jobs/{id}/results/{name}`` (a file, e.g. the gather PNG, or the
                    value as JSON), plus ``telemetry`` (the per-CCD records, JSON) once any
                    CCD has ended
``errorSummary``    ``error`` (one line), when the phase is ERROR
``jobInfo``         one JSON object: ``{"pipeline", "mode", "jobs", "telemetry"}``
==================  ===============================================================

The same names are used by the JSON form of a job (`request_json`), served for
``Accept: application/json``.
"""

from __future__ import annotations

import dataclasses
import datetime
import json
import math
import mimetypes
import os
from collections.abc import Iterable, Mapping
from typing import Any
from urllib.parse import quote

from pydantic_xml import element
from pydantic_xml.element.native import etree  # the XML backend vo-models' trees come from
from vo_models.uws import (
    ErrorSummary,
    Jobs,
    JobSummary,
    Parameter,
    Parameters,
    ResultReference,
    Results,
    ShortJobDescription,
)
from vo_models.uws.types import ErrorType, ExecutionPhase
from vo_models.vosi.availability.models import Availability

from .model import OcpsRequest

__all__ = [
    "TELEMETRY_RESULT",
    "ResultEntry",
    "availability_xml",
    "job_list_xml",
    "job_xml",
    "job_url",
    "jsonable",
    "parameters_xml",
    "request_json",
    "request_parameters",
    "result_entries",
    "results_xml",
]

TELEMETRY_RESULT = "telemetry"
"""Name of the result holding a request's per-CCD telemetry records."""


class _OcpsParameters(Parameters, tag="parameters"):
    """UWS parameters as a plain list: OCPS parameter names (``config.<section>.<field>``) vary.

    Made per document, never shared.
    """

    parameter: list[Parameter] = element(tag="parameter", default_factory=list)


class _OcpsJob(JobSummary[_OcpsParameters], tag="job"):
    """A UWS job whose parameters are `_OcpsParameters`."""


@dataclasses.dataclass(frozen=True)
class ResultEntry:
    """One UWS result of a request, and how to serve it (immutable, made per HTTP request).

    Attributes
    ----------
    name : `str`
        Result id (a key of ``OcpsRequest.results``, or `TELEMETRY_RESULT`).
    value : `~typing.Any`
        The value served as JSON when ``path`` is `None`.
    path : `str` or `None`
        Absolute path of a file result (served as the file).
    mime_type : `str`
        Media type of what is served.
    size : `int` or `None`
        File size in bytes, for file results.
    """

    name: str
    value: Any
    path: str | None
    mime_type: str
    size: int | None


def _utc(t: float | None) -> datetime.datetime | None:
    return None if t is None else datetime.datetime.fromtimestamp(t, datetime.UTC)


def _base(base_url: str) -> str:
    return base_url.rstrip("/")


def job_url(base_url: str, request_id: str) -> str:
    """URL of a job resource under the service root ``base_url``."""
    return f"{_base(base_url)}/jobs/{quote(request_id, safe='')}"


def jsonable(value: Any) -> Any:
    """Return ``value`` as plain JSON types: mappings and sequences copied, NaN/inf -> `None`.

    Numpy scalars become Python numbers (``.item()``); anything else unknown becomes `str`.
    """
    if value is None or isinstance(value, bool | int | str):
        return value
    if isinstance(value, float):
        return value if math.isfinite(value) else None
    if isinstance(value, Mapping):
        return {str(k): jsonable(v) for k, v in value.items()}
    if isinstance(value, list | tuple | set | frozenset):
        return [jsonable(v) for v in value]
    item = getattr(value, "item", None)
    if callable(item):
        try:
            return jsonable(item())
        except (TypeError, ValueError):
            pass
    return str(value)


def request_parameters(request: OcpsRequest) -> list[tuple[str, str]]:
    """The request's UWS parameters, as (name, value) pairs, in the names ``POST /jobs`` takes."""
    d = request.data_id
    params = [("pipeline", request.pipeline), ("instrument", d.instrument)]
    if d.obsid is not None:
        params.append(("obsid", d.obsid))
    if d.group_id is not None:
        params.append(("groupId", d.group_id))
    if d.detector is not None:
        params.append(("detector", str(d.detector)))
    if request.config_file is not None:
        params.append(("config", request.config_file))
    params.extend((f"config.{key}", str(value)) for key, value in sorted(request.overrides.items()))
    return params


def result_entries(request: OcpsRequest) -> list[ResultEntry]:
    """The request's results: a file for an absolute path to an existing file, else a JSON value.

    The per-CCD telemetry is added as `TELEMETRY_RESULT` once there is any (unless the
    service itself returns a result of that name).
    """
    entries = []
    for name, value in request.results.items():
        if isinstance(value, str | os.PathLike) and os.path.isabs(value) and os.path.isfile(value):
            path = os.fspath(value)
            mime = mimetypes.guess_type(path)[0] or "application/octet-stream"
            entries.append(ResultEntry(str(name), None, str(path), mime, os.path.getsize(path)))
        else:
            entries.append(ResultEntry(str(name), value, None, "application/json", None))
    if request.telemetry and TELEMETRY_RESULT not in request.results:
        entries.append(ResultEntry(TELEMETRY_RESULT, list(request.telemetry), None, "application/json", None))
    return entries


def _result_refs(request: OcpsRequest, base_url: str) -> Results:
    url = job_url(base_url, request.id)
    return Results(results=[
        ResultReference(id=e.name, href=f"{url}/results/{quote(e.name, safe='')}", size=e.size,
                        mime_type=e.mime_type)
        for e in result_entries(request)])


def _parameters(request: OcpsRequest) -> _OcpsParameters:
    # model_construct: Parameters.__init__ maps parameters onto declared fields by id, and
    # OCPS parameter ids are not fixed.
    return _OcpsParameters.model_construct(
        parameter=[Parameter(id=name, value=value) for name, value in request_parameters(request)])


def _to_xml(model: Any, drop_empty: Iterable[str] = ()) -> bytes:
    tree = model.to_xml_tree()
    for tag in drop_empty:  # optional elements vo-models writes empty (runId)
        for child in list(tree):
            if child.tag.endswith("}" + tag) and not (child.text or len(child)):
                tree.remove(child)
    return etree.tostring(tree, xml_declaration=True, encoding="UTF-8")


def job_xml(request: OcpsRequest, base_url: str, execution_duration: float = 0) -> bytes:
    """The UWS ``job`` document of a request (``GET /jobs/{id}``).

    Parameters
    ----------
    request : `OcpsRequest`
        The request.
    base_url : `str`
        The service root (``http://host:port``); result links are absolute under it.
    execution_duration : `float`
        Seconds the request may execute (``ocps.execution_duration``; 0: no limit).
    """
    error = None
    if request.error is not None and request.phase == "ERROR":
        error = ErrorSummary(message=request.error, type=ErrorType.FATAL, has_detail=True)
    info = json.dumps(jsonable({"pipeline": request.pipeline, "mode": request.mode,
                                "jobs": list(request.jobs), "telemetry": list(request.telemetry)}),
                      separators=(",", ":"))
    job = _OcpsJob(
        job_id=request.id,
        owner_id=request.owner,
        phase=ExecutionPhase(str(request.phase)),
        creation_time=_utc(request.created_at),
        start_time=_utc(request.started_at),
        end_time=_utc(request.ended_at),
        execution_duration=int(execution_duration),
        parameters=_parameters(request),
        results=_result_refs(request, base_url),
        error_summary=error,
        job_info=[info],
    )
    return _to_xml(job, drop_empty=("runId",))


def job_list_xml(requests: Iterable[OcpsRequest], base_url: str) -> bytes:
    """The UWS ``jobs`` document (``GET /jobs``): one ``jobref`` per request."""
    jobs = Jobs(jobref=[
        ShortJobDescription(job_id=r.id, phase=ExecutionPhase(str(r.phase)), owner_id=r.owner,
                            creation_time=_utc(r.created_at), href=job_url(base_url, r.id))
        for r in requests])
    return _to_xml(jobs, drop_empty=("runId",))


def results_xml(request: OcpsRequest, base_url: str) -> bytes:
    """The UWS ``results`` document (``GET /jobs/{id}/results``)."""
    return _to_xml(_result_refs(request, base_url))


def parameters_xml(request: OcpsRequest) -> bytes:
    """The UWS ``parameters`` document (``GET /jobs/{id}/parameters``)."""
    return _to_xml(_parameters(request))


def availability_xml(available: bool, up_since: float, note: str | None = None) -> bytes:
    """The VOSI ``availability`` document (``GET /availability``)."""
    doc = Availability(available=available, up_since=_utc(up_since), note=[note] if note else [])
    return _to_xml(doc)


def request_json(request: OcpsRequest, base_url: str) -> dict[str, Any]:
    """A request as JSON (``GET /jobs/{id}`` with ``Accept: application/json``).

    Keys: ``jobId``, ``runId`` (null), ``ownerId``, ``phase``, ``creationTime``,
    ``startTime``, ``endTime`` (ISO 8601 UTC or null), ``pipeline``, ``mode``, ``dataId``
    (``instrument``, ``obsid``, ``groupId``, ``detector``), ``config``, ``overrides``
    (``section.field`` -> value), ``parameters`` (as in XML), ``error``, ``results`` (name ->
    ``{"href", "mime-type", "size", "value"}``; ``value`` only for non-file results), ``jobs``
    (batch job ids) and ``telemetry`` (the per-CCD records).
    """

    def iso(t: float | None) -> str | None:
        dt = _utc(t)
        return None if dt is None else dt.isoformat(timespec="milliseconds").replace("+00:00", "Z")

    url = job_url(base_url, request.id)
    results: dict[str, Any] = {}
    for e in result_entries(request):
        entry: dict[str, Any] = {"href": f"{url}/results/{quote(e.name, safe='')}", "mime-type": e.mime_type,
                                 "size": e.size}
        if e.path is None and e.name != TELEMETRY_RESULT:
            entry["value"] = jsonable(e.value)
        results[e.name] = entry
    d = request.data_id
    return {
        "jobId": request.id,
        "runId": None,
        "ownerId": request.owner,
        "phase": str(request.phase),
        "creationTime": iso(request.created_at),
        "startTime": iso(request.started_at),
        "endTime": iso(request.ended_at),
        "pipeline": request.pipeline,
        "mode": request.mode,
        "dataId": {"instrument": d.instrument, "obsid": d.obsid, "groupId": d.group_id,
                   "detector": d.detector},
        "config": request.config_file,
        "overrides": {k: str(v) for k, v in request.overrides.items()},
        "parameters": dict(request_parameters(request)),
        "error": request.error,
        "results": results,
        "jobs": list(request.jobs),
        "telemetry": jsonable(list(request.telemetry)),
    }
