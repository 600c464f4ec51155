"""The configuration sections of the services beside the submission path: monitoring (metrics,
job records, logs), calibration verification and OCPS. Part of `apbatch.config` (re-exported
there), kept in its own module for size."""

from __future__ import annotations

from typing import Literal

from pydantic import Field, field_validator

from .config_sources import ConfigModel as _Model

__all__ = ["CalibVerifyConfig", "EmbargoConfig", "MonitoringConfig", "ObscoreConfig", "OcpsConfig",
           "PpdbConfig", "TapConfig"]




class MonitoringConfig(_Model):
    """What the daemon and the jobs tell dashboards: Prometheus metrics, job metrics records, log format."""

    prometheus_port: int | None = Field(None, ge=0, le=65535, description=(
        "port of the daemon's Prometheus /metrics endpoint; unset: off; 0: any free port (logged and "
        "written to <root>/daemon-metrics.port)"))
    prometheus_host: str = Field("127.0.0.1", description="loopback address the endpoint binds to")
    job_metrics_topic: str | None = Field(None, description=(
        "Kafka topic each job publishes its metrics record to (one JSON record per CCD-visit); unset: off"))
    log_format: Literal["text", "json"] = Field("text", description="json: one JSON object per log line")

    @field_validator("prometheus_host")
    @classmethod
    def _loopback(cls, value: str) -> str:
        import ipaddress

        try:
            loopback = ipaddress.ip_address(value).is_loopback
        except ValueError:
            loopback = False
        if not loopback:
            raise ValueError(f"{value!r} is not a loopback address (metrics are served on loopback only)")
        return value


class CalibVerifyConfig(_Model):
    """Raw-calibration verification of calibration exposures (`apbatch.job.calverify`): thresholds
    per amplifier, against the master bias and flat."""

    enabled: bool = Field(True, description="verify bias/dark/flat/cbp raws; off: ISR health check only")
    overscan_skip: int = Field(2, ge=0, description="serial-overscan columns skipped (CTI trailing)")
    max_bias_drift: float = Field(10.0, gt=0, description="ADU: overscan level vs the master bias's OSLEVnn")
    max_read_noise_ratio: float = Field(1.2, gt=0, description="read noise / the master bias's (or camera's)")
    max_bias_offset: float = Field(5.0, gt=0, description="e-: bias frame after overscan and master bias")
    max_dark_current: float = Field(0.5, gt=0, description="e-/s: dark frame after overscan and master bias")
    max_flat_level_deviation: float = Field(0.02, gt=0, description="flat level / CCD's median amp, from 1")
    max_flat_gradient: float = Field(0.02, gt=0, description="peak-to-peak of the flat ratio across an amp")
    max_saturated_fraction: float = Field(1e-4, ge=0, description="of an amplifier's data pixels")
    bad_column_nsigma: float = Field(8.0, gt=0, description="column median vs the amplifier's, robust sigmas")
    max_new_bad_columns: int = Field(0, ge=0, description="bad columns not in the defect list (master mask)")


class OcpsConfig(_Model):
    """The OCPS service (``apbatch ocps serve``): processData requests, their jobs and events."""

    host: str = Field("127.0.0.1", description="address the HTTP service binds to; not loopback: a bearer "
                      "token is required")
    port: int = Field(8085, ge=0, le=65535)
    mode: Literal["async", "sync"] = Field("async", description=(
        "async: requests queue and run concurrently; sync: one at a time, others refused (409)"))
    token_file: str | None = Field(None, description="file holding the bearer token")
    token_env: str = Field("APBATCH_OCPS_TOKEN", description="environment variable holding the bearer token")
    ledger_url: str = Field("sqlite:///ocps/ledger.sqlite3", description=(
        "the OCPS ledger and requests (own database: a CCD processed by prompt processing can be "
        "processed again on request)"))
    output_run: str = Field("{instrument}/ocps/{day_obs}", description="RUN collection of the jobs' outputs")
    associate: bool = Field(False, description="job.associate of the requests' jobs (APDB and alerts)")
    completion_topic: str = "ocps-completion"
    telemetry_topic: str = "ocps-telemetry"
    poll_interval: float = Field(0.25, gt=0, description=(
        "seconds between polls of the requests' jobs: the completion event follows the last CCD by "
        "up to this (each poll is one scheduler query, e.g. one squeue, only while requests run)"))
    max_concurrent: int = Field(4, ge=1, description="async mode: requests executing at once")
    execution_duration: float = Field(3600.0, ge=0, description=(
        "UWS executionDuration: seconds a request may execute; then its unfinished jobs are cancelled "
        "and it ends in ERROR naming them (a job the scheduler lost, UNKNOWN, cannot hold it forever); "
        "0: no limit"))


class EmbargoConfig(_Model):
    """The embargo (``apbatch embargo release``): jobs write to ``job.repo``, the embargo repository;
    outputs whose visit ended ``period_hours`` ago are released to the public ``prompt_repo``."""

    prompt_repo: str | None = Field(None, description=(
        "the public (prompt) butler repository, made with `apbatch repo create`; unset: no release"))
    period_hours: float = Field(80.0, ge=0, description=(
        "hours after a visit (or calibration exposure) ended before its outputs are released"))
    cache_days: float = Field(30.0, gt=0, description=(
        "days the prompt repository keeps images (--purge removes older ones; catalogs and metrics stay)"))


class PpdbConfig(_Model):
    """The Prompt Products Database (``apbatch ppdb``, lsst-dax-ppdb) and the APDB's replication into it."""

    url: str = Field("sqlite:///ppdb.sqlite3", description=(
        "SQLAlchemy URL of the PPDB (its own database); PostgreSQL for real nights: dax_ppdb copies "
        "into it with COPY, ~13x faster than its SQLite inserts"))
    chunk_batch: int = Field(100, ge=1, description=(
        "replica chunks copied per pass at most (each chunk is one PPDB transaction)"))
    follow_interval: float = Field(60.0, gt=0, description=(
        "replicate --follow: seconds of sleep after a pass that copied nothing"))
    min_wait_seconds: float = Field(60.0, ge=0, description=(
        "a chunk with a newer one is copied once its last visit time is this old"))
    max_wait_seconds: float = Field(600.0, ge=0, description="the newest chunk is copied once this old")
    delete_from_apdb: bool = Field(False, description=(
        "drop copied chunks from the APDB's replica bookkeeping (after the PPDB committed them; "
        "the catalogs stay in the APDB)"))
    connection_timeout: int = Field(10, ge=1, description="seconds to wait for a PostgreSQL server")


class ObscoreConfig(_Model):
    """ObsCore records of the released images (``apbatch obscore update``, lsst-dax-obscore)."""

    url: str | None = Field(None, description=(
        "SQLAlchemy URL of the database holding the ObsCore table (PostgreSQL with pg_sphere); "
        "unset: ppdb.url"))
    schema_name: str = Field("ivoa", description="SQL schema of the ObsCore table")
    table: str = Field("obscore", description="SQL name of the ObsCore table (TAP name ivoa.ObsCore)")
    obs_collection: str = Field("LSST.Prompt", description="obs_collection of the records")
    publisher_did: str = Field("ivo://org.rubinobs/apbatch/prompt?id={id}", description=(
        "obs_publisher_did of a record, {id} being the butler dataset id; records without this "
        "prefix are never removed by `apbatch obscore update`"))


class TapConfig(_Model):
    """The TAP service (``apbatch tap serve``) over the PPDB tables and ObsCore."""

    host: str = Field("127.0.0.1", description="address the HTTP service binds to")
    port: int = Field(8086, ge=0, le=65535)
    url: str | None = Field(None, description=(
        "SQLAlchemy URL of the PPDB database (PostgreSQL with pg_sphere); unset: ppdb.url"))
    maxrec_default: int = Field(10000, ge=0, description="rows a query returns when it gives no MAXREC")
    maxrec_limit: int = Field(1000000, ge=1, description=(
        "rows a query returns at most (larger MAXREC: capped, OVERFLOW)"))
    statement_timeout: float = Field(60.0, gt=0, description="seconds a query may run in the database")
