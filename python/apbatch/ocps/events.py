"""OCPS events to Kafka: one completion event per request, one telemetry record per CCD.

Both are JSON (UTF-8) with the request id as the message key, on ``ocps.completion_topic``
(default ``ocps-completion``) and ``ocps.telemetry_topic`` (``ocps-telemetry``), through the
cluster of the ``kafka`` section (`apbatch.kafka_settings.kafka_settings`).

Completion event (exactly one per request; a consumer may still dedupe on ``request_id``)::

    {"request_id": str, "pipeline": str,
     "data_id": {"instrument": str, "obsid": str|null, "group_id": str|null, "detector": int|null},
     "phase": "COMPLETED" | "ERROR" | "ABORTED", "success": bool, "reason": str|null,
     "jobs": [batch job id, ...], "ccds": {"done": int, "failed": int},
     "results": {name: value or absolute path}, "time": UTC unix seconds}

Telemetry record (one per CCD when its job ends)::

    {"request_id": str, "instrument": str, "visit": int, "detector": int, "detector_name": str,
     "status": str, "exit_code": int|null, "psf_fwhm_arcsec": float|null, "zero_point": float|null,
     "sky_level": float|null, "n_sources": int|null, "n_dia_sources": int|null,
     "centroid_ra": float|null, "centroid_dec": float|null, "time": UTC unix seconds}

A completion event is published synchronously (produce + flush, acknowledged by the broker)
before the runner marks it published; telemetry is fire-and-forget (flushed with the next
completion event or at :meth:`EventPublisher.close`).
"""

from __future__ import annotations

import json
import logging
from collections.abc import Mapping
from typing import Any, Protocol

from .model import OcpsRequest, Phase

__all__ = ["EventPublisher", "KafkaEventPublisher", "MemoryPublisher", "completion_event"]

_log = logging.getLogger(__name__)


class EventPublisher(Protocol):
    """Where completion events and telemetry go."""

    def completion(self, event: Mapping[str, Any]) -> bool:
        """Publish a completion event; `True` once the broker acknowledged it."""
        ...

    def telemetry(self, record: Mapping[str, Any]) -> None:
        """Publish a telemetry record (never raises)."""
        ...

    def close(self) -> None:
        """Flush and release connections."""
        ...


class KafkaEventPublisher:
    """Publishes to Kafka (confluent-kafka, idempotent producer, ``acks=all``).

    Parameters
    ----------
    settings : `dict`
        librdkafka settings of the cluster (`apbatch.kafka_settings.kafka_settings`).
    completion_topic, telemetry_topic : `str`
        The topics.
    timeout : `float`
        Seconds to wait for a completion event's acknowledgement.

    Notes
    -----
    Lifetime: the service's runner. Thread-safe (a confluent-kafka producer is).
    """

    def __init__(self, settings: Mapping[str, Any], completion_topic: str, telemetry_topic: str,
                 timeout: float = 10.0):
        from confluent_kafka import Producer

        self.completion_topic = completion_topic
        self.telemetry_topic = telemetry_topic
        self.timeout = timeout
        self.producer = Producer({**settings, "acks": "all", "enable.idempotence": True, "linger.ms": 0,
                                  "message.timeout.ms": int(timeout * 1000)})

    @classmethod
    def from_config(cls, cfg: Any) -> KafkaEventPublisher:
        """The publisher of ``cfg.ocps`` topics on the ``cfg.kafka`` cluster."""
        from ..kafka_settings import kafka_settings

        return cls(kafka_settings(cfg.kafka, root=cfg.root), cfg.ocps.completion_topic,
                   cfg.ocps.telemetry_topic)

    def completion(self, event: Mapping[str, Any]) -> bool:
        """Produce and flush one completion event; `False` (logged) if not acknowledged."""
        errors: list[str] = []

        def delivered(err, _msg) -> None:
            if err is not None:
                errors.append(str(err))

        try:
            self.producer.produce(self.completion_topic, key=str(event["request_id"]).encode(),
                                  value=json.dumps(dict(event), default=str).encode(), on_delivery=delivered)
            left = self.producer.flush(self.timeout)
        except Exception as exc:
            _log.warning("completion event of %s not published: %s", event.get("request_id"), exc)
            return False
        if left or errors:
            _log.warning("completion event of %s not acknowledged: %s", event.get("request_id"),
                         "; ".join(errors) or f"within {self.timeout:g} s")
            return False
        return True

    def telemetry(self, record: Mapping[str, Any]) -> None:
        """Produce one telemetry record (not waited for)."""
        try:
            self.producer.produce(self.telemetry_topic, key=str(record["request_id"]).encode(),
                                  value=json.dumps(dict(record), default=str).encode())
            self.producer.poll(0)
        except Exception as exc:  # telemetry never stops a request
            _log.warning("telemetry of %s not published: %s", record.get("request_id"), exc)

    def close(self) -> None:
        """Flush what is left."""
        self.producer.flush(self.timeout)


class MemoryPublisher:
    """Keeps events in lists (no broker): for a service without Kafka and for unit tests.

    Thread-safe for appends (list.append is atomic); lifetime: the service's.
    """

    def __init__(self) -> None:
        self.completions: list[dict[str, Any]] = []
        self.telemetries: list[dict[str, Any]] = []

    def completion(self, event: Mapping[str, Any]) -> bool:
        """Keep the event; always acknowledged."""
        self.completions.append(dict(event))
        return True

    def telemetry(self, record: Mapping[str, Any]) -> None:
        """Keep the record."""
        self.telemetries.append(dict(record))

    def close(self) -> None:
        """Nothing to release."""


def completion_event(req: OcpsRequest, phase: Phase, reason: str | None, jobs: list[str], done: int,
                     failed: int, results: dict[str, Any], now: float) -> dict[str, Any]:
    """The completion event of a request (schema in the module docstring)."""
    d = req.data_id
    return {"request_id": req.id, "pipeline": req.pipeline,
            "data_id": {"instrument": d.instrument, "obsid": d.obsid, "group_id": d.group_id,
                        "detector": d.detector},
            "phase": str(phase), "success": phase is Phase.COMPLETED, "reason": reason, "jobs": jobs,
            "ccds": {"done": done, "failed": failed}, "results": results, "time": round(now, 3)}
