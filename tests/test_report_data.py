"""Tests of apbatch.report.data: a night gathered from a ledger, job metrics and alert files.

The night is built here with the project's own classes: a real `Ledger` (claims, submissions,
scheduler states, stage marks), alert files written by `process_ccd_alerts` into a real APDB
and `FileAlertSink`, and ``ap_metrics`` put into a real butler repository. ``build_night``
is shared with tests/test_report_plots.py and tests/test_report_html.py.
"""

from __future__ import annotations

import dataclasses
from pathlib import Path

import fastavro
import numpy as np
import pytest
from alert_synth import BORESIGHT, SMALL, make_ccd, make_images, make_sources, visit_id
from apbatch.backends.base import JobState, JobStatus
from apbatch.config import load_config
from apbatch.instruments import get_instrument
from apbatch.latency import STAGES, intervals_of
from apbatch.ledger import Ledger
from apbatch.report.data import butler_metrics, gather_night, job_log_path, read_alerts
from apbatch.states import SubmittedJob
from apbatch.work import CcdWork

DAY = 20260917
COMCAM_VISITS = (2026091700011, 2026091700012)
LSSTCAM_VISIT = visit_id(0)  # the alert files of alert_synth's first visit belong to it
STEPS = ("prepare_calibs", "isr", "subtract", "measure", "write_outputs")


@dataclasses.dataclass
class BuiltNight:
    """A small night: what was put in, to compare with what the report gathers."""

    cfg: object
    ledger: Ledger
    metrics: dict
    failed: dict  # (instrument, visit, detector) -> exit code
    no_template: set
    alerts_dir: Path
    extra_alert_visit: int  # alert files of a visit that is not in the night's ledger


def _works(instrument: str, visit: int, group: str, pointing: tuple[float, float, float], pfilter: str,
           detectors: list[int]) -> list[CcdWork]:
    cam = get_instrument(instrument)
    return [CcdWork(instrument=instrument, detector=d, detector_name=cam.detector(d).name, group_id=group,
                    visit=visit, day_obs=DAY, intent="science", exposure_time=30.0, nimages=1,
                    distributor="/nonexistent", ra=pointing[0], dec=pointing[1], rotation=pointing[2],
                    physical_filter=pfilter) for d in detectors]


def _marks(rng: np.random.Generator, t0: float, upto: int = len(STAGES)) -> dict[str, float]:
    t, out = t0, {}
    for stage in STAGES[:upto]:
        t += float(rng.uniform(0.5, 12.0))
        out[stage] = round(t, 3)
    return out


def _write_alerts(root: Path) -> Path:
    """Two visits of the same 12 transients on LSSTCam detector 94: new alerts, then repeats."""
    from apbatch.job.alert_sinks import AlertSpool, FileAlertSink
    from apbatch.job.alerts import AlertBuilder, process_ccd_alerts
    from apbatch.job.apdb import Association, create_apdb, open_apdb

    create_apdb(f"sqlite:///{root}/apdb.sqlite3", root / "apdb.yaml")
    assoc, spool = Association(open_apdb(root / "apdb.yaml")), AlertSpool(root / "spool")
    sink = FileAlertSink(root / "alerts")
    cat = make_sources(12, np.random.default_rng(7), nx=SMALL, ny=SMALL)
    for n in (0, 1):
        imgs = make_images(np.random.default_rng(n), sources=cat, shape=(SMALL, SMALL))
        process_ccd_alerts(make_ccd(n), cat, imgs["science"], imgs["template"], imgs["difference"],
                           psf_fwhm_pix=3.0, association=assoc, builder=AlertBuilder(cutout_size=30),
                           spool=spool, sink=sink, send_timeout=5.0)
    return root / "alerts"


def build_night(root: Path, *, alerts: bool = True) -> BuiltNight:
    """Two 9-CCD ComCam visits (one failure each) and a partly processed 189-CCD LSSTCam visit."""
    cfg = load_config(environ={}, overrides={"root": str(root)})
    ledger = Ledger.from_config(cfg)
    rng = np.random.default_rng(3)
    t0 = 1_789_000_000.0
    metrics, failed, no_template = {}, {}, set()
    visits = [
        ("LSSTComCam", COMCAM_VISITS[0], "2026-09-18T01:00:00", (150.0, 2.0, 30.0), "r_03", list(range(9))),
        ("LSSTComCam", COMCAM_VISITS[1], "2026-09-18T01:01:00", (210.0, -30.0, 0.0), "g_01", list(range(9))),
        ("LSSTCam", LSSTCAM_VISIT, "2026-09-18T01:02:00", BORESIGHT, "i_39",
         [d.id for d in get_instrument("LSSTCam").science_detectors]),
    ]
    job = 0
    for instrument, visit, group, pointing, pfilter, dets in visits:
        works = _works(instrument, visit, group, pointing, pfilter, dets)
        ledger.claim(works, received_at=t0, now=t0)
        jobs = []
        for w in works:
            job += 1
            jobs.append(SubmittedJob(w, f"local-{job}"))
        ledger.record_submitted(jobs, "local", now=t0 + 1)
        statuses = {}
        for i, (w, j) in enumerate(zip(works, jobs, strict=True)):
            key = (instrument, visit, w.detector)
            if instrument == "LSSTComCam" and i == 4:  # the centre CCD failed
                code = 3 if visit == COMCAM_VISITS[0] else 5
                statuses[j.job_id] = JobStatus(j.job_id, JobState.FAILED, code, f"exit code {code}")
                failed[key] = code
                continue
            if instrument == "LSSTCam" and i >= 150:  # still running: the visit is partial
                statuses[j.job_id] = JobStatus(j.job_id, JobState.RUNNING)
                ledger.record_stages(instrument, group, w.detector, _marks(rng, t0, upto=3))
                continue
            statuses[j.job_id] = JobStatus(j.job_id, JobState.COMPLETED, 0)
            ledger.record_stages(instrument, group, w.detector, _marks(rng, t0))
            status = "no_template" if instrument == "LSSTComCam" and i in (0, 1) else "done"
            if status == "no_template":
                no_template.add(key)
            metrics[key] = {"status": status, "n_dia_sources": int(rng.integers(0, 60)),
                            "prepare": {"templates": "prepared", **({"no_template": "no template covers "
                                        "this CCD in band r"} if status == "no_template" else {})},
                            "timings": {s: {"wall": float(rng.uniform(0.1, 5)),
                                            "cpu": float(rng.uniform(0.1, 5)),
                                            "maxrss_mib": float(rng.uniform(300, 1800))} for s in STEPS}}
        ledger.update_states(statuses, "local", now=t0 + 100)
    alerts_dir = _write_alerts(root) if alerts else root / "alerts"
    return BuiltNight(cfg, ledger, metrics, failed, no_template, alerts_dir, visit_id(1))


@pytest.fixture(scope="module")
def built(tmp_path_factory):
    night = build_night(tmp_path_factory.mktemp("night"))
    yield night
    night.ledger.close()


@pytest.fixture(scope="module")
def gathered(built):
    return gather_night(built.cfg, day_obs=DAY, ledger=built.ledger, metrics=lambda runs: built.metrics,
                        alerts_dir=built.alerts_dir, gallery_size=5)


def test_visits_and_ccds_come_from_the_ledger(built, gathered):
    rows = built.ledger.rows(day_obs=DAY)
    assert [(v.instrument, v.visit) for v in gathered.visits] == [
        ("LSSTComCam", COMCAM_VISITS[0]), ("LSSTComCam", COMCAM_VISITS[1]), ("LSSTCam", LSSTCAM_VISIT)]
    assert [len(v.ccds) for v in gathered.visits] == [9, 9, 189]
    assert len(gathered.ccds) == len(rows)
    by_key = {(r.instrument, r.visit, r.detector): r for r in rows}
    for v in gathered.visits:
        assert (v.ra, v.dec) == (by_key[(v.instrument, v.visit, v.ccds[0].detector)].work.ra,
                                 by_key[(v.instrument, v.visit, v.ccds[0].detector)].work.dec)
        for c in v.ccds:
            row = by_key[(v.instrument, v.visit, c.detector)]
            assert c.state == str(row.state) and c.job_id == row.job_id
            assert c.intervals == intervals_of(row.stages)
    lsst = gathered.visits[2]
    assert sum(c.state == "RUNNING" for c in lsst.ccds) == 39
    assert all(c.latency is None for c in lsst.ccds if c.state == "RUNNING")  # no alert mark yet


def test_metrics_are_joined_per_ccd(built, gathered):
    for v in gathered.visits:
        for c in v.ccds:
            m = built.metrics.get((v.instrument, v.visit, c.detector))
            assert c.n_dia == (None if m is None else m["n_dia_sources"])
            assert c.has_template is (None if m is None else m["status"] != "no_template")
    assert {(v.instrument, v.visit, c.detector) for v in gathered.visits for c in v.ccds
            if c.has_template is False} == built.no_template


def test_failures_carry_exit_code_and_log_path(built, gathered):
    assert {(f.visit, f.detector_name): f.exit_code for f in gathered.failures} == {
        (k[1], get_instrument(k[0]).detector(k[2]).name): code for k, code in built.failed.items()}
    log_dir = built.cfg.path(built.cfg.backend.log_dir).absolute()
    for f in gathered.failures:
        assert f.log_path == str(log_dir / "jobs" / f.job_id / "out.log")


def test_stage_values_cover_every_science_ccd_with_marks(built, gathered):
    values = gathered.stage_values()
    with_alerts = [r for r in built.ledger.rows(day_obs=DAY) if "alerts_sent" in r.stages]
    assert len(values["raw_to_alerts"]) == len(with_alerts)
    prepared = [r for r in built.ledger.rows(day_obs=DAY) if "prepared" in r.stages]
    assert len(values["prepare"]) == len(prepared)


def _alerts_of(path: Path) -> list[dict]:
    with path.open("rb") as fh:
        return list(fastavro.reader(fh))


def test_gallery_is_the_brightest_new_alerts_of_the_night(built, gathered):
    first = _alerts_of(built.alerts_dir / "LSSTCam" / str(LSSTCAM_VISIT) / "094.avro")
    assert gathered.alerts.per_visit == {("LSSTCam", LSSTCAM_VISIT): len(first)}
    assert gathered.visits[2].n_alerts == len(first)
    new = [a["diaSource"]["psfFlux"] for a in first if a["diaObject"]["nDiaSources"] == 1]
    want = sorted(new, reverse=True)
    assert [g.psf_flux for g in gathered.alerts.gallery] == pytest.approx(want[:5])
    for g in gathered.alerts.gallery:
        assert g.visit == LSSTCAM_VISIT and g.detector == 94
        for kind in ("science", "template", "difference"):
            assert (g.cutouts[kind] or b"")[:6] == b"SIMPLE"  # FITS bytes


def test_read_alerts_skips_repeats_and_reads_every_visit_without_a_filter(built):
    summary = read_alerts(built.alerts_dir, gallery_size=100)
    second = _alerts_of(built.alerts_dir / "LSSTCam" / str(built.extra_alert_visit) / "094.avro")
    assert second and all(a["diaObject"]["nDiaSources"] == 2 for a in second)  # the same objects again
    assert summary.per_visit[("LSSTCam", built.extra_alert_visit)] == len(second)
    assert {g.visit for g in summary.gallery} == {LSSTCAM_VISIT}  # repeats are not new


def test_unreadable_alert_file_is_noted_not_fatal(tmp_path):
    bad = tmp_path / "LSSTCam" / "123" / "005.avro"
    bad.parent.mkdir(parents=True)
    bad.write_bytes(b"not avro")
    summary = read_alerts(tmp_path)
    assert summary.files == 0 and len(summary.unreadable) == 1 and str(bad) in summary.unreadable[0]


def test_missing_butler_repository_is_a_note(built):
    night = gather_night(built.cfg, day_obs=DAY, ledger=built.ledger, alerts_dir=built.alerts_dir)
    assert any("job metrics not read" in n for n in night.notes)
    assert all(c.status is None for c in night.ccds)


def test_log_path_per_backend(built):
    row = built.ledger.rows(day_obs=DAY)[0]
    assert job_log_path(built.cfg, row) == str(
        built.cfg.path("logs/local").absolute() / "jobs" / str(row.job_id) / "out.log")
    slurm = load_config(environ={}, overrides={"root": str(built.cfg.root), "backend": {"kind": "slurm"}})
    assert job_log_path(slurm, row) is None  # the row ran on another backend
    srow = dataclasses.replace(row, backend="slurm", job_id="812_4")
    assert job_log_path(slurm, srow) == str(slurm.path("logs/slurm").absolute() / f"{row.label}_812_4.out")


def test_butler_metrics_reads_ap_metrics_of_the_night(butler, tmp_path):
    from apbatch.butler.io import ButlerIO
    from apbatch.butler.repo import register_exposures, register_output_run

    visit = 2024110800033
    register_exposures(butler, [{"instrument": "LSSTComCam", "exposure_id": visit, "visit_id": visit,
                                 "obs_id": "CC_O_20241108_000033", "day_obs": 20241108, "seq_num": 33,
                                 "physical_filter": "r_03", "exposure_time": 30.0, "ra": 150.0, "dec": 2.0,
                                 "rotation": 0.0, "observation_type": "science"}])
    register_output_run(butler, "LSSTComCam", 20241108)
    io = ButlerIO(butler, "LSSTComCam")
    io.put_outputs(visit, 0, metrics={"status": "done", "n_dia_sources": 4})
    io.put_outputs(visit, 4, metrics={"status": "no_template", "n_dia_sources": 0})
    got = butler_metrics(tmp_path / "repo", [("LSSTComCam", 20241108), ("LSSTComCam", 20241109)])
    assert got == {("LSSTComCam", visit, 0): {"status": "done", "n_dia_sources": 4},
                   ("LSSTComCam", visit, 4): {"status": "no_template", "n_dia_sources": 0}}
    with pytest.raises(FileNotFoundError):
        butler_metrics(tmp_path / "nothing", [("LSSTComCam", 20241108)])
