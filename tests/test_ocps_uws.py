"""Tests for apbatch.ocps.uws: UWS 1.1 documents (vo-models) read back by pyvo and by vo-models."""

import io
import json
import time
import warnings

import numpy as np
import pytest
from apbatch.ocps import uws
from apbatch.ocps.model import DataId, OcpsRequest, Phase
from pyvo.io.uws import parse_job, parse_job_list
from pyvo.io.vosi import parse_availability
from vo_models.uws import Results

BASE = "http://127.0.0.1:8085/"
T0 = 1_760_497_200.25  # 2025-10-15T03:00:00.250Z


def request(phase=Phase.PENDING, **kw):
    fields = {"id": "a1b2c3", "pipeline": "ap",
              "data_id": DataId("LSSTComCam", obsid="CC_O_20251015_000003", detector=4),
              "overrides": {"job.threads": "1", "isr.do_flat": "false"}, "config_file": "/cfg/ocps.yaml",
              "mode": "async", "phase": phase, "created_at": T0}
    fields.update(kw)
    return OcpsRequest(**fields)


def strict(parse, xml):
    with warnings.catch_warnings():
        warnings.simplefilter("error")
        return parse(io.BytesIO(xml), pedantic=True)


def test_pending_job_fields_and_parameters():
    xml = uws.job_xml(request(), BASE)
    assert xml.startswith(b"<?xml version='1.0' encoding='UTF-8'?>")
    job = strict(parse_job, xml)
    assert (job.jobid, job.phase, job.ownerid, job.runid) == ("a1b2c3", "PENDING", "anonymous", None)
    assert job.creationtime.isot == "2025-10-15T03:00:00.250"
    assert job.starttime is None and job.endtime is None and job.destruction is None
    assert [(p.id_, p.content) for p in job.parameters] == [
        ("pipeline", "ap"), ("instrument", "LSSTComCam"), ("obsid", "CC_O_20251015_000003"),
        ("detector", "4"), ("config", "/cfg/ocps.yaml"), ("config.isr.do_flat", "false"),
        ("config.job.threads", "1")]
    assert len(job.results) == 0 and job.errorsummary is None
    assert json.loads(job.jobinfo.text) == {"pipeline": "ap", "mode": "async", "jobs": [], "telemetry": []}


def test_completed_job_results_link_files_values_and_telemetry(tmp_path):
    png = tmp_path / "gather.png"
    png.write_bytes(b"\x89PNG" + b"\0" * 100)
    summary = tmp_path / "summary.json"
    summary.write_text("{}")
    tel = ({"detector": 4, "psf_fwhm_arcsec": np.float64(0.8), "n_sources": np.int64(812),
            "zero_point": float("nan")},)
    req = request(Phase.COMPLETED, started_at=T0 + 1, ended_at=T0 + 30, jobs=("11", "12"), telemetry=tel,
                  results={"ccds": {"done": 2, "failed": 0}, "gather_png": str(png), "summary": str(summary),
                           "missing_file": str(tmp_path / "gone.png")})
    job = strict(parse_job, uws.job_xml(req, BASE))
    assert job.phase == "COMPLETED" and job.endtime.isot == "2025-10-15T03:00:30.250"
    refs = {r.id_: (r.href, r.mimetype, r.size) for r in job.results}
    url = "http://127.0.0.1:8085/jobs/a1b2c3/results"
    assert refs == {"ccds": (f"{url}/ccds", "application/json", 0),
                    "gather_png": (f"{url}/gather_png", "image/png", 104),
                    "summary": (f"{url}/summary", "application/json", 2),
                    # a path that is not a file is a value
                    "missing_file": (f"{url}/missing_file", "application/json", 0),
                    "telemetry": (f"{url}/telemetry", "application/json", 0)}
    info = json.loads(job.jobinfo.text)
    assert info["jobs"] == ["11", "12"]
    assert info["telemetry"] == [{"detector": 4, "psf_fwhm_arcsec": 0.8, "n_sources": 812,
                                  "zero_point": None}]
    # vo-models reads its own document back too
    assert len(Results.from_xml(uws.results_xml(req, BASE)).results) == 5
    entries = {e.name: e for e in uws.result_entries(req)}
    assert entries["gather_png"].path == str(png) and entries["ccds"].value == {"done": 2, "failed": 0}
    assert entries["telemetry"].value == list(tel)


def test_error_summary_only_in_error_phase():
    err = "obsid CC_O_20251015_000099: raw never arrived <after 5 s> & exit 3"
    job = strict(parse_job, uws.job_xml(request(Phase.ERROR, error=err, ended_at=T0 + 9), BASE))
    assert job.phase == "ERROR"
    assert job.errorsummary.message.content == err and job.errorsummary.type_ == "fatal"
    aborted = strict(parse_job, uws.job_xml(request(Phase.ABORTED, error="aborted on request"), BASE))
    assert aborted.phase == "ABORTED" and aborted.errorsummary is None


@pytest.mark.parametrize("phase", list(Phase))
def test_every_phase_parses(phase):
    job = strict(parse_job, uws.job_xml(request(phase, error="x" if phase == Phase.ERROR else None), BASE))
    assert job.phase == str(phase)


def test_job_list_and_availability():
    reqs = [request(id="j1"), request(Phase.EXECUTING, id="j/2", created_at=T0 + 5)]
    jobs = strict(parse_job_list, uws.job_list_xml(reqs, BASE))
    assert [(j.jobid, j.phase, j.ownerid) for j in jobs] == [("j1", "PENDING", "anonymous"),
                                                             ("j/2", "EXECUTING", "anonymous")]
    assert b'xlink:href="http://127.0.0.1:8085/jobs/j%2F2"' in uws.job_list_xml(reqs, BASE)
    assert len(strict(parse_job_list, uws.job_list_xml([], BASE))) == 0
    avail = parse_availability(io.BytesIO(uws.availability_xml(True, time.time(), "mode: async")))
    assert avail.available is True and avail.notes == ["mode: async"]


def test_request_json_and_jsonable():
    req = request(Phase.EXECUTING, started_at=T0 + 2, jobs=("5",),
                  telemetry=({"detector": 4, "sky_level": float("inf")},), results={"ccds": (1, 2)})
    d = uws.request_json(req, BASE)
    assert d["creationTime"] == "2025-10-15T03:00:00.250Z" and d["endTime"] is None
    assert d["dataId"] == {"instrument": "LSSTComCam", "obsid": "CC_O_20251015_000003", "groupId": None,
                           "detector": 4}
    assert d["overrides"] == {"job.threads": "1", "isr.do_flat": "false"}
    assert d["telemetry"] == [{"detector": 4, "sky_level": None}]
    assert d["results"]["ccds"]["value"] == [1, 2] and "value" not in d["results"]["telemetry"]
    json.dumps(d, allow_nan=False)  # valid strict JSON
    assert uws.jsonable({"a": {np.float32(1.5), }, 2: object}) == {"a": [1.5], "2": str(object)}
