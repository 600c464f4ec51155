"""Truth scores over the issue-10 condition grid, or per-step timings, of the AP image steps on LSSTCam CCDs.

Run: ``OMP_NUM_THREADS=1 .venv/bin/python bench/bench_steps.py [--conditions all|a,b,...] [--seeds 1]
[--workers 1]``
(threads are pinned to 1 here anyway, before numpy is imported). For each condition of
tests/scene_conditions.py and each seed, a CCD visit is simulated (tests/steps_scene.py:
two 15 s snaps with cosmic rays, hot/dead columns, stars drawn out to their wings, saturated
stars with bleed trails, a header WCS off by 1.4 arcsec, 300 injected transients, a two-patch
template), ISR -> background -> detection -> PSF -> astrometry -> warp -> subtraction -> DIA
measurement is run and scored against the truth. One row per condition: completeness by true
S/N over the difference's valid region (>= 10, 5-10, and >= 10 within 25 px of the border),
pooled over the seeds (found / injected; S/N 5-10 with its 95% Wilson interval: one CCD has
~100 transients there, so one seed alone is uncertain by +-8%), false detections (all / without
bad, saturated, cr, edge or suspect flags: mean and max per CCD over seeds; of the unflagged,
``near`` an object of the scene, where they may be its residual, and ``isol``-ated, noise peaks:
``scene_score.near_objects``) beside the noise floor (``noise``: mean unflagged detections of
white noise drawn from the difference's variance through the same DIA detection, what a
perfect subtraction would give), median flux and S/N
ratios (measured / true: ``snr`` against the background-limited optimum, ``snr*`` against the
optimum counting the transient's own shot noise, the S/N a perfect measurement reaches),
``alrt10``: completeness at S/N >= 10 counting only transients found by a DIA source the alert
policy keeps (not in a saturated star's halo: what brokers receive), ``halo%``: median share of
the valid pixels in saturated stars' halos, CPU seconds of the chain (median), and whether the
targets are met (on the pooled completeness and the mean false detections per CCD: noise peaks
are Poisson, so the max over seeds grows with the number of seeds). A condition whose chain
raises prints ``exit <code>: <message>`` (the job's exit code for apbatch errors) in its row,
and the bench goes on. ``--workers 2`` runs two (condition, seed) pairs at a time (~15 s each;
~2 GB of memory each).

``--timing`` instead prints the per-step CPU and wall time, peak memory and truth scores of
``--runs`` default scenes (scene generation is not timed; medians over runs, the machine is
shared: timings are noisy). ``--keep-freed-memory`` first applies
:func:`apbatch.job.steps.memory.keep_freed_memory` (freed buffers reused without page faults),
as a job process should; with ``--runs 1`` the figures are those of a fresh process, like one job.
"""

import os

for _k in ("OMP_NUM_THREADS", "OPENBLAS_NUM_THREADS", "MKL_NUM_THREADS"):
    os.environ[_k] = "1"

import argparse  # noqa: E402
import contextlib  # noqa: E402
import json  # noqa: E402
import multiprocessing  # noqa: E402
import resource  # noqa: E402
import sys  # noqa: E402
import time  # noqa: E402
import tracemalloc  # noqa: E402
from concurrent.futures import ProcessPoolExecutor  # noqa: E402
from pathlib import Path  # noqa: E402

import numpy as np  # noqa: E402

sys.path.insert(0, str(Path(__file__).resolve().parent.parent / "tests"))
from scene_conditions import CONDITIONS  # noqa: E402
from scene_score import noise_floor  # noqa: E402
from steps_scene import make_scene, run_chain, score  # noqa: E402

TARGETS = {
    "cpu_total": 10.0,
    "completeness_valid_10_inf": 0.98,
    "completeness_valid_5_10": 0.80,
    "false_unflagged": 3,
    "flux_ratio_tolerance": 0.05,
    "snr_ratio_shot": 0.98,
}


def _timer(times: dict):
    @contextlib.contextmanager
    def timer(name):
        c, w = time.process_time(), time.perf_counter()
        yield
        times.setdefault(name, []).append((time.process_time() - c, time.perf_counter() - w))

    return timer


def run_condition(name: str, seed: int) -> dict:
    """Simulate, process and score one condition and seed.

    Returns
    -------
    row : `dict`
        The scores plus ``cpu`` (seconds of the chain), or ``error`` (one line) if the chain raised.
    """
    times: dict = {}
    stage = "scene"
    try:
        scene = make_scene(seed=seed, **CONDITIONS[name])
        stage = "chain"
        result = run_chain(scene, _timer(times))
    except Exception as exc:  # noqa: BLE001 - one failing condition must not stop the grid
        code = getattr(exc, "exit_code", None)
        head = f"exit {int(code)}" if code is not None else f"{stage} crash {type(exc).__name__}"
        msg = str(exc).splitlines()[0] if str(exc) else ""
        return {"condition": name, "seed": seed, "error": f"{head}: {msg}"}
    row = score(scene, result)
    row.update(condition=name, seed=seed, cpu=sum(v[0][0] for v in times.values()))
    row.update(noise_floor(result, seed, scene.truth))
    return row


def _fmt(v: float, pct: bool = False) -> str:
    if v is None or not np.isfinite(v):
        return "-"
    return f"{100 * v:.1f}" if pct else f"{v:.3f}"


def _plain(v):
    return v.item() if hasattr(v, "item") else list(v)


def wilson(k: int, n: int, z: float = 1.96) -> tuple[float, float]:
    """Wilson score interval of a binomial fraction ``k / n`` (95% for ``z`` 1.96)."""
    if n == 0:
        return float("nan"), float("nan")
    p = k / n
    d = 1 + z * z / n
    c = (p + z * z / (2 * n)) / d
    h = z * np.sqrt(p * (1 - p) / n + z * z / (4 * n * n)) / d
    return max(float(c - h), 0.0), min(float(c + h), 1.0)


def pooled(rows: list[dict], key: str) -> tuple[int, int]:
    """Found and injected transients of completeness bin ``key`` (e.g. ``valid_5_10``) over rows."""
    n = [r[f"n_{key}"] for r in rows]
    k = [round(r[f"completeness_{key}"] * m) if m else 0 for r, m in zip(rows, n, strict=True)]
    return int(sum(k)), int(sum(n))


def _targets(c10, c5, fu_mean, flux, snr_shot) -> str:
    miss = []
    if not (np.isfinite(c10) and c10 >= TARGETS["completeness_valid_10_inf"]):
        miss.append("c10")
    if not (np.isfinite(c5) and c5 >= TARGETS["completeness_valid_5_10"]):
        miss.append("c5")
    if fu_mean > TARGETS["false_unflagged"]:
        miss.append("false")
    if not (np.isfinite(flux) and abs(flux - 1) <= TARGETS["flux_ratio_tolerance"]):
        miss.append("flux")
    if not (np.isfinite(snr_shot) and snr_shot >= TARGETS["snr_ratio_shot"]):
        miss.append("snr")
    return "yes" if not miss else "no: " + ",".join(miss)


HEADER = (
    f"{'condition':22s} {'c>=10%':>7s} {'c5-10% (95%)':>18s} {'edge10%':>8s} {'n_edge':>6s} {'false':>6s} "
    f"{'f_max':>5s} {'unflag':>6s} {'u_max':>5s} {'near':>5s} {'isol':>5s} {'noise':>5s} {'+/-':>7s} "
    f"{'flux':>6s} {'snr':>6s} {'snr*':>6s} {'alrt10':>6s} {'halo%':>5s} {'valid':>6s} {'cpu s':>6s}  "
    "targets met"
)


def table_row(name: str, rows: list[dict]) -> str:
    """One line of the grid table from the per-seed results of a condition."""
    ok = [r for r in rows if "error" not in r]
    if not ok:
        return f"{name:22s} {rows[0]['error']}"

    def med(k):
        vals = [r.get(k, float("nan")) for r in ok]
        return float(np.nanmedian(vals)) if any(np.isfinite(vals)) else float("nan")

    def frac(key):
        k, n = pooled(ok, key)
        return (k / n if n else float("nan")), k, n

    c10, c5, e10 = frac("valid_10_inf")[0], frac("valid_5_10"), frac("edge_10_inf")
    a10 = frac("alertable_10_inf")[0] if all("n_alertable_10_inf" in r for r in ok) else float("nan")
    lo, hi = wilson(c5[1], c5[2])
    fa = [r["false"] for r in ok]
    fu = [r["false_unflagged"] for r in ok]
    noise = np.mean([r["noise_unflagged"] for r in ok]) if all("noise_unflagged" in r for r in ok) else np.nan
    iso = np.mean([r.get("false_isolated", np.nan) for r in ok])
    pos, neg = sum(r["false_pos"] for r in ok), sum(r["false_neg"] for r in ok)
    flux, snr, snr_shot = med("flux_ratio"), med("snr_ratio"), med("snr_ratio_shot")
    c5_text = f"{_fmt(c5[0], True)} ({_fmt(lo, True)}-{_fmt(hi, True)})"
    line = (
        f"{name:22s} {_fmt(c10, True):>7s} {c5_text:>18s} {_fmt(e10[0], True):>8s} {e10[2]:6d} "
        f"{np.mean(fa):6.2f} {max(fa):5d} {np.mean(fu):6.2f} {max(fu):5d} {np.mean(fu) - iso:5.2f} "
        f"{iso:5.2f} {noise:5.2f} {f'{pos}/{neg}':>7s} "
        f"{_fmt(flux):>6s} {_fmt(snr):>6s} {_fmt(snr_shot):>6s} {_fmt(a10, True):>6s} "
        f"{100 * med('halo_fraction'):5.2f} {_fmt(med('valid_fraction')):>6s} "
        f"{med('cpu'):6.1f}  {_targets(c10, c5[0], float(np.mean(fu)), flux, snr_shot)}"
    )
    errors = [r["error"] for r in rows if "error" in r]
    return line + (f"  ({len(errors)} seed(s) failed: {errors[0]})" if errors else "")


def grid(args) -> int:
    names = list(CONDITIONS) if args.conditions == "all" else [c.strip() for c in args.conditions.split(",")]
    unknown = [n for n in names if n not in CONDITIONS]
    if unknown:
        print(f"--conditions: unknown {', '.join(unknown)} (use 'all' or some of: {', '.join(CONDITIONS)})")
        return 2
    if args.workers < 1:
        print(f"--workers: {args.workers} is not a number of processes (use 1 or more)")
        return 2
    print(
        f"{len(names)} condition(s) x {args.seeds} seed(s) from seed {args.seed}; completeness by true S/N "
        "over the difference's valid region, pooled over seeds; false = all / unflagged (mean, max per "
        "CCD), "
        "noise = white-noise floor (mean per CCD)"
    )
    print(HEADER, flush=True)
    tasks = [(name, args.seed + k) for name in names for k in range(args.seeds)]
    out = open(args.json, "w") if args.json else None  # noqa: SIM115
    with contextlib.ExitStack() as stack:
        if args.workers > 1:
            pool = stack.enter_context(
                ProcessPoolExecutor(args.workers, mp_context=multiprocessing.get_context("spawn"))
            )
            results = pool.map(run_condition, *zip(*tasks, strict=True))
        else:
            results = (run_condition(n, s) for n, s in tasks)
        rows: list[dict] = []
        for row in results:
            rows.append(row)
            if out:
                out.write(json.dumps(row, default=_plain) + "\n")
                out.flush()
            if len(rows) == args.seeds:
                print(table_row(rows[0]["condition"], rows), flush=True)
                rows = []
    if out:
        out.close()
    print(
        f"targets: c>=10 >= {TARGETS['completeness_valid_10_inf']:.0%}, c5-10 >= "
        f"{TARGETS['completeness_valid_5_10']:.0%} (pooled), unflagged false <= "
        f"{TARGETS['false_unflagged']} "
        f"(mean per CCD), flux ratio within {TARGETS['flux_ratio_tolerance']:.0%}, "
        f"snr* >= {TARGETS['snr_ratio_shot']}"
    )
    return 0


def timing(args) -> int:
    if args.keep_freed_memory:
        from apbatch.job.steps.memory import keep_freed_memory

        print(f"keep_freed_memory: {keep_freed_memory()}")
    times: dict[str, list] = {}
    scores = []
    for run in range(args.runs):
        scene = make_scene(seed=args.seed + run)
        rss_before = resource.getrusage(resource.RUSAGE_SELF).ru_maxrss
        result = run_chain(scene, _timer(times))
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
        "false_unflagged",
    ]
    print("median: " + ", ".join(f"{k}={np.median([s[k] for s in scores]):.3f}" for k in keys))
    return 0


def main(argv=None) -> int:
    ap = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    ap.add_argument("--conditions", default="all", help="'all' or a comma list of scene_conditions.py names")
    ap.add_argument("--seeds", type=int, default=1, help="seeds per condition")
    ap.add_argument("--seed", type=int, default=1, help="first seed")
    ap.add_argument("--workers", type=int, default=1, help="(condition, seed) pairs run at a time")
    ap.add_argument("--json", help="also write every (condition, seed) score as a JSON line to this file")
    ap.add_argument("--timing", action="store_true", help="per-step timings of default scenes instead")
    ap.add_argument("--runs", type=int, default=3, help="--timing: scenes timed")
    ap.add_argument("--keep-freed-memory", action="store_true", help="--timing: tune glibc malloc first")
    args = ap.parse_args(argv)
    return timing(args) if args.timing else grid(args)


if __name__ == "__main__":
    sys.exit(main())
