"""Tests of apbatch.cli.progress: a live line on a terminal, nothing in a log."""

from __future__ import annotations

import io
import json

import pytest
from apbatch.cli import main
from apbatch.cli.progress import progress


class Terminal(io.StringIO):
    def isatty(self) -> bool:
        return True


def test_quiet_when_not_a_terminal():
    out = io.StringIO()
    with progress("simulating", 3, stream=out) as step:
        for i in range(3):
            step(f"raw {i}")
    assert out.getvalue() == ""


def test_terminal_shows_count_and_latest_item():
    out = Terminal()
    with progress("replaying", 4, stream=out, force=True) as step:
        for i in range(4):
            step(f"raw MC_O_20251015_00000{i}")
    text = out.getvalue()
    assert "replaying" in text and "4/4" in text and "MC_O_20251015_000003" in text


def test_terminal_without_total_counts():
    out = Terminal()
    with progress("ingesting", stream=out, force=True) as step:
        step("calibs: 3 file(s)")
        step("templates: 2 file(s)")
    assert "2 done" in out.getvalue()


def test_sim_night_in_a_pipe_prints_only_the_manifest(tmp_path, capsys):
    """Under cron or CI (stderr not a terminal) a long command prints its result, no per-file lines."""
    with pytest.raises(SystemExit) as done:
        main(["sim", "night", "--out", str(tmp_path / "n"), "--instrument", "LATISS", "--visits", "1",
              "--no-templates", "--calibrations", ""])
    captured = capsys.readouterr()
    assert done.value.code == 0
    assert captured.err == ""
    assert json.loads(captured.out)["instrument"] == "LATISS"
