"""The whole per-CCD job, as a batch job runs it: CPU per step and per process, peak memory.

Run: ``.venv/bin/python bench/bench_job.py [--visits 2] [--detectors 0,4,8] [--out DIR]``

bench_steps.py times the image steps on an in-memory scene; this one times what a job
process really does on simulated LSSTComCam CCDs (4k x 4k ITL sensors, like LSSTCam's):
interpreter start and imports, the distributor-backed butler get of the raw, calibration
and template reads, the image steps, the butler writes of the calibrated and difference
images, APDB association and alert packaging (file sink).

1. ``apbatch demo`` (untimed set-up): simulate the night, create the butler repository and
   the APDB, replay it through the daemon and local backend with one worker.
2. Every science CCD-visit is run again as its own ``python -m apbatch process-ccd`` process
   (one at a time, OMP/OPENBLAS/MKL threads = 1) into a fresh output run, with a fresh APDB and
   alert directory, so each is a first run; ``os.wait4`` gives the process's CPU (user +
   system) and peak RSS, and the job's own metrics give the CPU of each step; ``(raw ->
   alerts)`` sums the steps from the raw's read to the alerts sent (the critical path).

The set-up runs in a process of its own: Linux carries the peak RSS of the process that
starts a job over into the job's ``ru_maxrss`` (``vfork`` + ``exec`` keeps the larger), so a
bench that had simulated the night in its own process (about 1 GB) reported that as the
floor of every job's peak.

Medians over the jobs are printed (machines are shared: single timings are noisy).
"""

from __future__ import annotations

import argparse
import os
import subprocess
import sys
import tempfile
import time
from pathlib import Path

import numpy as np
import yaml

TARGET_CPU = 10.0  # s per 4k x 4k CCD (the target for the pipeline)
# the steps from the raw's read to the alerts sent: the CPU on the raw -> alert critical path
# (the images are written after the alerts, the prepare_* steps before the raw)
CRITICAL = ("wait_for_raw", "calib_retrieval", "isr", "background_detection", "template_retrieval",
            "astrometry", "warp", "subtract", "measure", "write_catalog", "associate_alerts")
THREADS = dict.fromkeys(("OMP_NUM_THREADS", "OPENBLAS_NUM_THREADS", "MKL_NUM_THREADS"), "1")


def _setup(out: Path, visits: int, detectors: list[str], seed: int) -> Path:
    """``apbatch demo`` in a child process, so that this one stays small (module docstring)."""
    code = ("import sys; from pathlib import Path; from apbatch.script.demo import run_demo; "
            "run_demo(Path(sys.argv[1]), visits=int(sys.argv[2]), detectors=sys.argv[3].split(','), "
            "seed=int(sys.argv[4]), speed=200.0, workers=1, say=lambda m: None)")
    subprocess.run([sys.executable, "-c", code, str(out), str(visits), ",".join(detectors), str(seed)],
                   check=True, env={**os.environ, **THREADS})
    return out / "apbatch.yaml"


def _science_work(cfg_path: Path) -> list:
    from apbatch.config import load_config
    from apbatch.ledger import Ledger

    cfg = load_config(cfg_path, environ={})
    rows = Ledger.from_config(cfg, create=False).rows()
    return [r.work for r in rows if r.intent == "science"]


def _bench_config(out: Path) -> Path:
    """A config overlay: a new APDB and alert directories, so every rerun is a first run."""
    from apbatch.config import load_config
    from apbatch.script import apdb as apdb_script

    bench = out / "bench"
    bench.mkdir(exist_ok=True)
    overlay = {"apdb": {"url": f"sqlite:///{bench}/apdb.sqlite3",
                        "config_file": str(bench / "apdb-config.yaml")},
               "alerts": {"directory": str(bench / "alerts"), "spool_dir": str(bench / "alerts-spool")}}
    path = bench / "bench.yaml"
    path.write_text(yaml.safe_dump(overlay))
    cfg = load_config([out / "apbatch.yaml", path], environ={})
    apdb_script.create(cfg)
    return path


def _run_job(work, cfg_path: Path, overlay: Path, run: str) -> dict:
    cmd = [sys.executable, "-m", "apbatch", "process-ccd", *work.job_args(), "--timeout", "30",
           "--output-run", run, "--config", str(cfg_path), "--config", str(overlay)]
    env = {**os.environ, **THREADS}
    env.pop("APBATCH_CONFIG", None)
    t0 = time.perf_counter()
    proc = subprocess.Popen(cmd, env=env, stdout=subprocess.DEVNULL, stderr=subprocess.PIPE)
    _, status, usage = os.wait4(proc.pid, 0)
    wall = time.perf_counter() - t0
    err = proc.stderr.read().decode(errors="replace")
    proc.stderr.close()
    code = os.waitstatus_to_exitcode(status)
    if code != 0:
        raise SystemExit(f"bench_job: job {work.label} exited {code}:\n{err[-2000:]}")
    return {"cpu": usage.ru_utime + usage.ru_stime, "wall": wall, "rss_mib": usage.ru_maxrss / 1024}


def _metrics(repo: Path, work, run: str) -> dict:
    from lsst.daf.butler import Butler

    butler = Butler.from_config(str(repo))
    return butler.get("ap_metrics", instrument=work.instrument, visit=work.visit, detector=work.detector,
                      collections=run)


def main(argv=None) -> int:
    ap = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    ap.add_argument("--visits", type=int, default=2)
    ap.add_argument("--detectors", default="0,4,8")
    ap.add_argument("--seed", type=int, default=1)
    ap.add_argument("--out", type=Path, help="work directory (default: a temporary one, removed)")
    args = ap.parse_args(argv)
    os.environ.update(THREADS)
    tmp = None
    if args.out is None:
        tmp = tempfile.TemporaryDirectory(prefix="bench-job-")
        args.out = Path(tmp.name) / "night"
    t0 = time.perf_counter()
    cfg_path = _setup(args.out, args.visits, args.detectors.split(","), args.seed)
    works = _science_work(cfg_path)
    overlay = _bench_config(args.out)
    print(f"set-up (simulate, repository, demo replay): {time.perf_counter() - t0:.0f} s; "
          f"{len(works)} science CCD-visits")
    steps: dict[str, list[float]] = {}
    procs = []
    for i, work in enumerate(works):
        run = f"bench/run{i}"
        procs.append(_run_job(work, cfg_path, overlay, run))
        m = _metrics(args.out / "work" / "butler", work, run)
        for name, t in m["timings"].items():
            steps.setdefault(name, []).append(t["cpu"])
        steps.setdefault("(all steps)", []).append(sum(t["cpu"] for t in m["timings"].values()))
        steps.setdefault("(raw -> alerts)", []).append(
            sum(t["cpu"] for name, t in m["timings"].items() if name in CRITICAL))
    print(f"\n{'step':22s} {'median cpu s':>12s} {'max':>6s}   "
          f"({len(works)} jobs, one at a time, job.threads threads each)")
    for name, vals in steps.items():
        print(f"{name:22s} {np.median(vals):12.2f} {np.max(vals):6.2f}")
    cpu = [p["cpu"] for p in procs]
    print(f"{'whole process':22s} {np.median(cpu):12.2f} {np.max(cpu):6.2f}   "
          "(interpreter, imports, butler/APDB set-up and the steps)")
    print(f"{'wall, whole process':22s} {np.median([p['wall'] for p in procs]):12.2f}")
    rss = [p["rss_mib"] for p in procs]
    print(f"peak RSS per job: median {np.median(rss):.0f} MiB, max {np.max(rss):.0f} MiB")
    steps_total = float(np.median(steps["(all steps)"]))
    print(f"\ntarget: <= {TARGET_CPU:.0f} s CPU per CCD for the pipeline; all steps {steps_total:.2f} s "
          f"({steps_total / TARGET_CPU:.2f} of the target), whole process {np.median(cpu):.2f} s")
    if tmp is not None:
        tmp.cleanup()
    return 0


if __name__ == "__main__":
    sys.exit(main())
