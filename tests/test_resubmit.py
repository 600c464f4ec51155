"""Tests of apbatch.script.resubmit and ``apbatch resubmit``: rerun CCDs that failed for good."""

from __future__ import annotations

import json
from pathlib import Path

import apbatch.backends
import pytest
import yaml
from apbatch.cli import main
from apbatch.config import load_config
from apbatch.errors import BadInputError
from apbatch.ledger import Ledger
from apbatch.script.resubmit import resubmit_ccds
from apbatch.states import JobState, JobStatus, SubmissionState
from test_dispatcher import FakeBackend

DATA = Path(__file__).resolve().parent / "data" / "events"
GROUP = "2024-11-09T06:33:55.311"  # nextVisit_LSSTComCam.json: 9 CCDs, visit 3110636353110000
VISIT = "3110636353110000"


@pytest.fixture
def env(tmp_path, monkeypatch):
    """A submitted ComCam visit whose jobs ended: S00 COMPLETED, S01 FAILED 5, S02 FAILED 127,
    S10 TIMEOUT, S11 RUNNING, the rest FAILED 4 with max_attempts used up."""
    monkeypatch.delenv("APBATCH_CONFIG", raising=False)
    cfg_file = tmp_path / "apbatch.yaml"
    cfg_file.write_text(yaml.safe_dump({"root": str(tmp_path / "work"), "events": {"max_attempts": 1}}))
    backend = FakeBackend()
    monkeypatch.setattr(apbatch.backends, "make_backend", lambda config, **deps: backend)
    with pytest.raises(SystemExit):
        main(["submit", str(DATA / "nextVisit_LSSTComCam.json"), "--config", str(cfg_file)])
    ends = {"fake-1": (JobState.COMPLETED, 0), "fake-2": (JobState.COMPLETED, 5),
            "fake-3": (JobState.FAILED, 127), "fake-4": (JobState.TIMEOUT, None),
            "fake-5": (JobState.RUNNING, None)}
    ledger = Ledger.from_config(load_config(cfg_file, environ={}))
    ledger.update_states({f"fake-{i}": JobStatus(f"fake-{i}", *ends.get(f"fake-{i}", (JobState.FAILED, 4)))
                          for i in range(1, 10)}, "fake")
    yield {"config": str(cfg_file), "backend": backend, "ledger": ledger,
           "cfg": load_config(cfg_file, environ={})}
    ledger.close()


def run(capsys, *args):
    with pytest.raises(SystemExit) as exc:
        main(list(args))
    out, err = capsys.readouterr()
    return exc.value.code, out, err


def states(ledger):
    return {r.detector_name: (r.state, r.attempts) for r in ledger.rows()}


def test_resubmit_whole_visit_skips_completed_and_running(env, capsys):
    code, out, err = run(capsys, "resubmit", VISIT, "--config", env["config"])
    assert code == 0
    redone = {line.split("\t")[2]: line.split("\t")[3] for line in out.splitlines()}
    assert sorted(redone) == ["R22_S01", "R22_S02", "R22_S10", "R22_S12", "R22_S20", "R22_S21", "R22_S22"]
    assert redone["R22_S01"] == "was FAILED exit 5" and redone["R22_S02"] == "was FAILED exit 127"
    assert "skipped: COMPLETED=1 RUNNING=1" in err
    after = states(env["ledger"])
    assert after["R22_S00"] == (SubmissionState.COMPLETED, 1)
    assert after["R22_S11"] == (SubmissionState.RUNNING, 1)
    # a new attempt each, past max_attempts (a person decided)
    assert {after[n] for n in redone} == {(SubmissionState.PENDING, 2)}
    assert len(env["backend"].batches) == 2 and len(env["backend"].batches[1]) == 7  # one batch for the visit


def test_resubmit_some_detectors_by_group(env, capsys):
    code, out, _ = run(capsys, "resubmit", GROUP, "R22_S01", "4", "--config", env["config"], "--json")
    res = json.loads(out)
    assert code == 0 and [i["detector_name"] for i in res["resubmitted"]] == ["R22_S01"]
    assert res["skipped"] == {"RUNNING": 1}  # detector 4 is R22_S11, still running
    code, _, err = run(capsys, "resubmit", GROUP, "R22_S11", "--config", env["config"])
    assert code == 2 and "nothing to resubmit" in err and "1 RUNNING" in err
    code, _, err = run(capsys, "resubmit", GROUP, "R99_S99", "--config", env["config"])
    assert code == 2 and "no detector 'R99_S99'" in err
    code, _, err = run(capsys, "resubmit", "2099-01-01T00:00:00.000", "--config", env["config"])
    assert code == 2 and "no submissions recorded" in err


def test_dry_run_changes_nothing(env):
    before = env["ledger"].rows()
    res = resubmit_ccds(env["cfg"], VISIT, dry_run=True, ledger=env["ledger"], backend=env["backend"])
    assert len(res["resubmitted"]) == 7 and {i["job_id"] for i in res["resubmitted"]} == {None}
    assert env["ledger"].rows() == before and len(env["backend"].batches) == 1


def test_a_ccd_another_process_resubmitted_first_is_left_to_it(env):
    """resubmit reads the rows, a daemon wins one of them in between: that one is not submitted again."""
    ledger, backend = env["ledger"], env["backend"]
    real_rows = ledger.rows

    def rows_then_race(**kw):
        rows = real_rows(**kw)
        s01 = [r for r in rows if r.detector_name == "R22_S01"]
        assert ledger.reclaim(s01) == [s01[0].id]  # the other process's compare-and-set
        return rows

    ledger.rows = rows_then_race
    res = resubmit_ccds(env["cfg"], VISIT, ledger=ledger, backend=backend)
    ledger.rows = real_rows
    assert res["taken"] == 1 and "R22_S01" not in [i["detector_name"] for i in res["resubmitted"]]
    assert len(res["resubmitted"]) == 6


def test_resubmit_refuses_to_create_a_ledger(tmp_path):
    cfg = load_config(environ={}, overrides={"root": str(tmp_path / "nowhere")})
    with pytest.raises(BadInputError, match="no ledger at"):
        resubmit_ccds(cfg, VISIT)
    assert not (tmp_path / "nowhere").exists()


def test_resubmit_of_a_claim_whose_submitter_died_after_the_scheduler_took_it_records_it(env):
    """``apbatch resubmit`` of a stale CLAIMED row: the scheduler has its jobs (token) -> recorded."""
    ledger, backend = env["ledger"], env["backend"]
    row = next(r for r in ledger.rows() if r.detector_name == "R22_S01")  # FAILED 5
    token = "abcd0000abcd0000abcd"
    assert ledger.reclaim([row], now=1000.0, tokens={(row.instrument, row.group_id): token}) == [row.id]
    backend.submit([row.work], token=token)  # accepted; the resubmitting process died before recording
    n_batches = len(backend.batches)
    res = resubmit_ccds(env["cfg"], VISIT, detectors=["R22_S01"], ledger=ledger, backend=backend, now=2000.0)
    assert res["resubmitted"] == [] and res["taken"] == 0 and len(backend.batches) == n_batches
    assert [i["job_id"] for i in res["recovered"]] == [backend.tokens[token][0].job_id]
    after = next(r for r in ledger.rows() if r.detector_name == "R22_S01")
    assert (after.state, after.attempts, after.job_id) == ("PENDING", 2, backend.tokens[token][0].job_id)
