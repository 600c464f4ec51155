"""Benchmarks: the cost of APDB replication per CCD store, and APDB -> PPDB replication rows/s.

Usage: python bench/bench_ppdb.py [--visits 10] [--ccds 4] [--sources 500]
                                  [--pg postgresql+psycopg2://apbatch@127.0.0.1:PORT]
Stores visits x CCDs the way jobs do (`Association.run` + `store`) into an APDB with and without
replication, then replicates into a PPDB (lsst-dax-ppdb) and prints a table. SQLite always; with
``--pg`` (a server from scripts/postgres-local.sh) also PostgreSQL, in new databases dropped after.
Single process, one core; synthetic data from tests/alert_synth.py.
"""

from __future__ import annotations

import argparse
import statistics
import sys
import tempfile
import time
import uuid
from pathlib import Path

import numpy as np
import sqlalchemy as sa

ROOT = Path(__file__).resolve().parent.parent
sys.path.insert(0, str(ROOT / "tests"))

from alert_synth import make_ccd, make_images, make_sources  # noqa: E402
from apbatch.job.apdb import Association, create_apdb, open_apdb  # noqa: E402
from apbatch.products.ppdb import Replicator, create_ppdb  # noqa: E402

SIDE = 2000


def fill(config: Path, visits: int, ccds: int, n_sources: int) -> list[float]:
    """Store visits x ccds CCD-visits; return the seconds of each ``store``."""
    assoc = Association(open_apdb(config))
    images = {}
    times = []
    for n in range(visits):
        for det in range(90, 90 + ccds):
            cat = make_sources(n_sources, np.random.default_rng(det), detector=det, nx=SIDE, ny=SIDE)
            if det not in images:
                images[det] = make_images(np.random.default_rng(det), sources=None, shape=(SIDE, SIDE))
            img = images[det]
            res = assoc.run(make_ccd(n, detector=det), cat, img["difference"], img["science"], 3.0)
            t = time.perf_counter()
            assoc.store(res)
            times.append(time.perf_counter() - t)
    return times


def run(label: str, urls: dict[str, str], tmp: Path, args: argparse.Namespace) -> list[str]:
    """Rows of the table for one database kind (``urls``: apdb, apdbplain, ppdb)."""
    rows = []
    for replication in (False, True):
        config = tmp / f"{label}-{replication}.yaml"
        create_apdb(urls["apdb" if replication else "apdbplain"], config, replication=replication)
        times = fill(config, args.visits, args.ccds, args.sources)
        rows.append(f"| {label} | store per CCD, replication {'on ' if replication else 'off'} | "
                    f"{statistics.median(times) * 1000:.1f} ms median, {max(times) * 1000:.1f} ms max |")
    create_ppdb(urls["ppdb"])
    replicator = Replicator.open(config, urls["ppdb"])
    t = time.perf_counter()
    report = replicator.run_once()
    seconds = time.perf_counter() - t
    rows.append(f"| {label} | replicate {len(report.copied)} chunks, {report.rows} rows | "
                f"{seconds:.2f} s: {report.rows / seconds:,.0f} rows/s, "
                f"{seconds / max(len(report.copied), 1) * 1000:.0f} ms/chunk |")
    return rows


def main() -> None:
    parser = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    parser.add_argument("--visits", type=int, default=10)
    parser.add_argument("--ccds", type=int, default=4)
    parser.add_argument("--sources", type=int, default=500)
    parser.add_argument("--pg", help="PostgreSQL server URL without database")
    args = parser.parse_args()
    lines = [f"{args.visits} visits x {args.ccds} CCDs x {args.sources} sources", "",
             "| database | what | result |", "|---|---|---|"]
    with tempfile.TemporaryDirectory() as tmp_name:
        tmp = Path(tmp_name)
        kinds = ("apdb", "apdbplain", "ppdb")
        lines += run("sqlite", {k: f"sqlite:///{tmp}/{k}.sqlite3" for k in kinds}, tmp, args)
        if args.pg:
            tag = uuid.uuid4().hex[:8]
            names = {k: f"bench_{k}_{tag}" for k in kinds}
            admin = sa.create_engine(f"{args.pg}/postgres", isolation_level="AUTOCOMMIT")
            with admin.connect() as conn:
                for name in names.values():
                    conn.execute(sa.text(f'CREATE DATABASE "{name}"'))
            try:
                lines += run("postgresql", {k: f"{args.pg}/{n}" for k, n in names.items()}, tmp, args)
            finally:
                with admin.connect() as conn:
                    for name in names.values():
                        conn.execute(sa.text(f'DROP DATABASE IF EXISTS "{name}" WITH (FORCE)'))
                admin.dispose()
    print("\n".join(lines))


if __name__ == "__main__":
    main()
