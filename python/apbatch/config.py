"""Configuration: pydantic models, YAML files, ``APBATCH_*`` environment overrides.

Precedence (last wins): model defaults < YAML file(s) (``--config`` or ``$APBATCH_CONFIG``)
< environment variables ``APBATCH_<SECTION>__<FIELD>`` (e.g. ``APBATCH_BACKEND__KIND=slurm``,
``APBATCH_LEDGER__URL=postgresql://...``). Secrets (Kafka and database passwords) are read only
from the environment or from files named in the config, never from a command line, so that
nobody reading ``squeue``/``condor_q`` sees them.

Every path that is not absolute is relative to ``root`` (default ``./apbatch-work``).
:func:`load_config` is called at start-up by the commands, never at import time.
"""

from __future__ import annotations

import os
from pathlib import Path
from typing import Annotated, Any, Literal

import yaml
from pydantic import BaseModel, ConfigDict, Field, ValidationError

from .errors import BadInputError

__all__ = [
    "AlertsConfig",
    "ApbatchConfig",
    "ApdbConfig",
    "BackendConfig",
    "EventsConfig",
    "HTCondorBackendConfig",
    "JobConfig",
    "KafkaConfig",
    "LedgerConfig",
    "LocalBackendConfig",
    "SlurmBackendConfig",
    "SourceConfig",
    "load_config",
]


class _Model(BaseModel):
    model_config = ConfigDict(extra="forbid", frozen=True)


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
    time_limit: str = "00:10:00"
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
    max_retries: int = Field(2, ge=0)
    extra_attributes: dict[str, str] = {}
    log_dir: str = "logs/htcondor"


BackendConfig = Annotated[
    LocalBackendConfig | SlurmBackendConfig | HTCondorBackendConfig, Field(discriminator="kind")
]


class LedgerConfig(_Model):
    """Where every submission is recorded (SQLAlchemy URL; SQLite or PostgreSQL)."""

    url: str = "sqlite:///ledger.sqlite3"


class SourceConfig(_Model):
    """Where the daemon reads observatory events from."""

    kind: Literal["spool", "stdin", "kafka"] = "spool"
    spool_dir: str = "events/incoming"
    poll_interval: float = Field(0.2, gt=0)
    kafka_topics: list[str] = [
        "lsst.sal.ScriptQueue.logevent_nextVisit",
        "lsst.sal.MTCamera.logevent_startIntegration",
        "lsst.sal.CCCamera.logevent_startIntegration",
        "lsst.sal.ATCamera.logevent_startIntegration",
    ]
    kafka_group_id: str = "apbatch-daemon"


class EventsConfig(_Model):
    """How events are judged and turned into jobs."""

    mode: Literal["dynamic", "batch"] = Field(
        "dynamic", description="dynamic: submit at nextVisit; batch: submit at startIntegration")
    max_age: float = Field(600.0, gt=0,
                           description="events older than this (s, by private_sndStamp) are stale")
    dead_letter: str = "events/dead-letter.jsonl"
    anticipated_exposure_time: dict[str, float] = Field(
        default_factory=lambda: {"default": 30.0},
        description="per survey (or instrument) name; 'default' for the rest")
    process_calibrations: bool = True
    detectors: dict[str, list[int]] = Field(
        default_factory=dict, description="per instrument: only these detector ids (partial focal plane)")
    max_attempts: int = Field(3, ge=1, description="submissions per CCD, retries of exit codes 3/4 included")


class KafkaConfig(_Model):
    """A Kafka cluster (alerts out, or events in). Credentials from env/files only."""

    bootstrap_servers: str = "127.0.0.1:9092"
    security_protocol: str = "PLAINTEXT"
    sasl_mechanism: str | None = None
    username_env: str = "APBATCH_KAFKA_USERNAME"
    password_env: str = "APBATCH_KAFKA_PASSWORD"
    password_file: str | None = None


class AlertsConfig(_Model):
    """Where alerts go."""

    sink: Literal["file", "kafka"] = "file"
    directory: str = "alerts"
    topic: str = "alerts-simulated"
    spool_dir: str = "alerts/spool"
    history_days: float = 365.0
    cutout_size: int = Field(30, ge=8)
    send_timeout: float = Field(30.0, ge=0,
                                description="s a job waits for delivery before leaving alerts spooled")
    # The newest schema the pinned lsst-alert-packet ships (tests check it): sites whose
    # consumers know older ids (lsst-alert-stream's default registry: 11.0) set e.g. "11.0".
    schema_version: str = Field(
        "11.1", description="alert schema written (major.minor; framed as major*100+minor)")


class ApdbConfig(_Model):
    """The Alert Production Database."""

    url: str = "sqlite:///apdb.sqlite3"
    config_file: str = "apdb-config.yaml"
    association_radius_arcsec: float = 1.0
    region_padding_arcsec: float = 10.0
    history_days: float = 365.0


class JobConfig(_Model):
    """What each per-CCD job is told (beyond its per-CCD arguments)."""

    repo: str = "butler"
    input_collection: str = "{instrument}/defaults"
    output_run: str = "{instrument}/prompt/{day_obs}"
    distributor: str = "distributor"
    raw_timeout: float = Field(120.0, gt=0)
    command: list[str] = Field(["apbatch", "process-ccd"], min_length=1, description=(
        "the per-CCD command; a bare 'apbatch' becomes this install's script at submission"))
    config_dir: str = Field("config", description="where the night's resolved config for the jobs is written")
    env: dict[str, str] = {"OMP_NUM_THREADS": "1", "OPENBLAS_NUM_THREADS": "1", "MKL_NUM_THREADS": "1"}


class ApbatchConfig(_Model):
    """Everything the daemon, the commands and the jobs are configured with."""

    root: str = "apbatch-work"
    backend: BackendConfig = Field(default_factory=LocalBackendConfig)
    ledger: LedgerConfig = LedgerConfig()
    source: SourceConfig = SourceConfig()
    events: EventsConfig = EventsConfig()
    kafka: KafkaConfig = KafkaConfig()
    alerts: AlertsConfig = AlertsConfig()
    apdb: ApdbConfig = ApdbConfig()
    job: JobConfig = JobConfig()

    def path(self, value: str) -> Path:
        """Resolve a configured path against ``root``."""
        p = Path(value)
        return p if p.is_absolute() else Path(self.root) / p

    def sqlalchemy_url(self, url: str) -> str:
        """Make a ``sqlite:///relative`` URL relative to ``root``; other URLs unchanged."""
        prefix = "sqlite:///"
        if url.startswith(prefix) and not url.startswith(prefix + "/") and ":memory:" not in url:
            return prefix + str(Path(self.root).resolve() / url[len(prefix):])
        return url


def _deep_merge(base: dict, extra: dict) -> dict:
    out = dict(base)
    for key, value in extra.items():
        if isinstance(value, dict) and isinstance(out.get(key), dict):
            out[key] = _deep_merge(out[key], value)
        else:
            out[key] = value
    return out


def _env_overrides(environ: dict[str, str]) -> dict[str, Any]:
    """``APBATCH_SECTION__FIELD=value`` -> ``{"section": {"field": value}}`` (YAML-parsed values)."""
    out: dict[str, Any] = {}
    for key, raw in environ.items():
        if not key.startswith("APBATCH_") or key == "APBATCH_CONFIG":
            continue
        parts = key[len("APBATCH_"):].lower().split("__")
        if len(parts) == 1 and parts[0] != "root":
            continue  # not a config field (e.g. a secret like APBATCH_KAFKA_PASSWORD)
        try:
            value = yaml.safe_load(raw)
        except yaml.YAMLError:
            value = raw
        node = out
        for part in parts[:-1]:
            node = node.setdefault(part, {})
        node[parts[-1]] = value
    return out


def load_config(paths: list[str | Path] | str | Path | None = None, overrides: dict[str, Any] | None = None,
                environ: dict[str, str] | None = None) -> ApbatchConfig:
    """Build the configuration from defaults, YAML files, the environment and overrides.

    Parameters
    ----------
    paths : `str`, `Path` or `list`, optional
        YAML files, merged in order; default ``$APBATCH_CONFIG`` if set.
    overrides : `dict`, optional
        Nested values applied last (from command-line options).
    environ : `dict`, optional
        Environment to read ``APBATCH_*`` from; default `os.environ`.

    Raises
    ------
    BadInputError
        Raised if a file cannot be read or a value is invalid; names the field.
    """
    environ = dict(os.environ if environ is None else environ)
    if paths is None:
        paths = [environ["APBATCH_CONFIG"]] if environ.get("APBATCH_CONFIG") else []
    elif isinstance(paths, str | Path):
        paths = [paths]
    data: dict[str, Any] = {}
    for p in paths:
        try:
            loaded = yaml.safe_load(Path(p).read_text()) or {}
        except FileNotFoundError:
            raise BadInputError("--config", f"no such file {str(p)!r}", "check the path") from None
        except yaml.YAMLError as exc:
            raise BadInputError("--config", f"{p} is not valid YAML: {str(exc).splitlines()[0]}") from None
        if not isinstance(loaded, dict):
            raise BadInputError("--config", f"{p} must hold a mapping of sections")
        data = _deep_merge(data, loaded)
    data = _deep_merge(data, _env_overrides(environ))
    data = _deep_merge(data, overrides or {})
    try:
        return ApbatchConfig.model_validate(data)
    except ValidationError as exc:
        err = exc.errors()[0]
        field = ".".join(str(x) for x in err["loc"])
        raise BadInputError(f"config {field}", err["msg"],
                            "fix the YAML file or APBATCH_* variable") from None
