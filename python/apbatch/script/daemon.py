"""``apbatch daemon``: watch an event source and submit one job per CCD, until stopped."""

from __future__ import annotations

import contextlib
import logging
import signal
import threading

from ..backends.base import Backend
from ..config import ApbatchConfig
from ..dispatcher import Dispatcher
from ..ledger import Ledger
from ..sources import EventSource, make_source

__all__ = ["run_daemon"]

_log = logging.getLogger(__name__)


@contextlib.contextmanager
def _stop_on_signals(stop: threading.Event, install: bool):
    """Set ``stop`` on SIGTERM/SIGINT (main thread only); restore the old handlers after."""
    if not install or threading.current_thread() is not threading.main_thread():
        yield
        return

    def handler(signum, _frame):
        _log.info("received %s: finishing the current event and stopping", signal.Signals(signum).name)
        stop.set()

    old = {sig: signal.signal(sig, handler) for sig in (signal.SIGTERM, signal.SIGINT)}
    try:
        yield
    finally:
        for sig, h in old.items():
            signal.signal(sig, h)


def _start_metrics(config: ApbatchConfig):
    """The daemon's metrics and their endpoint (``monitoring.prometheus_port``; unset: neither)."""
    port = config.monitoring.prometheus_port
    if port is None:
        return None, None
    from ..monitoring import DaemonMetrics, serve_metrics
    from ..monitoring.prometheus import PORT_FILE

    metrics = DaemonMetrics()
    return metrics, serve_metrics(metrics, port, config.monitoring.prometheus_host, config.path(PORT_FILE))


def run_daemon(config: ApbatchConfig, *, source_kind: str | None = None, max_events: int | None = None,
               max_seconds: float | None = None, status_interval: float = 5.0,
               stop_event: threading.Event | None = None, install_signals: bool = True,
               backend: Backend | None = None, ledger: Ledger | None = None,
               source: EventSource | None = None) -> dict[str, int]:
    """Run the dispatcher loop (see `apbatch.dispatcher`) until stopped.

    Parameters
    ----------
    config : `ApbatchConfig`
        The configuration; ``source.kind`` picks the source unless ``source_kind`` is given.
    source_kind : `str`, optional
        ``spool``, ``stdin`` or ``kafka``.
    max_events, max_seconds : optional
        Stop after this many events / seconds (tests, batch runs).
    status_interval : `float`
        Seconds between scheduler polls.
    stop_event : `threading.Event`, optional
        Set to stop; SIGTERM and SIGINT set it too when ``install_signals``.
    backend, ledger, source : optional
        Injected for tests; default from the configuration.

    Returns
    -------
    counts : `dict` [`str`, `int`]
        Events per outcome (``submitted``, ``duplicate``, ``rejected``, ``bad``, ...).
    """
    stop = stop_event or threading.Event()
    from ..logs import set_log_format

    set_log_format(config.monitoring.log_format)  # unless the command line chose (--log-format)
    own_ledger, own_source = ledger is None, source is None
    ledger = ledger or Ledger.from_config(config)
    try:
        if backend is None:
            from ..backends import make_backend

            backend = make_backend(config)
        source = source or make_source(config, source_kind)
        metrics, server = _start_metrics(config)
        dispatcher = Dispatcher(config, ledger, backend, source, status_interval=status_interval,
                                metrics=metrics)
        _log.info("daemon started: source %s, backend %s, mode %s", source.name, dispatcher.kind,
                  dispatcher.mode)
        try:
            with _stop_on_signals(stop, install_signals):
                counts = dispatcher.run(max_events=max_events, max_seconds=max_seconds, stop_event=stop)
        finally:
            if server is not None:
                server.close()
        _log.info("daemon stopped: %s", ", ".join(f"{k}={v}" for k,
                                                  v in sorted(counts.items())) or "no events")
        return counts
    finally:
        if own_source and source is not None:
            source.close()
        if own_ledger:
            ledger.close()
