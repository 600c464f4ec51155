"""Tests of apbatch.job.alert_sinks: spool, Avro file sink, Kafka sink against a real broker."""

from __future__ import annotations

import json
import os
import signal
import subprocess
import sys
import time
import uuid
from pathlib import Path

import fastavro
import numpy as np
import pytest
from alert_synth import SMALL, make_ccd, make_images, make_sources
from apbatch.config import KafkaConfig, load_config
from apbatch.errors import BadInputError
from apbatch.job.alert_sinks import (
    AlertSink,
    AlertSpool,
    FileAlertSink,
    KafkaAlertSink,
    deliver,
    flush_spool,
    kafka_settings,
    write_alert_container,
)
from apbatch.job.alerts import AlertBuilder, unframe
from apbatch.job.apdb import Association, create_apdb, open_apdb

SYNTH = Path(__file__).resolve().parent / "alert_synth.py"


@pytest.fixture(scope="module")
def ccd_visit(tmp_path_factory):
    """One synthetic CCD-visit's association result and images."""
    tmp = tmp_path_factory.mktemp("apdb")
    create_apdb(f"sqlite:///{tmp}/apdb.sqlite3", tmp / "apdb.yaml")
    cat = make_sources(25, np.random.default_rng(8), nx=SMALL, ny=SMALL)
    imgs = make_images(np.random.default_rng(0), sources=cat, shape=(SMALL, SMALL))
    assoc = Association(open_apdb(tmp / "apdb.yaml"))
    res = assoc.run(make_ccd(0), cat, imgs["difference"], imgs["science"], 3.0)
    return res, (imgs["science"], imgs["template"], imgs["difference"])


@pytest.fixture(scope="module")
def packets(ccd_visit):
    """Framed alerts of one synthetic CCD-visit, and the builder that made them."""
    builder = AlertBuilder()
    return builder, builder.payloads(ccd_visit[0], *ccd_visit[1])


class _FlakySink(AlertSink):
    """Confirms only the first ``n`` alerts of each send (a broker that goes away)."""

    def __init__(self, n):
        self.n, self.sent = n, []

    def send(self, name, alerts, timeout):
        self.sent += [i for i, _ in alerts[: self.n]]
        return [k < self.n for k in range(len(alerts))]


def test_container_readable_by_fastavro_and_schema(tmp_path, packets):
    builder, payloads = packets
    path = tmp_path / "a.avro"
    bodies = [unframe(p)[1] for _, p in payloads]
    write_alert_container(path, json.dumps(builder.schema.definition), bodies * 2)
    with path.open("rb") as fh:
        records = list(fastavro.reader(fh))
    assert [r["diaSourceId"] for r in records] == [i for i, _ in payloads] * 2
    with path.open("rb") as fh:
        _, again = builder.schema.retrieve_alerts(fh)
        assert len(list(again)) == 50
    assert not list(tmp_path.glob(".*tmp"))


def test_spool_delivery_state_and_order(tmp_path, packets):
    _, payloads = packets
    spool = AlertSpool(tmp_path)
    spool.write("LSSTCam/3700000400000000/094", payloads[:5], 1101)
    spool.write("LSSTCam/3700000000000000/095", payloads[5:8], 1101)
    spool.write("LSSTCam/3700000000000000/094", payloads[8:10], 1101)
    assert spool.pending() == ["LSSTCam/3700000000000000/094", "LSSTCam/3700000000000000/095",
                               "LSSTCam/3700000400000000/094"]
    flaky = _FlakySink(3)
    assert deliver(spool, "LSSTCam/3700000400000000/094", flaky, 1.0) == (5, 3)
    assert deliver(spool, "LSSTCam/3700000400000000/094", flaky, 1.0) == (5, 5)  # only the rest is resent
    assert flaky.sent == [i for i, _ in payloads[:5]]
    assert "LSSTCam/3700000400000000/094" not in spool.pending()  # data file removed once delivered
    assert spool.exists("LSSTCam/3700000400000000/094")
    # a rewrite (a retry that never reached the APDB) resets the delivery record
    spool.write("LSSTCam/3700000000000000/095", payloads[5:8], 1101)
    spool.mark_delivered("LSSTCam/3700000000000000/095", [0])
    spool.write("LSSTCam/3700000000000000/095", payloads[5:8], 1101)
    assert spool.state("LSSTCam/3700000000000000/095")["delivered"] == []
    # flush stops at the first CCD-visit the sink cannot finish: order is kept
    done = flush_spool(spool, _FlakySink(1), 1.0)
    assert done == [("LSSTCam/3700000000000000/094", 2, 1)]


def test_file_sink_writes_official_container(tmp_path, packets):
    builder, payloads = packets
    sink = FileAlertSink(tmp_path)
    assert sink.send("LSSTCam/1/094", payloads, 1.0) == [True] * len(payloads)
    with (tmp_path / "LSSTCam" / "1" / "094.avro").open("rb") as fh:
        records = list(fastavro.reader(fh))
    assert all(builder.schema.validate(r) for r in records)


def test_kafka_settings_secrets_from_env_or_file(tmp_path):
    plain = kafka_settings(KafkaConfig(bootstrap_servers="h:1"), {})
    assert plain == {"bootstrap.servers": "h:1", "security.protocol": "PLAINTEXT"}
    cfg = KafkaConfig(security_protocol="SASL_SSL", sasl_mechanism="SCRAM-SHA-512")
    env = {"APBATCH_KAFKA_USERNAME": "u", "APBATCH_KAFKA_PASSWORD": "p"}
    assert kafka_settings(cfg, env)["sasl.password"] == "p"
    (tmp_path / "pw").write_text("from-file\n")
    filecfg = cfg.model_copy(update={"password_file": str(tmp_path / "pw")})
    assert kafka_settings(filecfg, {"APBATCH_KAFKA_USERNAME": "u"})["sasl.password"] == "from-file"
    with pytest.raises(BadInputError, match="kafka.password_env"):
        kafka_settings(cfg, {"APBATCH_KAFKA_USERNAME": "u"})
    with pytest.raises(BadInputError, match="kafka.username_env"):
        kafka_settings(cfg, {"APBATCH_KAFKA_PASSWORD": "p"})
    (tmp_path / "empty").write_text("\n")
    empty = cfg.model_copy(update={"password_file": str(tmp_path / "empty")})
    with pytest.raises(BadInputError, match=r"^kafka.password_file: '.*empty' is empty \(write the secret"):
        kafka_settings(empty, {"APBATCH_KAFKA_USERNAME": "u"})
    missing = cfg.model_copy(update={"password_file": "nope"})
    with pytest.raises(BadInputError, match=r"^kafka.password_file: cannot read '.*nope'"):
        kafka_settings(missing, {"APBATCH_KAFKA_USERNAME": "u"}, root=tmp_path)


def test_file_sink_declares_the_schema_the_packets_carry(tmp_path, ccd_visit):
    from apbatch.job.alert_schemas import alert_schema

    old = AlertBuilder(schema=alert_schema("10.0"))
    FileAlertSink(tmp_path).send("LSSTCam/1/094", old.payloads(ccd_visit[0], *ccd_visit[1]), 1.0)
    with (tmp_path / "LSSTCam/1/094.avro").open("rb") as fh:
        reader = fastavro.reader(fh)
        assert reader.writer_schema["name"] == "lsst.v10_0.alert"
        assert all(old.schema.validate(r) for r in reader)


def test_kafka_sink_check_fails_fast_without_a_broker():
    from apbatch.errors import RetriableError

    sink = KafkaAlertSink({"bootstrap.servers": "127.0.0.1:1", "reconnect.backoff.max.ms": 200}, "never")
    with pytest.raises(RetriableError, match="no Kafka broker at 127.0.0.1:1"):
        sink.check(1.0)
    sink.close()
    FileAlertSink("/nonexistent").check(1.0)  # nothing to reach


def test_cli_dump_file_and_spool(tmp_path, packets, capsys):
    from apbatch.cli import main

    _, payloads = packets
    AlertSpool(tmp_path / "spool").write("LSSTCam/1/094", payloads, 1101)
    FileAlertSink(tmp_path / "alerts").send("LSSTCam/1/094", payloads, 1.0)
    for path in (tmp_path / "spool" / "LSSTCam/1/094.avro", tmp_path / "alerts" / "LSSTCam/1/094.avro"):
        with pytest.raises(SystemExit) as exc:
            main(["alerts", "dump", str(path), "--json"])
        assert exc.value.code == 0
        summary = json.loads(capsys.readouterr().out)
        assert summary["alerts"] == len(payloads) and summary["rows"][0]["cutoutBytes"] > 0
    (tmp_path / "junk.avro").write_bytes(b"not avro")
    with pytest.raises(SystemExit) as exc:
        main(["alerts", "dump", str(tmp_path / "junk.avro")])
    assert exc.value.code == 2


def test_dump_refuses_avro_that_holds_no_records(tmp_path):
    from apbatch.script.alerts import dump

    path = tmp_path / "ints.avro"
    with path.open("wb") as fh:
        fastavro.writer(fh, fastavro.parse_schema("int"), [1, 2])
    with pytest.raises(BadInputError, match="ints.avro holds 'int' values, not alert records"):
        dump(path)


# ----------------------------------------------------------------------------- real broker
def _consume(bootstrap, topic, expect, timeout=60.0):
    """Decode alerts in a separate process with lsst-alert-stream's AlertConsumer."""
    proc = subprocess.run([sys.executable, str(SYNTH), "consume", "--bootstrap", bootstrap, "--topic", topic,
                           "--expect", str(expect), "--timeout", str(timeout)],
                          capture_output=True, text=True, timeout=timeout + 30,
                          env={**os.environ, "PYTHONPATH": str(SYNTH.parent)})
    assert proc.returncode == 0, proc.stderr[-2000:]
    return [json.loads(line) for line in proc.stdout.splitlines() if line.startswith("{")]


def _topic(bootstrap):
    from confluent_kafka.admin import AdminClient, NewTopic

    name = f"alerts-{uuid.uuid4().hex[:8]}"
    admin = AdminClient({"bootstrap.servers": bootstrap})  # must outlive the future
    admin.create_topics([NewTopic(name, 1, 1)])[name].result(30)
    return name


@pytest.mark.kafka
def test_kafka_alerts_decoded_by_alert_consumer(kafka_broker, packets):
    _, payloads = packets
    topic = _topic(kafka_broker)
    sink = KafkaAlertSink({"bootstrap.servers": kafka_broker}, topic)
    assert all(sink.send("x", payloads, 30.0))
    sink.close()
    got = _consume(kafka_broker, topic, len(payloads))
    assert [g["diaSourceId"] for g in got] == [i for i, _ in payloads]
    assert all(g["valid"] and g["key"] == str(g["diaSourceId"]) for g in got)


@pytest.mark.kafka
def test_broker_unreachable_spool_then_flush(kafka_broker, packets, tmp_path):
    _, payloads = packets
    spool = AlertSpool(tmp_path / "spool")
    names = ["LSSTCam/3700000000000000/094", "LSSTCam/3700000400000000/094"]
    spool.write(names[1], payloads[10:], 1101)
    spool.write(names[0], payloads[:10], 1101)
    dead = KafkaAlertSink({"bootstrap.servers": "127.0.0.1:1", "reconnect.backoff.max.ms": 200}, "never")
    assert deliver(spool, names[0], dead, 2.0) == (10, 0)
    dead.close()
    assert spool.pending() == names
    topic = _topic(kafka_broker)
    cfg = load_config(overrides={"root": str(tmp_path), "alerts": {"sink": "kafka", "topic": topic,
                                                                   "spool_dir": "spool"},
                                 "kafka": {"bootstrap_servers": kafka_broker}}, environ={})
    from apbatch.script.alerts import flush

    assert flush(cfg, timeout=30.0) == [(names[0], 10, 10), (names[1], 15, 15)]
    assert spool.pending() == [] and flush(cfg, timeout=5.0) == []  # a second flush sends nothing
    got = _consume(kafka_broker, topic, len(payloads))
    assert [g["diaSourceId"] for g in got] == [i for i, _ in payloads]  # in order, none twice


@pytest.mark.kafka
def test_sigkill_while_sending_then_retry(kafka_broker, tmp_path):
    create_apdb(f"sqlite:///{tmp_path}/apdb.sqlite3", tmp_path / "apdb.yaml")
    topic = _topic(kafka_broker)
    argv = [sys.executable, str(SYNTH), "job", "--apdb-config", str(tmp_path / "apdb.yaml"), "--spool",
            str(tmp_path / "spool"), "--sink", "kafka", "--bootstrap", kafka_broker, "--topic", topic,
            "--nsources", "12"]
    env = {**os.environ, "PYTHONPATH": str(SYNTH.parent)}
    killed = subprocess.run(argv + ["--kill-at", "delivered:5"], capture_output=True, text=True,
                            timeout=120, env=env)
    assert killed.returncode == -signal.SIGKILL, killed.stderr[-2000:]
    retry = subprocess.run(argv, capture_output=True, text=True, timeout=120, env=env)
    assert retry.returncode == 0, retry.stderr[-2000:]
    report = json.loads(retry.stdout.strip().splitlines()[-1])
    assert report["stored"] is False and report["delivered"] == 12
    got = _consume(kafka_broker, topic, 12)
    ids = [g["diaSourceId"] for g in got]
    assert len(set(ids)) == 12  # every alert at least once (some maybe twice: killed before the record)
    assert all(g["key"] == str(g["diaSourceId"]) for g in got)
    first = {}
    for g in got:
        first.setdefault(g["diaSourceId"], g["key"])
        assert first[g["diaSourceId"]] == g["key"]


@pytest.mark.kafka
def test_default_alert_consumer_decodes_configured_schema_version(kafka_broker, ccd_visit, tmp_path):
    """alerts.schema_version = 11.0: lsst-alert-stream's default AlertConsumer (no schema, no
    registry given) decodes the job's alerts from the broker; with 11.1 it cannot (KeyError 1101)."""
    from apbatch.job.alert_schemas import alert_schema
    from apbatch.job.alert_sinks import make_sink
    from lsst.alert.stream.alertConsumer import AlertConsumer

    topic = _topic(kafka_broker)
    cfg = load_config(environ={}, overrides={"root": str(tmp_path), "alerts": {
        "sink": "kafka", "topic": topic, "schema_version": "11.0"},
        "kafka": {"bootstrap_servers": kafka_broker}})
    builder = AlertBuilder(schema=alert_schema(cfg.alerts.schema_version))
    payloads = builder.payloads(ccd_visit[0], *ccd_visit[1])
    latest = AlertBuilder().payloads(ccd_visit[0], *ccd_visit[1])[:1]
    sink = make_sink(cfg)
    sink.check(10.0)
    assert all(sink.send("LSSTCam/1/094", payloads + latest, 30.0))
    sink.close()
    settings = {"bootstrap.servers": kafka_broker, "group.id": f"g-{uuid.uuid4().hex[:8]}",
                "auto.offset.reset": "earliest", "session.timeout.ms": 6000, "heartbeat.interval.ms": 1000,
                "fetch.wait.max.ms": 10}
    got = []
    with AlertConsumer(topic, **settings) as consumer:
        deadline = time.monotonic() + 60
        while len(got) < len(payloads) and time.monotonic() < deadline:
            schema, alert = consumer.poll(0.5)
            if alert is not None:
                got.append((schema, alert))
        with pytest.raises(KeyError, match="1101"):  # why the setting exists
            while time.monotonic() < deadline:
                consumer.poll(0.5)
    assert [a["diaSourceId"] for _, a in got] == [i for i, _ in payloads]
    assert all(s.get_schema_id() == 1100 and s.validate(a) for s, a in got)
    assert got[0][1]["cutoutScience"] == builder.deserialize(payloads[0][1])["cutoutScience"]
