"""Batch backends: local process pool, Slurm, HTCondor; chosen by ``config.backend.kind``.

Backend modules load lazily: ``import apbatch.backends`` does not import ``htcondor2``.
"""

from __future__ import annotations

import importlib

from ..config import ApbatchConfig
from ..errors import BadInputError
from .base import Backend, JobState, JobStatus, SubmittedJob

__all__ = ["BACKENDS", "Backend", "JobState", "JobStatus", "SubmittedJob", "make_backend"]

BACKENDS: dict[str, str] = {
    "local": "apbatch.backends.local:LocalBackend",
    "slurm": "apbatch.backends.slurm:SlurmBackend",
    "htcondor": "apbatch.backends.htcondor:HTCondorBackend",
    "pilot": "apbatch.backends.pilot:PilotBackend",
}


def make_backend(config: ApbatchConfig, **deps) -> Backend:
    """The backend named by ``config.backend.kind``, built with ``deps``.

    Parameters
    ----------
    config : `ApbatchConfig`
        The whole configuration.
    **deps
        Injected dependencies passed to the constructor: ``runner`` (all), ``executable``
        (all: the interpreter whose install the jobs run), ``python`` (local), ``schedd`` /
        ``schedd_factory`` (htcondor).

    Raises
    ------
    BadInputError
        Raised if the kind is not a known backend.
    """
    target = BACKENDS.get(config.backend.kind)
    if target is None:
        raise BadInputError("config backend.kind", f"unknown backend {config.backend.kind!r}",
                            f"use one of {', '.join(BACKENDS)}")
    module, attr = target.split(":")
    return getattr(importlib.import_module(module), attr)(config, **deps)
