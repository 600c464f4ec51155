"""Tests of apbatch.ocps.gather's pure helpers (telemetry and gather are exercised through the runner)."""

from __future__ import annotations

from apbatch.config import load_config
from apbatch.ocps.gather import ccd_failure, metric_runs
from apbatch.states import SubmissionState as S
from apbatch.submission import Submission
from apbatch.work import CcdWork

WORK = CcdWork("LSSTComCam", 4, "R22_S11", "2025-06-10T07:31:26.692", 2025061000578, 20250610, "science",
               30.0, 2, "http://127.0.0.1:8000")


def _row(state: S, **kw) -> Submission:
    base = {"id": 1, "instrument": WORK.instrument, "group_id": WORK.group_id, "detector": WORK.detector,
            "detector_name": WORK.detector_name, "visit": WORK.visit, "day_obs": WORK.day_obs,
            "intent": WORK.intent, "state": state, "attempts": 1, "retry": True, "work": WORK,
            "claimed_at": 0.0}
    return Submission(**{**base, **kw})


def test_ccd_failure_names_the_detector_the_exit_code_and_the_reason():
    assert ccd_failure(_row(S.FAILED, exit_code=3, reason="no raw\n  after 120 s")) == \
        "R22_S11: exit 3 (raw_timeout): no raw after 120 s"
    assert ccd_failure(_row(S.FAILED, exit_code=77)) == "R22_S11: exit 77"
    assert ccd_failure(_row(S.CANCELLED)) == "R22_S11: CANCELLED"
    long = ccd_failure(_row(S.FAILED, exit_code=2, reason="x" * 500))
    assert long == "R22_S11: exit 2 (bad_input): " + "x" * 200


def test_metric_runs_are_the_jobs_then_ocps_then_prompt_processing_without_repeats(tmp_path):
    cfg = load_config([], environ={"APBATCH_ROOT": str(tmp_path)})
    runs = metric_runs(cfg, "{instrument}/ocps/{day_obs}", "LSSTComCam", 20250610)
    assert runs[1] == "LSSTComCam/ocps/20250610" and len(runs) == len(set(runs)) >= 2
    assert metric_runs(cfg, cfg.job.output_run, "LSSTComCam", 20250610) == \
        [cfg.job.output_run.format(instrument="LSSTComCam", day_obs=20250610), *runs[2:]]
