"""The ``backend:`` section of the configuration: one model per batch system (`apbatch.backends`).

``kind`` selects the model (a pydantic discriminated union, `BackendConfig`); `apbatch.config`
re-exports every name here and refuses a field the configured kind lacks.
"""

from __future__ import annotations

import re
from typing import Annotated, Literal

from pydantic import AfterValidator, BeforeValidator, Field

from .config_sources import ConfigModel as _Model

__all__ = ["PILOT_GRACE_SECONDS", "PILOT_MEM_HEADROOM_MIB", "BackendConfig", "HTCondorBackendConfig",
           "LocalBackendConfig", "PilotBackendConfig", "PilotHTCondorLauncher", "PilotLocalLauncher",
           "PilotSlurmLauncher", "SlurmBackendConfig", "time_limit_seconds"]


def time_limit_seconds(text: str) -> int:
    """Seconds of a Slurm-style time limit: ``M``, ``MM:SS``, ``HH:MM:SS``, ``D-HH[:MM[:SS]]``.

    Raises
    ------
    ValueError
        Raised if ``text`` is none of these, or not positive.
    """
    m = re.fullmatch(r"(?:(\d+)-)?(\d+)(?::(\d+))?(?::(\d+))?", text.strip())
    if m is None:
        raise ValueError(f"{text!r} is not a time limit (M, MM:SS, HH:MM:SS or D-HH:MM:SS)")
    days, a, b, c = (int(x) if x is not None else None for x in m.groups())
    assert a is not None
    if days is not None:
        seconds = days * 86400 + a * 3600 + (b or 0) * 60 + (c or 0)
    elif c is not None:
        seconds = a * 3600 + (b or 0) * 60 + c
    elif b is not None:
        seconds = a * 60 + b
    else:
        seconds = a * 60
    if seconds <= 0:
        raise ValueError(f"{text!r} is not a positive time limit")
    return seconds


def _time_limit(value: str) -> str:
    time_limit_seconds(value)
    return value


TimeLimit = Annotated[str, AfterValidator(_time_limit)]
"""A Slurm-style time limit, checked by `time_limit_seconds` when the config is read."""


def _slurm_time_limit(value: str) -> str:
    if value.strip().upper() in ("UNLIMITED", "INFINITE"):  # Slurm's own words for no limit
        return value.strip()
    return _time_limit(value)


SlurmTimeLimit = Annotated[str, AfterValidator(_slurm_time_limit)]
"""`TimeLimit` or Slurm's ``UNLIMITED`` / ``INFINITE``: what ``sbatch --time`` accepts, checked
when the config is read (a bad one used to fail every sbatch of the night)."""


class LocalBackendConfig(_Model):
    """Local process pool: jobs run as separate processes on this machine."""

    kind: Literal["local"] = "local"
    max_workers: int | None = Field(None, ge=1, description="concurrent jobs; default: number of cores")
    log_dir: str = "logs/local"


class SlurmBackendConfig(_Model):
    """Slurm through its command-line tools (sbatch/squeue/scontrol/scancel/sacct)."""

    kind: Literal["slurm"] = "slurm"
    partition: str | None = None
    account: str | None = None
    qos: str | None = None
    time_limit: SlurmTimeLimit = Field("00:10:00", description=(
        "sbatch --time: [[D-]HH:]MM:SS, minutes, or UNLIMITED"))
    mem: str | None = "4G"
    cpus_per_task: int = Field(1, ge=1)
    requeue: bool = True
    max_array_parallel: int | None = Field(None, ge=1, description="the %N throttle of --array")
    extra_directives: list[str] = []
    log_dir: str = "logs/slurm"
    jobcomp_log: str | None = Field(None, description="jobcomp/filetxt log read when sacct is unavailable")
    command_timeout: float = 30.0


class HTCondorBackendConfig(_Model):
    """HTCondor through the ``htcondor2`` Python bindings."""

    kind: Literal["htcondor"] = "htcondor"
    schedd_name: str | None = None
    collector: str | None = None
    request_memory: str = "4GB"
    request_cpus: int = Field(1, ge=1)
    max_retries: int = Field(2, ge=0, description=(
        "HTCondor reruns of a job killed by a signal (a lost node), like Slurm's --requeue; a job "
        "that exits is never rerun by HTCondor: the daemon owns retries of exit codes 3 and 4"))
    time_limit: TimeLimit = Field("00:10:00", description="wall time ([[D-]HH:]MM:SS or minutes, as Slurm's "
                            "--time): a job running longer is removed and reported TIMEOUT")
    extra_attributes: dict[str, str] = {}
    log_dir: str = "logs/htcondor"


class PilotLocalLauncher(_Model):
    """Pilots are detached processes on the submitting machine."""

    kind: Literal["local"] = "local"


class PilotSlurmLauncher(_Model):
    """Each pilot is one ordinary Slurm job (``sbatch``); its time limit is ``max_lifetime`` plus
    `PILOT_GRACE_SECONDS`, its memory ``max_rss_mib`` plus `PILOT_MEM_HEADROOM_MIB` unless ``mem``."""

    kind: Literal["slurm"] = "slurm"
    partition: str | None = None
    account: str | None = None
    qos: str | None = None
    mem: str | None = Field(None, description="the pilot job's --mem (default: max_rss_mib + one CCD's "
                            "working set)")
    cpus_per_task: int = Field(1, ge=1)
    extra_directives: list[str] = []
    jobcomp_log: str | None = Field(None, description="jobcomp/filetxt log read when sacct is unavailable")
    command_timeout: float = 30.0


class PilotHTCondorLauncher(_Model):
    """Each pilot is one ordinary HTCondor job (``htcondor2`` bindings)."""

    kind: Literal["htcondor"] = "htcondor"
    schedd_name: str | None = None
    collector: str | None = None
    request_cpus: int = Field(1, ge=1)
    request_memory: str | None = Field(None, description="default: max_rss_mib + one CCD's working set")
    extra_attributes: dict[str, str] = {}


def _launcher_shorthand(value: object) -> object:
    """``launcher: slurm`` means ``launcher: {kind: slurm}``."""
    return {"kind": value} if isinstance(value, str) else value


PilotLauncher = Annotated[
    PilotLocalLauncher | PilotSlurmLauncher | PilotHTCondorLauncher,
    Field(discriminator="kind"),
    BeforeValidator(_launcher_shorthand),
]

PILOT_GRACE_SECONDS = 600
"""A batch pilot's time limit is ``max_lifetime`` plus this: it takes no new work after
``max_lifetime`` and may still be running a CCD (raw timeout included)."""
PILOT_MEM_HEADROOM_MIB = 1024
"""A batch pilot's memory request is ``max_rss_mib`` (checked after each CCD) plus this, the
working set of one CCD on top of what the pilot keeps."""


class PilotBackendConfig(_Model):
    """Warm pilots: long-lived processes that run the per-CCD work in-process
    (`apbatch.backends.pilot`); ``launcher`` says how a pilot is started (a local process, or
    an ordinary Slurm or HTCondor job)."""

    kind: Literal["pilot"] = "pilot"
    pilots: int = Field(2, ge=1, description="pilot processes at most at once (each runs one CCD at a time)")
    idle_timeout: float = Field(600.0, gt=0, description="seconds without work after which a pilot ends")
    max_lifetime: TimeLimit = Field("16:00:00", description=(
        "a pilot takes no new work after this long ([[D-]HH:]MM:SS or minutes): the end of the night"))
    calib_cache: int = Field(4, ge=0, description="calibrations (bias, flat) each pilot keeps read, at most")
    calib_cache_mib: float = Field(512.0, ge=0, description=(
        "space the kept calibrations' pixel files may use (a private temporary directory, not the "
        "pilot's memory), MiB; the least recently used go first"))
    max_rss_mib: float = Field(3072.0, gt=0, description=(
        "a pilot whose resident memory after a CCD is above this ends, and a fresh one takes the queue"))
    command: list[str] = Field(["apbatch", "pilot"], min_length=1, description=(
        "the pilot's command; a bare 'apbatch' becomes this install's script"))
    launcher: PilotLauncher = Field(default_factory=PilotLocalLauncher, description=(
        "how pilots start: local (detached processes here), slurm or htcondor (one batch job each; "
        "log_dir must then be on a filesystem the pilots' nodes share, with working link and flock)"))
    log_dir: str = "logs/pilot"


BackendConfig = Annotated[
    LocalBackendConfig | SlurmBackendConfig | HTCondorBackendConfig | PilotBackendConfig,
    Field(discriminator="kind"),
]
