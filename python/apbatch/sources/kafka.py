"""`KafkaSource`: JSON-encoded observatory events from Kafka topics (confluent-kafka).

The consumer joins ``source.kafka_group_id``, does not auto-commit, and commits a message's
offset only after the daemon has handled it (recorded it in the ledger and submitted its
jobs, or dead-lettered it), so a restarted daemon resumes after the last handled event.
A group with no committed offset starts at the earliest message: events that arrived
before the group's first join are not lost, and old ones are dropped as stale by the
policy. Values must be JSON (the SAL topics' Avro must be converted upstream); the topic
name tells the event kind and the camera. Credentials come from the environment or a
file (`apbatch.config.KafkaConfig`), never from a command line.
"""

from __future__ import annotations

import logging
import os
from collections.abc import Callable, Mapping, Sequence
from pathlib import Path
from typing import Any

from .base import RawEvent

__all__ = ["KafkaSource", "consumer_config"]

_log = logging.getLogger(__name__)


def consumer_config(config, environ: Mapping[str, str] | None = None) -> dict[str, Any]:
    """librdkafka settings of the daemon's consumer from an `ApbatchConfig`."""
    environ = os.environ if environ is None else environ
    k = config.kafka
    conf: dict[str, Any] = {
        "bootstrap.servers": k.bootstrap_servers,
        "group.id": config.source.kafka_group_id,
        "enable.auto.commit": False,
        "auto.offset.reset": "earliest",
        "security.protocol": k.security_protocol,
    }
    if k.sasl_mechanism:
        conf["sasl.mechanism"] = k.sasl_mechanism
        user = environ.get(k.username_env)
        password = environ.get(k.password_env)
        if password is None and k.password_file:
            password = Path(config.path(k.password_file)).read_text().strip()
        if user is not None:
            conf["sasl.username"] = user
        if password is not None:
            conf["sasl.password"] = password
    return conf


class KafkaSource:
    """Consume events from Kafka topics. Used from one thread.

    Parameters
    ----------
    consumer_factory : callable
        Returns a subscribed-to-nothing consumer with confluent-kafka's ``subscribe``,
        ``consume``, ``commit`` and ``close``; called on the first :meth:`poll` (the
        constructor does no I/O).
    topics : `list` [`str`]
        Topics to subscribe to.
    batch : `int`
        At most this many messages per poll.
    """

    name = "kafka"

    def __init__(self, consumer_factory: Callable[[], Any], topics: Sequence[str], batch: int = 500):
        self._factory = consumer_factory
        self.topics = list(topics)
        self.batch = batch
        self._consumer = None

    @classmethod
    def from_config(cls, config, consumer: Any = None, extra: Mapping[str, Any] | None = None,
                    environ: Mapping[str, str] | None = None) -> KafkaSource:
        """A source on ``source.kafka_topics`` of ``kafka.bootstrap_servers``; ``consumer`` for tests."""
        if consumer is not None:
            return cls(lambda: consumer, config.source.kafka_topics)

        def factory():
            from confluent_kafka import Consumer

            return Consumer({**consumer_config(config, environ), **dict(extra or {})})

        return cls(factory, config.source.kafka_topics)

    @property
    def exhausted(self) -> bool:
        return False

    def _get(self):
        if self._consumer is None:
            self._consumer = self._factory()
            self._consumer.subscribe(self.topics)
        return self._consumer

    def poll(self, timeout: float) -> list[RawEvent]:
        """Messages available within ``timeout`` seconds; broker errors are logged, not raised."""
        out: list[RawEvent] = []
        for msg in self._get().consume(num_messages=self.batch, timeout=timeout):
            err = msg.error()
            if err is not None:
                if not _is_partition_eof(err):
                    _log.warning("kafka: %s", err)
                continue
            origin = f"kafka:{msg.topic()}[{msg.partition()}]@{msg.offset()}"
            out.append(RawEvent(msg.value(), origin, topic=msg.topic(),
                                token=(msg.topic(), msg.partition(), msg.offset())))
        return out

    def ack(self, events: Sequence[RawEvent], ok: bool = True) -> None:
        """Commit, synchronously, the offsets after the handled messages."""
        from confluent_kafka import TopicPartition

        latest: dict[tuple[str, int], int] = {}
        for ev in events:
            topic, partition, offset = ev.token
            latest[(topic, partition)] = max(offset, latest.get((topic, partition), -1))
        if latest and self._consumer is not None:
            self._consumer.commit(offsets=[TopicPartition(t, p, o + 1) for (t, p), o in latest.items()],
                                  asynchronous=False)

    def close(self) -> None:
        """Leave the consumer group."""
        if self._consumer is not None:
            self._consumer.close()
            self._consumer = None


def _is_partition_eof(err) -> bool:
    try:
        from confluent_kafka import KafkaError

        return err.code() == KafkaError._PARTITION_EOF
    except (ImportError, AttributeError):
        return False
