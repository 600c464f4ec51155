"""Each job's metrics record, published to Kafka for dashboards (``monitoring.job_metrics_topic``).

One JSON record per CCD-visit, key ``<instrument>/<visit>/<detector>``; the value is what the
job writes to its butler ``ap_metrics`` dataset (`apbatch.job.task.CcdResult`) plus the CCD's
identity, the batch job id, the stage marks and their intervals (`apbatch.latency`). A job
that failed publishes a record too (``status: failed`` and the stages it reached).

Metrics are telemetry: failing to publish is a warning in the job's log, never a job failure.
The cluster is `apbatch.config.KafkaConfig` through `apbatch.kafka_settings.kafka_settings`.
"""

from __future__ import annotations

import json
import logging
import time
from collections.abc import Mapping
from typing import Any

from ..latency import intervals_of
from ..work import CcdWork

__all__ = ["job_metrics_key", "job_metrics_record", "publish_job_metrics"]

_log = logging.getLogger(__name__)


def job_metrics_key(work: CcdWork) -> str:
    """``<instrument>/<visit>/<detector>``: the record's Kafka key."""
    return f"{work.instrument}/{work.visit}/{work.detector}"


def job_metrics_record(work: CcdWork, metrics: Mapping[str, Any] | None, stages: Mapping[str, float],
                       job_id: str | None = None, now: float | None = None) -> dict[str, Any]:
    """The record of one CCD-visit (plain JSON).

    Parameters
    ----------
    work : `CcdWork`
        The CCD.
    metrics : `dict`, optional
        The job's ``ap_metrics`` (`CcdResult.to_dict`); `None` for a job that failed.
    stages : `dict`
        The job's stage marks (`apbatch.latency.STAGES` -> UTC unix seconds).
    job_id : `str`, optional
        The batch system's id of this job (`apbatch.logs.job_id_from_env`).
    now : `float`, optional
        ``published_at`` (UTC unix seconds); default now.
    """
    record: dict[str, Any] = {"status": "failed"}
    record.update(metrics or {})
    record.update({"instrument": work.instrument, "visit": work.visit, "detector": work.detector,
                   "group_id": work.group_id, "day_obs": work.day_obs, "intent": work.intent,
                   "job_id": job_id, "stages": dict(stages), "intervals": intervals_of(stages),
                   "published_at": round(time.time() if now is None else now, 3)})
    return record


def publish_job_metrics(cfg: Any, work: CcdWork, metrics: Mapping[str, Any] | None,
                        stages: Mapping[str, float], *, producer: Any = None, job_id: str | None = None,
                        timeout: float = 10.0) -> bool:
    """Publish the job's record to ``monitoring.job_metrics_topic`` (if set); never raises.

    Parameters
    ----------
    cfg : `apbatch.config.ApbatchConfig`
        ``monitoring.job_metrics_topic`` and the ``kafka`` section are used.
    work, metrics, stages, job_id
        As for :func:`job_metrics_record`.
    producer : `confluent_kafka.Producer`, optional
        Injected (tests); default: one made from the config, flushed and dropped here.
    timeout : `float`
        Seconds to wait for the broker's acknowledgement.

    Returns
    -------
    published : `bool`
        `True` if the broker acknowledged the record; `False` if no topic is configured or
        publishing failed (logged as a warning).
    """
    topic = cfg.monitoring.job_metrics_topic
    if not topic:
        return False
    try:
        value = json.dumps(job_metrics_record(work, metrics, stages, job_id), default=str)
        if producer is None:
            from confluent_kafka import Producer

            from ..kafka_settings import kafka_settings

            producer = Producer({**kafka_settings(cfg.kafka, root=cfg.root), "acks": "all",
                                 "message.timeout.ms": int(timeout * 1000)})
        errors: list[str] = []

        def delivered(err, _msg) -> None:
            if err is not None:
                errors.append(str(err))

        producer.produce(topic, key=job_metrics_key(work).encode(), value=value.encode(),
                         on_delivery=delivered)
        left = producer.flush(timeout)
        if left or errors:
            why = "; ".join(errors) or f"not acknowledged within {timeout:g} s"
            _log.warning("could not publish the job's metrics to %s: %s", topic, why)
            return False
        return True
    except Exception as exc:  # telemetry must never fail the job
        _log.warning("could not publish the job's metrics to %s: %s: %s", topic, type(exc).__name__, exc)
        return False
