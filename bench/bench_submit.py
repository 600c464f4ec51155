#!/usr/bin/env python3
"""Submission benchmark: from a nextVisit event to "all of the visit's jobs accepted".

For 9 CCDs (LSSTComCam) and 189 CCDs (LSSTCam) it times, per run, the path
``JSON event text -> parse_event -> fan_out -> backend.submit(works)`` returning with every
CCD's job id, for:

* ``local``          : the local backend (jobs queued in its state dir, runner started);
* ``slurm-array``    : the Slurm backend, one ``sbatch`` of one array per visit;
* ``slurm-naive``    : the same CCDs as separate ``sbatch`` calls, one per CCD.

Jobs are cancelled after each timed run (outside the timing) so the 2-core machine is not
flooded with job processes. Prints medians (and min/max) over ``--runs`` runs. Slurm is
started through ``scripts/slurm-local.sh start`` if it is not running (needs root).

Then, on Slurm, **intake while polling** (issue 11): 11 earlier LSSTCam visits (2,079 jobs,
submitted held so they stay queued) are being polled by the daemon's background poller
without pause (``status_interval`` 0: squeue of every unfinished job, then the ledger update),
while events arrive through the daemon's own loop (`Dispatcher.run`); per event, the time
from handing it to the source to all 189 jobs accepted and recorded: p50 and max over
``--events`` events (target: max <= 0.5 s).

Usage: ``.venv/bin/python bench/bench_submit.py [--runs 7] [--events 15] [--no-slurm]``
"""

from __future__ import annotations

import argparse
import json
import os
import queue
import statistics
import subprocess
import sys
import tempfile
import threading
import time
from pathlib import Path

from apbatch.backends import make_backend
from apbatch.config import ApbatchConfig, load_config
from apbatch.events import parse_event
from apbatch.work import CcdWork

REPO = Path(__file__).resolve().parent.parent
SLURM_DIR = os.environ.get("SLURM_LOCAL_DIR", "/tmp/apbatch-slurm")
TARGET_S = 0.3

try:
    from apbatch.fanout import fan_out
except ImportError:  # the fan-out module is optional for this benchmark: do the same by hand
    fan_out = None


def next_visit_json(instrument: str, n: int) -> str:
    """A nextVisit event as it arrives (JSON text); a distinct group per run."""
    start = time.time() + 30
    group = time.strftime("%Y-%m-%dT%H:%M:%S", time.gmtime(start)) + f".{n % 1000:03d}"
    return json.dumps({
        "kind": "nextVisit", "salIndex": 1, "scriptSalIndex": 100000 + n, "groupId": group,
        "coordinateSystem": 2, "position": [150.1, 2.2], "startTime": start, "rotationSystem": 2,
        "cameraAngle": 30.0, "filters": "r_57", "dome": 2, "duration": 32.0, "nimages": 2,
        "instrument": instrument, "survey": "BLOCK-365", "totalCheckpoints": 0,
        "private_sndStamp": time.time(),
    })


def works_from_event(text: str, config: ApbatchConfig) -> list[CcdWork]:
    event = parse_event(text)
    if fan_out is not None:
        return fan_out(event, config)
    from apbatch.ids import visit_id_from_group
    from apbatch.instruments import get_instrument
    inst = get_instrument(event.instrument)
    return [CcdWork(inst.name, d.id, d.name, event.groupId, visit_id_from_group(event.groupId),
                    int(event.groupId[:10].replace("-", "")), "science", 30.0, event.nimages,
                    config.job.distributor, event.position[0], event.position[1], event.cameraAngle,
                    event.filters) for d in inst.science_detectors]


def slurm_local(command: str) -> subprocess.CompletedProcess:
    env = {**os.environ, "SLURM_LOCAL_DIR": SLURM_DIR}
    return subprocess.run(["bash", str(REPO / "scripts" / "slurm-local.sh"), command],
                          capture_output=True, text=True, env=env)


def ensure_slurm() -> bool | None:
    """Start Slurm unless running: `True` if started here, `False` if already up, `None` if unavailable."""
    started = False
    if slurm_local("status").returncode != 0:
        print("starting Slurm via scripts/slurm-local.sh start ...", file=sys.stderr)
        result = slurm_local("start")
        if result.returncode != 0:
            print(f"Slurm could not start: {result.stderr.strip().splitlines()[-1:]}", file=sys.stderr)
            return None
        started = True
    os.environ["SLURM_CONF"] = f"{SLURM_DIR}/etc/slurm.conf"
    return started


def measure(config: ApbatchConfig, instrument: str, runs: int, naive: bool) -> list[float]:
    """Seconds from event text to every job id, per run."""
    backend = make_backend(config)
    times = []
    for run in range(runs + 1):  # run 0 warms up imports and caches; not counted
        text = next_visit_json(instrument, run + (1000 if naive else 0))
        t0 = time.perf_counter()
        works = works_from_event(text, config)
        jobs = [j for w in works for j in backend.submit([w])] if naive else backend.submit(works)
        elapsed = time.perf_counter() - t0
        assert len(jobs) == len(works)
        backend.cancel(sorted({j.job_id.split("_")[0] for j in jobs}) if config.backend.kind == "slurm"
                       else [j.job_id for j in jobs])
        if run:
            times.append(elapsed)
    return times


class _QueueSource:
    """An event source fed by the benchmark (no spool-file delays in the timing)."""

    name = "bench"
    exhausted = False

    def __init__(self) -> None:
        self.q: queue.Queue = queue.Queue()

    def poll(self, timeout: float) -> list:
        try:
            return [self.q.get(timeout=timeout)]
        except queue.Empty:
            return []

    def ack(self, events, ok: bool = True) -> None:
        pass

    def close(self) -> None:
        pass


def measure_while_polling(root: str, events: int, earlier_visits: int = 11) -> dict[str, float]:
    """Event -> 189 jobs accepted (seconds) through `Dispatcher.run` while it polls 2,000+ jobs."""
    from apbatch.dispatcher import Dispatcher
    from apbatch.ledger import Ledger
    from apbatch.sources.base import RawEvent
    from apbatch.submitter import Submitter

    config = load_config(environ={}, overrides={
        "root": f"{root}/polling", "job": {"command": ["/bin/true"], "distributor": "http://127.0.0.1:8000"},
        "backend": {"kind": "slurm", "jobcomp_log": f"{SLURM_DIR}/log/jobcomp.txt", "mem": None,
                    "extra_directives": ["--hold"]}})  # queued, never run: the poll sees them every time
    ledger = Ledger.from_config(config)
    backend = make_backend(config)
    arrays: set[str] = set()
    for n in range(earlier_visits):
        works = works_from_event(next_visit_json("LSSTCam", 5000 + n), config)
        res = Submitter(ledger, backend).submit_new(works)
        arrays |= {j.job_id.split("_")[0] for j in res.jobs}
    polled = len(ledger.unfinished_job_ids("slurm"))
    done: dict[str, float] = {}

    class Timed(Dispatcher):
        def handle_raw(self, raw):
            outcome = super().handle_raw(raw)
            done[raw.origin] = time.perf_counter()
            arrays.update(j.job_id.split("_")[0] for j in outcome.jobs)
            return outcome

    source = _QueueSource()
    disp = Timed(config, ledger, backend, source, status_interval=0.0, check_age=False)
    poll_times: list[float] = []
    real_refresh = disp.refresh_states

    def timed_refresh() -> dict[str, int]:
        t0 = time.perf_counter()
        out = real_refresh()
        poll_times.append(time.perf_counter() - t0)
        return out

    disp.refresh_states = timed_refresh  # type: ignore[method-assign]
    stop = threading.Event()
    loop = threading.Thread(target=disp.run, kwargs={"stop_event": stop})
    loop.start()
    times = []
    try:
        while not poll_times:  # the poller is busy before the first event arrives
            time.sleep(0.05)
        for n in range(events):
            origin = f"bench:{n}"
            t0 = time.perf_counter()
            source.q.put(RawEvent(json.loads(next_visit_json("LSSTCam", 6000 + n)), origin=origin))
            while origin not in done:
                time.sleep(0.001)
            times.append(done[origin] - t0)
            time.sleep(0.3)  # events a few tenths of a second apart: each lands at a new point of a poll
    finally:
        stop.set()
        loop.join()
        for i in range(0, len(arrays), 100):
            subprocess.run(["scancel", *sorted(arrays)[i:i + 100]], capture_output=True)
        ledger.close()
    return {"p50": statistics.median(times), "max": max(times), "polled": polled,
            "poll_p50": statistics.median(poll_times), "poll_max": max(poll_times), "polls": len(poll_times)}


def main(argv: list[str] | None = None) -> int:
    parser = argparse.ArgumentParser(description=__doc__.split("\n\n")[0])
    parser.add_argument("--runs", type=int, default=7, help="timed runs per cell (median reported)")
    parser.add_argument("--no-slurm", action="store_true", help="local backend only")
    parser.add_argument("--events", type=int, default=15, help="events timed while polling (Slurm)")
    args = parser.parse_args(argv)
    root = tempfile.mkdtemp(prefix="apbatch-bench-")
    job = {"command": ["/bin/true"], "distributor": "http://127.0.0.1:8000"}
    configs: dict[str, tuple[ApbatchConfig, bool]] = {
        "local": (load_config(environ={}, overrides={"root": root, "job": job}), False)}
    started = None if args.no_slurm else ensure_slurm()
    if started is not None:
        slurm = load_config(environ={}, overrides={
            "root": root, "job": job,
            "backend": {"kind": "slurm", "jobcomp_log": f"{SLURM_DIR}/log/jobcomp.txt", "mem": None}})
        configs["slurm-array"] = (slurm, False)
        configs["slurm-naive"] = (slurm, True)
    sizes = {"LSSTComCam": 9, "LSSTCam": 189}
    results: dict[tuple[str, str], list[float]] = {}
    for name, (config, naive) in configs.items():
        for instrument in sizes:
            results[name, instrument] = measure(config, instrument, args.runs, naive)

    def fmt(t: list[float]) -> str:
        return f"{statistics.median(t):8.4f}  ({min(t):.4f}-{max(t):.4f})"

    print(f"\nevent -> all jobs accepted, seconds: median (min-max) over {args.runs} runs"
          f"  [fan_out: {'apbatch.fanout' if fan_out else 'inline loop'}]")
    print(f"{'approach':<14} {'9 CCDs (LSSTComCam)':>28} {'189 CCDs (LSSTCam)':>28}")
    for name in configs:
        print(f"{name:<14} {fmt(results[name, 'LSSTComCam']):>28} {fmt(results[name, 'LSSTCam']):>28}")
    if ("slurm-array", "LSSTCam") in results:
        median = statistics.median(results["slurm-array", "LSSTCam"])
        verdict = "met" if median <= TARGET_S else "MISSED"
        print(f"target <= {TARGET_S} s for a 189-CCD visit on Slurm: {median:.4f} s -> {verdict}")
        naive = statistics.median(results["slurm-naive", "LSSTCam"])
        print(f"one array vs 189 separate sbatch: {naive / median:.0f}x faster")
        p = measure_while_polling(root, args.events)
        verdict = "met" if p["max"] <= 0.5 else "MISSED"
        print(f"\nevent -> 189 jobs accepted through the daemon loop while it polls {p['polled']} "
              f"earlier jobs ({p['polls']} polls, each {p['poll_p50']:.2f} s median, {p['poll_max']:.2f} s "
              f"max):\n  p50 {p['p50']:.4f} s, max {p['max']:.4f} s over {args.events} events -> "
              f"target max <= 0.5 s {verdict}")
    if started:
        slurm_local("stop")
    return 0


if __name__ == "__main__":
    sys.exit(main())
