"""Per-step CPU and wall time, peak memory and truth scores of the AP image steps on one LSSTCam CCD.

Run: ``OMP_NUM_THREADS=1 .venv/bin/python bench/bench_steps.py [--runs 3] [--seed 1]``
(threads are pinned to 1 here anyway, before numpy is imported). Each run simulates a
4072 x 4000 ITL CCD (two 15 s snaps with cosmic rays, hot/dead columns, Moffat stars drawn
out to their wings, saturated stars with bleed trails, a header WCS off by 1.4 arcsec, 300
injected transients) and a two-patch
template (tests/steps_scene.py), then times ISR -> background -> detection -> PSF ->
astrometry -> warp -> subtraction -> DIA measurement. Scene generation is not timed.
Medians over runs are printed (the machine is shared: timings are noisy).
``--keep-freed-memory`` first applies :func:`apbatch.job.steps.memory.keep_freed_memory`
(freed buffers reused without page faults), as a job process should; with ``--runs 1`` the
figures are those of a fresh process, like one job.
"""

import os

for _k in ("OMP_NUM_THREADS", "OPENBLAS_NUM_THREADS", "MKL_NUM_THREADS"):
    os.environ[_k] = "1"

import argparse  # noqa: E402
import contextlib  # noqa: E402
import resource  # noqa: E402
import sys  # noqa: E402
import time  # noqa: E402
import tracemalloc  # noqa: E402
from pathlib import Path  # noqa: E402

import numpy as np  # noqa: E402

sys.path.insert(0, str(Path(__file__).resolve().parent.parent / "tests"))
from steps_scene import make_scene, run_chain, score  # noqa: E402

TARGETS = {
    "cpu_total": 10.0,
    "completeness_measured_10_inf": 0.98,
    "completeness_measured_5_10": 0.80,
    "false": 3,
}


def main(argv=None) -> int:
    ap = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    ap.add_argument("--runs", type=int, default=3)
    ap.add_argument("--seed", type=int, default=1)
    ap.add_argument("--keep-freed-memory", action="store_true", help="tune glibc malloc first, as a job does")
    args = ap.parse_args(argv)
    if args.keep_freed_memory:
        from apbatch.job.steps.memory import keep_freed_memory

        print(f"keep_freed_memory: {keep_freed_memory()}")
    times: dict[str, list] = {}
    scores = []
    for run in range(args.runs):
        scene = make_scene(seed=args.seed + run)
        rss_before = resource.getrusage(resource.RUSAGE_SELF).ru_maxrss

        @contextlib.contextmanager
        def timer(name):
            c, w = time.process_time(), time.perf_counter()
            yield
            times.setdefault(name, []).append((time.process_time() - c, time.perf_counter() - w))

        result = run_chain(scene, timer)
        scores.append(score(scene, result))
        del result, scene
    peak = resource.getrusage(resource.RUSAGE_SELF).ru_maxrss / 1024
    # one more, untimed run under tracemalloc (numpy reports its buffers): the chain's own peak
    scene = make_scene(seed=args.seed)
    tracemalloc.start()
    base = tracemalloc.get_traced_memory()[0]
    run_chain(scene)
    chain_peak = (tracemalloc.get_traced_memory()[1] - base) / 2**20
    tracemalloc.stop()
    print(f"{'step':12s} {'cpu s':>7s} {'wall s':>7s}   (median of {args.runs} runs, 1 thread)")
    tot_c = np.zeros(args.runs)
    tot_w = np.zeros(args.runs)
    for name, vals in times.items():
        c, w = np.array(vals).T
        tot_c += c
        tot_w += w
        print(f"{name:12s} {np.median(c):7.2f} {np.median(w):7.2f}")
    print(
        f"{'TOTAL':12s} {np.median(tot_c):7.2f} {np.median(tot_w):7.2f}   "
        f"(target <= {TARGETS['cpu_total']} s CPU)"
    )
    print(
        f"peak RSS {peak:.0f} MiB (includes the simulated scene; "
        f"RSS before the first chain {rss_before / 1024:.0f} MiB)"
    )
    print(f"peak memory allocated by the steps (tracemalloc, inputs excluded): {chain_peak:.0f} MiB")
    print("truth scores per run:")
    for s in scores:
        print("  " + ", ".join(f"{k}={v:.3f}" if isinstance(v, float) else f"{k}={v}" for k, v in s.items()))
    keys = [
        "completeness_measured_10_inf",
        "completeness_measured_5_10",
        "completeness_true_10_inf",
        "completeness_true_5_10",
        "false",
        "false_clean",
    ]
    print("median: " + ", ".join(f"{k}={np.median([s[k] for s in scores]):.3f}" for k in keys))
    return 0


if __name__ == "__main__":
    sys.exit(main())
