"""Tests for apbatch.ocps.service (with the runner, the local backend, a butler and a real broker).

A simulated LSSTComCam group (one visit of two snaps, one CCD: R22_S11) and a bias are made
once per module; the distributor holds their raws; the butler has the exposures registered,
calibrations and templates ingested, so ``process-ccd`` really runs for ``ap`` and
``calib-verify``. The many-request, sync and restart tests run the service, runner, backend,
ledger and broker for real, but give the service a per-CCD ``job.command`` that only sleeps:
60 real CCD jobs do not fit in a test on two shared cores (the requests' own CCD work is what
the other tests cover).
"""

from __future__ import annotations

import json
import sys
import time
import uuid
from pathlib import Path

import pytest
from apbatch.config import load_config
from apbatch.errors import BadInputError
from apbatch.ocps.events import KafkaEventPublisher
from apbatch.ocps.model import BusyError, DataId, Phase, UnknownRequestError
from apbatch.ocps.service import Service

INSTRUMENT = "LSSTComCam"
pytestmark = pytest.mark.kafka


@pytest.fixture(scope="module")
def site(tmp_path_factory):
    """(root directory, night manifest): a repository, a distributor with the raws, no ledger yet."""
    from apbatch.distributor.store import DistributorStore
    from apbatch.raw import read_raw_header, translate_header
    from apbatch.script import repo as repo_script
    from apbatch.script.sim import sim_night

    out = tmp_path_factory.mktemp("ocps")
    night = out / "night"
    sim_night(night, INSTRUMENT, 1, 5, detectors=["4"], calibrations={"BIAS": 1})
    plan = json.loads((night / "night.json").read_text())
    repo = out / "work" / "butler"
    repo_script.create(repo)
    repo_script.register(repo, INSTRUMENT, night, (20251015,))
    repo_script.ingest(repo, night / "calibs", night / "templates")
    store = DistributorStore(out / "work" / "distributor")
    for path in sorted((night / "raw").rglob("*.fits")):
        store.deliver(path, translate_header(read_raw_header(path)))
    visit = plan["visits"][0]
    return out, {"group": visit["group_id"], "bias": "CC_C_20251015_000001",
                 "snaps": [f"CC_O_20251015_{e['seq_num']:06d}" for e in visit["exposures"]]}


def _config(root: Path, bootstrap: str, topic: str, job: dict | None = None, **ocps):
    data = {"root": str(root / "work"), "backend": {"kind": "local", "max_workers": 2},
            "job": {"distributor": str(root / "work" / "distributor"), "repo": "butler", "threads": 1},
            "events": {"detectors": {INSTRUMENT: [4]}},
            "kafka": {"bootstrap_servers": bootstrap},
            "ocps": {"poll_interval": 0.2, "completion_topic": topic, "telemetry_topic": f"{topic}-telemetry",
                     "ledger_url": f"sqlite:///ocps/{topic}.sqlite3", **ocps}}
    data["job"].update(job or {})
    return load_config(overrides=data, environ={})


def _sleeper(seconds: float) -> dict:
    return {"command": [sys.executable, "-c", f"import time; time.sleep({seconds})"]}


def _topics(bootstrap: str) -> str:
    from confluent_kafka.admin import AdminClient, NewTopic

    name = f"ocps-{uuid.uuid4().hex[:8]}"
    admin = AdminClient({"bootstrap.servers": bootstrap})
    for f in admin.create_topics([NewTopic(name, 1, 1), NewTopic(f"{name}-telemetry", 1, 1)]).values():
        f.result(30)
    return name


def _consume(bootstrap: str, topic: str, expect: int, timeout: float = 60.0,
             settle: float = 2.0) -> list[dict]:
    """Every message of ``topic`` once ``expect`` arrived and nothing more came for ``settle`` s."""
    from confluent_kafka import OFFSET_BEGINNING, Consumer, TopicPartition

    c = Consumer({"bootstrap.servers": bootstrap, "group.id": uuid.uuid4().hex, "enable.auto.commit": False,
                  "fetch.wait.max.ms": 10, "session.timeout.ms": 6000})
    c.assign([TopicPartition(topic, 0, OFFSET_BEGINNING)])
    got: list[dict] = []
    deadline = time.monotonic() + timeout
    quiet_until = None
    try:
        while time.monotonic() < deadline:
            msg = c.poll(0.2)
            if msg is not None and not msg.error():
                got.append(json.loads(msg.value()))
                quiet_until = None
            if len(got) >= expect:
                quiet_until = quiet_until or time.monotonic() + settle
                if time.monotonic() > quiet_until:
                    break
    finally:
        c.close()
    return got


def _service(cfg) -> Service:
    svc = Service(cfg, publisher=KafkaEventPublisher.from_config(cfg))
    svc.start()
    return svc


def _wait_final(svc: Service, ids, timeout: float) -> dict:
    deadline = time.monotonic() + timeout
    out = {}
    for i in ids:
        out[i] = svc.wait(i, max(deadline - time.monotonic(), 0.0), phase=None)
        while not out[i].phase.final and time.monotonic() < deadline:
            out[i] = svc.wait(i, max(deadline - time.monotonic(), 0.0))
    return out


@pytest.fixture(scope="module")
def processed(site, kafka_broker):
    """The group processed by a real ``ap`` request, a real ``calib-verify`` of the bias, then ``gather``."""
    root, names = site
    topic = _topics(kafka_broker)
    cfg = _config(root, kafka_broker, topic)
    svc = _service(cfg)
    try:
        ap = svc.create("ap", DataId(INSTRUMENT, group_id=names["group"]), run=True)
        cv = svc.create("calib-verify", DataId(INSTRUMENT, obsid=names["bias"]), run=True)
        done = _wait_final(svc, [ap.id, cv.id], 600)
        gather = svc.create("gather", DataId(INSTRUMENT, group_id=names["group"]), run=True)
        done.update(_wait_final(svc, [gather.id], 120))
    finally:
        svc.stop()
    events = _consume(kafka_broker, topic, 3)
    telemetry = _consume(kafka_broker, f"{topic}-telemetry", 2)
    return {"ap": done[ap.id], "cv": done[cv.id], "gather": done[gather.id], "events": events,
            "telemetry": telemetry, "cfg": cfg}


def test_ap_request_runs_the_real_job_with_telemetry(processed):
    ap = processed["ap"]
    assert ap.phase is Phase.COMPLETED, ap.error
    assert ap.results["ccds"]["R22_S11"]["state"] == "COMPLETED" and len(ap.jobs) == 1
    (tel,) = ap.telemetry
    assert tel["detector_name"] == "R22_S11" and tel["status"] == "done" and tel["exit_code"] == 0
    assert tel["n_sources"] > 50 and tel["n_dia_sources"] is not None
    assert tel["centroid_ra"] is not None and -30 < tel["centroid_dec"] < -20  # the simulated field
    on_broker = [t for t in processed["telemetry"] if t["request_id"] == ap.id]
    assert on_broker == [tel]


def test_no_association_and_own_output_run(processed):
    """An OCPS ap job writes into <instrument>/ocps/<day_obs>, never the APDB or alerts."""
    from lsst.daf.butler import Butler

    cfg = processed["cfg"]
    assert not cfg.path(cfg.apdb.config_file).exists() and not cfg.path(cfg.alerts.directory).exists()
    butler = Butler.from_config(str(cfg.path("butler")))
    refs = butler.query_datasets("ap_metrics", collections=f"{INSTRUMENT}/ocps/20251015", explain=False)
    assert len(refs) == 1
    assert butler.get(refs[0])["alerts"] == {}


def test_calib_verify_results_are_the_verdicts(processed):
    cv = processed["cv"]
    assert cv.phase is Phase.COMPLETED, cv.error
    verdict = cv.results["verification"]["R22_S11"]
    assert verdict["passed"] is True and verdict["exposures"] == ["CC_C_20251015_000001"]


def test_gather_writes_summary_and_focal_plane(processed):
    g = processed["gather"]
    assert g.phase is Phase.COMPLETED, g.error
    png, js = Path(g.results["gather_png"]), Path(g.results["gather_json"])
    assert png.read_bytes()[:8] == b"\x89PNG\r\n\x1a\n" and png.parent.name == g.id
    summary = json.loads(js.read_text())
    ccd = summary["ccds"]["R22_S11"]
    assert ccd["state"] == "COMPLETED" and ccd["n_sources"] == processed["ap"].telemetry[0]["n_sources"]


def test_one_completion_event_per_request(processed):
    events = processed["events"]
    ids = [processed[k].id for k in ("ap", "cv", "gather")]
    assert sorted(e["request_id"] for e in events) == sorted(ids)
    ap = next(e for e in events if e["request_id"] == ids[0])
    assert ap["phase"] == "COMPLETED" and ap["success"] is True and ap["ccds"] == {"done": 1, "failed": 0}
    assert ap["jobs"] == list(processed["ap"].jobs)
    assert ap["data_id"]["group_id"] == processed["ap"].data_id.group_id


def test_never_ingested_obsid_fails_with_the_reason(site, kafka_broker):
    root, _ = site
    topic = _topics(kafka_broker)
    svc = _service(_config(root, kafka_broker, topic))
    try:
        req = svc.create("ap", DataId(INSTRUMENT, obsid="CC_O_20251015_000099", detector=4),
                         overrides={"job.raw_timeout": "2"}, run=True)  # sent before its data exist: not held
        done = _wait_final(svc, [req.id], 180)[req.id]
    finally:
        svc.stop()
    assert done.phase is Phase.ERROR and "exit 3 (raw_timeout)" in done.error and "R22_S11" in done.error
    (event,) = _consume(kafka_broker, topic, 1)
    assert event["request_id"] == req.id and event["success"] is False and event["reason"] == done.error
    assert event["ccds"] == {"done": 0, "failed": 1}


def test_bad_requests_are_refused_at_once(site, kafka_broker):
    root, names = site
    svc = Service(_config(root, kafka_broker, _topics(kafka_broker)),
                  publisher=KafkaEventPublisher.from_config(_config(root, kafka_broker, "unused")))
    try:
        for call, field in [
            (lambda: svc.create("nope", DataId(INSTRUMENT, obsid=names["bias"])), "pipeline"),
            (lambda: svc.create("ap", DataId(INSTRUMENT, obsid=names["bias"]), overrides={"job.nope": "1"}),
             "overrides.job.nope"),
            (lambda: svc.create("ap", DataId(INSTRUMENT, obsid=names["bias"]),
                                overrides={"job.command": "[sh]"}), "overrides.job.command"),
        ]:
            with pytest.raises(BadInputError) as info:
                call()
            assert info.value.field == field
        assert svc.list() == []
        with pytest.raises(UnknownRequestError):
            svc.get("nothere")
    finally:
        svc.stop()


def test_async_twenty_requests_all_complete_with_events_and_telemetry(site, processed, kafka_broker):
    root, names = site
    topic = _topics(kafka_broker)
    svc = _service(_config(root, kafka_broker, topic, max_concurrent=4, job=_sleeper(0.2)))
    three = {"events.detectors.LSSTComCam": "[0, 4, 8]"}
    try:
        t0 = time.monotonic()
        reqs = [svc.create("ap", DataId(INSTRUMENT, obsid=f"CC_O_20251015_{100 + i:06d}"), overrides=three,
                           run=True) for i in range(18)]
        reqs.append(svc.create("calib-verify", DataId(INSTRUMENT, obsid=names["bias"]), run=True))
        reqs.append(svc.create("gather", DataId(INSTRUMENT, group_id=names["group"]), run=True))
        assert time.monotonic() - t0 < 5  # async: nothing waits for the jobs
        done = _wait_final(svc, [r.id for r in reqs], 300)
    finally:
        svc.stop()
    assert {i: r.phase for i, r in done.items()} == {r.id: Phase.COMPLETED for r in reqs}
    assert all(len(done[r.id].telemetry) == 3 and len(done[r.id].jobs) == 3 for r in reqs[:18])
    events = _consume(kafka_broker, topic, 20)
    assert sorted(e["request_id"] for e in events) == sorted(r.id for r in reqs)  # 20, none twice
    telemetry = _consume(kafka_broker, f"{topic}-telemetry", 18 * 3 + 1)
    per_ccd = {(t["request_id"], t["detector"]) for t in telemetry}
    assert len(telemetry) == len(per_ccd) == 18 * 3 + 1
    assert {t["detector_name"] for t in telemetry} == {"R22_S00", "R22_S11", "R22_S22"}


def test_sync_mode_refuses_a_second_request_while_one_runs(site, kafka_broker):
    root, names = site
    topic = _topics(kafka_broker)
    svc = _service(_config(root, kafka_broker, topic, mode="sync", job=_sleeper(3.0)))
    try:
        first = svc.create("ap", DataId(INSTRUMENT, obsid="CC_O_20251015_000200", detector=4), run=True)
        with pytest.raises(BusyError):
            svc.create("ap", DataId(INSTRUMENT, obsid="CC_O_20251015_000201", detector=4), run=True)
        second = svc.create("ap", DataId(INSTRUMENT, obsid="CC_O_20251015_000201", detector=4))
        assert second.phase is Phase.PENDING and second.mode == "sync"
        assert svc.wait(first.id, 10.0, Phase.QUEUED).phase in (Phase.EXECUTING, Phase.COMPLETED)
        with pytest.raises(BusyError):
            svc.run(second.id)
        assert _wait_final(svc, [first.id], 120)[first.id].phase is Phase.COMPLETED
        svc.run(second.id)
        assert _wait_final(svc, [second.id], 120)[second.id].phase is Phase.COMPLETED
    finally:
        svc.stop()
    assert sorted(e["request_id"] for e in _consume(kafka_broker, topic, 2)) == sorted([first.id, second.id])


def test_restart_with_five_queued_completes_each_once(site, kafka_broker):
    root, _ = site
    topic = _topics(kafka_broker)
    cfg = _config(root, kafka_broker, topic, max_concurrent=1, job=_sleeper(1.0))
    first = _service(cfg)
    ids = [first.create("ap", DataId(INSTRUMENT, obsid=f"CC_O_20251015_{300 + i:06d}", detector=4),
                        run=True).id for i in range(5)]
    assert first.wait(ids[0], 10.0, Phase.QUEUED).phase is Phase.EXECUTING
    first.stop()  # one executing, four queued
    assert sum(first.store.get(i).phase is Phase.QUEUED for i in ids) >= 4
    second = _service(cfg)  # a new process would do the same: everything is in the database
    try:
        done = _wait_final(second, ids, 180)
    finally:
        second.stop()
    assert all(r.phase is Phase.COMPLETED for r in done.values()), {i: r.error for i, r in done.items()}
    events = _consume(kafka_broker, topic, 5, settle=3.0)
    assert sorted(e["request_id"] for e in events) == sorted(ids)
