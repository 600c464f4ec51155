"""``apbatch daemon``: watch an event source and submit one job per CCD."""

from __future__ import annotations

import json

import click

from .cmd_submit import load_cli_config
from .opt import config_option

__all__ = ["daemon"]


@click.command()
@click.option("--source", "source_kind", type=click.Choice(["spool", "stdin", "kafka"]), default=None,
              help="Event source (default: source.kind of the config, i.e. the spool directory).")
@click.option("--max-events", type=click.IntRange(min=1), default=None, help="Stop after this many events.")
@click.option("--max-seconds", type=click.FloatRange(min=0), default=None,
              help="Stop after this many seconds.")
@click.option("--status-interval", type=click.FloatRange(min=0.1), default=5.0, show_default=True,
              help="Seconds between scheduler polls.")
@config_option
def daemon(source_kind: str | None, max_events: int | None, max_seconds: float | None, status_interval: float,
           config_paths: tuple[str, ...]) -> None:
    """Submit jobs for observatory events as they arrive, and track their states.

    Runs until SIGTERM/SIGINT (or --max-events/--max-seconds, or the end of stdin), then
    prints the count of each outcome as JSON.
    """
    from ..script.daemon import run_daemon

    config, _ = load_cli_config(config_paths)
    counts = run_daemon(config, source_kind=source_kind, max_events=max_events, max_seconds=max_seconds,
                        status_interval=status_interval)
    click.echo(json.dumps(counts, sort_keys=True))
