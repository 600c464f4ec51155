"""Tests of apbatch.backends.htcondor.

No HTCondor daemons can run on this machine (FIELD-NOTES): the submit description, its item
data and attributes go through the REAL ``htcondor2`` bindings (parsing, macro expansion,
itemdata); the schedd calls go to a recording fake with `htcondor2.Schedd`'s interface.
"""

from __future__ import annotations

import shutil
import sys
from pathlib import Path

import classad2
import htcondor2
import pytest
from apbatch.backends.base import JobState
from apbatch.backends.htcondor import HTCondorBackend, condor_arg, executable_argv
from apbatch.config import load_config
from apbatch.errors import BadInputError, SchedulerError
from apbatch.work import CcdWork

GROUP = "2025-06-10T07:31:26.692"
EVIL_GROUP = "2025-06-10T07:31:26.692; rm -rf / $(touch /tmp/pwned) $ENV(HOME) it's \"q\" \\"


def works_of(n: int, group: str = GROUP) -> list[CcdWork]:
    return [CcdWork("LSSTComCam", d, f"R22_S{d // 3}{d % 3}", group, 2025061000578, 20250610, "science",
                    30.0, 2,
                    "http://127.0.0.1:8000", 10.5, -20.25, 45.0, "r_03") for d in range(n)]


class FakeResult:
    def __init__(self, cluster, count):
        self._cluster, self._count = cluster, count

    def cluster(self):
        return self._cluster

    def first_proc(self):
        return 0

    def num_procs(self):
        return self._count


class FakeSchedd:
    """Records calls; same method signatures as `htcondor2.Schedd` for what the backend uses."""

    def __init__(self, queue=(), history=(), cluster=314, fail=None, made=None):
        self.queue, self.history_ads, self.cluster, self.fail = list(queue), list(history), cluster, fail
        self.calls = []

    def submit(self, description, count=0, spool=False, itemdata=None, queue=None):
        assert isinstance(description, htcondor2.Submit)
        items = list(itemdata)
        self.calls.append(("submit", str(description), items))
        if self.fail:
            raise self.fail
        return FakeResult(self.cluster, len(items))

    def query(self, constraint="True", projection=(), callback=None, limit=-1, opts=None):
        self.calls.append(("query", constraint, list(projection)))
        return [ad for ad in self.queue if _matches(ad, constraint)]

    def history(self, constraint=None, projection=(), match=-1, since=None):
        self.calls.append(("history", constraint, list(projection)))
        return [ad for ad in self.history_ads if _matches(ad, constraint)]

    def act(self, action, job_spec, reason=None):
        self.calls.append(("act", action, list(job_spec), reason))
        return classad2.ClassAd({"TotalSuccess": len(job_spec)})


def _matches(ad: classad2.ClassAd, constraint: str) -> bool:
    """Evaluate the backend's constraint with the real ClassAd language."""
    return bool(classad2.ExprTree(constraint).eval(ad))


def ad(cluster, proc, status, **attrs) -> classad2.ClassAd:
    return classad2.ClassAd({"ClusterId": cluster, "ProcId": proc, "JobStatus": status, **attrs})


def make(tmp_path, schedd=None, **backend) -> HTCondorBackend:
    cfg = load_config(environ={}, overrides={
        "root": str(tmp_path), "backend": {"kind": "htcondor", **backend},
        "job": {"command": ["/opt/ap/bin/apbatch", "process-ccd"]}})
    return HTCondorBackend(cfg, schedd=schedd)


def condor_split(arguments: str) -> list[str]:
    """Split HTCondor's new-syntax argument string (quoting rules of the condor_submit manual)."""
    assert arguments.startswith('"') and arguments.endswith('"')
    text = arguments[1:-1].replace('""', '"')
    args, cur, quoted, i, started = [], "", False, 0, False
    while i < len(text):
        c = text[i]
        if c == "'":
            if quoted and text[i + 1:i + 2] == "'":
                cur += "'"
                i += 1
            else:
                quoted, started = not quoted, True
        elif c == " " and not quoted:
            if started:
                args.append(cur)
            cur, started = "", False
        else:
            cur, started = cur + c, True
        i += 1
    if started:
        args.append(cur)
    return args


# ---------------------------------------------------------------- description through the real bindings
def test_render_golden(tmp_path):
    text = make(tmp_path).render(works_of(2))
    log = f"{tmp_path}/logs/htcondor/ap-LSSTComCam-2025061000578"
    env = "'OMP_NUM_THREADS=1' 'OPENBLAS_NUM_THREADS=1' 'MKL_NUM_THREADS=1'"
    night_file = tmp_path / "config" / "20250610.yaml"
    args = ("'--visit' '2025061000578' '--day-obs' '20250610' '--intent' 'science' '--exposure-time' '30.0' "
            "'--nimages' '2' '--distributor' 'http://127.0.0.1:8000' '--ra' '10.5' '--dec' '-20.25' "
            "'--rotation' '45.0' '--filter' 'r_03'")
    assert text == f"""universe = vanilla
executable = /opt/ap/bin/apbatch
arguments = "'process-ccd' '--config' '{night_file}' $(ApArgs)"
environment = "{env}"
getenv = false
transfer_executable = false
should_transfer_files = IF_NEEDED
batch_name = ap-LSSTComCam-2025061000578
request_memory = 4GB
request_cpus = 1
max_retries = 2
success_exit_code = 0
retry_until = ExitBySignal == false
periodic_remove = JobStatus == 2 && time() - JobCurrentStartDate > 600
output = {log}_$(ClusterId).$(ProcId).out
error = {log}_$(ClusterId).$(ProcId).out
log = {log}.log
+ApVisit = 2025061000578
+ApDayObs = 20250610
+ApGroup = "{GROUP}"
+ApInstrument = "LSSTComCam"
+ApIntent = "science"
+ApDetector = $(ApDetector)
+ApDetectorName = "$(ApDetectorName)"
queue ApDetector,ApDetectorName,ApArgs from (
  0, R22_S00, '--instrument' 'LSSTComCam' '--detector' '0' '--group' '{GROUP}' {args}
  1, R22_S01, '--instrument' 'LSSTComCam' '--detector' '1' '--group' '{GROUP}' {args}
)
"""


def test_rendered_description_parses_and_round_trips_itemdata(tmp_path):
    backend = make(tmp_path, request_memory="6GB", request_cpus=2, max_retries=5,
                   extra_attributes={"AccountingGroup": '"rubin.ap"'})
    works = works_of(9, group=EVIL_GROUP)
    sub = htcondor2.Submit(backend.render(works))
    assert list(sub.itemdata()) == backend.itemdata(works)
    assert sub.getQArgs().startswith("ApDetector,ApDetectorName,ApArgs from")
    assert (sub["request_memory"], sub["request_cpus"], sub["max_retries"]) == ("6GB", "2", "5")
    assert sub["MY.AccountingGroup"] == '"rubin.ap"' and sub["batch_name"] == "ap-LSSTComCam-2025061000578"


def test_attributes_and_arguments_expand_to_literal_data(tmp_path):
    """Per proc: set the item's variables, then let the bindings expand the macros as the schedd would."""
    backend = make(tmp_path)
    works = works_of(9, group=EVIL_GROUP)
    for work, item in zip(works, backend.itemdata(works), strict=True):
        sub = htcondor2.Submit(backend.description(works))
        for key, value in item.items():
            sub[key] = value
        assert condor_split(sub.expand("arguments")) == [
            "process-ccd", "--config", str(tmp_path / "config" / "20250610.yaml"), *work.job_args()]
        assert classad2.ExprTree(sub.expand("MY.ApGroup")).eval() == EVIL_GROUP
        assert classad2.ExprTree(sub.expand("MY.ApDetector")).eval() == work.detector
        assert classad2.ExprTree(sub.expand("MY.ApDetectorName")).eval() == work.detector_name
        assert classad2.ExprTree(sub.expand("MY.ApVisit")).eval() == 2025061000578
        assert classad2.ExprTree(sub.expand("MY.ApInstrument")).eval() == "LSSTComCam"
        assert classad2.ExprTree(sub.expand("MY.ApIntent")).eval() == "science"


def test_relative_executable_is_resolved_on_path(tmp_path, monkeypatch):
    (tmp_path / "bin").mkdir()
    exe = tmp_path / "bin" / "apjob"
    exe.write_text("#!/bin/sh\n")
    exe.chmod(0o755)
    monkeypatch.setenv("PATH", f"{tmp_path / 'bin'}:/usr/bin:/bin")
    cfg = load_config(environ={}, overrides={"root": str(tmp_path), "backend": {"kind": "htcondor"},
                                             "job": {"command": ["apjob", "run"]}})
    assert HTCondorBackend(cfg).description(works_of(1))["executable"] == str(exe)


def test_default_command_is_this_installs_apbatch_not_the_one_on_path(tmp_path, monkeypatch):
    """A bare `apbatch` is the script next to the submitting interpreter, whatever PATH says."""
    (tmp_path / "bin").mkdir()
    other = tmp_path / "bin" / "apbatch"
    other.write_text("#!/bin/sh\n")
    other.chmod(0o755)
    monkeypatch.setenv("PATH", f"{tmp_path / 'bin'}:/usr/bin:/bin")
    cfg = load_config(environ={}, overrides={"root": str(tmp_path), "backend": {"kind": "htcondor"}})
    desc = HTCondorBackend(cfg).description(works_of(1))
    mine = Path(sys.executable).absolute().parent / "apbatch"
    assert desc["executable"] == (str(mine) if mine.exists() else str(Path(sys.executable).absolute()))
    assert desc["executable"] != str(other)


def test_line_breaks_cannot_be_expressed_and_are_refused(tmp_path):
    with pytest.raises(BadInputError, match="group_id"):
        make(tmp_path).render(works_of(1, group="2025-06-10T07:31:26.692\nqueue 1000"))
    with pytest.raises(BadInputError, match="line break"):
        condor_arg("a\rb")


# ---------------------------------------------------------------- schedd calls against the fake
def test_submit_is_one_cluster_with_one_item_per_ccd(tmp_path):
    schedd = FakeSchedd(cluster=271)
    backend = make(tmp_path, schedd)
    works = works_of(9)
    jobs = backend.submit(works)
    assert [j.job_id for j in jobs] == [f"271.{i}" for i in range(9)] and [j.work for j in jobs] == works
    (call, description, items), = schedd.calls
    assert call == "submit" and items == backend.itemdata(works)
    assert description == str(htcondor2.Submit(backend.description(works)))
    assert (tmp_path / "logs" / "htcondor").is_dir()
    # the jobs' --config file exists before the schedd can start them, with the resolved config
    night_file = tmp_path / "config" / "20250610.yaml"
    assert f"'--config' '{night_file}'" in htcondor2.Submit(backend.description(works))["arguments"]
    assert load_config(night_file, environ={}) == backend.config


def test_schedd_errors_become_scheduler_errors(tmp_path):
    schedd = FakeSchedd(fail=htcondor2.HTCondorException("Failed to connect to schedd"))
    with pytest.raises(SchedulerError) as err:
        make(tmp_path, schedd).submit(works_of(1))
    assert err.value.argv == ["htcondor2.Schedd.submit"] and "Failed to connect" in err.value.stderr


def test_short_submit_is_an_error(tmp_path):
    schedd = FakeSchedd()
    schedd.submit = lambda description, itemdata=None, **kw: FakeResult(5, 3)
    with pytest.raises(SchedulerError, match="asked for 9 jobs"):
        make(tmp_path, schedd).submit(works_of(9))


def test_status_maps_every_job_status_code(tmp_path, caplog):
    queue = [ad(40, 0, 1), ad(40, 1, 2), ad(40, 2, 5, HoldReason="Job exceeded request_memory"),
             ad(40, 3, 6), ad(40, 4, 7), ad(40, 5, 9), ad(41, 0, 2)]
    history = [ad(40, 6, 4, ExitCode=0, ExitBySignal=False), ad(40, 7, 4, ExitCode=4, ExitBySignal=False),
               ad(40, 8, 4, ExitBySignal=True, ExitSignal=9), ad(40, 9, 3, RemoveReason="via condor_rm"),
               ad(40, 6, 4, ExitCode=3, ExitBySignal=False)]  # an older run of 40.6: newest record wins
    schedd = FakeSchedd(queue, history)
    ids = [f"40.{i}" for i in range(11)]
    states = make(tmp_path, schedd).status(ids)
    assert [(states[j].state, states[j].exit_code) for j in ids] == [
        (JobState.PENDING, None), (JobState.RUNNING, None), (JobState.HELD, None), (JobState.RUNNING, None),
        (JobState.HELD, None), (JobState.UNKNOWN, None), (JobState.COMPLETED, 0), (JobState.FAILED, 4),
        (JobState.FAILED, 137), (JobState.CANCELLED, None), (JobState.UNKNOWN, None)]
    assert states["40.2"].reason == "Job exceeded request_memory" and states["40.9"].reason == "via condor_rm"
    assert "unknown scheduler state '9'" in caplog.text
    assert [c[0] for c in schedd.calls] == ["query", "history"]
    assert schedd.calls[0][1] == "ClusterId == 40" and "JobStatus" in schedd.calls[0][2]
    assert "41.0" not in states


def test_cancel_is_one_remove_action(tmp_path):
    schedd = FakeSchedd()
    backend = make(tmp_path, schedd)
    backend.cancel(["40.1", "40.2"])
    assert schedd.calls == [("act", htcondor2.JobAction.Remove, ["40.1", "40.2"], "apbatch cancel")]
    with pytest.raises(BadInputError, match="not an HTCondor job id"):
        backend.cancel(["40.1 || true"])


def test_schedd_is_made_lazily_by_the_factory(tmp_path):
    made = []
    cfg = load_config(environ={}, overrides={"root": str(tmp_path), "backend": {"kind": "htcondor"}})
    backend = HTCondorBackend(cfg, schedd_factory=lambda: made.append(1) or FakeSchedd())
    assert made == []  # the constructor does no I/O
    backend.status(["1.0"])
    backend.status(["1.0"])
    assert made == [1]


def test_default_schedd_without_daemons_is_a_scheduler_error(tmp_path, monkeypatch):
    monkeypatch.setenv("CONDOR_CONFIG", str(tmp_path / "condor_config"))
    (tmp_path / "condor_config").write_text(f"COLLECTOR_HOST = 127.0.0.1:1\nLOG = {tmp_path}\n")
    cfg = load_config(environ={}, overrides={"root": str(tmp_path), "backend": {"kind": "htcondor"}})
    with pytest.raises(SchedulerError) as err:
        HTCondorBackend(cfg).status(["1.0"])
    assert err.value.argv == ["htcondor2.Schedd"]


# ---------------------------------------------------------------- issue 11: token, retries, wall time, exe
def test_submission_token_is_an_attribute_and_finds_the_procs_queue_then_history(tmp_path):
    token = "abcd0000abcd0000abcd"
    schedd = FakeSchedd(cluster=500)
    backend = make(tmp_path, schedd)
    works = works_of(3)
    backend.submit(works, token=token)
    sub = htcondor2.Submit(schedd.calls[0][1])  # what reached the schedd, parsed by the real bindings
    assert sub["MY.ApSubmitToken"] == f'"{token}"'
    mine = classad2.ClassAd({"ApSubmitToken": token})
    # the procs as the schedd would hold them (attributes from the description and the item data)
    schedd.queue = [ad(500, i, 1, ApDetector=i, ApSubmitToken=token) for i in (0, 2)] + [
        ad(499, 0, 1, ApDetector=1, ApSubmitToken="ffff0000ffff0000ffff"), ad(498, 0, 2, ApDetector=1)]
    assert classad2.ExprTree('ApSubmitToken =?= "abcd0000abcd0000abcd"').eval(mine) is True
    found = backend.find_submitted(works, token, since=0.0)
    assert [(j.work.detector, j.job_id) for j in found] == [(0, "500.0"), (2, "500.2")]
    assert schedd.calls[-1][0] == "query"  # found in the queue: history not read
    schedd.queue = []
    schedd.history_ads = [ad(500, 1, 4, ApDetector=1, ApSubmitToken=token, ExitCode=0)]
    assert [j.job_id for j in backend.find_submitted(works, token, since=0.0)] == ["500.1"]
    assert [c[0] for c in schedd.calls[-2:]] == ["query", "history"]
    assert backend.find_submitted(works, "0000000000000000aaaa", since=0.0) == []
    with pytest.raises(BadInputError, match="submission token"):
        backend.find_submitted(works, 'x" || true || "', since=0.0)
    schedd.fail = None
    schedd.query = lambda **kw: (_ for _ in ()).throw(htcondor2.HTCondorException("no schedd"))
    with pytest.raises(SchedulerError, match="no schedd"):
        backend.find_submitted(works, token, since=0.0)


@pytest.mark.parametrize("code", [0, 2, 3, 4, 5, 126, 127])
def test_htcondor_never_reruns_a_job_that_exited_the_daemon_owns_retries(tmp_path, code):
    desc = htcondor2.Submit(make(tmp_path).description(works_of(1)))
    assert desc["success_exit_code"] == "0" and desc["max_retries"] == "2"
    until = classad2.ExprTree(desc["retry_until"])
    # retry_until true = retries cease: for every documented exit code; a signal-killed job is rerun
    assert until.eval(classad2.ClassAd({"ExitBySignal": False, "ExitCode": code})) is True
    assert until.eval(classad2.ClassAd({"ExitBySignal": True, "ExitSignal": 9})) is False


def test_wall_time_limit_removes_a_long_job_and_it_reads_as_timeout(tmp_path):
    desc = htcondor2.Submit(make(tmp_path, time_limit="00:05:00").description(works_of(1)))
    remove = classad2.ExprTree(desc["periodic_remove"])
    assert str(remove) == "JobStatus == 2 && time() - JobCurrentStartDate > 300"
    assert remove.eval(classad2.ClassAd({"JobStatus": 2, "JobCurrentStartDate": 0})) is True
    assert remove.eval(classad2.ClassAd({"JobStatus": 1, "JobCurrentStartDate": 0})) is False
    assert remove.eval(classad2.ClassAd({"JobStatus": 2, "JobCurrentStartDate": 2**40})) is False
    why = ("The job attribute PeriodicRemove expression "
           "'JobStatus == 2 && time() - JobCurrentStartDate > 300' evaluated to TRUE")
    schedd = FakeSchedd(history=[ad(7, 0, 3, RemoveReason=why), ad(7, 1, 3, RemoveReason="apbatch cancel")])
    states = make(tmp_path, schedd).status(["7.0", "7.1"])
    assert states["7.0"].state is JobState.TIMEOUT and "time limit" in states["7.0"].reason
    assert states["7.1"].state is JobState.CANCELLED
    for bad in ("soon", "0", "00:00"):
        with pytest.raises(BadInputError, match="time_limit"):
            make(tmp_path, time_limit=bad)


def test_env_shebang_executable_runs_by_its_resolved_interpreter(tmp_path):
    """``getenv = false`` gives the job no PATH: ``#!/usr/bin/env python3`` would not start."""
    shim = tmp_path / "apbatch-shim"
    shim.write_text("#!/usr/bin/env python3\nprint('hi')\n")
    shim.chmod(0o755)
    cfg = load_config(environ={}, overrides={"root": str(tmp_path), "backend": {"kind": "htcondor"},
                                             "job": {"command": [str(shim), "process-ccd"]}})
    desc = htcondor2.Submit(HTCondorBackend(cfg, schedd=FakeSchedd()).description(works_of(1)))
    python3 = str(Path(shutil.which("python3")).absolute())
    assert desc["executable"] == python3 and desc["getenv"] == "false"
    assert condor_split(desc["arguments"].replace(" $(ApArgs)", ""))[:2] == [str(shim), "process-ccd"]
    # the install's own script has an absolute interpreter: used as it is
    assert executable_argv([sys.executable, "-V"]) == [sys.executable, "-V"]
    shim.write_text("#!/usr/bin/env no-such-interpreter-xyz\n")
    with pytest.raises(BadInputError, match="no-such-interpreter-xyz"):
        executable_argv([str(shim)])


def test_log_path_is_the_descriptions_output_with_the_jobs_cluster_and_proc(tmp_path):
    schedd = FakeSchedd(cluster=271)
    backend = make(tmp_path, schedd)
    works = works_of(3)
    jobs = backend.submit(works)
    desc = backend.description(works)
    assert desc["output"] == desc["error"]  # stdout and stderr in one file
    for job in jobs:
        cluster, proc = job.job_id.split(".")
        expected = desc["output"].replace("$(ClusterId)", cluster).replace("$(ProcId)", proc)
        assert backend.log_path(job.job_id, job.work) == expected
        assert expected.startswith(f"{tmp_path}/logs/htcondor/{works[0].label}_271.")
    assert backend.log_path("271", works[0]) is None and backend.log_path("271.0") is None
