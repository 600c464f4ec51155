"""The real single-node Slurm cluster, started by the project's own ``scripts/slurm-local.sh``.

``slurm_cluster`` (session scope) starts it (installing the Debian packages if needed; needs
root), sets ``SLURM_CONF`` in `os.environ` and yields a `SlurmCluster`. xdist workers share
one cluster: every worker registers in a users file under a lock, and the last one out stops
the cluster, and only if a test session started it (a cluster that was already running,
e.g. for the benchmark, is left running). If it cannot start, the tests skip, or fail
under ``CI=true`` (`conftest.service_unavailable`).
"""

from __future__ import annotations

import dataclasses
import fcntl
import os
import shutil
import subprocess
from pathlib import Path

import pytest
from conftest import service_unavailable

__all__ = ["SlurmCluster", "slurm_cluster"]

SCRIPT = Path(__file__).resolve().parent.parent / "scripts" / "slurm-local.sh"
STATE_DIR = Path(os.environ.get("SLURM_LOCAL_DIR", "/tmp/apbatch-slurm"))


@dataclasses.dataclass(frozen=True)
class SlurmCluster:
    """What a test needs to know about the running cluster."""

    conf: Path
    jobcomp_log: Path
    state_dir: Path


def _script(command: str, timeout: float = 600) -> subprocess.CompletedProcess:
    env = {**os.environ, "SLURM_LOCAL_DIR": str(STATE_DIR)}
    return subprocess.run(["bash", str(SCRIPT), command], capture_output=True, text=True,
                          timeout=timeout, env=env)


def _update_users(update) -> int:
    """Apply ``update(set of users)`` to the users file; return how many are left (call under the lock)."""
    path = Path(f"{STATE_DIR}.users")
    users = set(path.read_text().split()) if path.exists() else set()
    users = update({u for u in users if Path(f"/proc/{u}").exists()})  # drop sessions that were killed
    path.write_text("\n".join(sorted(users)))
    return len(users)


@pytest.fixture(scope="session")
def slurm_cluster():
    """A running single-node Slurm; `SLURM_CONF` set for the client commands."""
    if os.geteuid() != 0:
        service_unavailable("slurm", "scripts/slurm-local.sh needs root")
    if shutil.which("bash") is None:
        service_unavailable("slurm", "bash is not installed")
    me = str(os.getpid())
    lock = Path(f"{STATE_DIR}.users.lock")
    with open(lock, "a") as f:
        fcntl.flock(f, fcntl.LOCK_EX)  # one worker starts it; the others wait and find it running
        if _script("status", 30).returncode != 0:
            try:
                result = _script("start")
            except subprocess.TimeoutExpired:
                service_unavailable("slurm", "slurm-local.sh start timed out")
            if result.returncode != 0:
                tail = " | ".join(result.stderr.strip().splitlines()[-3:])
                service_unavailable("slurm", f"slurm-local.sh start failed: {tail}")
            Path(f"{STATE_DIR}.started-by-tests").touch()
        _update_users(lambda users: users | {me})
    conf = STATE_DIR / "etc" / "slurm.conf"
    old = os.environ.get("SLURM_CONF")
    os.environ["SLURM_CONF"] = str(conf)
    try:
        yield SlurmCluster(conf=conf, jobcomp_log=STATE_DIR / "log" / "jobcomp.txt", state_dir=STATE_DIR)
    finally:
        if old is None:
            os.environ.pop("SLURM_CONF", None)
        else:
            os.environ["SLURM_CONF"] = old
        with open(lock, "a") as f:
            fcntl.flock(f, fcntl.LOCK_EX)
            marker = Path(f"{STATE_DIR}.started-by-tests")
            if _update_users(lambda users: users - {me}) == 0 and marker.exists():
                _script("stop", 120)
                marker.unlink()
