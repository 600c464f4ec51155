"""Tests of apbatch.monitoring: the daemon's Prometheus metrics (a real HTTP scrape while a daemon
handles events) and the jobs' metrics records (published to and consumed back from the real broker)."""

from __future__ import annotations

import json
import logging
import threading
import time
import urllib.error
import urllib.request
import uuid

import pytest
from apbatch.atomic import write_atomic
from apbatch.backends.base import JobState, JobStatus
from apbatch.config import load_config
from apbatch.dispatcher import Dispatcher
from apbatch.errors import BadInputError
from apbatch.events import parse_event
from apbatch.fanout import fan_out
from apbatch.latency import STAGES
from apbatch.ledger import Ledger
from apbatch.monitoring import DaemonMetrics, job_metrics_record, publish_job_metrics, serve_metrics
from apbatch.monitoring.job_metrics import job_metrics_key
from apbatch.monitoring.prometheus import PORT_FILE
from apbatch.script.daemon import run_daemon
from apbatch.sources.spool import SpoolSource
from prometheus_client.parser import text_string_to_metric_families
from test_dispatcher import FakeBackend, fresh, payload


def samples(text: str) -> dict[tuple, float]:
    """Parsed exposition text: (sample name, sorted label items) -> value."""
    return {(s.name, tuple(sorted(s.labels.items()))): s.value
            for fam in text_string_to_metric_families(text) for s in fam.samples}


def value(text: str, name: str, **labels) -> float:
    return samples(text).get((name, tuple(sorted(labels.items()))), 0.0)


def scrape(url: str) -> str:
    with urllib.request.urlopen(url, timeout=5) as resp:
        assert resp.status == 200
        return resp.read().decode()


def wait_for(predicate, timeout: float = 20.0):
    deadline = time.monotonic() + timeout
    while time.monotonic() < deadline:
        got = predicate()
        if got:
            return got
        time.sleep(0.05)
    raise AssertionError("condition not reached in time")


def stages(raw_to_alerts: float, t0: float = 1_800_000_000.0) -> dict[str, float]:
    """Stage marks of one job: 10 s to prepare, ``raw_to_alerts`` s from raw to alerts."""
    marks = dict(zip(STAGES, (t0, t0 + 10, t0 + 20, t0 + 20.5, t0 + 21, t0 + 22, t0 + 22.5,
                              t0 + 20 + raw_to_alerts, t0 + 21 + raw_to_alerts), strict=True))
    return marks


# ------------------------------------------------------------------ the daemon's endpoint
def test_daemon_metrics_endpoint_counters_move_between_scrapes(tmp_path):
    cfg = load_config(environ={}, overrides={"root": str(tmp_path), "monitoring": {"prometheus_port": 0}})
    ledger = Ledger.from_config(cfg)
    backend = FakeBackend()
    spool = tmp_path / "spool"
    spool.mkdir()
    stop = threading.Event()
    result: dict = {}
    daemon = threading.Thread(target=lambda: result.update(run_daemon(
        cfg, backend=backend, ledger=ledger, source=SpoolSource(spool, settle_time=0.0), stop_event=stop,
        install_signals=False, status_interval=0.1)))
    daemon.start()
    try:
        port_file = tmp_path / PORT_FILE
        port = int(wait_for(lambda: port_file.exists() and port_file.read_text().strip()))
        url = f"http://127.0.0.1:{port}/metrics"
        first = scrape(url)
        assert value(first, "apbatch_submissions_total", backend="fake") == 0

        # as a producer must (spool.py): write under another name, then rename to *.json; with
        # settle_time 0 a file written in place can be read half-written (CI saw a.json empty)
        write_atomic(spool / "a.json", json.dumps(fresh("nextVisit_LSSTComCam.json", time.time())))
        write_atomic(spool / "b.json", '{"kind": "nextVisit", "groupId": ')  # malformed: dead-lettered
        second = wait_for(lambda: (t := scrape(url)) and value(t, "apbatch_events_dead_lettered_total") == 1
                          and value(t, "apbatch_jobs", state="PENDING") == 9 and t)
        assert value(second, "apbatch_events_received_total", kind="nextVisit") == 1
        assert value(second, "apbatch_events_received_total", kind="invalid") == 1
        assert value(second, "apbatch_submissions_total", backend="fake") == 9

        rows = ledger.rows()
        for i, row in enumerate(rows):  # the jobs end: 7 complete, one fails retriably, one for good
            code = 4 if i == 7 else 5 if i == 8 else 0
            backend.states[row.job_id] = JobStatus(row.job_id, JobState.COMPLETED, code)
            if i < 3:
                ledger.record_stages(row.instrument, row.group_id, row.detector, stages(5.0 * (i + 1)))
        third = wait_for(lambda: (t := scrape(url)) and value(t, "apbatch_jobs_ended_total", state="FAILED",
                                                              exit_code="5") == 1
                         and value(t, "apbatch_submissions_total", backend="fake") == 10
                         and value(t, "apbatch_jobs", state="PENDING") == 1 and t)
    finally:
        stop.set()
        daemon.join(30)
    assert not daemon.is_alive() and result == {"submitted": 1, "bad": 1}
    assert value(third, "apbatch_jobs_ended_total", state="COMPLETED", exit_code="0") == 7
    assert value(third, "apbatch_jobs_ended_total", state="FAILED", exit_code="4") == 1  # resubmitted (10th)
    assert value(third, "apbatch_jobs", state="PENDING") == 1
    assert value(third, "apbatch_jobs", state="RUNNING") == 0
    assert value(third, "apbatch_stage_seconds_count", interval="raw_to_alerts") == 3
    assert value(third, "apbatch_stage_seconds_sum", interval="raw_to_alerts") == pytest.approx(30.0)
    assert value(third, "apbatch_stage_seconds_bucket", interval="raw_to_alerts", le="10.0") == 2
    assert value(third, "apbatch_stage_seconds_count", interval="prepare") == 3
    with pytest.raises(urllib.error.URLError):  # stopped with the daemon: the port is released
        scrape(url)
    assert not port_file.exists()


def test_dispatcher_counts_refusals_and_endings_by_exit_code(tmp_path):
    cfg = load_config(environ={}, overrides={"root": str(tmp_path)})
    ledger = Ledger.from_config(cfg)
    backend = FakeBackend(fail_submits=1)
    metrics = DaemonMetrics()
    disp = Dispatcher(cfg, ledger, backend, metrics=metrics, clock=time.time)
    assert disp.handle(parse_event(fresh("nextVisit_LATISS.json", time.time()))).action == "submit-failed"
    assert value(metrics.text(), "apbatch_submit_failures_total", backend="fake") == 1
    assert value(metrics.text(), "apbatch_jobs", state="SUBMIT_FAILED") == 0  # no poll yet
    disp.poll_jobs()  # resubmits the refused CCD
    job = ledger.rows()[0].job_id
    backend.states[job] = JobStatus(job, JobState.TIMEOUT)
    disp.poll_jobs()
    text = metrics.text()
    assert value(text, "apbatch_submissions_total", backend="fake") == 1
    assert value(text, "apbatch_jobs_ended_total", state="TIMEOUT", exit_code="none") == 1
    assert value(text, "apbatch_jobs", state="PENDING") == 0
    disp.poll_jobs()  # an ended job is counted once
    assert value(metrics.text(), "apbatch_jobs_ended_total", state="TIMEOUT", exit_code="none") == 1
    ledger.close()


def test_metrics_are_private_per_daemon():
    a, b = DaemonMetrics(), DaemonMetrics()
    a.event_received("nextVisit")
    assert value(a.text(), "apbatch_events_received_total", kind="nextVisit") == 1
    assert value(b.text(), "apbatch_events_received_total", kind="nextVisit") == 0


def test_metrics_only_on_loopback(tmp_path):
    with pytest.raises(BadInputError, match="monitoring.prometheus_host.*loopback"):
        load_config(environ={}, overrides={"monitoring": {"prometheus_host": "0.0.0.0"}})
    with pytest.raises(BadInputError, match="loopback"):
        serve_metrics(DaemonMetrics(), 0, host="0.0.0.0")
    server = serve_metrics(DaemonMetrics(), 0, port_file=tmp_path / "port")
    try:
        assert (tmp_path / "port").read_text() == f"{server.port}\n" and server.port > 0
        with pytest.raises(BadInputError, match="monitoring.prometheus_port"):  # taken
            serve_metrics(DaemonMetrics(), server.port)
    finally:
        server.close()
    assert not (tmp_path / "port").exists()


# ------------------------------------------------------------------ the jobs' records
WORKS = fan_out(parse_event(payload("nextVisit_LSSTComCam.json")), load_config(environ={}))
WORK = WORKS[4]


def test_record_carries_identity_metrics_and_intervals():
    rec = job_metrics_record(WORK, {"status": "ok", "n_dia_sources": 12}, stages(8.0), "123_4", now=5.0)
    assert job_metrics_key(WORK) == f"LSSTComCam/{WORK.visit}/4" and WORK.detector == 4
    assert rec["status"] == "ok" and rec["n_dia_sources"] == 12 and rec["job_id"] == "123_4"
    assert (rec["visit"], rec["detector"], rec["day_obs"]) == (WORK.visit, 4, WORK.day_obs)
    assert rec["intervals"]["raw_to_alerts"] == 8.0 and rec["published_at"] == 5.0
    failed = job_metrics_record(WORK, None, {"started": 1.0}, None)
    assert failed["status"] == "failed" and failed["intervals"] == {}


def _topic(bootstrap: str) -> str:
    """A new one-partition topic."""
    from confluent_kafka.admin import AdminClient, NewTopic

    name = f"job-metrics-{uuid.uuid4().hex[:8]}"
    admin = AdminClient({"bootstrap.servers": bootstrap})  # must outlive the future
    admin.create_topics([NewTopic(name, 1, 1)])[name].result(30)
    return name


def _consume(bootstrap: str, topic: str, n: int, timeout: float = 30.0) -> list:
    from confluent_kafka import OFFSET_BEGINNING, Consumer, TopicPartition

    consumer = Consumer({"bootstrap.servers": bootstrap, "group.id": f"t-{uuid.uuid4().hex[:6]}",
                         "enable.auto.commit": False, "fetch.wait.max.ms": 10})
    consumer.assign([TopicPartition(topic, 0, OFFSET_BEGINNING)])
    got: list = []
    deadline = time.monotonic() + timeout
    try:
        while len(got) < n and time.monotonic() < deadline:
            msg = consumer.poll(0.5)
            if msg is not None and msg.error() is None:
                got.append(msg)
    finally:
        consumer.close()
    return got


@pytest.mark.kafka
def test_job_metrics_published_to_the_real_broker(kafka_broker, tmp_path):
    topic = _topic(kafka_broker)
    cfg = load_config(environ={}, overrides={"root": str(tmp_path),
                                             "kafka": {"bootstrap_servers": kafka_broker},
                                             "monitoring": {"job_metrics_topic": topic}})
    ok = publish_job_metrics(cfg, WORK, {"status": "ok", "n_dia_sources": 7}, stages(6.5), job_id="local-3")
    assert ok
    failed_work = WORKS[5]
    assert publish_job_metrics(cfg, failed_work, None, {"started": 1.0, "prepared": 3.0})
    msgs = _consume(kafka_broker, topic, 2)
    assert [m.key().decode() for m in msgs] == [f"LSSTComCam/{WORK.visit}/4", f"LSSTComCam/{WORK.visit}/5"]
    first, second = (json.loads(m.value()) for m in msgs)
    assert first["n_dia_sources"] == 7 and first["job_id"] == "local-3"
    assert first["intervals"]["raw_to_alerts"] == 6.5 and first["stages"]["alerts_sent"] == stages(6.5)[
        "alerts_sent"]
    assert second["status"] == "failed" and second["intervals"] == {"prepare": 2.0}


def test_unreachable_broker_never_fails_the_job(tmp_path, caplog):
    from conftest import free_port

    cfg = load_config(environ={}, overrides={
        "root": str(tmp_path), "kafka": {"bootstrap_servers": f"127.0.0.1:{free_port()}"},
        "monitoring": {"job_metrics_topic": "job-metrics"}})
    t0 = time.monotonic()
    with caplog.at_level(logging.WARNING, logger="apbatch.monitoring.job_metrics"):
        assert publish_job_metrics(cfg, WORK, {"status": "ok"}, stages(5.0), timeout=1.0) is False
    assert time.monotonic() - t0 < 10
    assert "could not publish the job's metrics to job-metrics" in caplog.text
    off = load_config(environ={}, overrides={"root": str(tmp_path)})
    assert publish_job_metrics(off, WORK, {"status": "ok"}, {}) is False  # no topic: nothing tried


@pytest.mark.kafka
def test_process_ccd_publishes_its_record_also_when_it_fails(kafka_broker, tmp_path, monkeypatch):
    """The hook in `apbatch.script.process_ccd`: the job's ap_metrics + stages, or ``failed``."""
    import types

    from apbatch.errors import RetriableError
    from apbatch.job import task
    from apbatch.script.process_ccd import process_ccd

    topic = _topic(kafka_broker)
    cfg = load_config(environ={}, overrides={"root": str(tmp_path),
                                             "kafka": {"bootstrap_servers": kafka_broker},
                                             "monitoring": {"job_metrics_topic": topic}})
    monkeypatch.setenv("APBATCH_JOB_ID", "local-42")
    deps = types.SimpleNamespace(butler_io=None, distributor=None, alerts=None)

    def ok(work, deps_, *, clock, **kw):
        clock.mark("raw_available", clock.marks["started"] + 1.0)
        clock.mark("alerts_sent", clock.marks["started"] + 4.5)
        return task.CcdResult(status="ok", n_dia_sources=3, stages=clock.to_dict())

    monkeypatch.setattr(task, "run_ccd", ok)
    assert process_ccd(cfg, WORKS[0], deps=deps)["n_dia_sources"] == 3

    def broken(work, deps_, **kw):
        raise ZeroDivisionError("boom")

    monkeypatch.setattr(task, "run_ccd", broken)
    with pytest.raises(RetriableError):
        process_ccd(cfg, WORKS[1], deps=deps)
    msgs = _consume(kafka_broker, topic, 2)
    assert [m.key().decode() for m in msgs] == [job_metrics_key(WORKS[0]), job_metrics_key(WORKS[1])]
    good, bad = (json.loads(m.value()) for m in msgs)
    assert good["status"] == "ok" and good["n_dia_sources"] == 3 and good["job_id"] == "local-42"
    assert good["intervals"]["raw_to_alerts"] == 3.5
    assert bad["status"] == "failed" and bad["detector"] == WORKS[1].detector and "started" in bad["stages"]
