"""``apbatch render-job``: print the exact job script / submit description of an event."""

from __future__ import annotations

import click

from .cmd_submit import load_cli_config
from .opt import config_option

__all__ = ["render_job"]


@click.command("render-job")
@click.argument("event_file")
@click.option("--detector", default=None, help="Only this detector (id or name).")
@config_option
def render_job(event_file: str, detector: str | None, config_paths: tuple[str, ...]) -> None:
    """Print what would be submitted for EVENT_FILE ('-' for stdin), without submitting."""
    from ..script.render import render_job as render

    config, _ = load_cli_config(config_paths)
    text = render(config, event_file, detector=detector)
    click.echo(text if text.endswith("\n") else text + "\n", nl=False)
