"""Benchmark the simulator: one LSSTCam CCD (raw + truth) and one LSSTComCam visit (9 CCDs).

Run: ``python bench/bench_sim.py [--runs 3] [--out DIR]``. Prints a table of median and
min/max wall times (one core; the camera signature of each CCD is included, as in a real
first render). Each run uses another exposure (sequence number), so nothing is cached.
"""

from __future__ import annotations

import argparse
import statistics
import tempfile
import time
from pathlib import Path

from apbatch.sim.calibs import detector_signature
from apbatch.sim.raws import ExposureSpec, simulate_ccd
from apbatch.sim.sky import SkyModel
from apbatch.sim.truth import visit_truth, write_truth


def _spec(instrument, filt, seq):
    return ExposureSpec(
        instrument=instrument,
        day_obs=20251015,
        seq_num=seq,
        controller="O",
        image_type="OBJECT",
        exptime=30.0,
        mjd_begin=60964.05 + seq / 86400,
        physical_filter=filt,
        group_id=f"2025-10-16T01:{seq % 60:02d}:26.692",
        ra=320.6,
        dec=-27.9,
        ra_start=320.6,
        dec_start=-27.9,
        rotation=30.0,
    )


def _one_ccd(out: Path, instrument: str, filt: str, det: int, seq: int) -> dict:
    t0 = time.perf_counter()
    sim = simulate_ccd(
        _spec(instrument, filt, seq), det, SkyModel(1, 60964.0), seq, out / f"{seq}_{det}.fits"
    )
    write_truth(visit_truth([sim.truth]), out / f"{seq}_{det}.parquet")
    return {
        "seconds": time.perf_counter() - t0,
        "sources": len(sim.truth),
        "bytes": (out / f"{seq}_{det}.fits").stat().st_size,
    }


def main() -> None:
    parser = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    parser.add_argument("--runs", type=int, default=3)
    parser.add_argument("--out", default=None, help="scratch directory (default: a temporary one)")
    args = parser.parse_args()
    with tempfile.TemporaryDirectory(dir=args.out) as tmp:
        out = Path(tmp)
        rows = []
        ccd = []
        for r in range(args.runs):
            detector_signature.cache_clear()
            ccd.append(_one_ccd(out, "LSSTCam", "r_57", 94, 100 + r))
        rows.append(
            (
                "LSSTCam CCD R22_S11 (E2V), raw + truth",
                [c["seconds"] for c in ccd],
                f"{ccd[0]['sources']} sources, {ccd[0]['bytes'] / 1e6:.1f} MB RICE",
            )
        )
        visit = []
        for r in range(args.runs):
            detector_signature.cache_clear()
            t0 = time.perf_counter()
            for det in range(9):
                _one_ccd(out, "LSSTComCam", "r_03", det, 200 + r)
            visit.append(time.perf_counter() - t0)
        rows.append(("LSSTComCam visit (9 CCDs), raws + truth", visit, "sequential, one core"))
    print(f"{'case':<44} {'median s':>9} {'min s':>7} {'max s':>7}  note")
    for name, times, note in rows:
        print(f"{name:<44} {statistics.median(times):>9.2f} {min(times):>7.2f} {max(times):>7.2f}  {note}")


if __name__ == "__main__":
    main()
