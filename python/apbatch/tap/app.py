"""The TAP HTTP service (FastAPI): sync queries and the VOSI resources.

Endpoints::

    GET|POST /sync           REQUEST=doQuery (optional), LANG=ADQL, QUERY, MAXREC,
                             RESPONSEFORMAT (or FORMAT) = votable -> result VOTable
    GET      /tables         VOSI tableset (the served tables, their columns' metadata)
    GET      /capabilities   VOSI capabilities (TAPRegExt: ADQL, geometry, VOTable, limits)
    GET      /availability   VOSI availability (whether the database answers)

Parameters come from the query string and a form body; their names are case-insensitive. Every
query problem (bad ADQL, unknown table or column, bad MAXREC or LANG, the database down, a
timeout) is a TAP error VOTable (``QUERY_STATUS`` ``ERROR``, one line) with HTTP 200, which
pyvo raises as ``DALQueryError``; no response carries a traceback.
"""

from __future__ import annotations

import datetime
from urllib.parse import parse_qsl
from xml.etree import ElementTree as ET

from fastapi import FastAPI, Request
from fastapi.responses import Response
from starlette.concurrency import run_in_threadpool
from vo_models.vosi.availability import Availability

from .service import QueryError, TapService
from .votable import error_votable

__all__ = ["capabilities_xml", "make_app"]

VOTABLE = "application/x-votable+xml"
XML = "application/xml"
_FORMATS = {"votable", "application/x-votable+xml", "text/xml", "application/xml", "votable/td"}
_GEOMETRY = ("POINT", "CIRCLE", "BOX", "POLYGON", "CONTAINS", "INTERSECTS", "DISTANCE")


def capabilities_xml(base_url: str, maxrec_default: int, maxrec_limit: int) -> bytes:
    """The VOSI capabilities document of the service at ``base_url`` (ends with ``/``)."""
    ns = {"vosi": "http://www.ivoa.net/xml/VOSICapabilities/v1.0", "vs": "http://www.ivoa.net/xml/VODataService/v1.1",
          "tr": "http://www.ivoa.net/xml/TAPRegExt/v1.0", "xsi": "http://www.w3.org/2001/XMLSchema-instance"}
    for prefix, uri in ns.items():
        ET.register_namespace(prefix, uri)
    xsi_type = f"{{{ns['xsi']}}}type"
    root = ET.Element(f"{{{ns['vosi']}}}capabilities")

    def capability(standard_id: str, path: str) -> ET.Element:
        cap = ET.SubElement(root, "capability", standardID=standard_id)
        iface = ET.SubElement(cap, "interface", {xsi_type: "vs:ParamHTTP", "role": "std"})
        ET.SubElement(iface, "accessURL", use="base" if not path else "full").text = base_url + path
        return cap

    tap = capability("ivo://ivoa.net/std/TAP", "")
    tap.set(xsi_type, "tr:TableAccess")
    tap[0].set("version", "1.1")
    lang = ET.SubElement(tap, "language")
    ET.SubElement(lang, "name").text = "ADQL"
    ET.SubElement(lang, "version", {"ivo-id": "ivo://ivoa.net/std/ADQL#v2.0"}).text = "2.0"
    ET.SubElement(lang, "description").text = "ADQL 2.0, translated to PostgreSQL/pg_sphere by queryparser"
    features = ET.SubElement(lang, "languageFeatures", type="ivo://ivoa.net/std/TAPRegExt#features-adqlgeo")
    for form in _GEOMETRY:
        ET.SubElement(ET.SubElement(features, "feature"), "form").text = form
    fmt = ET.SubElement(tap, "outputFormat", {"ivo-id": "ivo://ivoa.net/std/TAPRegExt#output-votable-td"})
    ET.SubElement(fmt, "mime").text = VOTABLE
    ET.SubElement(fmt, "alias").text = "votable"
    limit = ET.SubElement(tap, "outputLimit")
    ET.SubElement(limit, "default", unit="row").text = str(maxrec_default)
    ET.SubElement(limit, "hard", unit="row").text = str(maxrec_limit)
    for name in ("capabilities", "availability", "tables"):
        capability(f"ivo://ivoa.net/std/VOSI#{name}", name)
    return ET.tostring(root, xml_declaration=True, encoding="UTF-8")


class _Params:
    """Request parameters, names case-insensitive; one per HTTP request."""

    def __init__(self, items: list[tuple[str, str]]):
        self.items = items

    def one(self, name: str) -> str | None:
        values = [v for k, v in self.items if k.lower() == name.lower()]
        if len(values) > 1:
            raise QueryError(f"{name}: given {len(values)} times")
        return values[0] if values else None


async def _params(request: Request) -> _Params:
    items = list(request.query_params.multi_items())
    if request.method == "POST":
        body = await request.body()
        ctype = request.headers.get("content-type", "").split(";")[0].strip().lower()
        if body and ctype not in ("application/x-www-form-urlencoded", ""):
            raise QueryError(f"Content-Type {ctype!r} is not supported: "
                             "send application/x-www-form-urlencoded")
        try:
            items += parse_qsl(body.decode("utf-8"), keep_blank_values=True)
        except UnicodeDecodeError:
            raise QueryError("the request body is not UTF-8") from None
    return _Params(items)


def make_app(service: TapService) -> FastAPI:
    """Build the HTTP application over ``service`` (closed by the caller).

    Returns
    -------
    app : `fastapi.FastAPI`
        Stateless besides ``service``, which is thread-safe; queries run in worker threads.
    """
    app = FastAPI(title="apbatch TAP", summary="sync TAP over the PPDB and ObsCore", docs_url=None,
                  redoc_url=None)
    up_since = datetime.datetime.now(datetime.UTC)

    def votable(content: bytes) -> Response:
        return Response(content, media_type=VOTABLE)

    @app.api_route("/sync", methods=["GET", "POST"])
    async def sync(request: Request) -> Response:
        try:
            p = await _params(request)
            req = p.one("REQUEST")
            if req is not None and req.lower() != "doquery":
                raise QueryError(f"REQUEST: {req!r} is not supported; use doQuery")
            lang = p.one("LANG")
            if lang is None:
                raise QueryError("LANG: missing; use LANG=ADQL")
            if lang.upper() not in ("ADQL", "ADQL-2.0", "ADQL-2.1"):
                raise QueryError(f"LANG: {lang!r} is not supported; use ADQL")
            fmt = p.one("RESPONSEFORMAT") or p.one("FORMAT")
            if fmt is not None and fmt.lower() not in _FORMATS:
                raise QueryError(f"RESPONSEFORMAT: {fmt!r} is not supported; use votable")
            query = p.one("QUERY")
            if query is None or not query.strip():
                raise QueryError("QUERY: missing")
            maxrec = service.parse_maxrec(p.one("MAXREC"))
        except QueryError as exc:
            return votable(error_votable(str(exc)))
        access_url = str(request.url_for("sync"))
        return votable(await run_in_threadpool(service.query, query, maxrec, access_url))

    @app.get("/tables")
    async def tables() -> Response:
        try:
            registry, _ = await run_in_threadpool(service.registry)
        except QueryError as exc:
            return Response(f"tables: {exc}", status_code=503, media_type="text/plain")
        return Response(registry.tableset_xml(), media_type=XML)

    @app.get("/capabilities")
    async def capabilities(request: Request) -> Response:
        return Response(capabilities_xml(str(request.base_url), service.limits.maxrec_default,
                                         service.limits.maxrec_limit), media_type=XML)

    @app.get("/availability")
    async def availability() -> Response:
        ok, note = await run_in_threadpool(service.available)
        doc = Availability(available=ok, up_since=up_since, note=[note])
        return Response(doc.to_xml(), media_type=XML)

    return app
