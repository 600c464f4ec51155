"""``apbatch process-ccd``: wire the per-CCD job's dependencies from the config and run it."""

from __future__ import annotations

import json
import logging
from pathlib import Path

from ..config import ApbatchConfig
from ..errors import BadInputError
from ..instruments import get_instrument
from ..work import CcdWork

__all__ = ["make_deps", "process_ccd"]

log = logging.getLogger(__name__)


def make_deps(cfg: ApbatchConfig, work: CcdWork, *, repo: str | None = None, collections: str | None = None,
              with_alerts: bool = True):
    """Open the butler, the distributor client, the APDB and the alert sink a job needs.

    Raises
    ------
    BadInputError
        Raised if the butler repository or the APDB config does not exist.
    """
    from lsst.daf.butler import Butler

    from ..butler.io import ButlerIO
    from ..distributor.client import DistributorClient
    from ..job.task import JobDeps

    repo_path = Path(repo) if repo else cfg.path(cfg.job.repo)
    if not (repo_path / "butler.yaml").exists():
        raise BadInputError("--repo", f"no butler repository at {str(repo_path)!r}",
                            "create it with: apbatch repo create")
    butler = Butler.from_config(str(repo_path), writeable=True)
    inputs = collections or cfg.job.input_collection.format(instrument=work.instrument)
    butler_io = ButlerIO(butler, work.instrument, collections=inputs)
    distributor = DistributorClient.from_location(work.distributor)
    alerts = None
    if with_alerts and work.intent == "science":
        from ..job.alert_sinks import AlertSpool
        from ..job.alerts import AlertBuilder, process_ccd_alerts
        from ..job.apdb import Association, open_apdb
        from .alerts import make_sink

        association = Association(open_apdb(cfg.path(cfg.apdb.config_file)), history_days=cfg.apdb.history_days,
                                  radius_arcsec=cfg.apdb.association_radius_arcsec)
        builder = AlertBuilder(cutout_size=cfg.alerts.cutout_size, history_days=cfg.alerts.history_days)
        spool = AlertSpool(cfg.path(cfg.alerts.spool_dir))
        sink = make_sink(cfg)

        def alerts(ccd, dia, science, template, difference, fwhm):
            try:
                return process_ccd_alerts(ccd, dia, science, template, difference, psf_fwhm_pix=fwhm,
                                          association=association, builder=builder, spool=spool, sink=sink)
            finally:
                sink.close()

    return JobDeps(butler_io=butler_io, distributor=distributor, alerts=alerts)


def process_ccd(cfg: ApbatchConfig, work: CcdWork, *, timeout: float | None = None, repo: str | None = None,
                collections: str | None = None, output_run: str | None = None, deps=None) -> dict:
    """Run the AP job for one CCD and return its result as a dict.

    Raises
    ------
    RawTimeoutError, BadInputError, RetriableError, NonRetriableError
        See `apbatch.job.task`; the CLI maps them to the documented exit codes.
    """
    from ..job.steps.memory import keep_freed_memory
    from ..job.task import run_ccd

    get_instrument(work.instrument).detector(work.detector, field="--detector")
    if deps is None:  # a job process of its own (not a test): reuse freed image buffers
        keep_freed_memory()
    if work.intent == "science" and not work.physical_filter:
        log.info("no --filter given: the raw header's filter will be used")
    deps = deps or make_deps(cfg, work, repo=repo, collections=collections)
    result = run_ccd(work, deps, timeout=cfg.job.raw_timeout if timeout is None else timeout,
                     output_run=output_run)
    out = {"instrument": work.instrument, "visit": work.visit, "detector": work.detector, **result.to_dict()}
    log.info("done: %s", json.dumps({k: out[k] for k in ("visit", "detector", "status", "n_dia_sources")}))
    return out

