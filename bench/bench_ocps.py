"""Benchmark: OCPS service overheads for a 9-CCD group (LSSTComCam), request to event.

Usage: python bench/bench_ocps.py [--repeat 5] [--poll 1.0 0.25] [--kafka BOOTSTRAP | --start-kafka]

Two intervals per request, median and max over ``--repeat`` requests, per ``ocps.poll_interval``:

* request -> jobs submitted: ``Service.create(run=True)`` called until the runner has planned the
  9 CCDs from the butler registry's exposure record, claimed them in the OCPS ledger and the
  local backend accepted the 9 jobs (`Runner.timings` ``submitted``);
* last CCD done -> completion event published: the last job's end (the local backend's
  ``jobs/<id>/exit`` file) until the broker acknowledged the completion event (``published``).

The jobs are ``python -c pass`` (``job.command``): what is measured is the service, not the
CCD processing. Without a broker the events go to memory (say so in the table).
"""

from __future__ import annotations

import argparse
import os
import statistics
import subprocess
import sys
import tempfile
import time
import uuid
from pathlib import Path

ROOT = Path(__file__).resolve().parent.parent
GROUP = "2025-10-16T01:00:00.000"


def _site(tmp: Path) -> None:
    from apbatch.butler.repo import create_repo, register_exposures, register_instrument

    butler = create_repo(tmp / "butler")
    register_instrument(butler, "LSSTComCam")
    register_exposures(butler, [{
        "instrument": "LSSTComCam", "exposure_id": 2025101500100, "obs_id": "CC_O_20251015_000100",
        "day_obs": 20251015, "seq_num": 100, "physical_filter": "r_03", "exposure_time": 15.0,
        "group_id": GROUP, "visit_id": 3405060000000000, "observation_type": "science", "ra": 53.0,
        "dec": -28.0, "rotation": 10.0, "mjd_begin": 60964.0417, "mjd_end": 60964.0419}])
    butler.close()


def bench(tmp: Path, poll: float, repeat: int, kafka: str | None) -> dict[str, list[float]]:
    from apbatch.config import load_config
    from apbatch.ocps.events import KafkaEventPublisher, MemoryPublisher
    from apbatch.ocps.model import DataId, Phase
    from apbatch.ocps.service import Service

    topic = f"ocps-bench-{uuid.uuid4().hex[:8]}"
    cfg = load_config(overrides={
        "root": str(tmp), "backend": {"kind": "local", "max_workers": 9, "log_dir": f"logs/{topic}"},
        "job": {"command": [sys.executable, "-c", "pass"], "distributor": str(tmp / "dist")},
        "kafka": {"bootstrap_servers": kafka or "127.0.0.1:9"},
        "ocps": {"poll_interval": poll, "completion_topic": topic, "telemetry_topic": f"{topic}-telemetry",
                 "ledger_url": f"sqlite:///{topic}.sqlite3"}}, environ={})
    publisher = KafkaEventPublisher.from_config(cfg) if kafka else MemoryPublisher()
    svc = Service(cfg, publisher=publisher)
    svc.start()
    out: dict[str, list[float]] = {"submit": [], "publish": []}
    try:
        for i in range(repeat + 1):  # the first request opens the butler: a warm-up, not counted
            t0 = time.time()
            req = svc.create("ap", DataId("LSSTComCam", group_id=GROUP), run=True)
            deadline = time.monotonic() + 120
            while not (done := svc.get(req.id)).phase.final and time.monotonic() < deadline:
                svc.wait(req.id, 5.0)
            while "published" not in svc.runner.timings.get(req.id, {}) and time.monotonic() < deadline:
                time.sleep(0.01)
            if done.phase is not Phase.COMPLETED or len(done.jobs) != 9:
                raise RuntimeError(f"request {req.id}: {done.phase} {done.error} ({len(done.jobs)} jobs)")
            t = svc.runner.timings[req.id]
            log_dir = cfg.path(cfg.backend.log_dir)
            last_exit = max((log_dir / "jobs" / j / "exit").stat().st_mtime for j in done.jobs)
            if i:
                out["submit"].append(t["submitted"] - t0)
                out["publish"].append(t["published"] - last_exit)
    finally:
        svc.stop()
    return out


def main() -> None:
    p = argparse.ArgumentParser(description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter)
    p.add_argument("--repeat", type=int, default=5)
    p.add_argument("--poll", type=float, nargs="+", default=[1.0, 0.25], help="ocps.poll_interval values")
    p.add_argument("--kafka", default=None, help="bootstrap servers of a running broker")
    p.add_argument("--start-kafka", action="store_true", help="start one with scripts/kafka-local.sh")
    a = p.parse_args()
    env = None
    if a.start_kafka:
        env = {**os.environ, "KAFKA_LOCAL_DIR": tempfile.mkdtemp(), "KAFKA_LOCAL_PORT": "19398",
               "KAFKA_LOCAL_VENV": sys.prefix}
        subprocess.run(["bash", str(ROOT / "scripts/kafka-local.sh"), "start"], env=env, check=True,
                       capture_output=True)
        a.kafka = "127.0.0.1:19398"
    rows = []
    try:
        with tempfile.TemporaryDirectory() as tmp:
            _site(Path(tmp))
            for poll in a.poll:
                r = bench(Path(tmp), poll, a.repeat, a.kafka)
                for key, name in (("submit", "request -> 9 jobs submitted"),
                                  ("publish", "last CCD done -> completion event published")):
                    rows.append((f"{name} (poll {poll:g} s)", statistics.median(r[key]), max(r[key])))
    finally:
        if env:
            subprocess.run(["bash", str(ROOT / "scripts/kafka-local.sh"), "stop"], env=env,
                           capture_output=True)
    where = f"Kafka {a.kafka}" if a.kafka else "in-memory publisher (no broker)"
    print(f"OCPS, LSSTComCam 9-CCD group, local backend, {a.repeat} requests each, events: {where}")
    print(f"{'interval':<62} {'median s':>9} {'max s':>7}  target <= 0.5 s")
    for name, med, top in rows:
        print(f"{name:<62} {med:>9.3f} {top:>7.3f}  {'ok' if med <= 0.5 else 'over'}")


if __name__ == "__main__":
    main()
