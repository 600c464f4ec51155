"""Tests of the bin/apbatch shim: it never runs an interpreter that lacks the package."""

from __future__ import annotations

import os
import shutil
import subprocess
import sys
from pathlib import Path

import pytest

SHIM = Path(__file__).resolve().parent.parent / "bin" / "apbatch"
BARE = Path(getattr(sys, "_base_executable", sys.executable))  # the interpreter the venv was made from


def clean_env() -> dict[str, str]:
    return {k: v for k, v in os.environ.items() if k not in ("PYTHONPATH", "VIRTUAL_ENV")}


def has_apbatch(python: Path) -> bool:
    done = subprocess.run([str(python), "-c", "import apbatch"], capture_output=True, env=clean_env())
    return done.returncode == 0


@pytest.mark.skipif(not (SHIM.parent.parent / ".venv" / "bin" / "python").exists(), reason="no .venv")
def test_shim_run_by_another_interpreter_uses_the_checkout_venv():
    assert not has_apbatch(BARE), "the base interpreter has apbatch: this test would prove nothing"
    done = subprocess.run([str(BARE), str(SHIM), "--help"], capture_output=True, text=True, env=clean_env(),
                          timeout=120)
    assert done.returncode == 0 and done.stdout.startswith("Usage: apbatch")


def test_shim_without_venv_or_package_says_so(tmp_path):
    assert not has_apbatch(BARE)
    copy = tmp_path / "bin" / "apbatch"
    copy.parent.mkdir()
    shutil.copy(SHIM, copy)
    done = subprocess.run([str(BARE), str(copy), "status"], capture_output=True, text=True, env=clean_env(),
                          timeout=60)
    assert done.returncode == 1 and done.stdout == ""
    assert done.stderr.strip().splitlines() == [
        f"apbatch: {BARE} cannot import apbatch (No module named 'apbatch'); run scripts/bootstrap.sh "
        f"to make {tmp_path / '.venv'}, or set up the package (EUPS: setup apbatch; pip: pip install .)"]


def test_shim_with_the_package_on_pythonpath_runs_it(tmp_path):
    """An EUPS set-up: no .venv next to the shim, the package on PYTHONPATH."""
    copy = tmp_path / "bin" / "apbatch"
    copy.parent.mkdir()
    shutil.copy(SHIM, copy)
    done = subprocess.run([sys.executable, str(copy), "--help"], capture_output=True, text=True, timeout=120)
    assert done.returncode == 0 and "resubmit" in done.stdout
