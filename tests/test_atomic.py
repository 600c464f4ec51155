"""Tests of apbatch.atomic.write_atomic."""

from __future__ import annotations

import stat

import pytest
from apbatch.atomic import create_exclusive, write_atomic


def test_write_atomic_replaces_whole_file_with_mode(tmp_path):
    target = tmp_path / "d" / "f.yaml"
    assert write_atomic(target, "one\n", mode=0o640) == target
    write_atomic(target, "two\n", mode=0o600)
    assert target.read_text() == "two\n" and stat.S_IMODE(target.stat().st_mode) == 0o600
    assert sorted(p.name for p in target.parent.iterdir()) == ["f.yaml"]


def test_write_atomic_leaves_nothing_on_failure(tmp_path):
    target = tmp_path / "f.txt"
    target.write_text("old")

    with pytest.raises(TypeError):
        write_atomic(target, 12345)  # type: ignore[arg-type]  # not text: nothing replaced
    assert target.read_text() == "old" and [p.name for p in tmp_path.iterdir()] == ["f.txt"]


def test_create_exclusive_never_replaces(tmp_path):
    target = tmp_path / "d" / "f.yaml"
    assert create_exclusive(target, "first\n", mode=0o640) is True
    assert create_exclusive(target, "second\n") is False
    assert target.read_text() == "first\n" and stat.S_IMODE(target.stat().st_mode) == 0o640
    assert [p.name for p in target.parent.iterdir()] == ["f.yaml"]


def test_replacing_gives_a_path_for_any_writer_and_cleans_up(tmp_path):
    from apbatch.atomic import replacing

    target = tmp_path / "sub" / "t.parquet"
    with replacing(target, mode=0o640, durable=False) as tmp:
        assert tmp.parent == target.parent and tmp.exists() and not target.exists()
        tmp.write_bytes(b"whole")
    assert target.read_bytes() == b"whole" and stat.S_IMODE(target.stat().st_mode) == 0o640
    with pytest.raises(RuntimeError), replacing(target) as tmp:  # the writer fails half-way
        tmp.write_bytes(b"ha")
        raise RuntimeError("writer died")
    assert target.read_bytes() == b"whole"
    assert sorted(p.name for p in target.parent.iterdir()) == ["t.parquet"]


def test_write_atomic_writes_bytes(tmp_path):
    assert write_atomic(tmp_path / "b.bin", b"\x00\x01").read_bytes() == b"\x00\x01"
