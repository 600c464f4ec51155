"""Shared test set-up.

Real-service tests (Slurm, Kafka, PostgreSQL) start the services through the project's own scripts in
``scripts/``. On a developer's machine where a service cannot start they skip; under
``CI=true`` a skip of a real-service test is turned into a failure (pattern from dramatiq's
conftest), so CI cannot go green without having exercised them.
"""

from __future__ import annotations

import os
import socket
from pathlib import Path

import pytest

# Service fixtures live in their own modules (tests/fixtures_<service>.py).
pytest_plugins = [p for p in ("fixtures_slurm", "fixtures_kafka", "fixtures_postgres")
                  if (Path(__file__).parent / f"{p}.py").exists()]

IN_CI = os.environ.get("CI", "").lower() in ("1", "true", "yes")


def free_port() -> int:
    """A TCP port on 127.0.0.1 that nothing listens on right now (for a service fixture)."""
    with socket.socket() as s:
        s.bind(("127.0.0.1", 0))
        return s.getsockname()[1]


def service_unavailable(service: str, why: str) -> None:
    """Skip (developer machine) or fail (CI) a test whose real service could not start."""
    if IN_CI:
        pytest.fail(f"{service} is required under CI=true but could not be started: {why}")
    pytest.skip(f"{service} unavailable: {why}")


@pytest.fixture
def butler(tmp_path):
    """A new butler repository in ``tmp_path/repo`` with LSSTComCam registered (modules that need
    another repository define their own ``butler`` fixture, which takes precedence)."""
    from apbatch.butler.repo import create_repo, register_instrument

    b = create_repo(tmp_path / "repo")
    register_instrument(b, "LSSTComCam")
    return b
