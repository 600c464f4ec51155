"""A corpus of bad inputs through every intake: the spool directory, stdin and ``apbatch submit``.

The small cases are files in ``tests/data/bad_events/``; the huge ones (100k nested brackets,
50k nested objects, oversized events and files) and the ones a repository cannot hold (symbolic
links, a FIFO) are made here, at test time. For every case: the daemon survives and goes on
with the next event, the case is exactly one dead letter whose error is one line naming the
field and the problem, ``apbatch submit`` exits 2 with that line, and nothing is submitted.
"""

from __future__ import annotations

import io
import json
import os
import stat
import time
from pathlib import Path

import apbatch.backends
import pytest
import yaml
from apbatch.cli import main
from apbatch.config import load_config
from apbatch.ledger import Ledger
from test_dispatcher import FakeBackend, fresh

CORPUS = Path(__file__).resolve().parent / "data" / "bad_events"
MAX_FILE = 1 << 20  # source.max_file_bytes of these tests (the default is 16 MiB)

# file -> how its one-line error starts (after the origin)
COMMITTED = {
    "bad_dome.json": "event.dome: 7 is not a Dome",
    "control_char.json": "event: malformed JSON: Invalid control character",
    "empty.json": "event: malformed JSON: Expecting value",
    "huge_integer.json": "event: malformed JSON: Exceeds the limit (4300 digits)",
    "malformed_pretty.json": "event: malformed JSON: Expecting ',' delimiter",
    "malformed_pretty.jsonl": "event (lines 1-25): malformed JSON",
    "missing_group.json": "event.groupId: missing",
    "nan_position.json": "event.position: expected [ra, dec], got [nan, -28.1]",
    "nested_40.json": "event: JSON nested deeper than 32 levels",
    "not_utf8.jsonl": "event: not UTF-8 text (invalid start byte at byte 353)",
    "scalar.json": "event: expected a JSON object, got int",
    "surrogate_escape.json": "event: a string holds an unpaired UTF-16 surrogate escape",
    "truncated.json": "event: malformed JSON: Unterminated string",
    "utf16.json": "event: not UTF-8 text (invalid start byte at byte 0)",
}
DEEP = "event: JSON nested deeper than 32 levels"
BIG_EVENT = json.dumps({"kind": "nextVisit", "pad": "x" * 100_000}).encode()
BIG_FILE = json.dumps({"kind": "nextVisit", "pad": "x" * (2 * MAX_FILE)}).encode()
SMALL_DEEP = b'{"a":' * 10_000 + b"1" + b"}" * 10_000  # under the size limit: the depth is the problem
GENERATED = {
    "deep_array.json": (b"[" * 100_000, "event: 100000 bytes, over the limit of 65536"),
    "deep_array_small.json": (b"[" * 50_000, DEEP),
    "deep_objects.jsonl": (b'{"a": ' * 50_000 + b"1" + b"}" * 50_000 + b"\n",
                           "event: 350001 bytes, over the limit of 65536"),
    "deep_objects_small.jsonl": (SMALL_DEEP + b"\n", DEEP),
    "deep_objects_pretty.jsonl": (b'{"a":\n' * 50_000, "event (lines 1-50000): malformed JSON"),
    "oversized_event.jsonl": (BIG_EVENT + b"\n", f"event: {len(BIG_EVENT)} bytes, over the limit of 65536"),
    "oversized_file.json": (BIG_FILE,
                            f"oversized_file.json: {len(BIG_FILE)} bytes, over the limit of {MAX_FILE}"),
}


def corpus() -> dict[str, tuple[bytes, str]]:
    """Every file case: name -> (content, start of the expected error)."""
    cases = {name: ((CORPUS / name).read_bytes(), error) for name, error in COMMITTED.items()}
    return cases | GENERATED


def one_line_cases() -> dict[str, tuple[bytes, str]]:
    """The cases that are one line, as stdin carries them (the error of a line, not of a file)."""
    out = {}
    for name, (data, error) in corpus().items():
        line = data.rstrip(b"\n")
        if line.strip() and b"\n" not in line:
            out[name] = (line, error)
    out["oversized_file.json"] = (BIG_FILE, f"event: {len(BIG_FILE)} bytes, over the limit of 65536")
    return out


def test_corpus_is_complete():
    """Every committed file is a case, and the line cases cover the issue's stdin inputs."""
    assert sorted(p.name for p in CORPUS.iterdir()) == sorted(COMMITTED)
    assert {"deep_array.json", "deep_objects.jsonl", "not_utf8.jsonl", "oversized_event.jsonl"} <= set(
        one_line_cases())


@pytest.fixture
def env(tmp_path, monkeypatch):
    """A config rooted in tmp_path (small file limit, short settle time) and a shared FakeBackend."""
    monkeypatch.delenv("APBATCH_CONFIG", raising=False)
    cfg_file = tmp_path / "apbatch.yaml"
    cfg_file.write_text(yaml.safe_dump({"root": str(tmp_path / "work"),
                                        "source": {"settle_time": 0.05, "max_file_bytes": MAX_FILE}}))
    backend = FakeBackend()
    monkeypatch.setattr(apbatch.backends, "make_backend", lambda config, **deps: backend)
    return {"config": str(cfg_file), "backend": backend, "root": tmp_path / "work", "tmp": tmp_path}


def run(capsys, *args):
    with pytest.raises(SystemExit) as exc:
        main(list(args))
    out, err = capsys.readouterr()
    return exc.value.code, out, err


def stdin(monkeypatch, data: bytes) -> None:
    """Standard input as a process has it: a text stream over the bytes."""
    monkeypatch.setattr("sys.stdin", io.TextIOWrapper(io.BytesIO(data), encoding="utf-8"))


def dead_letters(env) -> list[dict]:
    path = env["root"] / "events" / "dead-letter.jsonl"
    assert stat.S_IMODE(path.stat().st_mode) == 0o600  # it holds event payloads
    return [json.loads(line) for line in path.read_text().splitlines()]


def valid_event() -> bytes:
    return json.dumps(fresh("nextVisit_LATISS.json", time.time())).encode()


def check_dead_letters(env, expected: dict[str, str]) -> None:
    """Exactly one dead letter per case (by origin), its error one line starting as expected."""
    dead = dead_letters(env)
    by_origin = {d["origin"]: d for d in dead}
    assert len(dead) == len(by_origin) == len(expected), sorted(by_origin)
    for origin, error in expected.items():
        got = by_origin[origin]["error"]
        assert got.startswith(error) and "\n" not in got, (origin, got)
        kept = by_origin[origin]["payload"]
        assert len(kept if isinstance(kept, str) else json.dumps(kept)) < 66_000  # the payload kept is capped
    ledger = Ledger.from_config(load_config(env["config"], environ={}))
    rows = ledger.dead_letter_rows()
    ledger.close()
    assert len(rows) == len(expected) and max(len(r["payload"]) for r in rows) < 66_000


# ---------------------------------------------------------------------------------- spool
def test_spool_daemon_survives_the_corpus(env, capsys):
    spool = env["root"] / "events" / "incoming"
    spool.mkdir(parents=True)
    outside = env["tmp"] / "outside"
    outside.mkdir()
    for i, (name, (data, _)) in enumerate(sorted(corpus().items())):
        (spool / name).write_bytes(data)
        os.utime(spool / name, (1000 + i, 1000 + i))
    (outside / "event.json").write_bytes(valid_event())  # would be submitted if the link were followed
    (spool / "link_to_event.json").symlink_to(outside / "event.json")
    (spool / "link_to_passwd.json").symlink_to("/etc/passwd")
    os.mkfifo(spool / "fifo.json")
    (spool / "zzz_valid.json").write_bytes(valid_event())  # newest: handled after every bad case
    expected = {f"spool:{name}#0": error for name, (_, error) in corpus().items()} | {
        "spool:link_to_event.json#0": f"link_to_event.json: is a symbolic link (to '{outside}/event.json')",
        "spool:link_to_passwd.json#0": "link_to_passwd.json: is a symbolic link (to '/etc/passwd'); "
                                       "links are not followed",
        "spool:fifo.json#0": "fifo.json: is not a regular file"}
    code, out, _ = run(capsys, "daemon", "--config", env["config"], "--max-events", str(len(expected) + 1),
                       "--max-seconds", "60")
    assert code == 0 and json.loads(out) == {"bad": len(expected), "submitted": 1}
    check_dead_letters(env, expected)
    assert len(env["backend"].batches) == 1 and env["backend"].batches[0][0].group_id == json.loads(
        valid_event())["groupId"]  # only the valid event was submitted
    assert sorted(p.name for p in (spool / "failed").iterdir()) == sorted(o[6:-2] for o in expected)
    assert [p.name for p in (spool / "done").iterdir()] == ["zzz_valid.json"]
    assert (spool / "failed" / "link_to_passwd.json").is_symlink()
    # a restart finds nothing left to choke on
    code, out, _ = run(capsys, "daemon", "--config", env["config"], "--max-seconds", "0.5")
    assert code == 0 and json.loads(out) == {}


# ---------------------------------------------------------------------------------- stdin
def test_stdin_daemon_survives_the_corpus(env, capsys, monkeypatch):
    cases = sorted(one_line_cases().items())
    lines = [data for _, (data, _) in cases] + [valid_event()]
    stdin(monkeypatch, b"\n".join(lines) + b"\n")
    code, out, _ = run(capsys, "daemon", "--config", env["config"], "--source", "stdin",
                       "--max-seconds", "60")
    assert code == 0 and json.loads(out) == {"bad": len(cases), "submitted": 1}
    check_dead_letters(env, {f"stdin:{i}": error for i, (_, (_, error)) in enumerate(cases, start=1)})
    assert len(env["backend"].batches) == 1


def test_stdin_invalid_utf8_is_stored_escaped(env, capsys, monkeypatch):
    stdin(monkeypatch, b'{"s": "\xff\xfe"}\n')
    code, out, _ = run(capsys, "daemon", "--config", env["config"], "--source", "stdin",
                       "--max-seconds", "20")
    assert code == 0 and json.loads(out) == {"bad": 1}
    (dead,) = dead_letters(env)
    assert dead["payload"] == '{"s": "\\xff\\xfe"}' and dead["error"].startswith("event: not UTF-8 text")
    ledger = Ledger.from_config(load_config(env["config"], environ={}))
    assert [r["payload"] for r in ledger.dead_letter_rows()] == ['{"s": "\\xff\\xfe"}']
    ledger.close()


# ---------------------------------------------------------------------------------- submit
@pytest.mark.parametrize("name", sorted(corpus()))
def test_submit_refuses_the_corpus_file(env, capsys, name):
    data, error = corpus()[name]
    path = env["tmp"] / name
    path.write_bytes(data)
    code, out, err = run(capsys, "submit", str(path), "--config", env["config"])
    assert code == 2 and out == "" and len(err.splitlines()) == 1
    prefix = f"error: {name}: " if not error.startswith(name) else "error: "
    assert err.startswith(prefix + error), err
    assert env["backend"].batches == [] and not (env["root"] / "ledger.sqlite3").exists()


@pytest.mark.parametrize("name", sorted(one_line_cases()))
def test_submit_refuses_the_corpus_on_stdin(env, capsys, monkeypatch, name):
    data, error = one_line_cases()[name]
    stdin(monkeypatch, data)  # as `printf %s`: a newline would end the truncated string differently
    code, out, err = run(capsys, "submit", "-", "--config", env["config"])
    assert code == 2 and out == "" and len(err.splitlines()) == 1
    if len(data) > MAX_FILE:
        assert err.startswith(f"error: stdin: more than {MAX_FILE} bytes"), err
    else:
        assert err.startswith(f"error: stdin: {error}"), err
    assert env["backend"].batches == []


# ---------------------------------------------------------------------------------- the dispatcher's part
@pytest.fixture
def dispatcher(tmp_path):
    from apbatch.dispatcher import Dispatcher

    cfg = load_config(environ={}, overrides={"root": str(tmp_path)})
    ledger = Ledger.from_config(cfg)
    yield Dispatcher(cfg, ledger, FakeBackend(), check_age=False)
    ledger.close()


def test_message_bytes_decoded_with_the_same_limits(dispatcher):
    """A Kafka message (bytes) meets the limits of the other intakes in the dispatcher."""
    from apbatch.sources import RawEvent

    out = dispatcher.handle_raw(RawEvent(b"[" * 50_000, "kafka:t[0]@1"))
    assert out.action == "bad" and out.reason.startswith(DEEP)
    out = dispatcher.handle_raw(RawEvent(b'{"a": "' + b"x" * 70_000 + b'"}', "kafka:t[0]@2"))
    assert out.action == "bad" and out.reason.startswith("event: 70009 bytes, over the limit of 65536")
    out = dispatcher.handle_raw(RawEvent('{"a": 1}', "x", error="x.json: is a symbolic link"))
    assert out == type(out)("bad", "x.json: is a symbolic link")  # known bad: not parsed again
    assert dispatcher.backend.batches == [] and len(dispatcher.ledger.dead_letter_rows()) == 3


def test_unforeseen_parser_error_is_a_dead_letter(dispatcher, monkeypatch):
    from apbatch.sources import RawEvent

    def explode(payload, topic=None):
        raise RecursionError("maximum recursion depth exceeded")

    monkeypatch.setattr("apbatch.dispatcher.parse_event", explode)
    out = dispatcher.handle_raw(RawEvent({"kind": "nextVisit"}, "stdin:1"))
    assert out.action == "bad"
    assert out.reason == "event: cannot be read: RecursionError: maximum recursion depth exceeded"
    (dead,) = dead_letters({"root": dispatcher.dead_letter_path.parent.parent})
    assert dead["payload"] == {"kind": "nextVisit"}  # a JSON value stays JSON in the file


def test_dead_letter_file_mode_tightened_and_write_failure_survived(dispatcher, caplog):
    path = dispatcher.dead_letter_path
    path.parent.mkdir(parents=True)
    path.write_text("")
    path.chmod(0o644)  # written by an older version
    dispatcher.dead_letter("{bad", "event: malformed JSON", "stdin:1", 0.0)
    assert stat.S_IMODE(path.stat().st_mode) == 0o600 and len(path.read_text().splitlines()) == 1
    path.unlink()
    path.mkdir()  # cannot be appended to: logged, the ledger still has it, nothing raised
    dispatcher.dead_letter("{bad\nline two", "event: malformed\nJSON", "stdin:2", 0.0)
    assert f"could not append to {path}" in caplog.text
    rows = dispatcher.ledger.dead_letter_rows()
    assert [r["error"] for r in rows] == ["event: malformed JSON", "event: malformed JSON"]  # one line each
    assert rows[1]["payload"] == "{bad\nline two"


def test_dead_letter_payload_cut_and_escaped(dispatcher):
    dispatcher.dead_letter(b"\xff" + b"x" * 100_000, "event: too big", "stdin:1", 0.0)
    (dead,) = dead_letters({"root": dispatcher.dead_letter_path.parent.parent})
    assert dead["payload"].startswith("\\xffxxx") and dead["payload"].endswith(
        "... [cut: 100004 characters in all]") and len(dead["payload"]) < 65536 + 40


def test_spool_producer_writing_in_place_loses_nothing(env, capsys):
    """Issue 11, medium 8: a producer writes the final name directly, in pieces; the daemon waits."""
    import threading

    spool = env["root"] / "events" / "incoming"
    spool.mkdir(parents=True)
    lines = [valid_event(), json.dumps(fresh("nextVisit_LSSTComCam.json", time.time())).encode()]

    def producer():
        with open(spool / "direct.jsonl", "wb") as fh:
            for piece in (lines[0] + b"\n", lines[1][:100], lines[1][100:] + b"\n"):
                fh.write(piece)
                fh.flush()
                time.sleep(0.3)  # longer than a poll, shorter than the settle time

    cfg = yaml.safe_load(Path(env["config"]).read_text())
    cfg["source"]["settle_time"] = 1.0
    Path(env["config"]).write_text(yaml.safe_dump(cfg))
    writer = threading.Thread(target=producer)
    writer.start()
    code, out, _ = run(capsys, "daemon", "--config", env["config"], "--max-events", "2",
                       "--max-seconds", "20")
    writer.join()
    assert code == 0 and json.loads(out) == {"submitted": 2}
    assert (spool / "done" / "direct.jsonl").exists() and not (spool / "failed").exists()
