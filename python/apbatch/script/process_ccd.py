"""``apbatch process-ccd``: wire the per-CCD job's dependencies from the config, run it, and
turn every way it can end into one of the documented exit codes.

The job boundary (:func:`job_boundary`) is the one place that decides a job's exit code:

* bad input (arguments, config, data): `BadInputError`, exit 2;
* the raw never arrived: `RawTimeoutError`, exit 3;
* anything else before the APDB store began: `RetriableError`, exit 4;
* anything at or after the APDB store: `NonRetriableError`, exit 5.

For exits 2-4 the job leaves nothing behind: the CCD's outputs already put into the butler
are removed again (the APDB was not touched, by definition), so "retriable" really means
that a rerun starts from a clean slate.
"""

from __future__ import annotations

import contextlib
import json
import logging
from collections.abc import Callable, Iterator
from pathlib import Path
from typing import Any

from ..config import ApbatchConfig
from ..errors import ApbatchError, BadInputError, NonRetriableError, RetriableError
from ..instruments import get_instrument
from ..work import CcdWork

__all__ = ["AlertStage", "failure_error", "job_boundary", "make_deps", "output_run_of", "process_ccd",
           "record_stages", "record_verification"]

log = logging.getLogger(__name__)


def failure_error(exc: BaseException, apdb_reached: bool) -> ApbatchError:
    """The documented error a job failure maps to (the rule of the module docstring).

    Parameters
    ----------
    exc : `BaseException`
        What the job raised.
    apdb_reached : `bool`
        Whether the APDB store had begun (or the CCD-visit was already stored).

    Returns
    -------
    error : `ApbatchError`
        ``exc`` (or the `ApbatchError` it was raised from, e.g. inside a butler formatter) if
        that carries the right code, else a new error (one line, naming the original
        exception's type) to raise ``from exc``.
    """
    cause: BaseException | None = exc
    while cause is not None and not isinstance(cause, ApbatchError):
        cause = cause.__cause__  # e.g. the butler wraps what our raw formatter raised in a ValueError
    if isinstance(cause, ApbatchError) and not apdb_reached:
        return cause
    text = " ".join(str(exc).split()) or type(exc).__name__
    if apdb_reached:
        if isinstance(exc, NonRetriableError):
            return exc
        return NonRetriableError(f"failed after the APDB store began: {type(exc).__name__}: {text}")
    if isinstance(exc, ApbatchError):  # BadInput 2, RawTimeout 3, Retriable 4, explicit NonRetriable 5
        return exc
    return RetriableError(f"{type(exc).__name__}: {text}")


@contextlib.contextmanager
def job_boundary(apdb_reached: Callable[[], bool], discard: Callable[[], None] | None = None
                 ) -> Iterator[None]:
    """Map whatever the job raises to a documented `ApbatchError`; clean up when nothing is stored.

    Parameters
    ----------
    apdb_reached : callable
        Returns whether the APDB store had begun when the failure happened.
    discard : callable, optional
        Removes what the job put into the butler; called for failures that end with exit
        2, 3 or 4 (a cleanup failure is logged, and the exit code stays).

    Raises
    ------
    ApbatchError
        Always, when the body raised (see :func:`failure_error`); `KeyboardInterrupt` and
        `SystemExit` pass through.
    """
    try:
        yield
    except (KeyboardInterrupt, SystemExit):
        raise
    except BaseException as exc:
        err = failure_error(exc, apdb_reached())
        if not isinstance(err, NonRetriableError) and discard is not None:
            try:
                discard()
            except Exception as cleanup:  # the original failure is what the caller must see
                log.warning("could not remove this job's butler outputs: %s", cleanup)
        if err is exc:
            raise
        raise err from exc


def output_run_of(cfg: ApbatchConfig, work: CcdWork, output_run: str | None = None) -> str:
    """The RUN collection of the job's outputs: ``output_run`` or ``job.output_run`` filled in.

    Raises
    ------
    BadInputError
        Raised if ``job.output_run`` names a placeholder other than ``{instrument}`` and ``{day_obs}``.
    """
    if output_run:
        return output_run
    try:
        return cfg.job.output_run.format(instrument=work.instrument, day_obs=work.day_obs)
    except (KeyError, IndexError, ValueError) as exc:
        raise BadInputError("job.output_run", f"{cfg.job.output_run!r} is not a valid template ({exc})",
                            "use only {instrument} and {day_obs}") from None


class AlertStage:
    """The job's association + alert stage: `process_ccd_alerts` over the configured APDB,
    builder, spool and sink.

    Records whether the APDB store began (:attr:`apdb_reached`), which decides between exit
    codes 4 and 5. Lifetime: one job; not thread-safe.
    """

    def __init__(self, cfg: ApbatchConfig, *, apdb=None, builder=None, spool=None, sink=None):
        # apdb, builder, spool, sink: already open ones (a warm pilot's, `apbatch.script.pilot`)
        from ..job.alert_schemas import alert_schema
        from ..job.alert_sinks import AlertSpool, make_sink
        from ..job.alerts import AlertBuilder
        from ..job.apdb import open_apdb
        from ..job.apdb_preload import PreloadingAssociation

        self.send_timeout = cfg.alerts.send_timeout
        # everything that can be refused is refused here, before the job waits for its raw
        self.builder = builder or AlertBuilder(schema=alert_schema(cfg.alerts.schema_version),
                                               cutout_size=cfg.alerts.cutout_size,
                                               history_days=cfg.alerts.history_days)
        self.association = PreloadingAssociation(apdb or open_apdb(cfg.path(cfg.apdb.config_file)),
                                                 history_days=cfg.apdb.history_days,
                                                 radius_arcsec=cfg.apdb.association_radius_arcsec)
        self.spool = spool or AlertSpool(cfg.path(cfg.alerts.spool_dir))
        self.sink = sink or make_sink(cfg)
        self.apdb_reached = False
        self.clock: Any = None  # the job's StageClock, set by the job: marks apdb_stored, alerts_sent

    def prepare(self, corners, when) -> int:
        """Preload the APDB history of the sky polygon ``corners`` ((N, 2) RA/Dec deg) before the raw."""
        from ..butler.regions import sky_polygon

        return self.association.preload(sky_polygon(corners), when)

    def check(self) -> None:
        """Fail (retriable, nothing written) now if the alert sink cannot be reached."""
        self.sink.check(max(self.send_timeout, 1.0))

    def _checkpoint(self, point: str) -> None:
        if point in ("spooled", "already_stored"):  # the APDB store comes next, or was done
            self.apdb_reached = True
        if self.clock is not None and point in ("stored", "already_stored"):
            self.clock.mark("apdb_stored")
        if self.clock is not None and point == "delivered":
            self.clock.mark("alerts_sent")

    def __call__(self, ccd, dia, science, template, difference, fwhm, photometry=None):
        from ..job.alerts import process_ccd_alerts

        return process_ccd_alerts(ccd, dia, science, template, difference, psf_fwhm_pix=fwhm,
                                  association=self.association, builder=self.builder, spool=self.spool,
                                  sink=self.sink, send_timeout=self.send_timeout, checkpoint=self._checkpoint,
                                  photometry=photometry)

    def close(self) -> None:
        """Release the sink's connections."""
        self.sink.close()


def _open_butler(repo_path: Path, field: str):
    """The butler at ``repo_path``; a repository whose config cannot be read is bad input."""
    import sqlalchemy.exc
    from lsst.daf.butler import Butler

    if not (repo_path / "butler.yaml").exists():
        raise BadInputError(field, f"no butler repository at {str(repo_path)!r}",
                            "create it with: apbatch repo create")
    try:
        return Butler.from_config(str(repo_path), writeable=True)
    except (sqlalchemy.exc.OperationalError, TimeoutError, ConnectionError) as exc:  # a database server away
        raise RetriableError(f"cannot reach the butler registry of {repo_path}: {' '.join(str(exc).split())}"
                             ) from exc
    except Exception as exc:
        first = (str(exc).strip().splitlines() or [type(exc).__name__])[0]
        raise BadInputError(field, f"cannot open the butler repository at {str(repo_path)!r}: {first}",
                            "check its butler.yaml") from None


def make_deps(cfg: ApbatchConfig, work: CcdWork, *, repo: str | None = None, collections: str | None = None,
              with_alerts: bool = True):
    """Open the butler, the distributor client, the APDB and the alert sink a job needs.

    Raises
    ------
    BadInputError
        Raised if the butler repository, the APDB config or an alert setting is wrong.
    RetriableError
        Raised if the butler registry or the alert sink cannot be reached.
    """
    from ..butler.io import ButlerIO
    from ..distributor.client import DistributorClient
    from ..job.task import JobDeps

    butler = _open_butler(Path(repo) if repo else cfg.path(cfg.job.repo), "--repo" if repo else "job.repo")
    inputs = collections or cfg.job.input_collection.format(instrument=work.instrument)
    butler_io = ButlerIO(butler, work.instrument, collections=inputs)
    distributor = DistributorClient.from_location(work.distributor)
    alerts = None
    if with_alerts and work.intent == "science":
        alerts = AlertStage(cfg)
        alerts.check()
    return JobDeps(butler_io=butler_io, distributor=distributor, alerts=alerts)


def record_stages(cfg: ApbatchConfig, work: CcdWork, stages: dict[str, float]) -> bool:
    """Write the job's stage times into its ledger row (also for a failed job: how far it got).

    Stage times are telemetry: a ledger that cannot be reached is logged, never a job failure.
    Returns whether a row was updated (`False` for a job run by hand, without a row).
    """
    if not stages:
        return False
    return _update_row(cfg, "the stage times", lambda ledger: ledger.record_stages(
        work.instrument, work.group_id, work.detector, stages))


def record_verification(cfg: ApbatchConfig, work: CcdWork, verdict: dict[str, Any]) -> bool:
    """Write a calibration job's verification verdict into its ledger row (for ``status`` and the
    night report); like the stage times, a ledger that cannot be reached is logged, never a failure."""
    return _update_row(cfg, "the calibration verification", lambda ledger: ledger.record_verification(
        work.instrument, work.group_id, work.detector, verdict))


def _update_row(cfg: ApbatchConfig, what: str, update: Callable[[Any], bool]) -> bool:
    """Run ``update(ledger)`` on the configured ledger; `False` (logged) if there is none or it fails."""
    from ..ledger import Ledger

    try:
        ledger = Ledger.from_config(cfg, create=False)
    except Exception as exc:
        log.debug("no ledger for %s: %s", what, exc)
        return False
    try:
        return update(ledger)
    except Exception as exc:
        log.warning("could not record %s in the ledger: %s", what, exc)
        return False
    finally:
        ledger.close()


def _discard_outputs(deps, work: CcdWork, run: str) -> None:
    """Remove this CCD's outputs from ``run`` (what an earlier step of this job put there)."""
    discard = getattr(deps.butler_io, "discard_outputs", None)
    if discard is None:  # a test's fake
        return
    n = discard(work.visit, work.detector, run)
    if n:
        log.info("removed %d output(s) of this failed job from %s", n, run)


def process_ccd(cfg: ApbatchConfig, work: CcdWork, *, timeout: float | None = None, repo: str | None = None,
                collections: str | None = None, output_run: str | None = None, deps=None) -> dict:
    """Run the AP job for one CCD and return its result as a dict.

    Every setting not given as an argument comes from ``cfg`` (``job.*``, ``apdb.*``,
    ``alerts.*``, ``kafka.*``): the daemon passes its resolved config file with ``--config``.

    Raises
    ------
    BadInputError, RawTimeoutError, RetriableError, NonRetriableError
        Exit codes 2, 3, 4 and 5; see :func:`job_boundary`.
    """
    from ..job.steps import parallel
    from ..job.steps.memory import keep_freed_memory
    from ..job.task import run_ccd
    from ..latency import StageClock, process_start_time

    clock = StageClock()
    # a job process of its own counts from its start (interpreter and imports are part of preparing)
    clock.mark("started", process_start_time() if deps is None else None)
    from ..logs import job_id_from_env, set_job_context, set_log_format

    set_log_format(cfg.monitoring.log_format)  # unless the command line chose (--log-format)
    # every field is set (or removed), so a process that runs several CCDs never mixes them up
    set_job_context(visit=work.visit, detector=work.detector, group=work.group_id, job_id=job_id_from_env())
    get_instrument(work.instrument).detector(work.detector, field="--detector")
    run = output_run_of(cfg, work, output_run)
    if deps is None:  # a job process of its own (not a test): reuse freed image buffers
        keep_freed_memory()
    parallel.set_threads(cfg.job.threads)
    if work.intent == "science" and not work.physical_filter:
        log.info("no --filter given: the raw header's filter will be used")
    opened = {"deps": deps}

    def reached() -> bool:
        return bool(getattr(getattr(opened["deps"], "alerts", None), "apdb_reached", False))

    def discard() -> None:
        if opened["deps"] is not None:
            _discard_outputs(opened["deps"], work, run)

    try:
        with job_boundary(reached, discard):
            if opened["deps"] is None:
                opened["deps"] = make_deps(cfg, work, repo=repo, collections=collections,
                                           with_alerts=cfg.job.associate)
            result = run_ccd(work, opened["deps"],
                             timeout=cfg.job.raw_timeout if timeout is None else timeout,
                             output_run=run, region_padding_arcsec=cfg.apdb.region_padding_arcsec,
                             pointing_pad_arcsec=cfg.job.pointing_pad_arcsec, clock=clock,
                             calib_verify=cfg.calib_verify)
            opened["result"] = result.to_dict()  # the ap_metrics record, for monitoring.job_metrics_topic
    finally:
        close = getattr(getattr(opened["deps"], "alerts", None), "close", None)
        if close is not None:
            close()
        if deps is None and opened["deps"] is not None:
            # the distributor client this job opened: an HTTP client's download directory goes
            opened["deps"].distributor.close()
        parallel.shutdown()
        record_stages(cfg, work, clock.to_dict())
        from ..monitoring.job_metrics import publish_job_metrics

        publish_job_metrics(cfg, work, opened.get("result"), clock.to_dict(), job_id=job_id_from_env())
    if result.verification:  # a calibration's verdict (a failed one is still exit 0)
        record_verification(cfg, work, result.verification)
    out = {"instrument": work.instrument, "visit": work.visit, "detector": work.detector, **result.to_dict()}
    log.info("done: %s", json.dumps({k: out[k] for k in ("visit", "detector", "status", "n_dia_sources")}))
    return out
