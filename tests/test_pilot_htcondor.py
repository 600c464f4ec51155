"""Tests of warm pilots as HTCondor jobs (apbatch.backends.pilot_launch).

No HTCondor daemons can run here (FIELD-NOTES): the pilot's submit description goes through the
REAL ``htcondor2`` bindings (parsing, macro expansion); the schedd is a recording fake with
`htcondor2.Schedd`'s methods, so these tests stop at the schedd call.
"""

from __future__ import annotations

import sys
from pathlib import Path

import classad2
import htcondor2
import pytest
from apbatch.backends import make_backend
from apbatch.backends.base import JobState
from apbatch.backends.pilot import claim_next
from apbatch.config import load_config
from apbatch.errors import BadInputError, SchedulerError

sys.path.insert(0, str(Path(__file__).resolve().parent))
from test_htcondor import FakeResult, condor_split  # noqa: E402
from test_pilot_backend import works_of  # noqa: E402

TOKEN = "cd" * 10


class FakeSchedd:
    """A schedd that queues each submitted pilot (JobStatus 1) under clusters 700, 701, ...; its
    queue and history are ClassAds matched with the real ClassAd language; Remove moves a job
    to the history as Removed (3)."""

    def __init__(self, fail=None):
        self.calls: list[tuple] = []
        self.queue: dict[str, classad2.ClassAd] = {}
        self.history_ads: list[classad2.ClassAd] = []
        self.next, self.fail = 700, fail

    def submit(self, description, count=0, spool=False, itemdata=None, queue=None):
        assert isinstance(description, htcondor2.Submit) and itemdata is None
        self.calls.append(("submit", str(description), count))
        if self.fail:
            raise self.fail
        cluster, self.next = self.next, self.next + 1
        self.queue[f"{cluster}.0"] = classad2.ClassAd({"ClusterId": cluster, "ProcId": 0, "JobStatus": 1})
        return FakeResult(cluster, count)

    def query(self, constraint="True", projection=(), callback=None, limit=-1, opts=None):
        self.calls.append(("query", constraint))
        return [ad for ad in self.queue.values() if classad2.ExprTree(constraint).eval(ad)]

    def history(self, constraint=None, projection=(), match=-1, since=None):
        self.calls.append(("history", constraint))
        return [ad for ad in self.history_ads if classad2.ExprTree(constraint).eval(ad)]

    def act(self, action, job_spec, reason=None):
        self.calls.append(("act", action, list(job_spec)))
        for job in job_spec:
            ad = self.queue.pop(job)
            ad["JobStatus"] = 3
            ad["RemoveReason"] = reason or ""
            self.history_ads.insert(0, ad)
        return classad2.ClassAd({"TotalSuccess": len(job_spec)})

    def count(self, what: str) -> int:
        return sum(c[0] == what for c in self.calls)


def config(tmp_path, **backend):
    launcher = backend.pop("launcher", {"kind": "htcondor"})
    return load_config(environ={}, overrides={"root": str(tmp_path / "work"),
                                              "backend": {"kind": "pilot", "launcher": launcher, **backend}})


def as_pilot(job_id: str) -> dict:
    return {"pid": 4242, "ticks": 1, "pilot": f"htcondor-{job_id}", "host": "node3", "batch": "htcondor",
            "batch_id": job_id}


def test_pilot_description_parses_and_expands_to_the_pilot_command(tmp_path):
    backend = make_backend(config(tmp_path, launcher={"kind": "htcondor", "request_cpus": 2,
                                                      "extra_attributes": {"AccountingGroup": '"rubin.ap"'}},
                                  max_lifetime="01:00:00", max_rss_mib=2048))
    launcher = backend.launcher
    argv = backend.pilot_argv(20250610)
    sub = htcondor2.Submit(launcher.render(argv, backend.job_env(), 20250610))
    assert sub.getQArgs() == "1"
    assert Path(sub["executable"]).is_absolute() and sub["getenv"] == "false"
    assert (sub["request_memory"], sub["request_cpus"], sub["max_retries"]) == ("3072MB", "2", "0")
    assert sub["batch_name"] == "ap-pilot-20250610" and sub["MY.AccountingGroup"] == '"rubin.ap"'
    assert sub["periodic_remove"].endswith("> 4200")  # max_lifetime + 10 min for the last CCD
    sub["ClusterId"], sub["ProcId"] = "812", "0"
    assert condor_split(sub.expand("arguments"))[-3:] == ["pilot", "--config",
                                                         str(tmp_path / "work" / "config" / "20250610.yaml")]
    env = dict(e.split("=", 1) for e in condor_split(sub.expand("environment")))
    assert env == {"OMP_NUM_THREADS": "1", "OPENBLAS_NUM_THREADS": "1", "MKL_NUM_THREADS": "1",
                   "APBATCH_PILOT_ID": "htcondor-812.0"}
    assert sub.expand("output") == f"{backend.state_dir}/pilots/ap-pilot-20250610_812.0.out"


def test_submit_makes_one_pilot_job_per_missing_pilot_and_status_asks_the_schedd(tmp_path):
    schedd = FakeSchedd()
    backend = make_backend(config(tmp_path, pilots=2), schedd=schedd)
    first, second, third = [j.job_id for j in backend.submit(works_of(3), token=TOKEN)]
    assert schedd.count("submit") == 2 and all(c[2] == 1 for c in schedd.calls if c[0] == "submit")
    assert {p["pilot"]: p["state"] for p in backend.pilots()} == {"htcondor-700.0": "starting",
                                                                  "htcondor-701.0": "starting"}
    assert claim_next(backend.state_dir, as_pilot("700.0"))[0] == first
    schedd.queue["700.0"]["JobStatus"] = 2
    assert backend.status([first])[first].state is JobState.RUNNING
    # the pilot is removed (condor_rm, a periodic_remove, a lost node): its CCD is lost, never done,
    # and the CCDs still queued get a new pilot
    schedd.act(htcondor2.JobAction.Remove, ["700.0"], reason="by ops")
    states = backend.status([first, second, third])
    assert states[first].state is JobState.FAILED and "htcondor job 700.0" in states[first].reason
    assert states[second].state is JobState.PENDING and schedd.count("submit") == 3
    assert {p["pilot"]: p["state"] for p in backend.pilots()} == {
        "htcondor-700.0": "lost", "htcondor-701.0": "starting", "htcondor-702.0": "starting"}


def test_cancel_of_a_running_item_removes_its_pilot_job(tmp_path):
    schedd = FakeSchedd()
    backend = make_backend(config(tmp_path, pilots=1), schedd=schedd)
    (job_id,) = [j.job_id for j in backend.submit(works_of(1), token=TOKEN)]
    claim_next(backend.state_dir, as_pilot("700.0"))
    backend.cancel([job_id])
    assert ("act", htcondor2.JobAction.Remove, ["700.0"]) in schedd.calls
    assert backend.status([job_id])[job_id].state is JobState.CANCELLED


def test_schedd_errors_and_bad_values(tmp_path):
    failing = FakeSchedd(fail=htcondor2.HTCondorException("Failed to connect to schedd"))
    backend = make_backend(config(tmp_path), schedd=failing)
    with pytest.raises(SchedulerError, match="Failed to connect"):
        backend.submit(works_of(1), token=TOKEN)
    assert not (backend.state_dir / "jobs").exists() and not any((backend.state_dir / "queue").iterdir())
    assert backend.pilots() == []  # nothing queued, no pilot recorded: the daemon's retry is safe
    with pytest.raises(BadInputError, match="backend.pilot.launcher.htcondor.request_cpus"):
        config(tmp_path, launcher={"kind": "htcondor", "request_cpus": 0})
    bad = make_backend(config(tmp_path, launcher={"kind": "htcondor", "extra_attributes": {"X": "a\nb"}}),
                       schedd=FakeSchedd())
    with pytest.raises(BadInputError, match="extra_attributes.X"):
        bad.render(works_of(1))
