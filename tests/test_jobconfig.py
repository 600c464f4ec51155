"""Tests of apbatch.jobconfig: the job command of this install, and the night's config file."""

from __future__ import annotations

import os
import shutil
import stat
import subprocess
import sys
from pathlib import Path

import pytest
import yaml
from apbatch.config import load_config
from apbatch.errors import BadInputError
from apbatch.jobconfig import config_snapshot_path, resolve_command, write_config_snapshot


def test_bare_apbatch_is_the_script_next_to_the_interpreter(tmp_path, monkeypatch):
    bindir = tmp_path / "env" / "bin"
    bindir.mkdir(parents=True)
    python = bindir / "python"
    python.touch()
    onpath = tmp_path / "elsewhere"
    onpath.mkdir()
    (onpath / "apbatch").write_text("#!/bin/sh\n")
    (onpath / "apbatch").chmod(0o755)
    monkeypatch.setenv("PATH", f"{onpath}:/usr/bin:/bin")
    # no script next to it: the interpreter itself runs the package
    assert resolve_command(["apbatch", "process-ccd"], str(python)) == [str(python), "-m", "apbatch",
                                                                         "process-ccd"]
    (bindir / "apbatch").write_text("#!/bin/sh\n")
    (bindir / "apbatch").chmod(0o644)  # not executable: still not used
    assert resolve_command(["apbatch", "x"], str(python))[0] == str(python)
    (bindir / "apbatch").chmod(0o755)
    script = str(bindir / "apbatch")
    assert resolve_command(["apbatch", "process-ccd"], str(python)) == [script, "process-ccd"]


def test_other_commands(tmp_path, monkeypatch):
    monkeypatch.setenv("PATH", "/usr/bin:/bin")
    monkeypatch.chdir(tmp_path)
    assert resolve_command(["sh", "-c", "x"]) == [shutil.which("sh"), "-c", "x"]  # found on PATH
    assert resolve_command(["bin/job", "a"]) == [str(tmp_path / "bin" / "job"), "a"]  # relative -> absolute
    assert resolve_command(["no-such-program-xyz"]) == ["no-such-program-xyz"]  # fails visibly at start
    with pytest.raises(BadInputError, match="job.command"):
        resolve_command([])


def test_default_command_of_this_install_runs(tmp_path):
    """The resolved default command really is this install's apbatch."""
    argv = resolve_command(load_config(environ={}).job.command)
    assert argv[0].startswith(str(Path(sys.executable).absolute().parent))
    done = subprocess.run([*argv[:-1], "--help"], capture_output=True, text=True, timeout=120)
    assert done.returncode == 0 and "process-ccd" in done.stdout


def test_snapshot_is_the_resolved_config_written_once_atomically(tmp_path, monkeypatch):
    a, b = tmp_path / "a.yaml", tmp_path / "b.yaml"
    a.write_text(yaml.safe_dump({"root": "work", "events": {"max_attempts": 5}}))
    b.write_text(yaml.safe_dump({"alerts": {"topic": "site-b"}}))
    monkeypatch.chdir(tmp_path)
    cfg = load_config([a, b], environ={"APBATCH_APDB__HISTORY_DAYS": "30"})
    path = write_config_snapshot(cfg, 20250610)
    assert path == config_snapshot_path(cfg, 20250610) == tmp_path / "work" / "config" / "20250610.yaml"
    assert stat.S_IMODE(path.stat().st_mode) == 0o640
    assert [p.name for p in path.parent.iterdir()] == ["20250610.yaml"]  # no temp file left
    # a job in another directory, with no APBATCH_* in its environment, sees the same settings
    monkeypatch.chdir("/")
    job = load_config(path, environ={})
    assert job.events.max_attempts == 5 and job.alerts.topic == "site-b" and job.apdb.history_days == 30
    assert job.root == str(tmp_path / "work") and job.model_copy(update={"root": "work"}) == cfg
    # written once: an identical config does not rewrite it
    mtime = path.stat().st_mtime_ns
    os.utime(path, ns=(mtime - 10**9, mtime - 10**9))
    monkeypatch.chdir(tmp_path)
    assert write_config_snapshot(cfg, 20250610) == path and path.stat().st_mtime_ns == mtime - 10**9
    # another configuration the same night never replaces the file jobs may be reading: its own file
    other = load_config([a], environ={})
    assert config_snapshot_path(other, 20250610) != path
    second = write_config_snapshot(other, 20250610)
    assert second.parent == path.parent and second.name.startswith("20250610-") and second.suffix == ".yaml"
    assert second == config_snapshot_path(other, 20250610) == write_config_snapshot(other, 20250610)
    assert load_config(path, environ={}).alerts.topic == "site-b"
    assert load_config(second, environ={}).alerts.topic != "site-b"
    assert stat.S_IMODE(second.stat().st_mode) == 0o640
    assert sorted(p.name for p in path.parent.iterdir()) == sorted([path.name, second.name])


def test_unwritable_snapshot_directory_is_bad_input(tmp_path):
    (tmp_path / "config").write_text("a file where the directory should be")
    cfg = load_config(environ={}, overrides={"root": str(tmp_path)})
    with pytest.raises(BadInputError, match="job.config_dir"):
        write_config_snapshot(cfg, 20250610)
