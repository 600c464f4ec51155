"""``apbatch cancel``: cancel a visit's (or one CCD's) unfinished jobs."""

from __future__ import annotations

import click

from .cmd_submit import load_cli_config
from .opt import config_option

__all__ = ["cancel"]


@click.command()
@click.option("--group", default=None, help="Group id of the visit.")
@click.option("--visit", type=int, default=None, help="Visit id.")
@click.option("--detector", default=None, help="Only this detector (id or name).")
@click.option("--instrument", default=None, help="Only this instrument.")
@config_option
def cancel(group: str | None, visit: int | None, detector: str | None, instrument: str | None,
           config_paths: tuple[str, ...]) -> None:
    """Cancel the unfinished jobs of --group G or --visit V; print the cancelled job ids."""
    from ..script.cancel import cancel_jobs

    config, _ = load_cli_config(config_paths)
    rows = cancel_jobs(config, group=group, visit=visit, detector=detector, instrument=instrument)
    for r in rows:
        click.echo(f"{r.job_id or '-'}\t{r.instrument}\t{r.visit}\t{r.detector_name}")
    if not rows:
        click.echo("nothing to cancel: every matching job has finished", err=True)
