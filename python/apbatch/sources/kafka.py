"""`KafkaSource`: JSON-encoded observatory events from Kafka topics (confluent-kafka).

The consumer joins ``source.kafka_group_id``, does not auto-commit, and commits a partition's
position only over events the daemon has handled (recorded in the ledger and submitted, or
dead-lettered) without a gap: an event whose handling failed holds the position back, so a
restarted daemon gets it again instead of skipping it.
A group with no committed offset starts at the earliest message: events that arrived
before the group's first join are not lost, and old ones are dropped as stale by the
policy. Values must be JSON (the SAL topics' Avro must be converted upstream); the topic
name tells the event kind and the camera. Credentials come from the environment or a
file (`apbatch.config.KafkaConfig`), never from a command line.
"""

from __future__ import annotations

import logging
from collections.abc import Callable, Mapping, Sequence
from typing import Any

from ..kafka_settings import kafka_settings
from .base import RawEvent

__all__ = ["KafkaSource", "consumer_config"]

_log = logging.getLogger(__name__)


def consumer_config(config, environ: Mapping[str, str] | None = None) -> dict[str, Any]:
    """librdkafka settings of the daemon's consumer from an `ApbatchConfig`.

    The cluster and its credentials come from `apbatch.kafka_settings.kafka_settings` (the
    same as the alert producer's); this adds the group and the commit policy.

    Raises
    ------
    BadInputError
        Raised if SASL is configured and the credentials are not available.
    """
    return {**kafka_settings(config.kafka, environ, root=config.root),
            "group.id": config.source.kafka_group_id, "enable.auto.commit": False,
            "auto.offset.reset": "earliest"}


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
        # per (topic, partition): offsets delivered by poll and not yet committed, in delivery
        # (= offset) order, each with whether it was handled
        self._open: dict[tuple[str, int], dict[int, bool]] = {}

    @classmethod
    def from_config(cls, config, consumer: Any = None, extra: Mapping[str, Any] | None = None,
                    environ: Mapping[str, str] | None = None) -> KafkaSource:
        """A source on ``source.kafka_topics`` of ``kafka.bootstrap_servers``; ``consumer`` for tests.

        Raises
        ------
        BadInputError
            Raised if SASL is configured and the credentials are not available.
        """
        if consumer is not None:
            return cls(lambda: consumer, config.source.kafka_topics)
        settings = {**consumer_config(config, environ), **dict(extra or {})}

        def factory():
            from confluent_kafka import Consumer

            return Consumer(settings)

        return cls(factory, config.source.kafka_topics)

    @property
    def exhausted(self) -> bool:
        return False

    def _get(self):
        if self._consumer is None:
            self._consumer = self._factory()
            self._consumer.subscribe(self.topics, on_revoke=self._revoked, on_lost=self._revoked)
        return self._consumer

    def _revoked(self, consumer, partitions) -> None:
        """Forget what was in flight on partitions this consumer no longer owns.

        Their new owner resumes at the last commit, so unhandled events are redelivered there.
        """
        for tp in partitions:
            self._open.pop((tp.topic, tp.partition), None)

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
            self._open.setdefault((msg.topic(), msg.partition()), {})[msg.offset()] = False
            out.append(RawEvent(msg.value(), origin, topic=msg.topic(),
                                token=(msg.topic(), msg.partition(), msg.offset())))
        return out

    def ack(self, events: Sequence[RawEvent], ok: bool = True) -> None:
        """Record events as handled and commit, per partition, the handled prefix.

        Kafka commits are positions: committing offset N+1 says that everything up to N was
        handled. So a partition's commit only advances over the events handled without a gap
        since the last commit; an event that was delivered but never acknowledged (its
        handling failed) holds the position back, and it is delivered again, with the events
        after it, after a restart (the ledger makes the repeats harmless). Bad events
        (``ok=False``, dead-lettered) count as handled. Until then the handled offsets after
        the gap are kept in memory (a few bytes each), and dropped if the partition is revoked.
        """
        touched = set()
        for ev in events:
            topic, partition, offset = ev.token
            pending = self._open.get((topic, partition))
            if pending is not None and offset in pending:
                pending[offset] = True
                touched.add((topic, partition))
        commits = []
        for key in sorted(touched):
            pending, last = self._open[key], None
            while pending and pending[next(iter(pending))]:
                last = next(iter(pending))
                del pending[last]
            if last is not None:
                commits.append((key, last + 1))
        if commits and self._consumer is not None:
            from confluent_kafka import TopicPartition

            self._consumer.commit(offsets=[TopicPartition(t, p, o) for (t, p), o in commits],
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
