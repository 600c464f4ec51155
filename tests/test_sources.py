"""Tests of apbatch.sources: spool directory, stdin, Kafka (fake consumer and a real broker)."""

from __future__ import annotations

import io
import json
import os
import time
import uuid

import pytest
from apbatch.config import load_config
from apbatch.errors import BadInputError
from apbatch.events import parse_event
from apbatch.sources import make_source
from apbatch.sources.kafka import KafkaSource, consumer_config
from apbatch.sources.spool import SpoolSource, split_events
from apbatch.sources.stdin import StdinSource


def drop(directory, name, text, mtime=None):
    """Write like a producer: temp name, then rename."""
    directory.mkdir(parents=True, exist_ok=True)
    tmp = directory / f".{name}.tmp"
    tmp.write_text(text)
    os.replace(tmp, directory / name)
    if mtime is not None:
        os.utime(directory / name, (mtime, mtime))


# ---------------------------------------------------------------------------------- spool
def values(records):
    """Payloads of decoded records; the error's text (field: problem) for bad ones."""
    return [rec.payload if rec.error is None else f"BAD {rec.error.field}: {rec.error.problem}"
            for rec in records]


def test_split_events_formats():
    assert values(split_events(b'{"a": 1}', ".json")) == [{"a": 1}]
    assert values(split_events(b'[{"a": 1}, {"b": 2}]', ".json")) == [{"a": 1}, {"b": 2}]
    assert values(split_events(b'{"a": 1}\n\n{"b": 2}\n', ".jsonl")) == [{"a": 1}, {"b": 2}]
    assert values(split_events(b'{"a": 1}\n{"b": 2}\n', ".json")) == [{"a": 1}, {"b": 2}]  # JSON lines
    recs = split_events(b'{"a": 1}\n{"b": \n', ".jsonl")
    assert recs[0].payload == {"a": 1} and recs[1].payload == '{"b": '
    assert values(recs)[1].startswith("BAD event: malformed JSON")
    (rec,) = split_events(b'{"a": ', ".json")
    assert rec.payload == '{"a": ' and "malformed JSON" in str(rec.error)
    (rec,) = split_events(b"", ".json")
    assert rec.payload == "" and "malformed JSON" in str(rec.error)
    (rec,) = split_events(b"\xff\xfe", ".json")
    assert rec.payload == b"\xff\xfe" and "not UTF-8 text (invalid start byte at byte 0)" in str(rec.error)


def test_split_events_one_record_per_malformed_document():
    pretty = b'{\n  "kind": "nextVisit",\n  "groupId": "g"\n  "salIndex": 1\n}\n'  # missing comma
    (rec,) = split_events(pretty, ".json")
    assert rec.payload == pretty.decode() and "malformed JSON" in str(rec.error)
    # in JSON lines, a run of bad lines is one record; the good lines around it stay events
    recs = split_events(b'{"n": 1}\n' + pretty + b'{"n": 2}\n', ".jsonl")
    assert [r.payload for r in recs if r.error is None] == [{"n": 1}, {"n": 2}]
    (bad,) = [r for r in recs if r.error is not None]
    assert bad.error.field == "event (lines 2-6)" and bad.payload == pretty.decode().rstrip("\n")
    # JSON lines in a .json file only if every line is an event; else one record for the file
    (rec,) = split_events(b'{"n": 1}\n{"n": \n', ".json")
    assert rec.error is not None and rec.payload == '{"n": 1}\n{"n": \n'
    (rec,) = split_events(b"1\n2\n", ".json")  # a text file of numbers is not two events
    assert "malformed JSON" in str(rec.error)
    (rec,) = split_events(b"1\n2\n", ".jsonl")
    assert rec.payload == "1\n2" and str(rec.error) == ("event (lines 1-2): expected a JSON object per line "
                                                        "(send one JSON object per line)")


def test_split_events_limits():
    assert "nested deeper than 32 levels" in str(split_events(b"[" * 50_000, ".json")[0].error)
    assert "100000 bytes, over the limit of 65536" in str(split_events(b"[" * 100_000, ".json")[0].error)
    assert "nested deeper than 32 levels" in str(split_events(b"[" * 40 + b"]" * 40, ".json")[0].error)
    assert split_events(b"[" * 31 + b"]" * 31, ".json")[0].error is None
    big = json.dumps({"x": "y" * 2000}).encode()
    (rec,) = split_events(big, ".json", max_event_bytes=1024)
    assert str(rec.error) == (f"event: {len(big)} bytes, over the limit of 1024 (send smaller events or "
                              "raise source.max_event_bytes)") and len(rec.payload) == 1024
    recs = split_events(b"[" + big + b', {"n": 1}]', ".json", max_event_bytes=1024)
    assert recs[0].error is not None and recs[1] == ({"n": 1}, None)  # per event of a list
    recs = split_events(big + b'\n{"n": 1}\n', ".jsonl", max_event_bytes=1024)
    assert "over the limit" in str(recs[0].error) and recs[1].payload == {"n": 1}
    # Python refuses to convert an integer of over 4300 digits: malformed, not a crash
    (rec,) = split_events(b'{"salIndex": ' + b"1" * 5000 + b"}", ".json")
    assert "malformed JSON" in str(rec.error)


def test_spool_reads_oldest_first_and_moves_files(tmp_path):
    spool = tmp_path / "incoming"
    drop(spool, "b.json", '{"n": 2}', mtime=2000)
    drop(spool, "a.jsonl", '{"n": 0}\n{"n": 1}\n', mtime=1000)
    (spool / "c.json.tmp").write_text('{"n": 9}')  # being written: ignored
    (spool / ".d.json").write_text('{"n": 9}')
    (spool / "notes.txt").write_text("x")
    src = SpoolSource(spool)
    events = src.poll(0.0)
    assert [e.payload for e in events] == [{"n": 0}, {"n": 1}, {"n": 2}]
    assert [e.origin for e in events] == ["spool:a.jsonl#0", "spool:a.jsonl#1", "spool:b.json#0"]
    assert src.poll(0.0) == []  # in flight: not delivered twice
    src.ack(events[:1])
    assert (spool / "a.jsonl").exists()  # one event of it still unacknowledged
    src.ack(events[1:2])
    src.ack(events[2:], ok=False)
    assert (spool / "done" / "a.jsonl").exists() and (spool / "failed" / "b.json").exists()
    assert sorted(p.name for p in spool.iterdir() if p.is_file()) == [".d.json", "c.json.tmp", "notes.txt"]


def test_spool_restart_resumes_unacknowledged(tmp_path):
    drop(tmp_path, "e.json", '[{"n": 1}, {"n": 2}]')
    first = SpoolSource(tmp_path)
    got = first.poll(0.0)
    first.ack(got[:1])
    first.close()  # "crash" before the second event was handled
    second = SpoolSource(tmp_path)
    again = second.poll(0.0)
    assert [e.payload for e in again] == [{"n": 1}, {"n": 2}]  # the ledger makes the repeat harmless
    second.ack(again)
    assert (tmp_path / "done" / "e.json").exists()


def test_spool_name_reused_by_producer(tmp_path):
    src = SpoolSource(tmp_path)
    for n in range(2):
        drop(tmp_path, "same.json", json.dumps({"n": n}))
        src.ack(src.poll(0.0))
    assert sorted(json.loads(p.read_text())["n"] for p in (tmp_path / "done").iterdir()) == [0, 1]


def test_spool_poll_waits_then_returns_empty(tmp_path):
    src = SpoolSource(tmp_path / "new")
    t0 = time.monotonic()
    assert src.poll(0.3) == []
    assert 0.25 <= time.monotonic() - t0 < 2.0
    assert (tmp_path / "new").is_dir() and not src.exhausted


def test_spool_max_batch(tmp_path):
    for i in range(5):
        drop(tmp_path, f"{i}.json", "{}", mtime=1000 + i)
    src = SpoolSource(tmp_path, max_batch=2)
    assert [e.origin for e in src.poll(0)] == ["spool:0.json#0", "spool:1.json#0"]
    assert len(src.poll(0)) == 2 and len(src.poll(0)) == 1


def test_spool_refuses_links_without_reading_the_target(tmp_path):
    spool, outside = tmp_path / "incoming", tmp_path / "outside"
    spool.mkdir()
    outside.mkdir()
    (outside / "event.json").write_text('{"n": 1}')
    os.mkfifo(outside / "pipe")  # opening it to read would block the test: proof it is never opened
    (spool / "event.json").symlink_to(outside / "event.json")
    (spool / "passwd.json").symlink_to("/etc/passwd")
    (spool / "pipe.jsonl").symlink_to(outside / "pipe")
    (spool / "dangling.json").symlink_to(outside / "nothing")
    src = SpoolSource(spool, settle_time=60)  # links are refused at once, stable or not
    got = {e.origin: e for e in src.poll(0.0)}
    assert sorted(got) == ["spool:dangling.json#0", "spool:event.json#0", "spool:passwd.json#0",
                           "spool:pipe.jsonl#0"]
    for ev in got.values():
        assert ev.payload == "" and "is a symbolic link" in ev.error and "not followed" in ev.error
    assert got["spool:passwd.json#0"].error.startswith("passwd.json: is a symbolic link (to '/etc/passwd')")
    src.ack(list(got.values()), ok=False)
    moved = spool / "failed" / "event.json"
    assert moved.is_symlink() and os.readlink(moved) == str(outside / "event.json")  # the link, not the file
    assert (outside / "event.json").read_text() == '{"n": 1}' and sorted(p.name for p in spool.iterdir()) == [
        "failed"]


def test_spool_refuses_special_files(tmp_path):
    os.mkfifo(tmp_path / "fifo.json")
    (tmp_path / "dir.json").mkdir()
    src = SpoolSource(tmp_path, settle_time=60)
    got = src.poll(0.0)
    assert sorted(e.error for e in got) == [
        "dir.json: is not a regular file (write regular files into the spool directory)",
        "fifo.json: is not a regular file (write regular files into the spool directory)"]
    src.ack(got, ok=False)
    assert (tmp_path / "failed" / "dir.json").is_dir()


def test_spool_link_swapped_in_after_listing_is_not_followed(tmp_path, monkeypatch):
    (tmp_path / "a.json").write_text('{"n": 1}')
    os.utime(tmp_path / "a.json", (1, 1))
    src = SpoolSource(tmp_path, settle_time=0.0)
    real_open = os.open

    def swap_then_open(path, flags, *args):  # a producer replaces the file by a link in between
        if str(path).endswith("a.json") and not os.path.islink(path):
            os.remove(path)
            os.symlink("/etc/passwd", path)
        return real_open(path, flags, *args)

    monkeypatch.setattr(os, "open", swap_then_open)
    (ev,) = src.poll(0.0)
    assert ev.payload == "" and ev.error.startswith("a.json: is a symbolic link (to '/etc/passwd')")


def test_spool_waits_for_a_file_written_in_place(tmp_path):
    """A producer that writes the final name directly: nothing is read until the file is stable."""
    event = json.dumps({"kind": "nextVisit", "groupId": "g", "pad": "x" * 1000})
    src = SpoolSource(tmp_path, settle_time=0.8)
    with open(tmp_path / "direct.json", "w") as fh:
        fh.write(event[:500])
        fh.flush()
        assert src.poll(0.1) == []  # half an event: not complete, not stable
        time.sleep(0.2)
        fh.write(event[500:800])
        fh.flush()
        assert src.poll(0.3) == []  # changed 0.3 s ago: the clock restarted, not yet stable
        fh.write(event[800:])
    t0 = time.monotonic()
    (ev,) = src.poll(1.0)  # one complete JSON document: read at once, no settle wait
    assert ev.payload == json.loads(event) and ev.error is None and time.monotonic() - t0 < 0.3


def test_spool_json_lines_and_broken_files_wait_for_settle_time(tmp_path):
    src = SpoolSource(tmp_path, settle_time=0.3)
    (tmp_path / "lines.jsonl").write_text('{"n": 1}\n')  # more lines may follow
    (tmp_path / "broken.json").write_text('{"n": ')  # may still be being written
    assert src.poll(0.0) == []
    time.sleep(0.35)
    got = {e.origin: e for e in src.poll(0.0)}
    assert got["spool:lines.jsonl#0"].payload == {"n": 1}
    assert "malformed JSON" in got["spool:broken.json#0"].error
    (tmp_path / "old.jsonl").write_text('{"n": 2}\n')
    os.utime(tmp_path / "old.jsonl", (time.time() - 1, time.time() - 1))  # untouched for longer
    assert [e.payload for e in src.poll(0.0)] == [{"n": 2}]


def test_spool_file_changed_between_stat_and_read_is_read_later(tmp_path, monkeypatch):
    (tmp_path / "a.jsonl").write_text('{"n": 1}\n')
    os.utime(tmp_path / "a.jsonl", (1, 1))
    src = SpoolSource(tmp_path, settle_time=0.2)
    real_open = os.open

    def append_then_open(path, flags, *args):
        if str(path).endswith("a.jsonl"):
            with open(path, "a") as fh:
                fh.write('{"n": 2}\n')
            monkeypatch.setattr(os, "open", real_open)
        return real_open(path, flags, *args)

    monkeypatch.setattr(os, "open", append_then_open)
    assert src.poll(0.0) == []  # it changed under the reader: not stable after all
    time.sleep(0.25)
    assert [e.payload for e in src.poll(0.0)] == [{"n": 1}, {"n": 2}]


def test_spool_oversized_file_not_read_whole(tmp_path):
    (tmp_path / "big.jsonl").write_bytes(b'{"n": 1}\n' * 1000)
    os.utime(tmp_path / "big.jsonl", (1, 1))
    (ev,) = SpoolSource(tmp_path, max_file_bytes=4096).poll(0.0)
    assert ev.error == ("big.jsonl: 9000 bytes, over the limit of 4096 (send smaller events or raise "
                        "source.max_file_bytes)")
    assert ev.payload == (b'{"n": 1}\n' * 1000)[:1024]


def test_spool_unreadable_file(tmp_path, monkeypatch):
    (tmp_path / "a.json").write_text("{}")
    os.utime(tmp_path / "a.json", (1, 1))
    real_open = os.open

    def refuse(path, flags, *args):
        if str(path).endswith("a.json"):
            raise PermissionError(13, "Permission denied")
        return real_open(path, flags, *args)

    monkeypatch.setattr(os, "open", refuse)
    (ev,) = SpoolSource(tmp_path).poll(0.0)
    assert ev.error == "a.json: cannot open: Permission denied (check its permissions)"


def test_spool_odd_file_names_are_escaped_in_origins(tmp_path):
    name = os.fsdecode(b"a\xff\nb.json")  # not UTF-8, and a newline: would forge a log line
    (tmp_path / name).write_text('{"n": 1}')
    os.symlink("/etc/passwd", tmp_path / os.fsdecode(b"l\xfe\x1b.json"))
    src = SpoolSource(tmp_path)
    got = sorted(src.poll(0.0), key=lambda e: e.origin)
    assert [e.origin for e in got] == ["spool:a\\xff\\nb.json#0", "spool:l\\xfe\\x1b.json#0"]
    assert got[0].payload == {"n": 1} and got[1].error.startswith("l\\xfe\\x1b.json: is a symbolic link")
    src.ack(got)
    assert (tmp_path / "done" / name).exists()  # moved under its real name


# ---------------------------------------------------------------------------------- stdin
def test_stdin_lines_and_eof():
    src = StdinSource(io.StringIO('{"n": 1}\n\n  \n{"n": 2}\nnot json\n'))
    got = []
    deadline = time.monotonic() + 5
    while not src.exhausted and time.monotonic() < deadline:
        got += src.poll(0.1)
    assert [e.payload for e in got] == ['{"n": 1}', '{"n": 2}', "not json"]
    assert [e.origin for e in got] == ["stdin:1", "stdin:4", "stdin:5"]
    assert src.exhausted and src.poll(0.1) == []


def read_all(src):
    got = []
    deadline = time.monotonic() + 5
    while not src.exhausted and time.monotonic() < deadline:
        got += src.poll(0.1)
    assert src.exhausted
    return got


def test_stdin_reads_bytes_so_invalid_utf8_is_one_bad_line():
    stream = io.TextIOWrapper(io.BytesIO(b'{"n": 1}\n{"s": "\xff\xfe"}\n{"n": 2}\n'), encoding="utf-8")
    got = read_all(StdinSource(stream))
    assert [e.payload for e in got] == [b'{"n": 1}', b'{"s": "\xff\xfe"}', b'{"n": 2}']  # decoded later


def test_stdin_overlong_line_is_never_held_whole():
    big = b'{"x": "' + b"y" * 5000 + b'"}'
    got = read_all(StdinSource(io.BytesIO(big + b'\n{"n": 2}\n' + big), max_event_bytes=1024))
    assert [e.origin for e in got] == ["stdin:1", "stdin:2", "stdin:3"]
    assert got[0].error == got[2].error == (f"event: {len(big)} bytes, over the limit of 1024 (send smaller "
                                            "events or raise source.max_event_bytes)")  # newline or not
    assert got[0].payload == big[:1024] and got[1].payload == b'{"n": 2}' and got[1].error is None


class BrokenStream:
    """A text stream without ``.buffer`` whose second read fails (a terminal hung up, bad bytes)."""

    def __init__(self, error):
        self.lines, self.error = ['{"n": 1}\n'], error

    def readline(self, size=-1):
        if self.lines:
            return self.lines.pop(0)
        raise self.error


@pytest.mark.parametrize("error", [OSError(5, "Input/output error"),
                                   UnicodeDecodeError("utf-8", b"\xff", 0, 1, "invalid start byte")])
def test_stdin_read_error_ends_input_with_one_bad_event(error):
    got = read_all(StdinSource(BrokenStream(error)))
    assert got[0].payload == '{"n": 1}' and got[0].error is None
    assert got[1].origin == "stdin:2" and got[1].error.startswith("stdin: cannot read past line 1:")
    assert len(got) == 2


# ---------------------------------------------------------------------------------- kafka
class FakeError:
    def __init__(self, code):
        self._code = code

    def code(self):
        return self._code

    def __str__(self):
        return f"error {self._code}"


class FakeMessage:
    def __init__(self, topic, partition, offset, value, error=None):
        self._t, self._p, self._o, self._v, self._e = topic, partition, offset, value, error

    def topic(self):
        return self._t

    def partition(self):
        return self._p

    def offset(self):
        return self._o

    def value(self):
        return self._v

    def error(self):
        return self._e


class FakeConsumer:
    def __init__(self, batches):
        self.batches = list(batches)
        self.subscribed = None
        self.commits = []
        self.closed = False

    def subscribe(self, topics, on_revoke=None, on_lost=None):
        self.subscribed = list(topics)
        self.on_revoke = on_revoke

    def consume(self, num_messages, timeout):
        return self.batches.pop(0) if self.batches else []

    def commit(self, offsets, asynchronous):
        assert asynchronous is False
        self.commits.append(sorted((o.topic, o.partition, o.offset) for o in offsets))

    def close(self):
        self.closed = True


def test_kafka_source_with_fake_consumer():
    from confluent_kafka import KafkaError

    t = "lsst.sal.MTCamera.logevent_startIntegration"
    consumer = FakeConsumer([[
        FakeMessage(t, 0, 5, b'{"a": 1}'), FakeMessage(t, 1, 7, b'{"b": 2}'),
        FakeMessage(t, 0, 6, b"oops"), FakeMessage(t, 0, -1, None, FakeError(KafkaError._PARTITION_EOF)),
        FakeMessage(t, 0, -1, None, FakeError(KafkaError._TRANSPORT)),
    ]])
    cfg = load_config(environ={})
    src = KafkaSource.from_config(cfg, consumer=consumer)
    assert consumer.subscribed is None  # no I/O before the first poll
    events = src.poll(0.1)
    assert consumer.subscribed == cfg.source.kafka_topics
    assert [e.payload for e in events] == [b'{"a": 1}', b'{"b": 2}', b"oops"]
    assert events[0].topic == t and events[0].origin == f"kafka:{t}[0]@5"
    src.ack(events[:2])
    src.ack(events[2:], ok=False)  # bad events are handled (dead-lettered) too: committed
    assert consumer.commits == [[(t, 0, 6), (t, 1, 8)], [(t, 0, 7)]]
    src.close()
    assert consumer.closed


def test_kafka_consumer_config_secrets_from_env_and_file(tmp_path):
    (tmp_path / "pw").write_text("s3cret\n")
    cfg = load_config(environ={}, overrides={"root": str(tmp_path), "kafka": {
        "bootstrap_servers": "b:9092", "security_protocol": "SASL_SSL", "sasl_mechanism": "SCRAM-SHA-512",
        "password_file": "pw"}})  # relative to root, like every configured path
    conf = consumer_config(cfg, environ={"APBATCH_KAFKA_USERNAME": "ap"})
    assert conf["sasl.username"] == "ap" and conf["sasl.password"] == "s3cret"
    assert conf["enable.auto.commit"] is False and conf["group.id"] == "apbatch-daemon"
    env_pw = consumer_config(cfg, environ={"APBATCH_KAFKA_USERNAME": "ap",
                                           "APBATCH_KAFKA_PASSWORD": "fromenv"})
    assert env_pw["sasl.password"] == "fromenv"
    with pytest.raises(BadInputError, match="kafka.username_env"):  # refused at start-up, not at first poll
        KafkaSource.from_config(cfg, environ={"APBATCH_KAFKA_PASSWORD": "x"})
    plain = consumer_config(load_config(environ={}), environ={"APBATCH_KAFKA_PASSWORD": "x"})
    assert "sasl.password" not in plain


def test_kafka_settings_one_function_for_consumer_and_producer(tmp_path):
    """The daemon's consumer and the jobs' alert producer resolve the cluster the same way."""
    from apbatch.job.alert_sinks import KafkaAlertSink, make_sink
    from apbatch.kafka_settings import kafka_settings

    (tmp_path / "pw").write_text("pw-from-file\n")
    cfg = load_config(environ={}, overrides={"root": str(tmp_path), "alerts": {"sink": "kafka"}, "kafka": {
        "bootstrap_servers": "127.0.0.1:1", "security_protocol": "SASL_PLAINTEXT", "sasl_mechanism": "PLAIN",
        "password_file": "pw"}})
    env = {"APBATCH_KAFKA_USERNAME": "ap"}
    common = kafka_settings(cfg.kafka, env, root=cfg.root)
    assert common["sasl.password"] == "pw-from-file"
    consumer = consumer_config(cfg, env)
    sink = make_sink(cfg, env)
    assert isinstance(sink, KafkaAlertSink)
    for settings in (consumer, sink.settings):
        assert {k: settings[k] for k in common} == common


def test_kafka_commit_only_the_handled_prefix():
    """An event whose handling failed holds its partition's commit back (no loss on restart)."""
    t = "lsst.sal.MTCamera.logevent_startIntegration"
    first = [FakeMessage(t, 0, o, b"{}") for o in (10, 11, 12, 13)] + [FakeMessage(t, 1, 3, b"{}")]
    consumer = FakeConsumer([first, [FakeMessage(t, 0, 14, b"{}")]])
    src = KafkaSource.from_config(load_config(environ={}), consumer=consumer)
    e10, e11, e12, e13, p1 = src.poll(0.1)
    src.ack([e10])
    assert consumer.commits == [[(t, 0, 11)]]
    # e11 fails (never acknowledged); e12, e13 and the other partition's event are handled
    src.ack([e12])
    src.ack([e13], ok=False)  # bad input: dead-lettered, handled
    src.ack([p1])
    assert consumer.commits == [[(t, 0, 11)], [(t, 1, 4)]]  # partition 0 stays at 11
    (e14,) = src.poll(0.1)
    src.ack([e14])
    assert consumer.commits[-1] == [(t, 1, 4)]  # still nothing new for partition 0
    src.ack([e11])  # e.g. handled after all: the whole prefix goes at once
    assert consumer.commits[-1] == [(t, 0, 15)]
    src.ack([e11])  # a second ack of a committed event commits nothing
    assert len(consumer.commits) == 3


def test_kafka_revoked_partition_forgets_in_flight_events():
    from confluent_kafka import TopicPartition

    t = "lsst.sal.MTCamera.logevent_startIntegration"
    consumer = FakeConsumer([[FakeMessage(t, 0, 5, b"{}"), FakeMessage(t, 0, 6, b"{}")]])
    src = KafkaSource.from_config(load_config(environ={}), consumer=consumer)
    e5, e6 = src.poll(0.1)
    consumer.on_revoke(consumer, [TopicPartition(t, 0)])  # rebalance: another daemon owns it now
    src.ack([e6])
    src.ack([e5])
    assert consumer.commits == []  # the new owner resumes at the last commit


def test_make_source(tmp_path):
    cfg = load_config(environ={}, overrides={"root": str(tmp_path)})
    assert isinstance(make_source(cfg), SpoolSource)
    assert make_source(cfg).directory == tmp_path / "events" / "incoming"
    assert isinstance(make_source(cfg, "stdin", stream=io.StringIO("")), StdinSource)
    limited = load_config(environ={}, overrides={"root": str(tmp_path), "source": {
        "settle_time": 2.5, "max_event_bytes": 2000, "max_file_bytes": 3000}})
    spool = make_source(limited)
    assert (spool.settle_time, spool.max_event_bytes, spool.max_file_bytes) == (2.5, 2000, 3000)
    assert make_source(limited, "stdin").max_event_bytes == 2000
    assert isinstance(make_source(cfg, "kafka", consumer=FakeConsumer([])), KafkaSource)
    with pytest.raises(BadInputError, match="source.kind"):
        make_source(cfg, "carrier-pigeon")


# the broker's quirks (FIELD-NOTES): a short session for quick group joins, no long-poll
_KAFKA_TEST_EXTRA = {"session.timeout.ms": 6000, "heartbeat.interval.ms": 1000, "fetch.wait.max.ms": 10}


def _read_kafka(cfg, n: int, deadline_s: float = 30):
    """A new `KafkaSource` for ``cfg`` and up to ``n`` events polled from it within ``deadline_s``."""
    src = KafkaSource.from_config(cfg, extra=_KAFKA_TEST_EXTRA)
    got, deadline = [], time.monotonic() + deadline_s
    while len(got) < n and time.monotonic() < deadline:
        got += src.poll(0.5)
    return src, got


@pytest.mark.kafka
def test_kafka_source_real_broker_commit_and_resume(kafka_broker):
    from confluent_kafka import Producer

    topic = f"lsst.sal.CCCamera.logevent_startIntegration.t{uuid.uuid4().hex[:8]}"
    body = json.dumps({"imageName": "CC_O_20241108_000100", "imageIndex": 1, "imagesInSequence": 1,
                       "exposureTime": 15.0, "imageDate": "20241108", "imageNumber": 100, "imageSource": "CC",
                       "additionalKeys": "imageType", "additionalValues": "FLAT"})
    producer = Producer({"bootstrap.servers": kafka_broker})
    for _ in range(3):
        producer.produce(topic, body.encode())
    producer.flush(10)
    group = f"g-{uuid.uuid4().hex[:8]}"
    cfg = load_config(environ={}, overrides={"kafka": {"bootstrap_servers": kafka_broker}, "source": {
        "kafka_topics": [topic], "kafka_group_id": group}})

    def read(n):
        return _read_kafka(cfg, n)

    src, got = read(3)
    assert len(got) == 3 and got[0].topic == topic
    src.ack(got[:2])  # the third was "not handled" before the crash
    src.close()
    src2, again = read(1)
    try:
        assert [e.token[2] for e in again] == [got[2].token[2]]  # resumes after the last commit
    finally:
        src2.close()
    assert parse_event(got[0].payload, topic=None).imageName == "CC_O_20241108_000100"  # bytes decode


@pytest.mark.kafka
def test_kafka_failed_event_not_lost_on_restart(kafka_broker):
    """Event N fails, N+1 is handled: after a restart N (and N+1) come again, nothing is skipped."""
    from confluent_kafka import Producer
    from confluent_kafka.admin import AdminClient, NewTopic

    topic = f"lsst.sal.CCCamera.logevent_startIntegration.f{uuid.uuid4().hex[:8]}"
    admin = AdminClient({"bootstrap.servers": kafka_broker})  # one partition: one order
    admin.create_topics([NewTopic(topic, 1, 1)])[topic].result(30)
    producer = Producer({"bootstrap.servers": kafka_broker})
    for n in range(4):
        producer.produce(topic, json.dumps({"n": n}).encode())
    producer.flush(10)
    cfg = load_config(environ={}, overrides={"kafka": {"bootstrap_servers": kafka_broker}, "source": {
        "kafka_topics": [topic], "kafka_group_id": f"g-{uuid.uuid4().hex[:8]}"}})

    def read(n):
        return _read_kafka(cfg, n)

    src, got = read(4)
    assert [json.loads(e.payload)["n"] for e in got] == [0, 1, 2, 3]
    src.ack(got[:1])  # event 0 handled
    src.ack(got[2:])  # event 1 failed (not acknowledged); 2 and 3 handled
    src.close()
    src2, again = read(3)
    try:
        assert [json.loads(e.payload)["n"] for e in again] == [1, 2, 3]
    finally:
        src2.close()
