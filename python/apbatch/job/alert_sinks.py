"""Where alerts go: a durable spool, an Avro file sink and a Kafka sink.

Every CCD-visit's alerts are first written to the :class:`AlertSpool` (one Avro container per
CCD-visit, ``<spool>/<instrument>/<visit>/<detector>.avro``, written to a temporary name and
renamed) before the APDB store. :func:`deliver` sends what a spool file still owes to a sink
and records, in ``<...>.state.json`` (also replaced atomically), only the entries the sink
confirmed (Kafka: a successful delivery report). Alerts a sink could not take stay spooled and
are sent, in order, by a later :func:`flush_spool` (``apbatch alerts flush``): nothing is lost,
and nothing confirmed is sent again. A spool file is deleted once everything in it was
delivered; its small state file stays as the record.
"""

from __future__ import annotations

import abc
import json
import logging
import os
import time
import uuid
from collections.abc import Callable, Mapping, Sequence
from pathlib import Path

import fastavro

from ..atomic import replacing
from ..errors import RetriableError
from ..kafka_settings import kafka_settings

__all__ = [
    "AlertSink",
    "AlertSpool",
    "FileAlertSink",
    "KafkaAlertSink",
    "deliver",
    "flush_spool",
    "kafka_settings",
    "make_sink",
    "write_alert_container",
]

_LOG = logging.getLogger(__name__)
_SPOOL_SCHEMA = fastavro.parse_schema({
    "type": "record", "name": "apbatch_spooled_alert",
    "fields": [{"name": "diaSourceId", "type": "long"}, {"name": "payload", "type": "bytes"}],
})
_AVRO_MAGIC = b"Obj\x01"


def _atomic_write(path: Path, write: Callable) -> None:
    with replacing(path) as tmp, open(tmp, "wb") as fh:  # durable: the spool is what survives a crash
        write(fh)


def _zigzag(n: int) -> bytes:
    n = (n << 1) ^ (n >> 63)
    out = bytearray()
    while n & ~0x7F:
        out.append((n & 0x7F) | 0x80)
        n >>= 7
    out.append(n)
    return bytes(out)


def write_alert_container(path: str | Path, schema_json: str, bodies: Sequence[bytes]) -> None:
    """Write an Avro object container file from already-encoded (schemaless) alert bodies.

    The container is standard (``fastavro.reader`` and ``Schema.retrieve_alerts`` read it);
    bodies are not re-encoded. Written atomically.
    """
    sync = os.urandom(16)
    meta = {b"avro.schema": schema_json.encode(), b"avro.codec": b"null"}

    def write(fh):
        fh.write(_AVRO_MAGIC + _zigzag(len(meta)))
        for k, v in meta.items():
            fh.write(_zigzag(len(k)) + k + _zigzag(len(v)) + v)
        fh.write(_zigzag(0) + sync)
        for start in range(0, len(bodies), 1000):
            block = bodies[start:start + 1000]
            data = b"".join(block)
            fh.write(_zigzag(len(block)) + _zigzag(len(data)) + data + sync)

    _atomic_write(Path(path), write)


class AlertSpool:
    """Per-CCD-visit Avro files of framed alerts, with the record of what was delivered.

    Parameters
    ----------
    root : `str` or `Path`
        Spool directory.

    Notes
    -----
    One writer per CCD-visit at a time (the ledger runs one job per CCD-visit); readers see
    whole files only.
    """

    def __init__(self, root: str | Path):
        self.root = Path(root)

    def _data(self, name: str) -> Path:
        return self.root / f"{name}.avro"

    def _state_path(self, name: str) -> Path:
        return self.root / f"{name}.state.json"

    def exists(self, name: str) -> bool:
        """`True` if ``name`` was spooled (delivered or not)."""
        return self._state_path(name).exists() or self._data(name).exists()

    def write(self, name: str, alerts: Sequence[tuple[int, bytes]], schema_id: int) -> None:
        """Spool the alerts of one CCD-visit, replacing an earlier, never-delivered spool."""
        token = uuid.uuid4().hex
        records = [{"diaSourceId": int(i), "payload": p} for i, p in alerts]
        metadata = {"apbatch.token": token, "apbatch.schema_id": str(schema_id)}
        _atomic_write(self._data(name),
                      lambda fh: fastavro.writer(fh, _SPOOL_SCHEMA, records, metadata=metadata))
        self._save_state(name, {"token": token, "total": len(records), "delivered": []})

    def entries(self, name: str) -> list[tuple[int, bytes]]:
        """The spooled (diaSourceId, packet) pairs in order; empty if fully delivered."""
        path = self._data(name)
        if not path.exists():
            return []
        out = []
        with path.open("rb") as fh:
            for r in fastavro.reader(fh):
                if not isinstance(r, dict):  # _SPOOL_SCHEMA is a record: always a dict
                    raise ValueError(f"{path}: spool entry is {type(r).__name__}, not a record")
                out.append((r["diaSourceId"], r["payload"]))
        return out

    def _token(self, name: str) -> str | None:
        with self._data(name).open("rb") as fh:
            return fastavro.reader(fh).metadata.get("apbatch.token")

    def state(self, name: str) -> dict:
        """``{"total": n, "delivered": [indices]}`` (delivered empty if the state is stale)."""
        try:
            state = json.loads(self._state_path(name).read_text())
        except FileNotFoundError:
            state = {"token": None, "total": len(self.entries(name)), "delivered": []}
        if self._data(name).exists() and state.get("token") != self._token(name):
            state = {"token": self._token(name), "total": len(self.entries(name)), "delivered": []}
        return state

    def _save_state(self, name: str, state: dict) -> None:
        _atomic_write(self._state_path(name), lambda fh: fh.write(json.dumps(state).encode()))

    def mark_delivered(self, name: str, indices: Sequence[int]) -> dict:
        """Record delivered entries; deletes the data file once everything was delivered."""
        state = self.state(name)
        state["delivered"] = sorted(set(state["delivered"]) | {int(i) for i in indices})
        self._save_state(name, state)
        if len(state["delivered"]) >= state["total"]:
            self._data(name).unlink(missing_ok=True)
        return state

    def pending(self) -> list[str]:
        """Names with undelivered alerts, oldest visit first (then detector)."""
        names = [p.relative_to(self.root).as_posix()[:-len(".avro")] for p in self.root.rglob("*.avro")]

        def order(name: str):  # <instrument>/<visit>/<detector>: visit ids grow with time
            *_, visit, det = ["", ""] + name.split("/")
            return (int(visit) if visit.isdigit() else -1, det, name)

        return sorted(names, key=order)


class AlertSink(abc.ABC):
    """Something that takes framed alerts. Constructors do no I/O."""

    @abc.abstractmethod
    def send(self, name: str, alerts: Sequence[tuple[int, bytes]], timeout: float) -> list[bool]:
        """Send alerts in order; return, per alert, whether it was confirmed delivered."""

    def check(self, timeout: float) -> None:
        """Fail early if the sink cannot take alerts (before a job does any work).

        Raises
        ------
        RetriableError
            Raised if the sink is unreachable within ``timeout`` seconds.

        Notes
        -----
        Deliberately a no-op here: a sink with nothing to reach (a file) is always ready.
        """
        return None

    def close(self) -> None:
        """Release connections; deliberately a no-op here, for sinks that hold none."""
        return None


class FileAlertSink(AlertSink):
    """Writes each CCD-visit's alerts as one Avro container file (official schema), atomically.

    ``<directory>/<instrument>/<visit>/<detector>.avro``; readable with ``fastavro.reader`` or
    ``apbatch alerts dump``. Delivery is all or nothing per CCD-visit, so a resend after a
    crash rewrites the whole file with the same alerts.
    """

    def __init__(self, directory: str | Path):
        self.directory = Path(directory)

    def send(self, name, alerts, timeout):
        from .alert_schemas import alert_schema, schema_by_id
        from .alerts import unframe

        framed = [unframe(p) for _, p in alerts]
        ids = {schema_id for schema_id, _ in framed}
        if len(ids) > 1:
            raise ValueError(f"{name}: alerts of several schema ids {sorted(ids)} cannot share one file")
        # the container declares the schema the packets were written with (their framing says which)
        schema = schema_by_id(ids.pop()) if ids else alert_schema()
        path = self.directory / f"{name}.avro"
        write_alert_container(path, json.dumps(schema.definition), [b for _, b in framed])
        return [True] * len(alerts)


def make_sink(cfg, environ: Mapping[str, str] | None = None) -> AlertSink:
    """The alert sink an `apbatch.config.ApbatchConfig` names (``alerts.sink``: file or kafka).

    Kafka settings come from `apbatch.kafka_settings.kafka_settings` (the one place they are
    resolved). No I/O: a Kafka producer connects on its first use.

    Raises
    ------
    BadInputError
        Raised if Kafka with SASL is configured and the credentials are not available.
    """
    if cfg.alerts.sink == "kafka":
        return KafkaAlertSink(kafka_settings(cfg.kafka, environ, root=cfg.root), cfg.alerts.topic)
    return FileAlertSink(cfg.path(cfg.alerts.directory))


class KafkaAlertSink(AlertSink):
    """Idempotent confluent-kafka producer; alerts keyed by diaSourceId.

    Parameters
    ----------
    settings : `dict`
        librdkafka settings (see :func:`kafka_settings`); idempotence is always on.
    topic : `str`
        Alert topic.
    on_delivered : callable, optional
        Called with the running count of confirmed alerts (progress; tests inject crashes).

    Notes
    -----
    The producer is created on first use and lives until :meth:`close`; not thread-safe.
    """

    def __init__(self, settings: Mapping[str, str], topic: str,
                 on_delivered: Callable[[int], None] | None = None):
        self.settings = {"linger.ms": 5, "message.max.bytes": 10_000_000, **settings,
                         "enable.idempotence": True, "acks": "all"}
        self.topic = topic
        self.on_delivered = on_delivered
        self._producer = None

    def _get(self):
        if self._producer is None:
            from confluent_kafka import Producer

            # librdkafka's own log lines go through Python logging, served by poll/flush on this
            # thread: never written by its background threads after the job's last line
            self._producer = Producer({**self.settings, "logger": logging.getLogger("apbatch.rdkafka")})
        return self._producer

    def send(self, name, alerts, timeout):
        producer = self._get()
        ok = [False] * len(alerts)
        count = [0]

        def report(i):
            def cb(err, msg):
                if err is None:
                    ok[i] = True
                    count[0] += 1
                    if self.on_delivered:
                        self.on_delivered(count[0])
                else:
                    _LOG.debug("alert %d of %s not delivered: %s", i, name, err)
            return cb

        deadline = time.monotonic() + timeout
        for i, (source_id, payload) in enumerate(alerts):
            while True:
                try:
                    producer.produce(self.topic, value=payload, key=str(source_id).encode(),
                                     on_delivery=report(i))
                    break
                except BufferError:  # local queue full: serve delivery reports, then retry
                    producer.poll(0.05)
                    if time.monotonic() > deadline:
                        break
            producer.poll(0)
        remaining = producer.flush(max(0.0, deadline - time.monotonic()))
        if remaining:
            _LOG.warning("%s: broker did not confirm %d alerts within %.0f s; they stay spooled",
                         name, remaining, timeout)
            producer.purge(in_queue=True, in_flight=False)
            producer.flush(5.0)
        return ok

    def check(self, timeout: float) -> None:
        """Ask the brokers for the cluster's metadata; `RetriableError` if none answers in time."""
        from confluent_kafka import KafkaException

        try:
            self._get().list_topics(timeout=timeout)
        except KafkaException as exc:
            raise RetriableError(f"alerts.sink: no Kafka broker at {self.settings.get('bootstrap.servers')} "
                                 f"answered within {timeout:g} s ({exc.args[0].str() if exc.args else exc})"
                                 ) from None

    def close(self) -> None:
        if self._producer is not None:
            self._producer.flush(5.0)
            self._producer = None


def deliver(spool: AlertSpool, name: str, sink: AlertSink, timeout: float) -> tuple[int, int]:
    """Send what ``name``'s spool still owes to ``sink``; returns (total, delivered so far)."""
    state = spool.state(name)
    done = set(state["delivered"])
    entries = spool.entries(name)
    todo = [i for i in range(len(entries)) if i not in done]
    if todo:
        flags = sink.send(name, [entries[i] for i in todo], timeout)
        state = spool.mark_delivered(name, [i for i, f in zip(todo, flags, strict=False) if f])
    return state["total"], len(state["delivered"])


def flush_spool(spool: AlertSpool, sink: AlertSink, timeout: float, stop_on_failure: bool = True
                ) -> list[tuple[str, int, int]]:
    """Deliver every pending spool file, oldest first; stop at the first that fails (keeps order).

    Returns
    -------
    done : `list` [`tuple`]
        (name, total, delivered) per spool file attempted.
    """
    done = []
    for name in spool.pending():
        total, delivered = deliver(spool, name, sink, timeout)
        done.append((name, total, delivered))
        if delivered < total and stop_on_failure:
            break
    return done
