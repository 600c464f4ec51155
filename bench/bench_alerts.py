"""Benchmarks: alert building + serialisation, Kafka produce rate, APDB load+associate+store per CCD.

Usage: python bench/bench_alerts.py [--repeat 5] [--kafka BOOTSTRAP | --start-kafka] [--skip-100k]
                                   [--alerts-only]
Prints a table of medians. Synthetic data from tests/alert_synth.py; single process, one core.
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

import numpy as np
import pandas as pd

ROOT = Path(__file__).resolve().parent.parent
sys.path.insert(0, str(ROOT / "tests"))

from alert_synth import ccd_wcs, make_ccd, make_images, make_sources  # noqa: E402
from apbatch.image import Image  # noqa: E402
from apbatch.job.alerts import AlertBuilder  # noqa: E402
from apbatch.job.apdb import Association, create_apdb, open_apdb, pack_id  # noqa: E402


def _median(xs):
    return statistics.median(xs)


def bench_build(repeat: int, n_alerts: int, n_prv: int) -> tuple[float, int]:
    """Alerts/s for build (3 FITS cutouts each) + Avro + framing, with n_prv history rows each."""
    rng = np.random.default_rng(0)
    with tempfile.TemporaryDirectory() as tmp:
        create_apdb(f"sqlite:///{tmp}/apdb.sqlite3", f"{tmp}/apdb.yaml")
        assoc = Association(open_apdb(f"{tmp}/apdb.yaml"))
        cat = make_sources(n_alerts, rng, nx=2000, ny=2000)
        imgs = make_images(rng, sources=None, shape=(2000, 2000))
        res = assoc.run(make_ccd(n_prv), cat, imgs["difference"], imgs["science"], 3.0)
    if n_prv:
        prv = pd.concat([res.sources.assign(visit=k, midpointMjdTai=res.ccd.midpoint_mjd_tai - 1 - k,
                                            diaSourceId=res.sources["diaSourceId"] + 10**6 * (k + 1))
                         for k in range(n_prv)], ignore_index=True)
        prvf = pd.concat([res.forced.assign(midpointMjdTai=res.ccd.midpoint_mjd_tai - 1 - k)
                          for k in range(n_prv)], ignore_index=True)
    else:
        prv, prvf = res.sources.iloc[:0], res.forced.iloc[:0]
    res.prv_sources, res.prv_forced = prv, prvf
    builder = AlertBuilder()
    rates, size = [], 0
    for _ in range(repeat):
        t = time.perf_counter()
        payloads = builder.payloads(res, imgs["science"], imgs["template"], imgs["difference"])
        rates.append(len(payloads) / (time.perf_counter() - t))
        size = len(payloads[0][1])
    return _median(rates), size


def bench_kafka(bootstrap: str, repeat: int, n_alerts: int) -> float:
    from apbatch.job.alert_sinks import KafkaAlertSink
    from confluent_kafka.admin import AdminClient, NewTopic

    payload = os.urandom(80_000)
    alerts = [(i, b"\0\0\0\x04\x4d" + payload) for i in range(n_alerts)]
    rates = []
    for _ in range(repeat):
        topic = f"bench-{uuid.uuid4().hex[:8]}"
        admin = AdminClient({"bootstrap.servers": bootstrap})
        admin.create_topics([NewTopic(topic, 1, 1)])[topic].result(30)
        sink = KafkaAlertSink({"bootstrap.servers": bootstrap}, topic)
        t = time.perf_counter()
        ok = sink.send("bench", alerts, 120.0)
        rates.append(sum(ok) / (time.perf_counter() - t))
        sink.close()
    return _median(rates)


def bench_apdb(n_existing: int, repeat: int, n_sources: int, spread_deg: float) -> dict[str, float]:
    """Median s per CCD for load+associate+summaries+forced (run) and store, with n_existing objects."""
    rng = np.random.default_rng(1)
    with tempfile.TemporaryDirectory() as tmp:
        create_apdb(f"sqlite:///{tmp}/apdb.sqlite3", f"{tmp}/apdb.yaml")
        apdb = open_apdb(f"{tmp}/apdb.yaml")
        ccd0 = make_ccd(0)
        # seed: existing objects (one source each) around the CCD, stored in chunks of 20k
        ra0, dec0 = np.mean(np.array(ccd0.corners), axis=0)
        for start in range(0, n_existing, 20_000):
            n = min(20_000, n_existing - start)
            ra = ra0 + rng.uniform(-spread_deg / 2, spread_deg / 2, n) / np.cos(np.radians(dec0))
            dec = dec0 + rng.uniform(-spread_deg / 2, spread_deg / 2, n)
            ids = pack_id(ccd0.visit, 200 + start // 20_000 % 50, np.arange(n))
            objs = pd.DataFrame({"diaObjectId": ids, "ra": ra, "dec": dec, "raErr": np.nan, "decErr": np.nan,
                                 "ra_dec_Cov": np.nan, "nDiaSources": 1, "firstDiaSourceMjdTai": 61299.0,
                                 "lastDiaSourceMjdTai": 61299.0,
                                 **{f"{b}_psfFluxNdata": 0 for b in "ugrizy"}})
            src = pd.DataFrame({"diaSourceId": ids, "diaObjectId": ids, "visit": ccd0.visit,
                                "detector": 200 + start // 20_000 % 50, "midpointMjdTai": 61299.0,
                                "ra": ra, "dec": dec, "x": 0.0, "y": 0.0, "psfNdata": 0, "trailNdata": 0,
                                "dipoleNdata": 0, "timeProcessedMjdTai": 61299.0, "bboxSize": 0, "band": "r",
                                "psfFlux": 1.0, "psfFluxErr": 1.0})
            apdb.store(make_ccd(-1).visit_time, objs, src, None)
        assoc = Association(apdb)
        # full-size 4072 x 4000 difference/science planes, so forced photometry covers the whole CCD
        full = Image(np.zeros((4000, 4072), np.float32), np.full((4000, 4072), 100.0, np.float32),
                     np.zeros((4000, 4072), np.int32), ccd_wcs())
        runs, stores, on_ccd = [], [], 0
        for k in range(repeat):
            ccd = make_ccd(1 + k)
            cat = make_sources(n_sources, rng)
            t = time.perf_counter()
            res = assoc.run(ccd, cat, full, full, 3.0)
            t1 = time.perf_counter()
            assoc.store(res)
            t2 = time.perf_counter()
            runs.append(t1 - t)
            stores.append(t2 - t1)
            on_ccd = len(assoc.load_objects(ccd.region))
        return {"run": _median(runs), "store": _median(stores), "objects_in_region": on_ccd}


def main() -> None:
    p = argparse.ArgumentParser(description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter)
    p.add_argument("--repeat", type=int, default=5)
    p.add_argument("--kafka", default=None, help="bootstrap servers of a running broker")
    p.add_argument("--start-kafka", action="store_true", help="start one with scripts/kafka-local.sh")
    p.add_argument("--skip-100k", action="store_true")
    p.add_argument("--alerts-only", action="store_true", help="only the alert build+serialize rows")
    a = p.parse_args()
    rows = []
    # 500/CCD: a dense CCD; ~50/CCD: the design load (10^4 alerts per visit over 189 CCDs)
    for n_alerts, n_prv in ((500, 0), (500, 3), (500, 10), (50, 3), (50, 10)):
        rate, size = bench_build(a.repeat, n_alerts, n_prv)
        rows.append((f"alerts built+serialized /s/core ({n_alerts}/CCD, {n_prv} prv src+forced,"
                     " 3x30px cutouts)", f"{rate:,.0f}", f"{size / 1024:.0f} KiB/alert"))
    if a.alerts_only:
        _print(rows, a.repeat)
        return
    env = None
    if a.start_kafka:
        env = {**os.environ, "KAFKA_LOCAL_DIR": tempfile.mkdtemp(), "KAFKA_LOCAL_PORT": "19399",
               "KAFKA_LOCAL_VENV": sys.prefix}
        subprocess.run(["bash", str(ROOT / "scripts/kafka-local.sh"), "start"], env=env, check=True,
                       capture_output=True)
        a.kafka = "127.0.0.1:19399"
    try:
        if a.kafka:
            rate = bench_kafka(a.kafka, a.repeat, 2000)
            rows.append(("Kafka produce, 80 KB alerts, idempotent, acks=all (local Tansu)",
                         f"{rate:,.0f}/s", f"{rate * 80 / 1024:.0f} MiB/s"))
    finally:
        if env:
            subprocess.run(["bash", str(ROOT / "scripts/kafka-local.sh"), "stop"], env=env,
                           capture_output=True)
    sizes = [1_000] + ([] if a.skip_100k else [100_000])
    for n in sizes:
        for spread in (1.0, 0.25):
            r = bench_apdb(n, a.repeat, 50, spread)
            rows.append((f"APDB SQLite, {n:,} objects over {spread}x{spread} deg"
                         f" ({r['objects_in_region']:,} in CCD region), 50 sources: run / store / total",
                         f"{r['run']:.3f} / {r['store']:.3f} s", f"{r['run'] + r['store']:.3f} s"))
    _print(rows, a.repeat)


def _print(rows: list[tuple[str, str, str]], repeat: int) -> None:
    width = max(len(r[0]) for r in rows)
    print(f"{'measurement (medians of ' + str(repeat) + ')':<{width}}  {'value':>18}  extra")
    for name, value, extra in rows:
        print(f"{name:<{width}}  {value:>18}  {extra}")


if __name__ == "__main__":
    main()
