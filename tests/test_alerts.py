"""Tests of apbatch.job.alerts: schema validity, framing, FITS cutouts, the kill-safe sequence."""

from __future__ import annotations

import dataclasses
import io
import json
import os
import signal
import subprocess
import sys
from pathlib import Path

import fastavro
import numpy as np
import pytest
import sqlalchemy as sa
from alert_synth import SMALL, ccd_wcs, make_ccd, make_images, make_sources, visit_id
from apbatch.errors import NonRetriableError
from apbatch.image import MaskBits
from apbatch.job.alert_sinks import AlertSpool, FileAlertSink
from apbatch.job.alerts import AlertBuilder, CutoutWriter, frame, process_ccd_alerts, unframe
from apbatch.job.apdb import Association, create_apdb, open_apdb
from astropy.nddata import CCDData, VarianceUncertainty

SYNTH = Path(__file__).resolve().parent / "alert_synth.py"


@pytest.fixture(scope="module")
def builder():
    return AlertBuilder(cutout_size=30, history_days=365.0)


@pytest.fixture
def world(tmp_path):
    create_apdb(f"sqlite:///{tmp_path}/apdb.sqlite3", tmp_path / "apdb.yaml")
    return {"assoc": Association(open_apdb(tmp_path / "apdb.yaml")), "spool": AlertSpool(tmp_path / "spool"),
            "sink": FileAlertSink(tmp_path / "alerts"), "dir": tmp_path}


def _visit(world, builder, n, cat, checkpoint=None, band="r"):
    imgs = make_images(np.random.default_rng(n), sources=cat, shape=(SMALL, SMALL))
    return process_ccd_alerts(make_ccd(n, band=band), cat, imgs["science"], imgs["template"],
                              imgs["difference"], psf_fwhm_pix=3.0, association=world["assoc"],
                              builder=builder, spool=world["spool"], sink=world["sink"], send_timeout=5.0,
                              checkpoint=checkpoint)


def _alert_file(tmp_path, n):
    with (tmp_path / "alerts" / "LSSTCam" / str(visit_id(n)) / "094.avro").open("rb") as fh:
        return list(fastavro.reader(fh))


def _count(tmp_path, table, visit=None):
    where = f"WHERE visit = {visit}" if visit is not None else ""
    with sa.create_engine(f"sqlite:///{tmp_path}/apdb.sqlite3").connect() as conn:
        return conn.execute(sa.text(f'SELECT COUNT(*) FROM "{table}" {where}')).scalar()


def test_framing_roundtrip(builder):
    assert builder.schema_id == 1101
    payload = frame(1101, b"body")
    assert payload[:5] == b"\x00\x00\x00\x04\x4d"
    assert unframe(payload) == (1101, b"body")
    with pytest.raises(ValueError, match="magic"):
        unframe(b"\x01" + payload[1:])


def test_every_alert_valid_and_roundtrips(world, builder):
    cat = make_sources(12, np.random.default_rng(5), nx=SMALL, ny=SMALL)
    cat.loc[0, "psfFluxErr"] = np.nan  # nullable field -> None
    imgs = make_images(np.random.default_rng(0), sources=cat, shape=(SMALL, SMALL))
    res = world["assoc"].run(make_ccd(0), cat, imgs["difference"], imgs["science"], 3.0)
    records = list(builder.records(res, imgs["science"], imgs["template"], imgs["difference"]))
    assert len(records) == 12
    for rec in records:
        assert builder.schema.validate(rec)
        back = builder.deserialize(builder.serialize(rec))
        assert back["diaSourceId"] == rec["diaSourceId"] and back["diaObject"]["nDiaSources"] == 1
        assert back["cutoutScience"] == rec["cutoutScience"]
    assert records[0]["diaSource"]["psfFluxErr"] is None
    # the official schema's own deserializer agrees with the framed body
    assert builder.schema.deserialize(unframe(builder.serialize(records[1]))[1])["diaSourceId"] == \
        records[1]["diaSourceId"]


def test_cutouts_read_back_with_wcs_variance_mask():
    cat = make_sources(3, np.random.default_rng(2), nx=SMALL, ny=SMALL)
    img = make_images(np.random.default_rng(1), sources=cat, shape=(SMALL, SMALL))["science"]
    img.variance[:] = np.random.default_rng(0).uniform(50, 150, img.shape).astype(np.float32)
    img.mask[100:140, 100:140] = MaskBits.SAT
    writer = CutoutWriter(img, 30)
    x, y = np.array([120.2, 3.0]), np.array([110.7, 500.0])  # second one hangs over two edges
    blobs = writer.all(x, y)
    for xi, yi, blob in zip(x, y, blobs, strict=False):
        ccd = CCDData.read(io.BytesIO(blob), format="fits")
        x0, y0 = int(round(xi)) - 15, int(round(yi)) - 15
        assert ccd.shape == (30, 30) and str(ccd.unit) == "nJy"
        assert isinstance(ccd.uncertainty, VarianceUncertainty)
        px, py = np.array([0, 7, 29]), np.array([0, 21, 29])
        got = ccd.wcs.pixel_to_world_values(px, py)
        want = img.wcs.pixel_to_world_values(px + x0, py + y0)
        assert np.allclose(got, want, atol=1e-10, rtol=0)
        ys, xs = slice(max(y0, 0), min(y0 + 30, SMALL)), slice(max(x0, 0), min(x0 + 30, SMALL))
        inner = (slice(ys.start - y0, ys.stop - y0), slice(xs.start - x0, xs.stop - x0))
        assert np.array_equal(ccd.data[inner], img.image[ys, xs])
        assert np.array_equal(ccd.uncertainty.array[inner], img.variance[ys, xs])
    from astropy.io import fits

    with fits.open(io.BytesIO(blobs[0])) as hdul:
        # cutout x 105-134 and y 96-125 overlap the SAT box x/y 100-139 in 30 x 26 pixels
        assert (hdul["MASK"].data == MaskBits.SAT).sum() == 30 * 26
        assert np.array_equal(hdul["MASK"].data, img.mask[96:126, 105:135])
    with fits.open(io.BytesIO(blobs[1])) as hdul:  # off-image part: NaN image, NO_DATA mask
        assert np.isnan(hdul[0].data[-1, 0]) and hdul["MASK"].data[-1, 0] == MaskBits.NO_DATA


def test_cutout_writer_reuses_header_of_same_wcs_only():
    imgs = make_images(np.random.default_rng(3), sources=None, shape=(SMALL, SMALL))
    first = CutoutWriter(imgs["science"], 30)
    x, y = np.array([50.0, 200.4]), np.array([60.0, 10.2])
    assert imgs["template"].wcs is imgs["science"].wcs
    shared = CutoutWriter(imgs["template"], 30, like=first)
    assert shared._head is first._head and shared.image is imgs["template"]
    assert shared.all(x, y) == CutoutWriter(imgs["template"], 30).all(x, y)
    other = dataclasses.replace(imgs["template"], wcs=ccd_wcs(detector=10))
    assert CutoutWriter(other, 30, like=first)._head is not first._head
    assert CutoutWriter(other, 30, like=first).all(x, y) == CutoutWriter(other, 30).all(x, y)


def test_three_visits_third_alert_has_two_previous(world, builder):
    cat = make_sources(4, np.random.default_rng(11), nx=SMALL, ny=SMALL)
    for n in range(3):
        report = _visit(world, builder, n, cat)
        assert report.stored and report.alerts == report.delivered == 4
    alerts = _alert_file(world["dir"], 2)
    assert len(alerts) == 4
    for alert in alerts:
        assert alert["diaObject"]["nDiaSources"] == 3
        assert len(alert["prvDiaSources"]) == 2 and len(alert["prvDiaForcedSources"]) == 2
        assert [p["visit"] for p in alert["prvDiaSources"]] == [visit_id(0), visit_id(1)]
        assert alert["diaObject"]["diaObjectId"] == alert["prvDiaSources"][0]["diaSourceId"]
    assert _count(world["dir"], "DiaObjectLast") == 4


def test_a_visit_with_nothing_to_alert_on_is_stored_and_sends_nothing(world, builder):
    """A sparse CCD (LATISS) can have no DIA source; the objects it knows still get forced photometry."""
    cat = make_sources(3, np.random.default_rng(12), nx=SMALL, ny=SMALL)
    assert _visit(world, builder, 0, cat).alerts == 3
    report = _visit(world, builder, 1, cat.iloc[:0])
    assert report.stored and report.alerts == report.delivered == 0
    assert _count(world["dir"], "DiaForcedSource") == 6  # 3 objects x 2 visits


def test_alert_history_window(world):
    short = AlertBuilder(history_days=1.5)
    cat = make_sources(2, np.random.default_rng(4), nx=SMALL, ny=SMALL)
    for n in range(3):
        _visit(world, short, n, cat)
    assert all(len(a["prvDiaSources"]) == 1 for a in _alert_file(world["dir"], 2))


class _CrashError(Exception):
    """The crash a test injects at a checkpoint."""


@pytest.mark.parametrize("point", ["associated", "spooled", "stored", "delivered"])
def test_crash_at_each_point_then_retry(world, builder, point):
    cat = make_sources(6, np.random.default_rng(9), nx=SMALL, ny=SMALL)

    def crash(p):
        if p == point:
            raise _CrashError(p)

    with pytest.raises(_CrashError):
        _visit(world, builder, 0, cat, checkpoint=crash)
    points = []
    report = _visit(world, builder, 0, cat, checkpoint=points.append)
    assert report.stored == (point in ("associated", "spooled"))
    # the job boundary learns from these whether the APDB was reached (exit 5, not 4)
    assert points == (["associated", "spooled", "stored", "delivered"] if report.stored
                      else ["already_stored", "delivered"])
    assert report.pending == 0
    assert _count(world["dir"], "DiaSource", visit_id(0)) == 6
    assert _count(world["dir"], "DiaForcedSource", visit_id(0)) == 6
    ids = [a["diaSourceId"] for a in _alert_file(world["dir"], 0)]
    assert len(ids) == 6 and len(set(ids)) == 6
    assert _visit(world, builder, 0, cat).delivered == 6  # a third run changes nothing


def test_stored_without_spool_is_non_retriable(world, builder):
    cat = make_sources(2, np.random.default_rng(9), nx=SMALL, ny=SMALL)
    _visit(world, builder, 0, cat)
    for p in (world["dir"] / "spool").rglob("*"):
        if p.is_file():
            p.unlink()
    with pytest.raises(NonRetriableError, match="spool is missing"):
        _visit(world, builder, 0, cat)


def _job(tmp_path, *extra, check=True):
    argv = [sys.executable, str(SYNTH), "job", "--apdb-config", str(tmp_path / "apdb.yaml"),
            "--spool", str(tmp_path / "spool"), "--directory", str(tmp_path / "alerts"),
            "--nsources", "8", *extra]
    proc = subprocess.run(argv, capture_output=True, text=True, timeout=120,
                          env={**os.environ, "PYTHONPATH": str(SYNTH.parent)})
    if check:
        assert proc.returncode == 0, proc.stderr[-2000:]
    return proc


@pytest.mark.parametrize("point", ["spooled", "during_store", "stored"])
def test_sigkill_and_retry(tmp_path, point):
    create_apdb(f"sqlite:///{tmp_path}/apdb.sqlite3", tmp_path / "apdb.yaml")
    killed = _job(tmp_path, "--kill-at", point, check=False)
    assert killed.returncode == -signal.SIGKILL
    stored_before = _count(tmp_path, "DiaSource", visit_id(0))
    assert stored_before == (8 if point == "stored" else 0)  # a killed transaction leaves nothing
    assert _count(tmp_path, "DiaObject") == stored_before
    report = json.loads(_job(tmp_path).stdout.strip().splitlines()[-1])
    assert report["stored"] == (point != "stored") and report["delivered"] == 8
    assert _count(tmp_path, "DiaSource", visit_id(0)) == 8
    assert _count(tmp_path, "DiaObjectLast") == 8
    ids = [a["diaSourceId"] for a in _alert_file(tmp_path, 0)]
    assert len(set(ids)) == 8


def test_payloads_byte_identical_to_fastavro(world, builder):
    """The fast path (pieces encoded once, assembled) equals fastavro.schemaless_writer of the dicts."""
    assert builder._encoders is not None  # the shipped schema takes the fast path
    cat = make_sources(6, np.random.default_rng(21), nx=SMALL, ny=SMALL)
    for n in range(3):
        imgs = make_images(np.random.default_rng(n), sources=cat, shape=(SMALL, SMALL))
        res = world["assoc"].run(make_ccd(n), cat, imgs["difference"], imgs["science"], 3.0)
        res.sources.loc[res.sources.index[0], "psfFluxErr"] = np.nan  # None in nullable fields
        res.sources.loc[res.sources.index[1], "band"] = None
        res.objects.loc[res.objects.index[0], "r_psfFluxMean"] = np.nan
        if n == 2:
            res.prv_sources.loc[res.prv_sources.index[0], "psfFlux"] = np.nan
            res.prv_forced.loc[res.prv_forced.index[0], "psfFluxErr"] = np.nan
        fast = builder.payloads(res, imgs["science"], imgs["template"], imgs["difference"])
        records = list(builder.records(res, imgs["science"], imgs["template"], imgs["difference"]))
        assert fast == [(r["diaSourceId"], builder.serialize(r)) for r in records]
        for sid, payload in fast:
            back = builder.deserialize(payload)
            assert builder.schema.validate(back) and back["diaSourceId"] == sid
            assert len(back["prvDiaSources"]) == len(back["prvDiaForcedSources"]) == n
        assert builder.deserialize(fast[0][1])["diaSource"]["psfFluxErr"] is None
        assert builder.deserialize(fast[1][1])["diaSource"]["band"] is None
        world["assoc"].store(res)
    history = [builder.deserialize(p)["prvDiaSources"] for _, p in fast]
    assert any(h[0]["psfFlux"] is None for h in history) and all(h[1]["psfFlux"] is not None for h in history)


# ----------------------------------------------------------------------------- schema versions
def test_default_schema_version_is_the_newest_shipped():
    from apbatch.config import AlertsConfig
    from lsst.alert.packet import get_latest_schema_version

    assert AlertsConfig().schema_version == "{}.{}".format(*get_latest_schema_version())


def test_every_available_schema_version_validates(world):
    """Records and packets of each writable version validate against it and carry its id."""
    from apbatch.job.alert_schemas import alert_schema, schema_versions

    versions = schema_versions()
    assert {"11.0", "11.1"} <= set(versions) and "8.0" not in versions  # 8.0 needs time_processed
    cat = make_sources(4, np.random.default_rng(3), nx=SMALL, ny=SMALL)
    imgs = make_images(np.random.default_rng(1), sources=cat, shape=(SMALL, SMALL))
    res = world["assoc"].run(make_ccd(0), cat, imgs["difference"], imgs["science"], 3.0)
    world["assoc"].store(res)
    res = world["assoc"].run(make_ccd(1), cat, imgs["difference"], imgs["science"], 3.0)  # with history
    for version in versions:
        b = AlertBuilder(schema=alert_schema(version))
        major, minor = map(int, version.split("."))
        assert b.schema_id == major * 100 + minor
        records = list(b.records(res, imgs["science"], imgs["template"], imgs["difference"]))
        assert records and all(b.schema.validate(r) for r in records), version
        assert set(records[0]) == {f["name"] for f in b.schema.definition["fields"]}  # extras dropped
        for sid, payload in b.payloads(res, imgs["science"], imgs["template"], imgs["difference"]):
            assert unframe(payload)[0] == b.schema_id
            back = b.deserialize(payload)
            assert b.schema.validate(back) and back["diaSource"]["diaSourceId"] == sid
            assert len(back["prvDiaSources"]) == 1
