"""Synthetic DIA catalogs, images and CCD-visits for the APDB and alert tests and benchmarks.

Also a tiny per-CCD "job" (``python alert_synth.py job ...``) that runs the association and
alert sequence of :func:`apbatch.job.alerts.process_ccd_alerts` in a separate process, so tests
can kill it with SIGKILL at injected points and retry it.
"""

from __future__ import annotations

import argparse
import json
import os
import signal
import sys

import numpy as np
import pandas as pd
from apbatch.image import Image
from apbatch.instruments import get_instrument

__all__ = ["BORESIGHT", "make_ccd", "make_images", "make_sources", "visit_id"]

BORESIGHT = (150.0, 2.0, 30.0)  # ra, dec, rotation (deg)
SMALL = 512  # image side used by tests: sources sit in this corner of the 4k x 4k CCD
BASE_SECONDS = 370_000_000  # 2026-09: seconds since 2015-01-01 TAI


def visit_id(n: int) -> int:
    """A group-time visit id (``SSSSSSSSSmmmNNNN``), visits 40 s apart."""
    return int(f"{BASE_SECONDS + 40 * n}0000000")


def make_ccd(n: int = 0, detector: int = 94, band: str = "r", instrument: str = "LSSTCam",
             mjd0: float = 61300.0):
    """The ``n``-th visit's CCD-visit at :data:`BORESIGHT` (1 day apart)."""
    from apbatch.job.apdb import CcdVisit

    inst = get_instrument(instrument)
    corners = inst.footprint(detector, *BORESIGHT, pad_arcsec=10.0)
    return CcdVisit(instrument, visit_id(n), detector, band, mjd0 + n, tuple(map(tuple, corners)), 30.0)


def ccd_wcs(detector: int = 94, instrument: str = "LSSTCam"):
    return get_instrument(instrument).sky_wcs(detector, *BORESIGHT)


def make_sources(n: int, rng: np.random.Generator, detector: int = 94, xy: np.ndarray | None = None,
                 nx: int = 4072, ny: int = 4000) -> pd.DataFrame:
    """``n`` random DIA sources (contract columns) on a 4k x 4k CCD, or at the given pixels."""
    if xy is None:
        xy = np.column_stack([rng.uniform(20, nx - 20, n), rng.uniform(20, ny - 20, n)])
    x, y = xy[:, 0], xy[:, 1]
    ra, dec = ccd_wcs(detector).pixel_to_world_values(x, y)
    err = np.full(n, 0.05 / 3600.0)
    flux = rng.uniform(2000, 20000, n)
    flags = {f"pixelFlags_{k}": np.zeros(n, bool)
             for k in ("bad", "saturated", "cr", "edge", "interpolated", "suspect")}
    return pd.DataFrame({
        "x": x, "y": y, "ra": ra, "dec": dec, "raErr": err, "decErr": err, "ra_dec_Cov": np.zeros(n),
        "psfFlux": flux, "psfFluxErr": flux / rng.uniform(8, 50, n), "snr": rng.uniform(5, 50, n),
        "scienceFlux": flux * 2, "scienceFluxErr": flux / 10, "apFlux": flux, "apFluxErr": flux / 10,
        "ixx": np.full(n, 2.0), "iyy": np.full(n, 2.0), "ixy": np.zeros(n), "trailLength": np.zeros(n),
        "trailAngle": np.zeros(n), "isDipole": np.zeros(n, bool), "isNegative": np.zeros(n, bool),
        "reliability": rng.uniform(0, 1, n), "bboxSize": np.full(n, 15), **flags,
    })


def make_images(rng: np.random.Generator, detector: int = 94, sources: pd.DataFrame | None = None,
                fwhm: float = 3.0, shape: tuple[int, int] = (4000, 4072)) -> dict[str, Image]:
    """Science, template and difference images on the CCD's WCS (noise + Gaussian sources)."""
    wcs = ccd_wcs(detector)
    ny, nx = shape
    out = {}
    for name, scale in (("science", 2.0), ("template", 1.0), ("difference", 1.0)):
        img = rng.normal(0, 10.0, shape).astype(np.float32)
        if sources is not None and name != "template":
            sig = fwhm / 2.3548
            for x, y, f in zip(sources["x"], sources["y"], sources["psfFlux"], strict=False):
                x0, y0 = int(x) - 8, int(y) - 8
                if not (-17 < x0 < nx and -17 < y0 < ny):
                    continue
                yy, xx = np.mgrid[max(y0, 0):min(y0 + 17, ny), max(x0, 0):min(x0 + 17, nx)]
                img[yy, xx] += scale * f * np.exp(-0.5 * ((xx - x) ** 2 + (yy - y) ** 2) / sig**2) / (
                    2 * np.pi * sig**2)
        out[name] = Image(img, np.full(shape, 100.0, np.float32), np.zeros(shape, np.int32), wcs)
    return out


def _job(argv: list[str]) -> int:
    """Run one CCD-visit's association + alerts; optionally SIGKILL itself at a named point."""
    from apbatch.job.alert_sinks import AlertSpool, FileAlertSink, KafkaAlertSink
    from apbatch.job.alerts import AlertBuilder, process_ccd_alerts
    from apbatch.job.apdb import Association, open_apdb

    p = argparse.ArgumentParser()
    p.add_argument("--apdb-config", required=True)
    p.add_argument("--spool", required=True)
    p.add_argument("--sink", default="file")
    p.add_argument("--directory", default="")
    p.add_argument("--bootstrap", default="")
    p.add_argument("--topic", default="alerts")
    p.add_argument("--visit-index", type=int, default=0)
    p.add_argument("--nsources", type=int, default=20)
    p.add_argument("--kill-at", default="")
    p.add_argument("--send-timeout", type=float, default=20.0)
    a = p.parse_args(argv)
    rng = np.random.default_rng(1234)  # the same transients every visit and every retry
    ccd = make_ccd(a.visit_index)
    cat = make_sources(a.nsources, rng, nx=SMALL, ny=SMALL)
    images = make_images(np.random.default_rng(a.visit_index), sources=cat, shape=(SMALL, SMALL))

    def checkpoint(point: str) -> None:
        if point == a.kill_at:
            os.kill(os.getpid(), signal.SIGKILL)

    if a.kill_at == "during_store":
        from sqlalchemy import event
        from sqlalchemy.engine import Engine

        @event.listens_for(Engine, "before_cursor_execute")
        def _kill(conn, cursor, statement, *args):  # after DiaObject rows went in, mid-transaction
            if statement.lstrip().upper().startswith("INSERT") and '"DiaSource"' in statement:
                os.kill(os.getpid(), signal.SIGKILL)

    if a.sink == "kafka":
        sink = KafkaAlertSink({"bootstrap.servers": a.bootstrap}, a.topic,
                              on_delivered=lambda n: checkpoint(f"delivered:{n}"))
    else:
        sink = FileAlertSink(a.directory)
    report = process_ccd_alerts(
        ccd, cat, images["science"], images["template"], images["difference"], psf_fwhm_pix=3.0,
        association=Association(open_apdb(a.apdb_config)), builder=AlertBuilder(),
        spool=AlertSpool(a.spool), sink=sink, send_timeout=a.send_timeout, checkpoint=checkpoint)
    print(json.dumps(report.to_dict()))
    return 0


def _consume(argv: list[str]) -> int:
    """Decode alerts from Kafka with lsst-alert-stream's AlertConsumer; print one JSON line each."""
    from lsst.alert.packet import Schema
    from lsst.alert.stream.alertConsumer import AlertConsumer

    p = argparse.ArgumentParser()
    p.add_argument("--bootstrap", required=True)
    p.add_argument("--topic", required=True)
    p.add_argument("--expect", type=int, required=True)
    p.add_argument("--timeout", type=float, default=60.0)
    p.add_argument("--idle", type=float, default=1.5, help="s without messages after --expect to stop")
    a = p.parse_args(argv)
    import time

    schema = Schema.from_file()
    conf = {"bootstrap.servers": a.bootstrap, "group.id": f"test-{os.getpid()}",
            "auto.offset.reset": "earliest", "session.timeout.ms": 6000, "heartbeat.interval.ms": 1000,
            "fetch.wait.max.ms": 10}
    n, deadline, last = 0, time.monotonic() + a.timeout, time.monotonic()
    with AlertConsumer(a.topic, schema=schema, **conf) as consumer:
        while time.monotonic() < deadline:
            msg = consumer.consumer.poll(0.5)
            if msg is None:
                if n >= a.expect and time.monotonic() - last > a.idle:
                    break
                continue
            if msg.error():
                continue
            _, alert = consumer.decode_message(msg)
            ok = schema.validate(alert)
            n, last = n + 1, time.monotonic()
            print(json.dumps({"key": msg.key().decode(), "diaSourceId": alert["diaSourceId"], "valid": ok,
                              "offset": msg.offset(), "partition": msg.partition(),
                              "nDiaSources": alert["diaObject"]["nDiaSources"],
                              "prv": len(alert["prvDiaSources"] or []),
                              "psfFlux": alert["diaSource"]["psfFlux"]}), flush=True)
    return 0


if __name__ == "__main__":
    if sys.argv[1:2] == ["job"]:
        sys.exit(_job(sys.argv[2:]))
    if sys.argv[1:2] == ["consume"]:
        sys.exit(_consume(sys.argv[2:]))
    sys.exit(f"usage: {sys.argv[0]} job ...")
