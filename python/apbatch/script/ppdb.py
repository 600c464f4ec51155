"""``apbatch ppdb``: create the Prompt Products Database and replicate the APDB into it."""

from __future__ import annotations

import time
from collections.abc import Callable

from ..config import ApbatchConfig
from ..products.ppdb import ChunkCopy, ReplicationReport, Replicator, create_ppdb

__all__ = ["create", "make_replicator", "replicate"]


def create(cfg: ApbatchConfig, url: str | None = None) -> str:
    """Create the PPDB's tables (``lsst-dax-ppdb``, schema from ``lsst-sdm-schemas``).

    Parameters
    ----------
    cfg : `ApbatchConfig`
        Configuration; ``ppdb.url`` is the default.
    url : `str`, optional
        SQLAlchemy URL overriding ``ppdb.url`` (SQLite paths are relative to ``root``).

    Returns
    -------
    url : `str`
        The PPDB's URL, password hidden.

    Raises
    ------
    BadInputError
        Raised if the URL is unsupported or unreachable, or already holds a PPDB.
    """
    from sqlalchemy.engine import make_url

    db_url = cfg.sqlalchemy_url(url or cfg.ppdb.url)
    create_ppdb(db_url, connection_timeout=cfg.ppdb.connection_timeout)
    return make_url(db_url).render_as_string(hide_password=True)


def make_replicator(cfg: ApbatchConfig, url: str | None = None, *, clock: Callable[[], float] = time.time,
                    max_chunks: int | None = None,
                    on_chunk: Callable[[ChunkCopy], None] | None = None) -> Replicator:
    """A `Replicator` from the APDB of ``apdb.config_file`` to the PPDB of ``ppdb.url`` (or ``url``).

    Raises
    ------
    BadInputError
        Raised if either database is missing or unreachable.
    """
    return Replicator.open(cfg.path(cfg.apdb.config_file), cfg.sqlalchemy_url(url or cfg.ppdb.url),
                           connection_timeout=cfg.ppdb.connection_timeout, clock=clock,
                           min_wait_seconds=cfg.ppdb.min_wait_seconds,
                           max_wait_seconds=cfg.ppdb.max_wait_seconds,
                           max_chunks=max_chunks or cfg.ppdb.chunk_batch,
                           delete_from_apdb=cfg.ppdb.delete_from_apdb, on_chunk=on_chunk)


def replicate(cfg: ApbatchConfig, url: str | None = None, *, follow: bool = False,
              clock: Callable[[], float] = time.time, max_chunks: int | None = None,
              on_pass: Callable[[ReplicationReport], None] | None = None,
              stop: Callable[[], bool] = lambda: False,
              sleep: Callable[[float], None] = time.sleep) -> int:
    """Copy the APDB's ready replica chunks into the PPDB, in order, each chunk exactly once.

    Parameters
    ----------
    cfg : `ApbatchConfig`
        Configuration (``apdb.config_file``, the ``ppdb`` section).
    url : `str`, optional
        PPDB URL overriding ``ppdb.url``.
    follow : `bool`
        Keep going: a pass, then ``ppdb.follow_interval`` seconds of sleep after a pass that
        copied nothing, until ``stop()`` (or an interrupt); otherwise one pass (for cron).
    clock, stop, sleep : callable
        Injected time, stop condition and sleep (tests).
    max_chunks : `int`, optional
        Chunks per pass, overriding ``ppdb.chunk_batch``.
    on_pass : callable, optional
        Called with each pass's `ReplicationReport`.

    Returns
    -------
    copied : `int`
        Chunks copied.
    """
    replicator = make_replicator(cfg, url, clock=clock, max_chunks=max_chunks)
    try:
        if follow:
            return replicator.follow(cfg.ppdb.follow_interval, stop=stop, sleep=sleep, on_pass=on_pass)
        report = replicator.run_once()
        if on_pass is not None:
            on_pass(report)
        return len(report.copied)
    finally:
        replicator.close()
