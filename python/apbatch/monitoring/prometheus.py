"""The daemon's Prometheus metrics (``prometheus-client``), served on loopback.

`DaemonMetrics` holds one private `prometheus_client.CollectorRegistry` (never the global
one: a process, e.g. the test suite, may run many daemons), with:

================================================  =========  =====================================
``apbatch_events_received_total{kind}``           counter    events read (``invalid``: unparseable)
``apbatch_events_dead_lettered_total``            counter    events written to the dead-letter file
``apbatch_submissions_total{backend}``            counter    CCD jobs the scheduler accepted
``apbatch_submit_failures_total{backend}``        counter    visit submissions the scheduler refused
``apbatch_jobs_ended_total{state,exit_code}``     counter    jobs seen ending (exit code ``none``:
                                                             the scheduler gave none)
``apbatch_jobs{state}``                           gauge      unfinished CCD rows per state (the
                                                             queue as the dispatcher knows it)
``apbatch_stage_seconds{interval}``               histogram  `apbatch.latency.INTERVALS` of the
                                                             jobs seen ending (their ledger stages)
================================================  =========  =====================================

The `apbatch.dispatcher.Dispatcher` calls the hooks (:meth:`DaemonMetrics.event_received` ...);
its default is `NullMetrics`, which does nothing. :func:`serve_metrics` starts the HTTP
endpoint (``monitoring.prometheus_port``; 0: any free port, written to
``<root>/daemon-metrics.port``).
"""

from __future__ import annotations

import collections
import ipaddress
import logging
from collections.abc import Mapping, Sequence
from pathlib import Path
from typing import Any

from ..atomic import write_atomic
from ..errors import BadInputError
from ..latency import intervals_of
from ..states import JobStatus

__all__ = ["PORT_FILE", "STAGE_BUCKETS", "DaemonMetrics", "MetricsServer", "NullMetrics", "serve_metrics"]

_log = logging.getLogger(__name__)

PORT_FILE = "daemon-metrics.port"
"""Under ``root``: the port the daemon's metrics endpoint is bound to (one line)."""

STAGE_BUCKETS = (0.5, 1.0, 2.0, 5.0, 10.0, 15.0, 20.0, 30.0, 45.0, 60.0, 90.0, 120.0, 180.0, 300.0, 600.0)
"""Histogram bucket bounds (s) of the stage intervals; 60 s is the alert latency requirement."""


class NullMetrics:
    """The hooks of `DaemonMetrics`, doing nothing (the dispatcher's default)."""

    def event_received(self, kind: str) -> None:
        """An event was read (``kind``: its kind, or ``invalid``)."""

    def dead_lettered(self) -> None:
        """An event was dead-lettered."""

    def submitted(self, backend: str, n_jobs: int, n_refused: int) -> None:
        """``n_jobs`` CCD jobs were accepted and ``n_refused`` visit submissions refused."""

    def jobs_polled(self, ledger: Any, backend: str, ended: Mapping[str, JobStatus]) -> None:
        """A poll stored job states; ``ended``: the jobs it saw ending (job id -> settled status)."""


class DaemonMetrics(NullMetrics):
    """One daemon's metrics, in a registry of their own (see the module docstring).

    Thread-safe (the dispatcher polls in a background thread).
    """

    def __init__(self) -> None:
        from prometheus_client import CollectorRegistry, Counter, Gauge, Histogram

        self.registry = CollectorRegistry()
        r = self.registry
        self.events = Counter("apbatch_events_received", "Events read by the daemon", ["kind"], registry=r)
        self.dead_letters = Counter("apbatch_events_dead_lettered", "Events dead-lettered", registry=r)
        self.submissions = Counter("apbatch_submissions", "CCD jobs the scheduler accepted", ["backend"],
                                   registry=r)
        self.submit_failures = Counter("apbatch_submit_failures", "Visit submissions the scheduler refused",
                                       ["backend"], registry=r)
        self.jobs_ended = Counter("apbatch_jobs_ended", "Jobs seen ending, by state and exit code",
                                  ["state", "exit_code"], registry=r)
        self.jobs = Gauge("apbatch_jobs", "Unfinished CCD rows in the ledger, by state", ["state"],
                          registry=r)
        self.stage_seconds = Histogram("apbatch_stage_seconds", "Stage intervals of the jobs seen ending",
                                       ["interval"], buckets=STAGE_BUCKETS, registry=r)

    def event_received(self, kind: str) -> None:
        self.events.labels(kind=kind or "unknown").inc()

    def dead_lettered(self) -> None:
        self.dead_letters.inc()

    def submitted(self, backend: str, n_jobs: int, n_refused: int) -> None:
        if n_jobs:
            self.submissions.labels(backend=backend).inc(n_jobs)
        if n_refused:
            self.submit_failures.labels(backend=backend).inc(n_refused)

    def jobs_polled(self, ledger: Any, backend: str, ended: Mapping[str, JobStatus]) -> None:
        """Count the endings, observe their stage intervals (read from the ledger rows the jobs
        wrote them to) and set the queue gauge from the ledger; a ledger read that fails is
        logged (metrics never stop the daemon)."""
        for st in ended.values():
            code = "none" if st.exit_code is None else str(st.exit_code)
            self.jobs_ended.labels(state=st.state.value, exit_code=code).inc()
        try:
            for stages in _stages_of(ledger, backend, list(ended)):
                self.observe_stages(stages)
            counts = _unfinished_counts(ledger)
        except Exception as exc:
            _log.warning("metrics: could not read the ledger: %s", exc)
            return
        for state in _UNFINISHED:
            self.jobs.labels(state=state).set(counts.get(state, 0))

    def observe_stages(self, stages: Mapping[str, float]) -> None:
        """Observe the intervals of one job's stage marks (`apbatch.latency.STAGES` -> seconds)."""
        for name, seconds in intervals_of(stages).items():
            self.stage_seconds.labels(interval=name).observe(max(seconds, 0.0))

    def text(self) -> str:
        """The exposition text a scrape of ``/metrics`` returns."""
        from prometheus_client import generate_latest

        return generate_latest(self.registry).decode()


def _unfinished() -> tuple[str, ...]:
    from ..ledger_schema import UNFINISHED

    return tuple(UNFINISHED)


_UNFINISHED = _unfinished()


def _stages_of(ledger: Any, backend: str, job_ids: Sequence[str]) -> list[Mapping[str, float]]:
    """The stage marks the ledger holds for these jobs (rows without marks are left out)."""
    if not job_ids or ledger is None:
        return []
    import json

    import sqlalchemy as sa

    from ..ledger_schema import submissions

    c = submissions.c
    out = []
    with ledger.engine.connect() as conn:
        for i in range(0, len(job_ids), 500):
            q = sa.select(c.stages).where(c.backend == backend, c.job_id.in_(list(job_ids[i:i + 500])))
            out += [json.loads(r.stages) for r in conn.execute(q) if r.stages]
    return [s for s in out if s]


def _unfinished_counts(ledger: Any) -> dict[str, int]:
    """Unfinished rows per state (one grouped query)."""
    if ledger is None:
        return {}
    import sqlalchemy as sa

    from ..ledger_schema import submissions

    c = submissions.c
    q = sa.select(c.state, sa.func.count()).where(c.state.in_(_UNFINISHED)).group_by(c.state)
    with ledger.engine.connect() as conn:
        return collections.Counter({state: int(n) for state, n in conn.execute(q)})


class MetricsServer:
    """A running ``/metrics`` endpoint; :meth:`close` stops it.

    Attributes
    ----------
    host, port : `str`, `int`
        Where it listens (``port`` is the bound one, also when 0 was asked for).
    """

    def __init__(self, server: Any, thread: Any, host: str, port_file: str | Path | None = None):
        self._server, self._thread = server, thread
        self.host = host
        self.port = int(server.server_port)
        self.port_file = None if port_file is None else Path(port_file)

    @property
    def url(self) -> str:
        """``http://host:port/metrics``."""
        return f"http://{self.host}:{self.port}/metrics"

    def close(self) -> None:
        """Stop serving, release the port and remove the port file (nothing listens any more)."""
        self._server.shutdown()
        self._server.server_close()
        self._thread.join(timeout=5)
        if self.port_file is not None:
            self.port_file.unlink(missing_ok=True)


def serve_metrics(metrics: DaemonMetrics, port: int, host: str = "127.0.0.1",
                  port_file: str | Path | None = None) -> MetricsServer:
    """Serve ``metrics`` on ``http://host:port/metrics`` in a daemon thread.

    Parameters
    ----------
    metrics : `DaemonMetrics`
        What is served (its private registry).
    port : `int`
        0 for any free port.
    host : `str`
        A loopback address.
    port_file : `str` or `Path`, optional
        Written atomically with the bound port; removed by `MetricsServer.close`.

    Raises
    ------
    BadInputError
        Raised if ``host`` is not a loopback address or the port cannot be bound.
    """
    from prometheus_client import start_http_server

    try:
        loopback = ipaddress.ip_address(host).is_loopback
    except ValueError:
        loopback = False
    if not loopback:
        raise BadInputError("monitoring.prometheus_host", f"{host!r} is not a loopback address",
                            "use 127.0.0.1")
    try:
        server, thread = start_http_server(port, addr=host, registry=metrics.registry)
    except OSError as exc:
        raise BadInputError("monitoring.prometheus_port", f"cannot listen on {host}:{port}: {exc.strerror}",
                            "pick a free port, or 0 for any") from None
    out = MetricsServer(server, thread, host, port_file)
    if port_file is not None:
        write_atomic(port_file, f"{out.port}\n")
    _log.info("metrics served at %s", out.url)
    return out
