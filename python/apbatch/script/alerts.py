"""``apbatch alerts``: flush the alert spool, decode alert files."""

from __future__ import annotations

import io
from pathlib import Path
from typing import Any

from ..config import ApbatchConfig
from ..errors import BadInputError

__all__ = ["dump", "flush"]


def flush(cfg: ApbatchConfig, timeout: float | None = None, sink=None) -> list[tuple[str, int, int]]:
    """Send every spooled, undelivered alert, oldest CCD-visit first.

    Returns
    -------
    done : `list` [`tuple`]
        (name, total, delivered) per spool file attempted; stops at the first one the sink
        could not take completely, so order is kept.
    """
    from ..job.alert_sinks import AlertSpool, flush_spool, make_sink

    sink = sink or make_sink(cfg)
    try:
        return flush_spool(AlertSpool(cfg.path(cfg.alerts.spool_dir)), sink,
                           cfg.alerts.send_timeout if timeout is None else timeout)
    finally:
        sink.close()


def _as_record(record: object, path: Path) -> dict[str, Any]:
    """``record`` if it is an Avro record (a `dict`); fastavro returns any Avro value."""
    if not isinstance(record, dict):
        raise BadInputError("FILE", f"{path} holds {type(record).__name__!r} values, not alert records",
                            "give an alert file or an alert spool file")
    return record


def _decode(path: Path) -> list[dict[str, Any]]:
    import fastavro

    from ..job.alerts import unframe

    with path.open("rb") as fh:
        reader = fastavro.reader(fh)
        records = [_as_record(r, path) for r in reader]
    if records and set(records[0]) == {"diaSourceId", "payload"}:  # a spool file: framed packets
        from ..job.alert_schemas import schema_by_id

        out = []
        parsed: dict[int, Any] = {}
        for r in records:
            schema_id, body = unframe(r["payload"])
            if schema_id not in parsed:
                try:
                    parsed[schema_id] = fastavro.parse_schema(schema_by_id(schema_id).definition)
                except KeyError:
                    raise BadInputError("FILE", f"{path}: alert {r['diaSourceId']} has schema id {schema_id}",
                                        "lsst-alert-packet ships no such schema; upgrade it") from None
            out.append(_as_record(fastavro.schemaless_reader(io.BytesIO(body), parsed[schema_id]), path))
        return out
    return records


def dump(path: str | Path) -> dict:
    """Decode an alert container file (file sink) or spool file and summarise it.

    Returns
    -------
    summary : `dict`
        ``alerts``, ``diaObjects``, ``visits``, ``detectors`` and one row per alert
        (diaSourceId, diaObjectId, ra, dec, psfFlux, band, nDiaSources, prv counts, cutout bytes).

    Raises
    ------
    BadInputError
        Raised if the file is missing or not an Avro file.
    """
    path = Path(path)
    if not path.is_file():
        raise BadInputError("FILE", f"no such file {str(path)!r}")
    try:
        records = _decode(path)
    except BadInputError:  # already names the file and the problem
        raise
    except (ValueError, EOFError) as exc:
        raise BadInputError("FILE", f"{path} is not an alert Avro file: {exc}") from None
    rows = []
    for a in records:
        s, o = a["diaSource"], a.get("diaObject") or {}
        rows.append({
            "diaSourceId": a["diaSourceId"], "diaObjectId": s.get("diaObjectId"),
            "ra": s["ra"], "dec": s["dec"],
            "psfFlux": s.get("psfFlux"), "band": s.get("band"), "nDiaSources": o.get("nDiaSources"),
            "prvDiaSources": len(a.get("prvDiaSources") or []),
            "prvDiaForcedSources": len(a.get("prvDiaForcedSources") or []),
            "cutoutBytes": sum(len(a.get(k) or b"")
                               for k in ("cutoutScience", "cutoutTemplate", "cutoutDifference")),
        })
    return {
        "file": str(path), "alerts": len(rows), "diaObjects": len({r["diaObjectId"] for r in rows}),
        "visits": sorted({a["diaSource"]["visit"] for a in records}),
        "detectors": sorted({a["diaSource"]["detector"] for a in records}), "rows": rows,
    }
