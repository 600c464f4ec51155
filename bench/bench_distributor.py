"""Benchmark: distributor latency (file complete -> reader returns) and butler costs per raw.

Run: ``python bench/bench_distributor.py [--trials 30] [--size-mb 65]``. Prints medians and
95th percentiles. The machine is shared: run it twice and quote the medians.

Measured:

* local-directory and HTTP (loopback) distributor: time from the end of ``deliver`` (the
  sidecar is renamed into place) to ``wait_for_raws`` returning in a reader that was
  already waiting, with and without SHA-256 verification;
* ``import lsst.daf.butler`` (fresh interpreter), ``create_repo``;
* for one real-format ComCam raw: ``ingest_raw`` with ``transfer=direct`` and ``copy``,
  ``butler.get`` of the raw, ``find_dataset``, and a 4k x 4k `Image` put/get.
"""

from __future__ import annotations

import argparse
import os
import statistics
import subprocess
import sys
import tempfile
import threading
import time
from pathlib import Path

import numpy as np

sys.path.insert(0, str(Path(__file__).resolve().parents[1] / "tests"))


def pct(values, q):
    v = sorted(values)
    return v[min(len(v) - 1, int(round(q / 100 * (len(v) - 1))))]


def report(label, values):
    print(
        f"{label:48s} median {statistics.median(values) * 1e3:8.1f} ms   p95 {pct(values, 95) * 1e3:8.1f} ms"
        f"   (n={len(values)})"
    )


def distributor_latency(client_factory, store, src, trials, hour):
    lat = []
    for i in range(trials):
        group = f"2025-01-01T{hour:02d}:{i // 60:02d}:{i % 60:02d}.000"  # a new group per trial
        meta = {
            "instrument": "LSSTComCam",
            "obs_id": f"CC_O_20241231_{i:06d}",
            "detector_name": "R22_S11",
            "group_id": group,
            "image_index": 1,
        }
        done: dict[str, float] = {}

        def reader(client, group, done):
            client.wait_for_raws("LSSTComCam", group, "R22_S11", 1, timeout=30)
            done["t"] = time.perf_counter()

        th = threading.Thread(target=reader, args=(client_factory(), group, done))
        th.start()
        time.sleep(0.05 + 0.15 * np.random.default_rng(i).random())  # the reader is already polling
        store.deliver(src, meta)
        t_complete = time.perf_counter()
        th.join()
        lat.append(done["t"] - t_complete)
    return lat


def timed(fn, n=5):
    out = []
    for _ in range(n):
        t = time.perf_counter()
        fn()
        out.append(time.perf_counter() - t)
    return out


def main(argv=None):
    p = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    p.add_argument("--trials", type=int, default=30)
    p.add_argument("--size-mb", type=float, default=65.0, help="size of the synthetic raw for latency runs")
    args = p.parse_args(argv)

    from apbatch.distributor.client import DistributorClient
    from apbatch.distributor.server import make_server
    from apbatch.distributor.store import DistributorStore

    with tempfile.TemporaryDirectory() as tmp:
        tmp = Path(tmp)
        src = tmp / "raw.fits"
        src.write_bytes(os.urandom(int(args.size_mb * 2**20)))
        print(f"distributor latency, {args.size_mb:g} MB file, {args.trials} trials")
        store = DistributorStore(tmp / "dist")
        store.root.mkdir()
        for hour, verify in ((1, True), (2, False)):
            lat = distributor_latency(
                lambda v=verify: DistributorClient.from_location(store.root, verify_checksum=v),
                store,
                src,
                args.trials,
                hour,
            )
            report(f"local dir (sha256 check={verify})", lat)
        srv = make_server(store.root).start()
        try:
            store2 = DistributorStore(store.root)
            lat = distributor_latency(
                lambda: DistributorClient.from_location(srv.url, cache_dir=tmp / "cache"),
                store2,
                src,
                args.trials,
                3,
            )
            report("HTTP 127.0.0.1 (long-poll + download + sha256)", lat)
        finally:
            srv.stop()
        t = timed(
            lambda: store.deliver(
                src,
                {
                    "instrument": "LSSTComCam",
                    "obs_id": "CC_O_20241231_999999",
                    "detector_name": "R22_S11",
                    "group_id": "g",
                },
            ),
            5,
        )
        report("store.deliver (copy + sha256)", t)

        print("\nbutler")
        t = timed(lambda: subprocess.run([sys.executable, "-c", "import lsst.daf.butler"], check=True), 3)
        report("import lsst.daf.butler (fresh process)", t)
        from apbatch.butler import datasets as ds
        from apbatch.butler.io import ButlerIO
        from apbatch.butler.repo import create_repo, register_instrument
        from apbatch.raw import read_raw_header, translate_header
        from test_butler_io import raw_file

        t = time.perf_counter()
        butler = create_repo(tmp / "repo")
        report("create_repo", [time.perf_counter() - t])
        register_instrument(butler, "LSSTComCam")
        raws = [raw_file(tmp / "raws", seq=100 + i, det=f"R22_S{i // 3}{i % 3}") for i in range(9)]
        print(f"raw file: {raws[0].stat().st_size / 1e6:.1f} MB (RICE)")
        for transfer, chunk in (("direct", raws[:4]), ("copy", raws[4:8])):
            io = ButlerIO(butler, "LSSTComCam", transfer=transfer)
            ing, get = [], []
            for path in chunk:
                det = translate_header(read_raw_header(path)).detector
                t = time.perf_counter()
                ref = io.ingest_raw(path, det)
                ing.append(time.perf_counter() - t)
                t = time.perf_counter()
                butler.get(ref)
                get.append(time.perf_counter() - t)
            report(f"ingest_raw transfer={transfer} (incl. records)", ing)
            report(f"butler.get raw ({transfer})", get)
        t = timed(
            lambda: butler.find_dataset(
                ds.RAW,
                instrument="LSSTComCam",
                detector=0,
                exposure=2024110800100,
                collections=ds.defaults_collection("LSSTComCam"),
            ),
            20,
        )
        report("find_dataset raw", t)
        # image outputs (lsst-images VisitImage / DifferenceImage): bench/bench_butler_images.py


if __name__ == "__main__":
    main()
