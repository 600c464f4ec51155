"""``apbatch pilot``: one warm pilot of the pilot backend (started by the backend itself: a local
process, or the command of a Slurm / HTCondor job, which names the pilot in ``APBATCH_PILOT_ID``)."""

from __future__ import annotations

import json

import click

from .opt import config_option

__all__ = ["pilot"]


@click.command("pilot")
@click.option("--max-items", type=click.IntRange(min=1), default=None,
              help="End after this many CCDs (default: when idle for backend.idle_timeout).")
@config_option
def pilot(max_items: int | None, config_paths: tuple[str, ...]) -> None:
    """Run CCDs queued for the pilot backend in this process, one at a time, with imports,
    butler, APDB and calibrations kept warm between them.

    Each CCD ends with the exit code `apbatch process-ccd` would give it (written to its job
    directory under backend.log_dir); the pilot itself exits 0 when idle for
    backend.idle_timeout or past backend.max_lifetime, 2 if the config is not a pilot backend's
    (or APBATCH_PILOT_ID, set by a batch launcher, is not slurm-<id> / htcondor-<cluster>.<proc>).
    """
    from ..config import load_config
    from ..script.pilot import run_pilot

    cfg = load_config(list(config_paths) or None)
    rec = run_pilot(cfg, max_items=max_items)
    click.echo(json.dumps({k: rec.get(k) for k in ("pilot", "done", "failed", "reason", "rss_mib")}))
