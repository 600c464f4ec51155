"""The ``postgres_url`` fixture: a fresh database on a real PostgreSQL server (scripts/postgres-local.sh).

One server per pytest process (each xdist worker its own port and state directory), started
once; every test that asks for ``postgres_url`` gets a database of its own (with btree_gist,
from template1), dropped afterwards. The state directory is made directly under the system
temporary directory: when the tests run as root the server runs as 'postgres', which cannot
enter pytest's private (0700) temporary directories.
"""

from __future__ import annotations

import contextlib
import os
import shutil
import subprocess
import tempfile
import uuid
from pathlib import Path

import pytest

SCRIPT = Path(__file__).resolve().parent.parent / "scripts" / "postgres-local.sh"


@pytest.fixture(scope="session")
def postgres_server():
    """``postgresql+psycopg2://apbatch@127.0.0.1:PORT`` of a server that lives for the session."""
    from conftest import free_port, service_unavailable

    bash = shutil.which("bash")
    if bash is None:
        service_unavailable("postgres", "bash not found")
    state = tempfile.mkdtemp(prefix="apbatch-pg-")
    os.chmod(state, 0o755)
    port = free_port()
    env = {**os.environ, "PG_LOCAL_DIR": state, "PG_LOCAL_PORT": str(port)}
    try:
        proc = subprocess.run([bash, str(SCRIPT), "start"], env=env, capture_output=True, text=True,
                              timeout=300)
    except subprocess.TimeoutExpired:
        service_unavailable("postgres", "scripts/postgres-local.sh start took more than 300 s")
    if proc.returncode != 0:
        service_unavailable("postgres", (proc.stderr.strip().splitlines() or ["no output"])[-1])
    try:
        yield f"postgresql+psycopg2://apbatch@127.0.0.1:{port}"
    finally:
        subprocess.run([bash, str(SCRIPT), "stop"], env=env, capture_output=True, timeout=60)
        shutil.rmtree(state, ignore_errors=True)


@contextlib.contextmanager
def new_database(server: str, prefix: str = "t"):
    """SQLAlchemy URL of a new, empty database on ``server``, dropped when the block ends."""
    import sqlalchemy as sa

    name = f"{prefix}_{uuid.uuid4().hex[:12]}"
    admin = sa.create_engine(f"{server}/postgres", isolation_level="AUTOCOMMIT")
    try:
        with admin.connect() as conn:
            conn.execute(sa.text(f'CREATE DATABASE "{name}"'))
        yield f"{server}/{name}"
        with admin.connect() as conn:
            conn.execute(sa.text(f'DROP DATABASE IF EXISTS "{name}" WITH (FORCE)'))
    finally:
        admin.dispose()


@pytest.fixture
def postgres_url(postgres_server):
    """SQLAlchemy URL of a new, empty database (dropped after the test)."""
    with new_database(postgres_server) as url:
        yield url
