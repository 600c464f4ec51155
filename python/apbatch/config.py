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
from typing import Any, Literal

from pydantic import Field, ValidationError, field_validator

from .config_backends import (
    BackendConfig,
    HTCondorBackendConfig,
    LocalBackendConfig,
    PilotBackendConfig,
    SlurmBackendConfig,
    time_limit_seconds,
)
from .config_services import (
    CalibVerifyConfig,
    EmbargoConfig,
    MonitoringConfig,
    ObscoreConfig,
    OcpsConfig,
    PpdbConfig,
    TapConfig,
)
from .config_sources import ConfigModel, deep_merge, env_overrides, read_yaml
from .errors import BadInputError

__all__ = [
    "AlertsConfig",
    "ApbatchConfig",
    "ApdbConfig",
    "BackendConfig",
    "CalibVerifyConfig",
    "EmbargoConfig",
    "EventsConfig",
    "HTCondorBackendConfig",
    "JobConfig",
    "KafkaConfig",
    "LedgerConfig",
    "LocalBackendConfig",
    "MonitoringConfig",
    "ObscoreConfig",
    "OcpsConfig",
    "PilotBackendConfig",
    "PpdbConfig",
    "SlurmBackendConfig",
    "SourceConfig",
    "TapConfig",
    "load_config",
    "time_limit_seconds",
]


_Model = ConfigModel


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
    settle_time: float = Field(
        0.5, ge=0, description="seconds a spool file's size and mtime must stay unchanged before it is "
                               "read (a .json file holding one complete JSON document is read at once)")
    max_event_bytes: int = Field(65536, ge=1024,
                                 description="largest event (a line, a message, a one-event file) accepted")
    max_file_bytes: int = Field(16 * 1024 * 1024, ge=1024,
                                description="largest spool or `apbatch submit` file accepted")


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

    @field_validator("detectors")
    @classmethod
    def _known_science_detectors(cls, value: dict[str, list[int]]) -> dict[str, list[int]]:
        """Check each subset at start-up (not at the first event), keyed by the butler name.

        Raises a `BadInputError` naming ``events.detectors.<instrument>`` (`load_config` passes
        it on) if an instrument is unknown, a subset is empty, or a detector is unknown or not a
        science CCD.
        """
        if not value:
            return value
        from .instruments import get_instrument  # numpy and astropy: only when a subset is configured

        out: dict[str, list[int]] = {}
        for name, ids in value.items():
            try:
                inst = get_instrument(name)
            except BadInputError as exc:
                raise BadInputError(f"events.detectors.{name}", exc.problem, exc.fix) from None
            field = f"events.detectors.{inst.name}"
            if inst.name in out:
                raise BadInputError(field, f"given twice (as {name!r})", "list each instrument once")
            if not ids:
                raise BadInputError(field, "is empty: no CCD would ever be processed",
                                    "list at least one detector id, or remove the entry")
            for det in (inst.detector(i, field=field) for i in ids):
                if not det.is_science:
                    raise BadInputError(field, f"{det.name} ({det.id}) is a {det.purpose.lower()} CCD",
                                        "AP jobs run on science CCDs only")
            out[inst.name] = list(ids)
        return out


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
    replication: bool = Field(True, description=(
        "record each store's replica chunk for the PPDB (`apbatch ppdb replicate`); read at "
        "`apbatch apdb create` (measured: +25-55 ms a CCD store on PostgreSQL, noise on SQLite)"))


class JobConfig(_Model):
    """What each per-CCD job is told (beyond its per-CCD arguments)."""

    repo: str = "butler"
    input_collection: str = "{instrument}/defaults"
    output_run: str = "{instrument}/prompt/{day_obs}"
    distributor: str = "distributor"
    raw_timeout: float = Field(120.0, gt=0)
    threads: int = Field(2, ge=1, description=(
        "threads a job uses between its raw and its alerts (resampling, FFTs, filters); the latency "
        "target counts from a raw arriving when a core is free. Match the CPUs a job is given "
        "(backend.cpus_per_task / request_cpus)"))
    pointing_pad_arcsec: float = Field(20.0, ge=0, description=(
        "templates and the APDB region read before the raw arrive cover nextVisit's footprint grown "
        "by this; a header pointing farther away than this makes the job read them again"))
    command: list[str] = Field(["apbatch", "process-ccd"], min_length=1, description=(
        "the per-CCD command; a bare 'apbatch' becomes this install's script at submission"))
    config_dir: str = Field("config", description="where the night's resolved config for the jobs is written")
    env: dict[str, str] = {"OMP_NUM_THREADS": "1", "OPENBLAS_NUM_THREADS": "1", "MKL_NUM_THREADS": "1"}
    associate: bool = Field(True, description=(
        "associate DIA sources with the APDB and send alerts; false (OCPS requests by default): "
        "calibrated and difference images, the DIA table and the metrics only"))


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
    monitoring: MonitoringConfig = MonitoringConfig()
    calib_verify: CalibVerifyConfig = CalibVerifyConfig()
    ocps: OcpsConfig = OcpsConfig()
    embargo: EmbargoConfig = EmbargoConfig()
    ppdb: PpdbConfig = PpdbConfig()
    obscore: ObscoreConfig = ObscoreConfig()
    tap: TapConfig = TapConfig()

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


_BACKENDS = {cls.model_fields["kind"].default: cls
             for cls in (LocalBackendConfig, SlurmBackendConfig, HTCondorBackendConfig, PilotBackendConfig)}


def _check_backend_fields(data: dict[str, Any], env: dict[str, Any]) -> None:
    """Give the backend section its configured ``kind``, and refuse a field that kind lacks.

    ``APBATCH_BACKEND__TIME_LIMIT`` alone (or a file's backend section without ``kind``)
    applies to the backend the files configure, or to the default, ``local``; if that backend
    has no such field, one line names the variable (or ``config backend.<field>``) and the
    kinds that have it, instead of pydantic's complaint about the discriminator.
    """
    backend = data.get("backend")
    if not isinstance(backend, dict):
        return
    data["backend"] = backend = dict(backend)
    kind = backend.setdefault("kind", LocalBackendConfig.model_fields["kind"].default)
    cls = _BACKENDS.get(kind) if isinstance(kind, str) else None
    if cls is None:
        return  # pydantic's error names backend.kind
    env_backend = env.get("backend")
    from_env: dict[str, Any] = env_backend if isinstance(env_backend, dict) else {}
    for name in backend:
        if name in cls.model_fields:
            continue
        owners = [k for k, c in _BACKENDS.items() if name in c.model_fields]
        field, set_kind = ((f"APBATCH_BACKEND__{name.upper()}", "APBATCH_BACKEND__KIND") if name in from_env
                           else (f"config backend.{name}", "backend.kind"))
        fix = (f"set {set_kind} to {owners[0]}" if len(owners) == 1
               else f"set {set_kind} to one of {', '.join(owners)}" if owners
               else f"{kind} backend fields: {', '.join(cls.model_fields)}")
        raise BadInputError(field, f"the configured backend is {kind!r}, which has no {name!r}", fix)


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
        Raised, as one line naming the field (``--config``, ``config <section>.<field>`` or
        the ``APBATCH_*`` variable) and the fix, if a file cannot be read as UTF-8 YAML
        holding a mapping, or a value is invalid (a backend variable the configured
        ``backend.kind`` lacks, an unknown detector in ``events.detectors``...).
    """
    environ = dict(os.environ if environ is None else environ)
    if paths is None:
        paths = [environ["APBATCH_CONFIG"]] if environ.get("APBATCH_CONFIG") else []
    elif isinstance(paths, str | Path):
        paths = [paths]
    data: dict[str, Any] = {}
    for p in paths:
        data = deep_merge(data, read_yaml(p))
    env = env_overrides(environ)
    data = deep_merge(data, env)
    data = deep_merge(data, overrides or {})
    _check_backend_fields(data, env)
    try:
        return ApbatchConfig.model_validate(data)
    except ValidationError as exc:
        err = exc.errors()[0]
        cause = err.get("ctx", {}).get("error")
        if isinstance(cause, BadInputError):  # a validator's own one-line error (events.detectors)
            raise BadInputError(f"config {cause.field}", cause.problem, cause.fix) from None
        field = ".".join(str(x) for x in err["loc"])
        msg = str(cause) if err["type"] == "value_error" and cause is not None else err["msg"]
        raise BadInputError(f"config {field}", " ".join(msg.split()),
                            "fix the YAML file or APBATCH_* variable") from None
