"""A simulated night replayed through the daemon in real time, for bench_latency.py.

Like ``apbatch demo`` (`apbatch.script.demo.run_demo`), with two differences a latency
benchmark needs:

* the timeline is edited before the replay (:func:`retime_timeline`): the afternoon
  calibrations, 15 minutes before the first visit in the simulator's plan, are moved to just
  before it (at real speed the replay would otherwise sit idle for 15 minutes), and the
  visits may be spread to a slower ``cadence`` while everything inside a visit (the nextVisit
  lead, the snaps, readout, raw arrivals) keeps its real timing;
* the backend is a parameter: the local process pool, or a running Slurm.
"""

from __future__ import annotations

import threading
import time
from collections.abc import Callable, Sequence
from pathlib import Path
from typing import Any

import yaml

__all__ = ["EVENT_TIME_FIELDS", "retime_timeline", "run_night"]

EVENT_TIME_FIELDS = ("private_sndStamp", "private_rcvStamp", "private_kafkaStamp", "private_efdStamp",
                     "startTime", "timestampAcquisitionStart")
"""Fields of an event that hold a time (shifted together with the event's timeline record)."""

CALIBRATION_LEAD = 20.0
"""Seconds between the last calibration record and the first nextVisit after retiming."""


def _is_next_visit(item: dict) -> bool:
    return item["type"] == "event" and item["event"].get("topic", "").endswith("logevent_nextVisit")


def retime_timeline(items: Sequence[dict], cadence: float | None = None,
                    calibration_lead: float = CALIBRATION_LEAD) -> list[dict]:
    """Move the calibrations to just before the first visit and space the visits ``cadence`` apart.

    Parameters
    ----------
    items : sequence of `dict`
        Timeline records (`apbatch.sim.events.timeline`), in time order.
    cadence : `float`, optional
        Seconds from one nextVisit to the next; default: the plan's own (unchanged).
    calibration_lead : `float`
        The calibrations' last record ends up this many seconds before the first nextVisit
        (they are only moved closer, never later).

    Returns
    -------
    items : `list` [`dict`]
        New records (the input is not changed), sorted as the simulator sorts them.
    """
    group_of_image = {r["obs_id"]: r["group"] for r in items if r["type"] == "raw"}

    def group_of(item: dict) -> str | None:
        if item["type"] == "raw":
            return item["group"]
        ev = item["event"]
        return ev.get("groupId") or group_of_image.get(ev.get("imageName", ""))

    visits = sorted((i for i in items if _is_next_visit(i)), key=lambda i: i["time"])
    if not visits:
        return [dict(i) for i in items]
    t0 = visits[0]["time"]
    shift = {i["event"]["groupId"]: (t0 + k * cadence - i["time"]) if cadence else 0.0
             for k, i in enumerate(visits)}
    others = [i["time"] for i in items if group_of(i) not in shift]
    cal_shift = max(0.0, (t0 - calibration_lead) - max(others)) if others else 0.0
    out = []
    for item in items:
        dt = shift.get(group_of(item) or "", cal_shift)
        new = {**item, "time": item["time"] + dt}
        if item["type"] == "event":
            ev = dict(item["event"])
            for key in EVENT_TIME_FIELDS:
                if isinstance(ev.get(key), int | float):
                    ev[key] = ev[key] + dt
            new["event"] = ev
        out.append(new)
    out.sort(key=lambda r: (r["time"], r["type"] != "event"))
    return out


def _site_config(out: Path, instrument: str, detectors: list[int], backend: dict[str, Any]) -> Path:
    work = out / "work"
    data = {
        "root": str(work),
        "backend": backend,
        "job": {"distributor": str(work / "distributor"), "repo": "butler"},
        "events": {"detectors": {instrument: detectors}},
        "alerts": {"sink": "file"},
    }
    path = out / "apbatch.yaml"
    path.write_text(yaml.safe_dump(data, sort_keys=False))
    return path


def run_night(out: Path, *, instrument: str, visits: int, detectors: Sequence[str], seed: int,
              backend: dict[str, Any], cadence: float | None = None, timeout: float = 1800.0,
              say: Callable[[str], None] = print) -> Path:
    """Simulate a night, set up the repository and APDB, replay it at real speed through the daemon.

    Parameters
    ----------
    out : `Path`
        New or empty directory for everything.
    instrument, visits, detectors, seed
        What to simulate (``detectors`` empty: every science CCD).
    backend : `dict`
        The config's ``backend`` section (``{"kind": "local", "max_workers": 4}``, ...).
    cadence : `float`, optional
        Seconds between visits (default: the simulator's, ~37-39 s).
    timeout : `float`
        Give up waiting for the jobs this long after the replay ended.

    Returns
    -------
    config : `Path`
        The night's config file (``out/apbatch.yaml``), for reading the ledger afterwards.

    Raises
    ------
    RetriableError
        Raised if the jobs did not all settle within ``timeout``.
    """
    from apbatch.config import load_config
    from apbatch.errors import RetriableError
    from apbatch.instruments import get_instrument
    from apbatch.ledger import Ledger
    from apbatch.script import apdb as apdb_script
    from apbatch.script import repo as repo_script
    from apbatch.script.daemon import run_daemon
    from apbatch.script.sim import sim_night, sim_replay
    from apbatch.sim.events import read_timeline, write_timeline
    from apbatch.submission import Category

    cam = get_instrument(instrument)
    dets = ([cam.detector(d, field="--detectors").id for d in detectors]
            or [d.id for d in cam.science_detectors])
    out.mkdir(parents=True, exist_ok=True)
    cfg_path = _site_config(out, cam.name, dets, backend)
    cfg = load_config(cfg_path, environ={})
    night = out / "night"
    t0 = time.perf_counter()
    manifest = sim_night(night, cam.name, visits, seed, detectors=[str(d) for d in dets],
                         calibrations={"BIAS": 1})
    items = retime_timeline(read_timeline(night / "timeline.jsonl"), cadence)
    write_timeline(items, night / "timeline.jsonl")
    repo = cfg.path(cfg.job.repo)
    repo_script.create(repo)
    repo_script.register(repo, cam.name, night, (int(manifest["day_obs"]),))
    repo_script.ingest(repo, night / "calibs", night / "templates")
    apdb_script.create(cfg)
    span = items[-1]["time"] - items[0]["time"]
    say(f"  set-up (simulate {visits} visit(s) x {len(dets)} CCD(s), repository, APDB): "
        f"{time.perf_counter() - t0:.0f} s; replaying {span:.0f} s of night at real speed")

    stop = threading.Event()
    daemon = threading.Thread(target=lambda: run_daemon(cfg, stop_event=stop, install_signals=False,
                                                        status_interval=2.0),
                              name="apbatch-daemon", daemon=True)
    daemon.start()
    start = time.time()

    def progress(line: str) -> None:
        if line.startswith("raw ") or (line.startswith("event ") and line.strip() != "event"):
            say(f"  {time.time() - start:6.1f} s  {line}")

    try:
        sim_replay(night, cfg.path(cfg.source.spool_dir), cfg.path(cfg.job.distributor), speed=1.0,
                   progress=progress)
        expected = visits * len(dets)
        ledger = Ledger.from_config(cfg)
        deadline = time.monotonic() + timeout
        while True:
            rows = ledger.rows()
            now = time.time()
            done = [r for r in rows if r.category(max_attempts=cfg.events.max_attempts, claim_timeout=300.0,
                                                  lost_after=3600.0, now=now)
                    in (Category.COMPLETED, Category.FINAL, Category.EXHAUSTED)]
            science = sum(1 for r in rows if r.intent == "science")
            if science >= expected and len(done) == len(rows):
                break
            if time.monotonic() > deadline:
                raise RetriableError(f"{len(rows) - len(done)} of {len(rows)} jobs unfinished "
                                     f"{timeout:.0f} s after the replay")
            time.sleep(2.0)
        say(f"  all {len(rows)} jobs settled {time.time() - start:.0f} s after the replay began")
    finally:
        stop.set()
        daemon.join(timeout=60)
    return cfg_path
