"""``apbatch alerts``: flush the alert spool, decode alert files."""

from __future__ import annotations

import io
import os
from collections.abc import Mapping
from pathlib import Path

from ..config import ApbatchConfig
from ..errors import BadInputError

__all__ = ["dump", "flush", "make_sink"]


def make_sink(cfg: ApbatchConfig, environ: Mapping[str, str] | None = None):
    """The alert sink the config names (``alerts.sink``: ``file`` or ``kafka``)."""
    from ..job.alert_sinks import FileAlertSink, KafkaAlertSink, kafka_settings

    if cfg.alerts.sink == "kafka":
        return KafkaAlertSink(kafka_settings(cfg.kafka, os.environ if environ is None else environ),
                              cfg.alerts.topic)
    return FileAlertSink(cfg.path(cfg.alerts.directory))


def flush(cfg: ApbatchConfig, timeout: float | None = None, sink=None) -> list[tuple[str, int, int]]:
    """Send every spooled, undelivered alert, oldest CCD-visit first.

    Returns
    -------
    done : `list` [`tuple`]
        (name, total, delivered) per spool file attempted; stops at the first one the sink
        could not take completely, so order is kept.
    """
    from ..job.alert_sinks import AlertSpool, flush_spool

    sink = sink or make_sink(cfg)
    try:
        return flush_spool(AlertSpool(cfg.path(cfg.alerts.spool_dir)), sink,
                           cfg.alerts.send_timeout if timeout is None else timeout)
    finally:
        sink.close()


def _decode(path: Path) -> list[dict]:
    import fastavro

    from ..job.alerts import unframe

    with path.open("rb") as fh:
        reader = fastavro.reader(fh)
        records = list(reader)
    if records and set(records[0]) == {"diaSourceId", "payload"}:  # a spool file: framed packets
        from lsst.alert.packet import Schema

        schema = Schema.from_file()
        out = []
        for r in records:
            schema_id, body = unframe(r["payload"])
            if schema_id != schema.get_schema_id():
                raise BadInputError("FILE", f"alert {r['diaSourceId']} has schema id {schema_id}",
                                    f"this installation reads {schema.get_schema_id()}")
            out.append(fastavro.schemaless_reader(io.BytesIO(body), fastavro.parse_schema(schema.definition)))
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
    except (ValueError, EOFError) as exc:
        raise BadInputError("FILE", f"{path} is not an alert Avro file: {exc}") from None
    rows = []
    for a in records:
        s, o = a["diaSource"], a.get("diaObject") or {}
        rows.append({
            "diaSourceId": a["diaSourceId"], "diaObjectId": s.get("diaObjectId"), "ra": s["ra"], "dec": s["dec"],
            "psfFlux": s.get("psfFlux"), "band": s.get("band"), "nDiaSources": o.get("nDiaSources"),
            "prvDiaSources": len(a.get("prvDiaSources") or []),
            "prvDiaForcedSources": len(a.get("prvDiaForcedSources") or []),
            "cutoutBytes": sum(len(a.get(k) or b"") for k in ("cutoutScience", "cutoutTemplate", "cutoutDifference")),
        })
    return {
        "file": str(path), "alerts": len(rows), "diaObjects": len({r["diaObjectId"] for r in rows}),
        "visits": sorted({a["diaSource"]["visit"] for a in records}),
        "detectors": sorted({a["diaSource"]["detector"] for a in records}), "rows": rows,
    }
