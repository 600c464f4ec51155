"""``apbatch demo``: a simulated night end to end on the embedded defaults.

Simulate a night (raws, calibrations, templates, events) -> create and fill the butler
repository -> create the APDB -> run the daemon (spool source, local process-pool backend)
while the night is replayed into the spool and the distributor -> wait for every job ->
print the status table, the night report and what reached the alert files.
"""

from __future__ import annotations

import collections
import contextlib
import json
import threading
import time
from collections.abc import Callable, Sequence
from pathlib import Path
from typing import Any

import yaml

from ..atomic import write_atomic
from ..config import load_config
from ..errors import BadInputError, RetriableError
from ..submission import Category, Submission

__all__ = ["run_demo"]


def _site_config(out: Path, instrument: str, detectors: list[int], workers: int | None,
                 extra: dict | None = None) -> Path:
    """Write the demo's config file (the jobs get the daemon's resolved config with --config)."""
    work = out / "work"
    data: dict[str, Any] = {
        "root": str(work),
        "backend": {"kind": "local", "max_workers": workers},
        "job": {"distributor": str(work / "distributor"), "repo": "butler"},
        "events": {"detectors": {instrument: detectors}},
        "alerts": {"sink": "file"},
        # the daemon's Prometheus endpoint on a free loopback port (its number in <root>/daemon-metrics.port)
        "monitoring": {"prometheus_port": 0},
    }
    for section, values in (extra or {}).items():
        data[section] = {**data.get(section, {}), **values}
    path = out / "apbatch.yaml"
    return write_atomic(path, yaml.safe_dump(data, sort_keys=False))


def run_demo(out: str | Path, *, instrument: str = "LSSTComCam", visits: int = 3,
             detectors: Sequence[str] = ("0", "4", "8"), seed: int = 1, speed: float = 10.0,
             workers: int | None = None, timeout: float = 1800.0, extra_config: dict | None = None,
             say: Callable[[str], None] = print) -> dict:
    """Run a simulated night through the whole system.

    Parameters
    ----------
    out : `str` or `Path`
        Directory for everything (must not exist, or be empty).
    instrument, visits, detectors, seed
        What to simulate (``detectors`` ids or names; empty = every science CCD).
    speed : `float`
        Replay speed-up over real time.
    workers : `int`, optional
        Concurrent jobs (default: number of cores).
    timeout : `float`
        Give up waiting for the jobs after this many seconds.
    extra_config : `dict`, optional
        Config sections merged into the demo's (e.g. ``{"alerts": {"sink": "kafka"}}``).

    Returns
    -------
    summary : `dict`
        Job states, alerts written, wall time.

    Raises
    ------
    BadInputError
        Raised if ``out`` exists and is not empty.
    RetriableError
        Raised if the jobs did not finish within ``timeout``.
    """
    from ..instruments import get_instrument
    from ..ledger import Ledger
    from . import apdb as apdb_script
    from . import repo as repo_script
    from .daemon import run_daemon
    from .night import format_report, night_report
    from .report import write_night_html
    from .sim import sim_night, sim_replay
    from .status import collect_status, format_status

    t0 = time.perf_counter()
    out = Path(out).resolve()
    if out.exists() and any(out.iterdir()):
        raise BadInputError("--out", f"{out} is not empty", "choose a new directory or remove it")
    cam = get_instrument(instrument)
    dets = ([cam.detector(d, field="--detectors").id for d in detectors]
            or [d.id for d in cam.science_detectors])
    out.mkdir(parents=True, exist_ok=True)
    cfg_path = _site_config(out, cam.name, dets, workers, extra_config)
    cfg = load_config(cfg_path, environ={})
    night = out / "night"

    say(f"[1/5] simulating {visits} visit(s) of {cam.name} on {len(dets)} CCD(s) into {night}")
    manifest = sim_night(night, cam.name, visits, seed, detectors=[str(d) for d in dets],
                         calibrations={"BIAS": 1})
    day_obs = int(manifest["day_obs"])  # the simulated night's (raw headers, butler)
    say(f"[2/5] butler repository and APDB under {cfg.root}")
    repo = cfg.path(cfg.job.repo)
    repo_script.create(repo)
    repo_script.register(repo, cam.name, night, (day_obs,))
    repo_script.ingest(repo, night / "calibs", night / "templates")
    apdb_script.create(cfg)

    say(f"[3/5] daemon (local backend) + replay of the night at {speed:g}x")
    stop = threading.Event()
    counts: dict = {}
    daemon = threading.Thread(
        target=lambda: counts.update(run_daemon(cfg, stop_event=stop, install_signals=False,
                                                status_interval=2.0)),
        name="apbatch-daemon", daemon=True)
    daemon.start()
    url = _metrics_url(cfg)
    if url:
        say(f"      daemon metrics (Prometheus): {url}")
    replayed = sim_replay(night, cfg.path(cfg.source.spool_dir), cfg.path(cfg.job.distributor), speed=speed)

    say(f"[4/5] waiting for the jobs ({replayed['events']} events replayed)")
    deadline = time.monotonic() + timeout
    ledger = Ledger.from_config(cfg)
    shown = ""
    try:
        while True:
            rows = ledger.rows()
            done = [r for r in rows if _settled(r, cfg.events.max_attempts, time.time())]
            counts_now = " ".join(f"{k}={n}" for k, n in sorted(collections.Counter(
                str(r.state) for r in rows).items()))
            if counts_now != shown:  # a count per change, not per poll: quiet enough for a log
                say(f"      {len(done)}/{len(rows)} jobs settled: {counts_now}")
                shown = counts_now
            if rows and len(done) == len(rows):
                break
            if time.monotonic() > deadline:
                stop.set()
                raise RetriableError(f"{len(rows) - len(done)} of {len(rows)} jobs unfinished after "
                                     f"{timeout:.0f} s")
            time.sleep(2.0)
    finally:
        stop.set()
        daemon.join(timeout=30)

    say("[5/5] results")
    say(format_status(collect_status(cfg, ledger=ledger, live=False)))
    # replay retimes the events to "now" but keeps groups and image names: one night, the simulated one
    say(format_report(night_report(cfg, day_obs=day_obs, ledger=ledger)))
    page = write_night_html(cfg, day_obs=day_obs, directory=out / "report", ledger=ledger)
    say(f"night report page: {page}")
    alert_files = sorted(cfg.path(cfg.alerts.directory).rglob("*.avro"))
    n_alerts = sum(_count_alerts(p) for p in alert_files)
    summary = {
        "jobs": dict(sorted(collections.Counter(str(r.state) for r in rows).items())),
        "alert_files": len(alert_files),
        "alerts": n_alerts,
        "dia_sources": _count_dia_sources(cfg),
        "work": str(cfg.root),
        "wall_seconds": round(time.perf_counter() - t0, 1),
    }
    say(json.dumps(summary))
    return summary


def _metrics_url(cfg, wait: float = 10.0) -> str | None:
    """The daemon's metrics URL once it has written its port file (`None` if it did not in ``wait`` s)."""
    from ..monitoring.prometheus import PORT_FILE

    path = cfg.path(PORT_FILE)
    deadline = time.monotonic() + wait
    while time.monotonic() < deadline:
        with contextlib.suppress(OSError, ValueError):
            return f"http://{cfg.monitoring.prometheus_host}:{int(path.read_text().strip())}/metrics"
        time.sleep(0.1)
    return None


def _settled(row: Submission, max_attempts: int, now: float) -> bool:
    """A job that will not change any more (a retriable failure will be resubmitted)."""
    cat = row.category(max_attempts=max_attempts, claim_timeout=300.0, lost_after=3600.0, now=now)
    return cat in (Category.COMPLETED, Category.FINAL, Category.EXHAUSTED)


def _count_dia_sources(cfg) -> int:
    """DiaSources stored in the APDB (what the alerts are about)."""
    import sqlalchemy as sa

    engine = sa.create_engine(cfg.sqlalchemy_url(cfg.apdb.url))
    try:
        with engine.connect() as conn:
            return int(conn.execute(sa.text('SELECT COUNT(*) FROM "DiaSource"')).scalar_one())
    finally:
        engine.dispose()


def _count_alerts(path: Path) -> int:
    import fastavro

    with open(path, "rb") as fh:
        return sum(1 for _ in fastavro.reader(fh))
