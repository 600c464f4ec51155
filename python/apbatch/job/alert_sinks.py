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
import tempfile
import time
import uuid
from collections.abc import Callable, Mapping, Sequence
from pathlib import Path

import fastavro

from ..errors import BadInputError

__all__ = [
    "AlertSink",
    "AlertSpool",
    "FileAlertSink",
    "KafkaAlertSink",
    "deliver",
    "flush_spool",
    "kafka_settings",
    "write_alert_container",
]

_LOG = logging.getLogger(__name__)
_SPOOL_SCHEMA = fastavro.parse_schema({
    "type": "record", "name": "apbatch_spooled_alert",
    "fields": [{"name": "diaSourceId", "type": "long"}, {"name": "payload", "type": "bytes"}],
})
_AVRO_MAGIC = b"Obj\x01"


def _atomic_write(path: Path, write: Callable) -> None:
    path.parent.mkdir(parents=True, exist_ok=True)
    fd, tmp = tempfile.mkstemp(prefix=f".{path.name}.", suffix=".tmp", dir=path.parent)
    try:
        with os.fdopen(fd, "wb") as fh:
            write(fh)
            fh.flush()
            os.fsync(fh.fileno())
        os.replace(tmp, path)
    except BaseException:
        Path(tmp).unlink(missing_ok=True)
        raise


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
        _atomic_write(self._data(name), lambda fh: fastavro.writer(
            fh, _SPOOL_SCHEMA, records, metadata={"apbatch.token": token, "apbatch.schema_id": str(schema_id)}))
        self._save_state(name, {"token": token, "total": len(records), "delivered": []})

    def entries(self, name: str) -> list[tuple[int, bytes]]:
        """The spooled (diaSourceId, packet) pairs in order; empty if fully delivered."""
        path = self._data(name)
        if not path.exists():
            return []
        with path.open("rb") as fh:
            return [(r["diaSourceId"], r["payload"]) for r in fastavro.reader(fh)]

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

    def close(self) -> None:
        """Release connections."""


class FileAlertSink(AlertSink):
    """Writes each CCD-visit's alerts as one Avro container file (official schema), atomically.

    ``<directory>/<instrument>/<visit>/<detector>.avro``; readable with ``fastavro.reader`` or
    ``apbatch alerts dump``. Delivery is all or nothing per CCD-visit, so a resend after a
    crash rewrites the whole file with the same alerts.
    """

    def __init__(self, directory: str | Path, schema=None):
        self.directory = Path(directory)
        self._schema = schema

    def send(self, name, alerts, timeout):
        from .alerts import unframe

        if self._schema is None:
            from lsst.alert.packet import Schema

            self._schema = Schema.from_file()
        path = self.directory / f"{name}.avro"
        write_alert_container(path, json.dumps(self._schema.definition), [unframe(p)[1] for _, p in alerts])
        return [True] * len(alerts)


def kafka_settings(kafka, environ: Mapping[str, str] | None = None) -> dict:
    """librdkafka settings from a `apbatch.config.KafkaConfig`; secrets from env or file only.

    Raises
    ------
    BadInputError
        Raised if SASL is configured but the username or password is not available.
    """
    environ = os.environ if environ is None else environ
    settings = {"bootstrap.servers": kafka.bootstrap_servers, "security.protocol": kafka.security_protocol}
    if kafka.sasl_mechanism:
        settings["sasl.mechanism"] = kafka.sasl_mechanism
        user = environ.get(kafka.username_env)
        password = environ.get(kafka.password_env)
        if password is None and kafka.password_file:
            try:
                password = Path(kafka.password_file).read_text().strip()
            except OSError as exc:
                raise BadInputError("kafka.password_file", f"cannot read it: {exc.strerror}") from None
        if not user:
            raise BadInputError("kafka.username_env", f"${kafka.username_env} is not set", "export it")
        if not password:
            raise BadInputError("kafka.password_env", f"${kafka.password_env} is not set and no password_file",
                                "export it or set kafka.password_file")
        settings["sasl.username"], settings["sasl.password"] = user, password
    return settings


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

            self._producer = Producer(self.settings)
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
                    producer.produce(self.topic, value=payload, key=str(source_id).encode(), on_delivery=report(i))
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
