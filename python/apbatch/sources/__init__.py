"""Event sources of the daemon: a spool directory, stdin, or Kafka topics."""

from __future__ import annotations

from .base import EventSource, RawEvent

__all__ = ["EventSource", "RawEvent", "make_source"]


def make_source(config, kind: str | None = None, **deps) -> EventSource:
    """The source ``config.source.kind`` (or ``kind``) names.

    Parameters
    ----------
    config : `apbatch.config.ApbatchConfig`
        Gives the spool directory, its settle time, the size limits, the Kafka topics and the broker.
    kind : `str`, optional
        ``spool``, ``stdin`` or ``kafka``; default from the config.
    **deps
        Passed to the source (``stream=`` for stdin, ``consumer=`` for Kafka).
    """
    kind = kind or config.source.kind
    settings = config.source
    if kind == "spool":
        from .spool import SpoolSource

        return SpoolSource(config.path(settings.spool_dir), settle_time=settings.settle_time,
                           max_event_bytes=settings.max_event_bytes, max_file_bytes=settings.max_file_bytes,
                           **deps)
    if kind == "stdin":
        from .stdin import StdinSource

        return StdinSource(max_event_bytes=settings.max_event_bytes, **deps)
    if kind == "kafka":
        from .kafka import KafkaSource

        return KafkaSource.from_config(config, **deps)
    from ..errors import BadInputError

    raise BadInputError("source.kind", f"unknown source {kind!r}", "use spool, stdin or kafka")
