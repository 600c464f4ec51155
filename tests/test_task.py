"""Tests for apbatch.job.task: header checks, failure classes and the no-template path.

The image steps are tested in their own files and end to end in test_demo.py; here the
steps are replaced by small fakes so the orchestration's decisions are checked directly.
"""

from __future__ import annotations

import dataclasses

import numpy as np
import pandas as pd
import pytest
from apbatch.errors import BadInputError, RawTimeoutError, RetriableError
from apbatch.image import Image
from apbatch.instruments import get_instrument
from apbatch.job import task
from apbatch.job.forced import ForcedPhotometry
from apbatch.job.steps.background import BackgroundResult
from apbatch.job.steps.psf import gaussian_psf
from apbatch.raw import RawExposure, RawMetadata
from apbatch.work import CcdWork

GROUP = "2025-10-16T00:59:36.789"


def _work(**kw) -> CcdWork:
    base = {"instrument": "LSSTComCam", "detector": 4, "detector_name": "R22_S11", "group_id": GROUP,
            "visit": 3405059767890000, "day_obs": 20251015, "intent": "science", "exposure_time": 30.0,
            "nimages": 1, "distributor": "/nowhere", "ra": 53.0, "dec": -28.0, "rotation": 10.0,
            "physical_filter": "r_03"}
    base.update(kw)
    return CcdWork(**base)


def _raw(**kw) -> RawExposure:
    meta = {"instrument": "LSSTComCam", "detector": 4, "detector_name": "R22_S11",
            "obs_id": "CC_O_20251015_000001", "exposure_id": 2025101500001, "group_id": GROUP,
            "visit_id": 3405059767890000, "day_obs": 20251015, "seq_num": 1, "observation_type": "science",
            "physical_filter": "r_03", "band": "r", "exposure_time": 30.0, "dark_time": 30.2,
            "requested_exposure_time": 30.0, "mjd_begin": 60964.04, "mjd_end": 60964.0404, "ra": 53.0,
            "dec": -28.0, "rotation": 10.0, "airmass": 1.1, "image_index": 1, "images_in_sequence": 1,
            "science_program": "PP-SURVEY", "reason": "science", "can_see_sky": True}
    meta.update(kw)
    return RawExposure({}, RawMetadata(**meta), [])


class FakeButlerIO:
    """Records what the job asks for; returns what the test sets up."""

    def __init__(self, raws=None, templates=(), raise_on_get=None, calibs=None):
        self.raws, self.templates, self.raise_on_get = raws or [_raw()], list(templates), raise_on_get
        # kind -> callable(when, physical_filter) -> ref id or None (refs are found by the time asked)
        self.calibs = calibs or {}
        self.template_reads: list = []
        self.order: list[str] = []
        self.puts: list[dict] = []
        self.asked: dict = {}
        self.raw_delivered_at = None
        self.calib_reads: list[str] = []

    def get_raw_blocking(self, target, detector, nimages, client, timeout, *, group_id=None,
                         allow_partial=False):
        self.order.append("raw")
        self.asked = {"target": target, "nimages": nimages, "timeout": timeout,
                      "allow_partial": allow_partial}
        if self.raise_on_get:
            raise self.raise_on_get
        return self.raws

    def calib_ref(self, kind, detector, when, physical_filter=None):
        find = self.calibs.get(kind)
        rid = find(when, physical_filter) if find else None
        return None if rid is None else type("Ref", (), {"id": rid})()

    def read_calib(self, ref):
        self.order.append(f"calib:{ref.id}")
        self.calib_reads.append(ref.id)
        return None

    def get_templates(self, corners, band):
        self.order.append("templates")
        self.template_reads.append((np.asarray(corners, float).mean(axis=0), band))
        return self.templates

    def put_outputs(self, visit, detector, **outputs):
        self.puts.append({k: v for k, v in outputs.items() if v is not None})


@pytest.fixture
def fake_steps(monkeypatch):
    """Replace the image steps with cheap stand-ins returning plausible objects."""
    calls = []

    def isr(raws, cam, det, bias=None, flat=None, release_raws=False):
        calls.append("isr")
        wcs = cam.sky_wcs(det, 53.0, -28.0, 10.0)
        return Image(np.zeros((40, 50), np.float32), np.ones((40, 50), np.float32), wcs=wcs)

    monkeypatch.setattr(task, "run_isr", isr)
    monkeypatch.setattr(task, "subtract_background",
                        lambda img: calls.append("bkg") or BackgroundResult(level=120.0, rms=11.0, box=128))
    monkeypatch.setattr(task, "sources_and_psf", lambda img: (pd.DataFrame(
        {"x": [1.0], "y": [1.0], "flux": [1.0], "flag": [0], "masked": [False]}), gaussian_psf(1.5)))
    return calls


def test_raw_timeout_propagates_and_writes_nothing(fake_steps):
    io = FakeButlerIO(raise_on_get=RawTimeoutError("no raw for R22_S11 after 2 s"))
    with pytest.raises(RawTimeoutError):
        task.run_ccd(_work(), task.JobDeps(io, object()), timeout=2.0)
    assert io.puts == [] and fake_steps == []
    assert io.asked["timeout"] == 2.0


def test_unexpected_failure_before_apdb_is_retriable(monkeypatch, fake_steps):
    def boom(*a, **k):
        raise ZeroDivisionError("oops")

    monkeypatch.setattr(task, "run_isr", boom)
    io = FakeButlerIO()
    with pytest.raises(RetriableError, match="ZeroDivisionError: oops"):
        task.run_ccd(_work(), task.JobDeps(io, object()))
    assert io.puts == []


def test_no_template_gives_calibrated_image_only(fake_steps):
    io = FakeButlerIO(templates=[])
    alerts_called = []
    res = task.run_ccd(_work(), task.JobDeps(io, object(), alerts=lambda *a, **k: alerts_called.append(a)))
    assert res.status == "no_template"
    assert len(io.puts) == 1 and set(io.puts[0]) == {"calexp", "metrics"}
    assert io.puts[0]["metrics"]["status"] == "no_template"
    assert io.puts[0]["metrics"]["prepare"]["no_template"] == "no template covers this CCD in band r"
    assert alerts_called == []
    steps = {"wait_for_raw", "calib_retrieval", "isr", "background_detection", "template_retrieval"}
    assert steps <= set(res.timings)
    # each step records CPU, wall and the process's peak RSS so far (never decreasing)
    rss = [t["maxrss_mib"] for t in res.timings.values()]
    assert all(r > 0 for r in rss) and rss == sorted(rss)
    assert all(t["cpu"] >= 0 and t["wall"] >= 0 for t in res.timings.values())


def test_calibration_runs_isr_only(fake_steps):
    from apbatch.config import CalibVerifyConfig

    io = FakeButlerIO(raws=[_raw(observation_type="bias", physical_filter="none", ra=None, dec=None)])
    # verification off (calib_verify.enabled): the ISR health check alone; on, see test_calverify.py
    res = task.run_ccd(_work(intent="bias", ra=None, dec=None, rotation=None, physical_filter=None),
                       task.JobDeps(io, object()), calib_verify=CalibVerifyConfig(enabled=False))
    assert res.status == "calibration:bias"
    assert fake_steps == ["isr"] and io.puts == [] and res.verification == {}


def test_calibration_is_verified_and_its_verdict_put(fake_steps):
    """With verification on, a calibration raw's tables go to put_calib_verification (not ap_metrics)."""
    from test_calverify import _ccd

    raw = _raw(observation_type="bias", physical_filter="none", ra=None, dec=None, detector=0,
               detector_name="R22_S00")
    raw.segments = _ccd(np.random.default_rng(0))
    io = FakeButlerIO(raws=[raw])
    verdicts = []
    io.put_calib_verification = lambda table, exposure, det, run: verdicts.append((table, exposure, det, run))
    res = task.run_ccd(_work(intent="bias", detector=0, detector_name="R22_S00", ra=None, dec=None,
                             rotation=None, physical_filter=None), task.JobDeps(io, object()))
    assert res.status == "calibration:bias" and io.puts == []
    assert res.verification["passed"] is True and res.verification["failed_amps"] == {}  # no master: unjudged
    (table, exposure, det, run), = verdicts
    assert exposure == raw.metadata.exposure_id and det == 0 and run == "LSSTComCam/prompt/20251015"
    assert set(table["metric"]) == {"bias_level", "read_noise", "saturated", "bad_columns", "bias_offset"}
    assert "calib_verify" in res.timings


def test_partial_snaps_are_processed_and_recorded(fake_steps):
    io = FakeButlerIO(raws=[_raw(images_in_sequence=2, requested_exposure_time=15.0)], templates=[])
    res = task.run_ccd(_work(nimages=2), task.JobDeps(io, object()))
    assert io.asked["allow_partial"] is True and io.asked["nimages"] == 2
    assert (res.snaps_used, res.snaps_expected) == (1, 2)


def test_science_without_pointing_is_bad_input(fake_steps):
    io = FakeButlerIO(raws=[_raw(ra=None, dec=None, rotation=None)])
    with pytest.raises(BadInputError, match="no pointing"):
        task.run_ccd(_work(ra=None, dec=None, rotation=None), task.JobDeps(io, object()))


def test_warped_template_keeps_its_unit():
    from apbatch.job.steps.warp import template_unit

    assert template_unit([Image(np.zeros((2, 2)), metadata={"BUNIT": "nJy"})] * 2) == "nJy"
    assert template_unit([Image(np.zeros((2, 2)))]) == ""
    with pytest.raises(BadInputError, match="template_coadd.BUNIT"):
        template_unit([Image(np.zeros((2, 2)), metadata={"BUNIT": "nJy"}),
                       Image(np.zeros((2, 2)), metadata={"BUNIT": "electron"})])


def test_result_is_plain_json():
    import json

    res = task.CcdResult(status="done", timings={"isr": {"wall": 1.0, "cpu": 0.9}})
    assert json.loads(json.dumps(res.to_dict()))["timings"]["isr"]["cpu"] == 0.9
    assert dataclasses.is_dataclass(res)


def test_flagged_dia_sources_are_stored_in_the_butler_but_not_alerted(monkeypatch, fake_steps):
    """Sources in a saturated star's halo (suspect) or core (saturated) go to the butler table,
    not to the APDB/alerts; ids stay those of the full table; ISR's findings reach the metrics."""
    from apbatch.job.steps import DIA_COLUMNS

    shape = (40, 50)

    def isr(raws, cam, det, bias=None, flat=None, release_raws=False):
        wcs = cam.sky_wcs(det, 53.0, -28.0, 10.0)
        return Image(np.zeros(shape, np.float32), np.ones(shape, np.float32), wcs=wcs,
                     metadata={"SNAPMODE": "model", "SNAPRATI": 0.9, "AMPSBAD": "C10:dead"})

    dia = pd.DataFrame({c: np.zeros(3, bool if c.startswith(("is", "pixelFlags")) else float)
                        for c in DIA_COLUMNS})
    dia["x"], dia["y"], dia["psfFlux"] = [5.0, 10.0, 20.0], [5.0, 10.0, 20.0], [1.0, 2.0, 3.0]
    dia.loc[1, "pixelFlags_suspect"] = True
    dia["ra"], dia["dec"] = 53.0, -28.0
    cam = get_instrument("LSSTComCam")
    tmpl = Image(np.zeros(shape, np.float32), np.ones(shape, np.float32), metadata={"BUNIT": "nJy"},
                 wcs=cam.sky_wcs(cam.detector(4), 53.0, -28.0, 10.0))
    sub = type("Sub", (), {"n_stamps": 20, "kernel_sum": 1.0, "noise_scale": 1.0})()
    monkeypatch.setattr(task, "run_isr", isr)
    monkeypatch.setattr(task, "_fit_astrometry", lambda *a: None)
    monkeypatch.setattr(task, "warp_template", lambda *a, **k: tmpl)
    monkeypatch.setattr(task, "template_psf_sigma", lambda *a: 1.2)
    monkeypatch.setattr(task, "subtract_images", lambda *a, **k: (Image(np.zeros(shape, np.float32)), sub))
    monkeypatch.setattr(task, "crop_to_science", lambda w: w)
    monkeypatch.setattr(task, "photometric_scale", lambda *a: 1.0)
    monkeypatch.setattr(task, "measure_dia_sources", lambda *a, **k: dia.copy())
    io = FakeButlerIO(templates=[tmpl])
    alerted, forced = [], []
    res = task.run_ccd(_work(), task.JobDeps(io, object(), alerts=lambda ccd, d, *a, **k: (
        alerted.append(d), forced.append(k["photometry"])) and {}))
    assert res.status == "done" and res.n_dia_sources == 3
    # too few stars for an aperture correction: 1, said so; the APDB's forced photometry gets the
    # same PSF model and correction as the DIA fluxes
    assert res.apcorr["fallback"] is True and res.apcorr["value"] == 1.0
    (phot,) = forced
    assert isinstance(phot, ForcedPhotometry) and phot.apcorr is not None and phot.apcorr.value == 1.0
    assert phot.fwhm == pytest.approx(2.3548 * 1.5, rel=1e-3)
    # telemetry: the PSF model's FWHM in arcsec (1.5 px sigma), the background removed
    assert res.quality["psf_fwhm_arcsec"] == pytest.approx(2.3548 * 1.5 * 0.2, rel=1e-3)
    assert res.quality["sky_level"] == 120.0
    assert res.dia_rejected == {"pixelFlags_saturated": 0, "pixelFlags_suspect": 1, "total": 1}
    table = next(p["dia_sources"] for p in io.puts if "dia_sources" in p)
    assert len(table) == 3 and table["pixelFlags_suspect"].tolist() == [False, True, False]
    (sent,) = alerted
    assert sent["diaSourceId"].tolist() == table["diaSourceId"].iloc[[0, 2]].tolist()
    assert res.isr == {"snapmode": "model", "snaprati": 0.9, "ampsbad": "C10:dead"}
    metrics = io.puts[-1]["metrics"]
    assert metrics["dia_rejected"]["total"] == 1 and metrics["isr"]["ampsbad"] == "C10:dead"


# ---------------------------------------------------------------- prepare / process phases
@pytest.fixture
def stop_at_warp(monkeypatch, fake_steps):
    """Real template preparation; the process phase ends at the warp (calibrated image only)."""
    from apbatch.job.steps.warp import NoTemplateOverlapError

    def no_overlap(*a, **k):
        raise NoTemplateOverlapError("stopped by the test")

    monkeypatch.setattr(task, "_fit_astrometry", lambda *a: None)
    monkeypatch.setattr(task, "warp_template", no_overlap)
    return fake_steps


def _templates():
    cam = get_instrument("LSSTComCam")
    wcs = cam.sky_wcs(cam.detector(4), 53.0, -28.0, 10.0)
    return [Image(np.zeros((40, 50), np.float32), np.ones((40, 50), np.float32), wcs=wcs,
                  metadata={"BUNIT": "nJy"})]


def test_calibrations_and_templates_are_read_before_the_raw_and_used(stop_at_warp):
    """nextVisit's filter and pointing decide the reads before the raw; the header's different
    filter (headers can be wrong) is reported, and the prepared data are what the job uses."""
    io = FakeButlerIO(raws=[_raw(physical_filter="y_04")], templates=_templates(),
                      calibs={"bias": lambda when, f: "bias-1", "flat": lambda when, f: f"flat-{f}"})
    clock_marks = task.StageClock()
    res = task.run_ccd(_work(), task.JobDeps(io, object()), clock=clock_marks)
    assert io.order[:4] == ["calib:bias-1", "calib:flat-r_03", "templates", "raw"]
    assert io.calib_reads == ["bias-1", "flat-r_03"]  # not read again after the raw
    assert len(io.template_reads) == 1 and io.template_reads[0][1] == "r"
    assert any("FILTER 'y_04'" in m for m in res.mismatches)
    assert res.prepare["templates"] == "prepared"
    assert {"prepare_calibs", "prepare_templates"} <= set(res.timings)
    marks = res.stages
    assert list(marks)[:3] == ["started", "prepared", "raw_read"]  # the fake distributor gives no time
    assert marks["started"] <= marks["prepared"] <= marks["raw_read"] <= marks["isr_done"]


def test_a_calibration_that_does_not_hold_the_raws_time_is_read_again(fake_steps):
    # the bias changes at MJD 60964.0: nextVisit's group time (2025-10-16T00:59) is after it,
    # the raw (mjd_begin 60963.9) before: the prepared bias does not apply to the raw
    io = FakeButlerIO(raws=[_raw(mjd_begin=60963.9, mjd_end=60963.9004)], templates=[],
                      calibs={"bias": lambda when, f: "new" if float(getattr(when, "mjd", when)) >= 60964.0
                              else "old"})
    task.run_ccd(_work(), task.JobDeps(io, object()))
    assert io.calib_reads == ["new", "old"]


def test_pointing_far_from_next_visit_reads_templates_where_the_header_says(stop_at_warp):
    io = FakeButlerIO(raws=[_raw(ra=53.05)], templates=_templates())  # 2.6 arcmin east of nextVisit
    res = task.run_ccd(_work(), task.JobDeps(io, object()))
    assert len(io.template_reads) == 2
    (first, _), (second, _) = io.template_reads
    assert second[0] - first[0] == pytest.approx(0.05, abs=0.005)
    assert res.prepare["templates"].startswith("re-read: the CCD is")
    assert any("arcsec from the job's boresight" in m for m in res.mismatches)
    near = FakeButlerIO(raws=[_raw(ra=53.001)], templates=_templates())  # 3 arcsec: within the pad
    assert task.run_ccd(_work(), task.JobDeps(near, object())).prepare["templates"] == "prepared"
    assert len(near.template_reads) == 1


def test_preparation_failure_is_retriable_and_writes_nothing(fake_steps):
    def away(when, f):
        raise ConnectionError("registry unreachable")

    io = FakeButlerIO(calibs={"bias": away})
    with pytest.raises(RetriableError, match="preparation failed: ConnectionError: registry unreachable"):
        task.run_ccd(_work(), task.JobDeps(io, object()))
    assert io.puts == [] and io.asked == {} and fake_steps == []


def test_raw_that_never_arrives_drops_the_prepared_data(stop_at_warp):
    io = FakeButlerIO(templates=_templates(), raise_on_get=RawTimeoutError("no raw after 2 s"),
                      calibs={"bias": lambda when, f: "b"})
    clock = task.StageClock()
    with pytest.raises(RawTimeoutError):
        task.run_ccd(_work(), task.JobDeps(io, object()), timeout=2.0, clock=clock)
    assert io.order == ["calib:b", "templates", "raw"] and io.puts == [] and stop_at_warp == []
    assert set(clock.marks) == {"started", "prepared"}


def test_raw_available_is_the_distributors_delivery_time(fake_steps):
    io = FakeButlerIO(templates=[])
    io.raw_delivered_at = 1000.0
    res = task.run_ccd(_work(), task.JobDeps(io, object()))
    assert res.stages["raw_available"] == 1000.0 and res.stages["raw_read"] > 1000.0


def test_templates_are_prepared_one_patch_at_a_time():
    """read_templates takes each patch from ``iter_templates`` as it is read, so a patch's image is
    dropped before the next is read; the result is what preparing them all at once gives."""
    import gc
    import weakref

    from apbatch.job.prepare import read_templates, reference_catalog
    from apbatch.job.steps.warp import prepare_warp

    cam = get_instrument("LSSTComCam")
    det = cam.detector(4)
    rng = np.random.default_rng(2)
    patches = []
    for k in range(3):
        img = rng.normal(0, 1, (120, 140)).astype(np.float32)
        for y, x, f in rng.uniform((10, 10, 200), (110, 130, 900), (4, 3)):  # bright stars
            img[int(y) - 1 : int(y) + 2, int(x) - 1 : int(x) + 2] += np.float32(f)
        wcs = cam.sky_wcs(det, 53.0 + 0.01 * k, -28.0, 10.0)
        patches.append(Image(img, np.ones_like(img), wcs=wcs, metadata={"BUNIT": "nJy"}))
    alive = []

    class OneAtATime:
        def iter_templates(self, corners, band):
            for p in patches:
                copy = Image(p.image.copy(), p.variance.copy(), p.mask.copy(), p.wcs, dict(p.metadata))
                gc.collect()
                alive.append(sum(r() is not None for r in refs))  # earlier copies still held
                refs.append(weakref.ref(copy))
                yield copy

    refs: list = []
    got = read_templates(OneAtATime(), cam, det, (53.0, -28.0, 10.0), "r", 20.0)
    assert alive == [0, 0, 0]
    want = reference_catalog(patches)
    assert want is not None and got.references is not None and len(want) >= 6
    np.testing.assert_array_equal(got.references, want)
    for a, b in zip(got.patches, prepare_warp(patches), strict=True):
        np.testing.assert_array_equal(a.coef, b.coef)
        np.testing.assert_array_equal(a.variance, b.variance)
    assert got.band == "r" and got.pointing == (53.0, -28.0, 10.0)
