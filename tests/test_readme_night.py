"""The README's "night by hand", run line by line as a user would: the venv's ``apbatch``
console script, the default configuration, a fresh directory (a smaller night: 1 visit, 1 CCD)."""

from __future__ import annotations

import json
import os
import shlex
import subprocess
import sys
import time
from pathlib import Path

import pytest

README = Path(__file__).parents[1] / "README.rst"


def readme_night_commands() -> list[str]:
    """The command lines of the README's "A night by hand" block, in order."""
    text = README.read_text()
    start = text.index("A night by hand")
    block = text[text.index("::\n", start) + 3:]
    lines = []
    for line in block.splitlines()[1:]:
        if line and not line.startswith("   "):
            break
        if line.strip():
            lines.append(line.split("#")[0].strip())
    return lines


def test_readme_block_is_found():
    cmds = readme_night_commands()
    assert cmds[0].startswith("apbatch sim night") and cmds[-1] == "apbatch status"
    assert any(c.endswith("&") for c in cmds)


@pytest.mark.slow
def test_readme_night_by_hand_completes_every_ccd(tmp_path):
    bindir = Path(sys.executable).parent
    apbatch = bindir / "apbatch"
    assert apbatch.exists(), "the venv has no `apbatch` console script"
    env = {k: v for k, v in os.environ.items() if not k.startswith("APBATCH_")}
    # only the venv's bin on PATH ahead of the system: `apbatch` must be the console script
    env["PATH"] = f"{bindir}{os.pathsep}/usr/bin{os.pathsep}/bin"
    env.update(OMP_NUM_THREADS="1", OPENBLAS_NUM_THREADS="1")

    def run(cmd: str, timeout: float = 600) -> subprocess.CompletedProcess:
        return subprocess.run(shlex.split(cmd), cwd=tmp_path, env=env, capture_output=True, text=True,
                              timeout=timeout)

    daemon = None
    try:
        for cmd in readme_night_commands():
            cmd = cmd.replace("--visits 3 --detectors 0,4,8", "--visits 1 --detectors 4")
            cmd = cmd.replace("[0, 4, 8]", "[4]").replace("--speed 10", "--speed 40")
            if cmd.startswith("export "):
                key, _, value = cmd[len("export "):].partition("=")
                env[key] = shlex.split(value)[0]
                continue
            if cmd.endswith("&"):
                daemon = subprocess.Popen([*shlex.split(cmd[:-1]), "--status-interval", "1"], cwd=tmp_path,
                                          env=env, stdout=subprocess.PIPE, stderr=subprocess.PIPE, text=True)
                continue
            if cmd == "apbatch status":
                break
            done = run(cmd)
            assert done.returncode == 0, f"{cmd}\n{done.stderr[-3000:]}"
        # the daemon tracks the jobs; wait until none is unfinished
        deadline, rows = time.monotonic() + 600, {}
        while time.monotonic() < deadline:
            st = run("apbatch status --json")
            rows = json.loads(st.stdout) if st.returncode in (0, 6) else {}
            states = _states(rows)
            if states and not set(states) & {"CLAIMED", "SUBMITTED", "PENDING", "RUNNING", "HELD", "UNKNOWN"}:
                break
            time.sleep(3)
        final = run("apbatch status")
        assert final.returncode == 0, final.stdout + final.stderr
        # every CCD of the night COMPLETED: the science visit's and the calibration exposures'
        states = _states(rows)
        assert set(states) == {"COMPLETED"}, (rows, final.stdout)
        science = [v for v in rows["visits"] if v["intent"] == "science"]
        assert len(science) == 1 and science[0]["ccds"] == 1, rows
    finally:
        if daemon is not None:
            daemon.terminate()
            out, err = daemon.communicate(timeout=60)
            if daemon.returncode not in (0, -15):
                print(err[-3000:])


def _states(rows) -> dict[str, int]:
    """State counts over the ``status --json`` visit rows."""
    counts: dict[str, int] = {}
    for row in rows.get("visits", []):
        for state, n in (row.get("states") or {}).items():
            counts[state] = counts.get(state, 0) + int(n)
    return counts
