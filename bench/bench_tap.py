"""Benchmark: TAP cone-search latency on a PPDB of 1,000,000 DiaSources, through the HTTP service.

Usage: python bench/bench_tap.py [--rows 1000000] [--queries 20]
                           [--pg postgresql+psycopg2://apbatch@127.0.0.1:PORT]

Makes a PPDB (`apbatch.products.ppdb.create_ppdb`) in a new database, loads ``--rows``
DiaSources with COPY (uniform over a 10 x 10 degree field, 100 visits), makes the service's
indexes (`apbatch.tap.schema.create_indexes`: GiST on spoint(radians(ra), radians(dec))), shows
PostgreSQL's plan of a cone search, then (after 3 warm-up queries) times ``--queries`` cone
searches per radius (5", 1', 10'; random centres in the field) with pyvo through a real uvicorn
server, and prints a table of p50/p95 latency and rows returned. Without ``--pg`` a server is started with
scripts/postgres-local.sh in a temporary directory and stopped afterwards.
"""

from __future__ import annotations

import argparse
import io
import os
import shutil
import socket
import statistics
import subprocess
import sys
import tempfile
import time
import uuid
from pathlib import Path

import numpy as np
import sqlalchemy as sa

ROOT = Path(__file__).resolve().parent.parent
FIELD = (150.0, 160.0, -5.0, 5.0)  # ra min, max, dec min, max (degrees)
RADII = {'5"': 5 / 3600, "1'": 1 / 60, "10'": 10 / 60}


def _free_port() -> int:
    with socket.socket() as s:
        s.bind(("127.0.0.1", 0))
        return s.getsockname()[1]


def load(url: str, rows: int, seed: int = 1) -> float:
    """COPY ``rows`` DiaSources into the PPDB at ``url``; return the seconds it took."""
    rng = np.random.default_rng(seed)
    engine = sa.create_engine(url)
    raw = engine.raw_connection()
    t0 = time.perf_counter()
    try:
        cur = raw.cursor()
        batch = 200_000
        for start in range(0, rows, batch):
            n = min(batch, rows - start)
            ids = np.arange(start, start + n, dtype=np.int64) + 1
            visit = 1000 + ids % 100
            mjd = 61000.0 + (visit - 1000) * 0.01
            ra = rng.uniform(FIELD[0], FIELD[1], n)
            sin_dec = rng.uniform(np.sin(np.radians(FIELD[2])), np.sin(np.radians(FIELD[3])), n)
            dec = np.degrees(np.arcsin(sin_dec))
            buf = io.StringIO()
            cols = np.column_stack([ids, visit, ids % 189, mjd, ra, dec, rng.uniform(0, 4000, n),
                                    rng.uniform(0, 4000, n), np.full(n, 10), np.full(n, 10), np.full(n, 10),
                                    mjd + 0.001, np.full(n, 20)])
            np.savetxt(buf, cols, delimiter="\t", fmt=["%d", "%d", "%d", "%.9f", "%.12f", "%.12f", "%.3f",
                                                        "%.3f", "%d", "%d", "%d", "%.9f", "%d"])
            buf.seek(0)
            cur.copy_expert('COPY "DiaSource" ("diaSourceId", visit, detector, "midpointMjdTai", ra, dec, '
                            'x, y, "psfNdata", "trailNdata", "dipoleNdata", "timeProcessedMjdTai", '
                            '"bboxSize") FROM STDIN', buf)
        raw.commit()
    finally:
        raw.close()
        engine.dispose()
    return time.perf_counter() - t0


def explain(url: str, sql: str) -> str:
    engine = sa.create_engine(url)
    try:
        with engine.connect() as conn:
            return "\n".join(r[0] for r in conn.exec_driver_sql("EXPLAIN ANALYZE " + sql))
    finally:
        engine.dispose()


def bench(server: str, rows: int, queries: int) -> None:
    import pyvo
    from apbatch.ocps.server import ServerThread
    from apbatch.products.ppdb import create_ppdb
    from apbatch.tap.adql import parse_adql, to_sql
    from apbatch.tap.app import make_app
    from apbatch.tap.schema import create_indexes
    from apbatch.tap.service import TapService
    from apbatch.tap.validity import current_validity_time, pin_query

    name = f"bench_tap_{uuid.uuid4().hex[:8]}"
    admin = sa.create_engine(f"{server}/postgres", isolation_level="AUTOCOMMIT")
    with admin.connect() as conn:
        conn.exec_driver_sql(f'CREATE DATABASE "{name}"')
    url = f"{server}/{name}"
    try:
        create_ppdb(url)
        print(f"loaded {rows:,} DiaSources with COPY in {load(url, rows):.1f} s", flush=True)
        t0 = time.perf_counter()
        created = create_indexes(sa.create_engine(url))
        print(f"indexes {', '.join(created)} in {time.perf_counter() - t0:.1f} s", flush=True)
        service = TapService(url)
        server_thread = ServerThread(make_app(service), "127.0.0.1", 0).start()
        tap = pyvo.dal.TAPService(server_thread.url)
        rng = np.random.default_rng(7)
        lines = ["| radius | queries | p50 ms | p95 ms | rows (median, max) |", "|---|---|---|---|---|"]
        try:
            for _ in range(3):  # warm up: the first queries pay for connections and parser caches
                tap.search("SELECT TOP 1 diaSourceId FROM ppdb.DiaSource")
            for label, radius in RADII.items():
                latencies, counts = [], []
                for _ in range(queries):
                    ra = rng.uniform(FIELD[0] + 1, FIELD[1] - 1)
                    dec = rng.uniform(FIELD[2] + 1, FIELD[3] - 1)
                    adql = ("SELECT s.diaSourceId, s.ra, s.dec, s.midpointMjdTai FROM ppdb.DiaSource AS s "
                            "WHERE CONTAINS(POINT('ICRS', s.ra, s.dec), "
                            f"CIRCLE('ICRS', {ra:.6f}, {dec:.6f}, {radius!r})) = 1")
                    t = time.perf_counter()
                    result = tap.search(adql)
                    latencies.append((time.perf_counter() - t) * 1000)
                    counts.append(len(result))
                if label == "10'":
                    registry, _ = service.registry()
                    parsed = parse_adql(adql, registry)
                    with sa.create_engine(url).connect() as conn:
                        now = current_validity_time(conn, registry)
                    sql = to_sql(parsed, pin_query(parsed, now).sql_refs)
                    print(f"plan of a 10' cone search as the service runs it:\n{sql}\n" + explain(url, sql),
                          flush=True)
                p95 = float(np.percentile(latencies, 95))
                lines.append(f"| {label} | {queries} | {statistics.median(latencies):.1f} | {p95:.1f} | "
                             f"{statistics.median(counts):.0f}, {max(counts)} |")
        finally:
            server_thread.stop()
            service.close()
        print("\n".join(lines))
    finally:
        with admin.connect() as conn:
            conn.exec_driver_sql(f'DROP DATABASE IF EXISTS "{name}" WITH (FORCE)')
        admin.dispose()


def main() -> None:
    parser = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    parser.add_argument("--rows", type=int, default=1_000_000)
    parser.add_argument("--queries", type=int, default=20, help="cone searches per radius")
    parser.add_argument("--pg", help="PostgreSQL server URL without database (default: start one)")
    args = parser.parse_args()
    if args.pg:
        bench(args.pg, args.rows, args.queries)
        return
    state = tempfile.mkdtemp(prefix="apbatch-bench-tap-")
    os.chmod(state, 0o755)
    env = {**os.environ, "PG_LOCAL_DIR": state, "PG_LOCAL_PORT": str(_free_port())}
    script = str(ROOT / "scripts" / "postgres-local.sh")
    proc = subprocess.run(["bash", script, "start"], env=env, capture_output=True, text=True, timeout=300)
    if proc.returncode != 0:
        sys.exit(f"postgres-local.sh start failed: {proc.stderr.strip()[-500:]}")
    try:
        bench(f"postgresql+psycopg2://apbatch@127.0.0.1:{env['PG_LOCAL_PORT']}", args.rows, args.queries)
    finally:
        subprocess.run(["bash", script, "stop"], env=env, capture_output=True, timeout=60)
        shutil.rmtree(state, ignore_errors=True)


if __name__ == "__main__":
    main()
