"""The ``kafka_broker`` fixture: a real Kafka-protocol broker (Tansu) via scripts/kafka-local.sh.

Each pytest process (each xdist worker) starts its own broker on a free port with its own
state directory, so sessions never share or stop each other's broker.
"""

from __future__ import annotations

import os
import shutil
import subprocess
import sys
from pathlib import Path

import pytest

SCRIPT = Path(__file__).resolve().parent.parent / "scripts" / "kafka-local.sh"


@pytest.fixture(scope="session")
def kafka_broker(tmp_path_factory):
    """Bootstrap servers (``127.0.0.1:PORT``) of a broker that lives for the test session."""
    from conftest import free_port, service_unavailable

    bash = shutil.which("bash")
    if bash is None:
        service_unavailable("kafka", "bash not found")
    port = free_port()
    env = {**os.environ, "KAFKA_LOCAL_DIR": str(tmp_path_factory.mktemp("kafka")),
           "KAFKA_LOCAL_PORT": str(port), "KAFKA_LOCAL_VENV": sys.prefix}
    try:
        proc = subprocess.run([bash, str(SCRIPT), "start"], env=env, capture_output=True, text=True,
                              timeout=180)
    except subprocess.TimeoutExpired:
        service_unavailable("kafka", "scripts/kafka-local.sh start took more than 180 s")
    if proc.returncode != 0:
        service_unavailable("kafka", (proc.stderr.strip().splitlines() or ["no output"])[-1])
    try:
        yield f"127.0.0.1:{port}"
    finally:
        subprocess.run([bash, str(SCRIPT), "stop"], env=env, capture_output=True, timeout=30)
