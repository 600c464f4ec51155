"""Tests for apbatch.job.calverify: each metric on arrays with known answers, bad input, and a
simulated calibration night with a hot amplifier and a drifted bias level through the real job
(``apbatch process-ccd``, a butler repository, the ledger)."""

from __future__ import annotations

import dataclasses
import json
import os
import subprocess
import sys
from pathlib import Path

import numpy as np
import pytest
from apbatch.config import CalibVerifyConfig, load_config
from apbatch.errors import BadInputError
from apbatch.image import Image, MaskBits
from apbatch.instruments import get_instrument
from apbatch.job import calverify as cv
from apbatch.raw import RawExposure, RawSegment

INSTRUMENT = "LSSTComCam"
HOT, DRIFTED = "C03", "C14"


def _amp(name="C10"):
    inst = get_instrument(INSTRUMENT)
    return next(a for a in inst.amplifiers(0) if a.name == name)


def _segment(amp, rng, level=20000.0, noise_adu=5.0, signal_adu=0.0) -> np.ndarray:
    seg = rng.normal(level, noise_adu, (amp.raw_ny, amp.raw_nx)).astype(np.float32)
    x0, x1, y0, y1 = amp.data
    seg[y0:y1, x0:x1] += np.float32(signal_adu)
    return seg


# ------------------------------------------------------------------ metrics, known answers
@pytest.mark.parametrize("sigma", [2.0, 5.0, 12.0])
def test_read_noise_of_gaussian_overscan(sigma):
    rng = np.random.default_rng(1)
    ovs = rng.normal(1000.0, sigma, (2000, 62)).astype(np.float32)
    ovs += rng.normal(0, 3.0, (2000, 1)).astype(np.float32)  # row-to-row bias wander is not read noise
    ovs[rng.integers(0, 2000, 40), rng.integers(0, 62, 40)] += 5000.0  # cosmic-ray hits are clipped
    assert cv.read_noise_adu(ovs) == pytest.approx(sigma, rel=0.02)
    assert cv.bias_level(ovs) == pytest.approx(1000.0, abs=0.1)


def test_column_outliers_finds_new_columns_only():
    rng = np.random.default_rng(2)
    img = rng.normal(0.0, 5.0, (2000, 300)).astype(np.float32)
    img[:, 17] += 3.0  # 3 e- is ~30 sigma of a 2000-row column median
    img[:, 250] -= 40.0
    img[:1200, 99] += 500.0  # a hot column over most of the rows
    assert list(cv.column_outliers(img, 8.0)) == [17, 99, 250]
    known = np.zeros(300, bool)
    known[99] = True
    assert list(cv.column_outliers(img, 8.0, known)) == [17, 250]
    assert list(cv.column_outliers(rng.normal(0.0, 5.0, (2000, 300)), 8.0)) == []


def test_flat_gradient_of_a_plane():
    yy, xx = np.mgrid[0:2000, 0:500].astype(np.float32)
    flat = np.full((2000, 500), 1.0, np.float32)
    assert cv.flat_gradient(flat) == pytest.approx(0.0, abs=1e-6)
    tilted = 1.0 + 0.03 * (xx / 500 - 0.5) + 0.01 * (yy / 2000 - 0.5)  # 3% across x, 1% along y
    assert cv.flat_gradient(tilted) == pytest.approx(0.04, rel=0.05)


def _raw(segments, intent="bias", dark_time=0.1) -> RawExposure:
    from test_task import _raw as task_raw

    raw = task_raw(detector=0, detector_name="R22_S00", observation_type=intent, dark_time=dark_time,
                   exposure_time=max(dark_time - 0.4, 0.0))
    raw.segments = segments
    return raw


def _ccd(rng, signal_e=None, levels=None, noise_adu=5.0):
    """Raw segments of CCD 0 with known levels (ADU) and signal (e- per amplifier)."""
    inst = get_instrument(INSTRUMENT)
    segs = []
    for a in inst.amplifiers(0):
        level = (levels or {}).get(a.name, 20000.0)
        signal = (signal_e or {}).get(a.name, 0.0) / a.gain
        segs.append(RawSegment(a, _segment(a, rng, level, noise_adu, signal), {}))
    return segs


def _bias_image(det, levels=20000.0, rn=None) -> Image:
    inst = get_instrument(INSTRUMENT)
    meta = {}
    for a in inst.amplifiers(det.id):
        meta[f"OSLEV{a.index:02d}"] = levels
        meta[f"RDNOI{a.index:02d}"] = rn if rn is not None else 5.0 * a.gain
    z = np.zeros((det.ny, det.nx), np.float32)
    return Image(z, z + 1, np.zeros(z.shape, np.int32), None, meta)


def test_bias_frame_metrics_known_answers():
    """A bias with +30 ADU on one amplifier's overscan and data, and 50 e- in another's data."""
    rng = np.random.default_rng(3)
    inst = get_instrument(INSTRUMENT)
    det = inst.detector(0)
    raw = _raw(_ccd(rng, signal_e={"C11": 50.0}, levels={"C16": 20030.0}))
    v = cv.verify_raw(raw, inst, det, "bias", bias=_bias_image(det))
    got = {(m.amp, m.metric): m for m in v.metrics}
    assert got[("C16", "bias_level")].value == pytest.approx(20030.0, abs=0.2)
    assert got[("C10", "bias_level")].value == pytest.approx(20000.0, abs=0.2)
    assert got[("C11", "bias_offset")].value == pytest.approx(50.0, abs=0.5)
    a = _amp("C12")
    assert got[("C12", "read_noise")].value == pytest.approx(5.0 * a.gain, rel=0.02)
    assert v.failed_amps() == {"C16": ["bias_level"], "C11": ["bias_offset"]}
    assert not v.passed
    summary = v.summary()
    assert summary["failed_amps"] == v.failed_amps() and summary["metrics"]["bias_level"]["amp"] == "C16"
    json.dumps(summary)  # the ledger's JSON


def test_dark_current_saturation_and_unjudged_metrics():
    rng = np.random.default_rng(4)
    inst = get_instrument(INSTRUMENT)
    det = inst.detector(0)
    segs = _ccd(rng, signal_e={"C05": 300.0})  # 300 e- in 30 s: 10 e-/s
    sat_amp = segs[2].amp
    x0, x1, y0, y1 = sat_amp.data
    segs[2].data[y0 : y0 + 10, x0:x1] = sat_amp.saturation  # 10 of 2000 rows saturated
    v = cv.verify_raw(_raw(segs, "dark", dark_time=30.0), inst, det, "dark", bias=_bias_image(det))
    got = {(m.amp, m.metric): m for m in v.metrics}
    assert got[("C05", "dark_current")].value == pytest.approx(10.0, rel=0.01)
    assert abs(got[("C10", "dark_current")].value) < 0.05
    assert got[(sat_amp.name, "saturated")].value == pytest.approx(10 / 2000)
    assert set(v.failed_amps()) == {"C05", sat_amp.name}
    # without a master bias the bias level has no reference: reported, not judged
    v2 = cv.verify_raw(_raw(_ccd(rng), "dark", dark_time=30.0), inst, det, "dark")
    levels = [m for m in v2.metrics if m.metric in ("bias_level", "dark_current")]
    assert levels and all(m.passed is None for m in levels) and v2.passed


def test_flat_level_and_new_bad_column_against_the_master_flat():
    rng = np.random.default_rng(5)
    inst = get_instrument(INSTRUMENT)
    det = inst.detector(0)
    flat = Image(np.ones((det.ny, det.nx), np.float32), np.zeros((det.ny, det.nx), np.float32),
                 np.zeros((det.ny, det.nx), np.int32), None, {})
    segs = _ccd(rng, signal_e={a.name: 20000.0 for a in inst.amplifiers(0)}, noise_adu=3.0)
    dim = next(s for s in segs if s.amp.name == "C07")
    x0, x1, y0, y1 = dim.amp.data
    dim.data[y0:y1, x0:x1] -= np.float32(0.05 * 20000.0 / dim.amp.gain)  # 5% low
    col = next(s for s in segs if s.amp.name == "C00")
    col.data[col.amp.data[2] : col.amp.data[3], col.amp.data[0] + 100] += 200.0  # a new bad column
    v = cv.verify_raw(_raw(segs, "flat", 5.4), inst, det, "flat", bias=_bias_image(det), flat=flat)
    got = {(m.amp, m.metric): m for m in v.metrics}
    assert got[("C07", "flat_level")].value == pytest.approx(0.95, abs=0.002)
    assert got[("C00", "bad_columns")].value == 1
    assert v.failed_amps() == {"C07": ["flat_level"], "C00": ["bad_columns"]}
    # the same column in the master flat's defect list is known: not new
    bbox_col = col.amp.bbox
    x = bbox_col[1] - 1 - 100 if col.amp.flip_x else bbox_col[0] + 100
    flat.mask[bbox_col[2] : bbox_col[3], x] |= int(MaskBits.BAD)
    v = cv.verify_raw(_raw(segs, "flat", 5.4), inst, det, "flat", bias=_bias_image(det), flat=flat)
    assert v.failed_amps() == {"C07": ["flat_level"]}


# ------------------------------------------------------------------ bad input
def test_nan_pixels_name_the_segment():
    rng = np.random.default_rng(6)
    inst = get_instrument(INSTRUMENT)
    segs = _ccd(rng)
    segs[4].data[5, 3] = np.nan
    with pytest.raises(BadInputError, match=rf"raw.segments\[{segs[4].amp.extname}\]: data has 1 NaN"):
        cv.verify_raw(_raw(segs), inst, inst.detector(0), "bias")


def test_raw_without_overscan_is_refused_naming_the_field():
    amp = dataclasses.replace(_amp(), serial_overscan=(512, 512, 0, 2000))
    with pytest.raises(BadInputError, match=rf"raw.segments\[{amp.extname}\].serial_overscan: .*no serial"):
        cv.amp_arrays(np.zeros((amp.raw_ny, amp.raw_nx), np.float32), amp)
    amp = _amp()
    with pytest.raises(BadInputError, match=r"raw.segments\[Segment10\]: shape \(2048, 509\)"):
        cv.amp_arrays(np.zeros((amp.raw_ny, 509), np.float32), amp)  # the overscan columns cut off


def test_missing_segment_bad_master_and_dark_time():
    rng = np.random.default_rng(7)
    inst = get_instrument(INSTRUMENT)
    det = inst.detector(0)
    with pytest.raises(BadInputError, match="raw.segments: missing amplifier segments Segment10"):
        cv.verify_raw(_raw(_ccd(rng)[1:]), inst, det, "bias")
    small = Image(np.zeros((10, 10), np.float32))
    with pytest.raises(BadInputError, match="bias: shape"):
        cv.verify_raw(_raw(_ccd(rng)), inst, det, "bias", bias=small)
    with pytest.raises(BadInputError, match=r"raw.header\[DARKTIME\]"):
        cv.verify_raw(_raw(_ccd(rng), "dark", dark_time=0.0), inst, det, "dark")
    assert cv.verify_calibration([_raw(_ccd(rng))], inst, det, "cwfs", {}) == []


def test_merge_summaries():
    a = {"passed": True, "exposures": ["x"], "failed_amps": {}, "metrics": {"bias_level": {"amp": "C10"}}}
    b = {"passed": False, "exposures": ["y"], "failed_amps": {"C03": ["bias_offset"]},
         "metrics": {"bias_level": {"amp": "C03"}}}
    m = cv.merge_summaries([a, b])
    assert m["passed"] is False and m["exposures"] == ["x", "y"]
    assert m["failed_amps"] == {"C03": ["bias_offset"]}
    assert m["metrics"]["bias_level"]["amp"] == "C03"  # the failed exposure's worst value


# ------------------------------------------------------------------ a calibration night, real job path
@pytest.fixture(scope="module")
def calib_night(tmp_path_factory):
    """Bias, dark and flat of CCD 0 with a hot amplifier and a drifted bias level; the masters clean."""
    from apbatch.sim.night import plan_night
    from apbatch.sim.produce import simulate_night

    out = tmp_path_factory.mktemp("calnight")
    plan = plan_night(INSTRUMENT, 0, 11, detectors=[0], calibrations={"BIAS": 1, "DARK": 1, "FLAT": 1},
                      hot_amps=(HOT,), bias_drift={DRIFTED: 40.0})
    simulate_night(plan, out / "night", templates=False, compress=None)
    return out / "night", plan


def test_sim_faults_default_off_and_round_trip(calib_night):
    from apbatch.sim.exposure import ExposureSpec
    from apbatch.sim.raws import render_exposure

    _, plan = calib_night
    spec = plan.calibrations[0]
    assert spec.hot_amps == (HOT,) and spec.bias_drift == ((DRIFTED, 40.0),)
    assert ExposureSpec.from_dict(json.loads(json.dumps(spec.to_dict()))) == spec
    clean = dataclasses.replace(spec, hot_amps=(), bias_drift=())
    assert ExposureSpec.from_dict(json.loads(json.dumps(clean.to_dict()))).hot_amps == ()
    with pytest.raises(ValueError, match="hot_amps: no amplifier C99"):
        render_exposure(dataclasses.replace(spec, hot_amps=("C99",)), 0, None, 11)


def _job(tmp_path, config: Path, meta, dist: Path):
    from apbatch.events import intent_of

    argv = [sys.executable, "-m", "apbatch", "process-ccd", "--config", str(config),
            "--instrument", INSTRUMENT, "--detector", str(meta.detector), "--group", meta.group_id,
            "--visit", str(meta.visit_id), "--day-obs", str(meta.day_obs),
            "--intent", intent_of(meta.observation_type), "--exposure-time", str(meta.exposure_time),
            "--distributor", str(dist), "--image", meta.obs_id, "--timeout", "30"]
    env = {k: v for k, v in os.environ.items() if not k.startswith("APBATCH_")}
    return subprocess.run(argv, capture_output=True, text=True, timeout=300, env=env, cwd=tmp_path)


def test_calibration_night_flags_exactly_the_faulty_amps(tmp_path, calib_night):
    import pandas as pd
    import yaml
    from apbatch.butler.ingest import ingest_manifest
    from apbatch.butler.repo import create_repo, register_instrument, register_output_run
    from apbatch.distributor.store import DistributorStore
    from apbatch.events import intent_of
    from apbatch.ledger import Ledger
    from apbatch.raw import read_raw_header, translate_header
    from apbatch.sim.events import raw_relpath
    from apbatch.work import CcdWork
    from lsst.daf.butler import Butler

    night, plan = calib_night
    work_dir = tmp_path / "work"
    butler = create_repo(work_dir / "butler")
    register_instrument(butler, INSTRUMENT)
    register_output_run(butler, INSTRUMENT, plan.day_obs)
    ingest_manifest(butler, night / "calibs")
    config = tmp_path / "night-config.yaml"
    config.write_text(yaml.safe_dump({"root": str(work_dir), "job": {"repo": "butler"}}))
    cfg = load_config([config], environ={})
    dist = tmp_path / "dist"
    store = DistributorStore(dist)
    ledger = Ledger.from_config(cfg)
    metas = []
    for spec in plan.calibrations:
        path = night / raw_relpath(spec, "R22_S00")
        meta = translate_header(read_raw_header(path))
        store.deliver(path, meta)
        metas.append(meta)
        ledger.claim([CcdWork(instrument=INSTRUMENT, detector=0, detector_name="R22_S00",
                              group_id=meta.group_id, visit=meta.visit_id, day_obs=meta.day_obs,
                              intent=intent_of(meta.observation_type), exposure_time=meta.exposure_time,
                              nimages=1, distributor=str(dist), image_names=(meta.obs_id,))])
    for meta in metas:
        proc = _job(tmp_path, config, meta, dist)
        assert proc.returncode == 0, proc.stderr[-3000:]  # a bad calibration is not a failed job
        result = json.loads(proc.stdout.strip().splitlines()[-1])
        intent = intent_of(meta.observation_type)
        assert result["status"] == f"calibration:{intent}"
        verdict = result["verification"]
        assert verdict["passed"] is False and verdict["exposures"] == [meta.obs_id]
        # exactly the two faulty amplifiers, each by the metric its fault shows in this kind of image
        hot_metric = {"bias": "bias_offset", "dark": "dark_current", "flat": "flat_level"}[intent]
        assert verdict["failed_amps"] == {HOT: [hot_metric], DRIFTED: ["bias_level"]}, (intent, verdict)
        assert "calibration verification failed" in proc.stderr

    # the butler dataset, read with plain Butler.get (no apbatch import needed for a DataFrame)
    reader = Butler.from_config(str(work_dir / "butler"))
    run = f"{INSTRUMENT}/prompt/{plan.day_obs}"
    refs = reader.query_datasets("calib_verification", collections=run, explain=False)
    assert sorted(r.dataId["exposure"] for r in refs) == sorted(m.exposure_id for m in metas)
    flat_meta = next(m for m in metas if intent_of(m.observation_type) == "flat")
    table = reader.get("calib_verification", instrument=INSTRUMENT, exposure=flat_meta.exposure_id,
                       detector=0, collections=run)
    assert isinstance(table, pd.DataFrame) and len(table["amp"].unique()) == 16
    failed = table[table["passed"] == False]  # noqa: E712 (nullable booleans)
    assert sorted(zip(failed["amp"], failed["metric"], strict=True)) == [(HOT, "flat_level"),
                                                                         (DRIFTED, "bias_level")]
    drift = table[(table["amp"] == DRIFTED) & (table["metric"] == "bias_level")].iloc[0]
    assert drift["value"] - drift["reference"] == pytest.approx(40.0, abs=1.0)
    # ... and with the butler command line
    butler_cli = Path(sys.executable).parent / "butler"
    proc = subprocess.run([str(butler_cli), "query-datasets", str(work_dir / "butler"), "calib_verification",
                           "--collections", run], capture_output=True, text=True, timeout=120)
    assert proc.returncode == 0, proc.stderr
    assert proc.stdout.count("calib_verification") >= 3 and str(flat_meta.exposure_id) in proc.stdout

    # the verdicts in the ledger, for status and the night report
    rows = {r.work.image_names[0]: r for r in ledger.rows()}
    for meta in metas:
        v = rows[meta.obs_id].verification
        assert v is not None and v["passed"] is False and set(v["failed_amps"]) == {HOT, DRIFTED}
        assert rows[meta.obs_id].to_dict()["verification"] == v
    ledger.close()


def test_clean_calibration_passes_on_every_amp(tmp_path, calib_night):
    """The same bias without the injected faults passes every judged metric (no false alarms)."""
    from apbatch.raw import read_raw
    from apbatch.sim.calibs import detector_signature, make_bias
    from apbatch.sim.raws import simulate_ccd

    _, plan = calib_night
    spec = dataclasses.replace(plan.calibrations[0], hot_amps=(), bias_drift=())
    simulate_ccd(spec, 0, None, plan.seed, tmp_path / "bias.fits", compress=None)
    inst = get_instrument(INSTRUMENT)
    bias = make_bias(detector_signature(INSTRUMENT, 0, plan.seed), plan.seed)
    v = cv.verify_raw(read_raw(tmp_path / "bias.fits"), inst, inst.detector(0), "bias", bias=bias,
                      config=CalibVerifyConfig())
    assert v.passed and v.failed_amps() == {}
    assert all(m.passed is True for m in v.metrics)
