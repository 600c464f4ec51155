"""Options shared by several commands."""

from __future__ import annotations

import click

__all__ = ["config_option", "json_option"]

config_option = click.option(
    "--config", "config_paths", multiple=True, type=click.Path(dir_okay=False),
    help="YAML config file(s), merged in order (default: $APBATCH_CONFIG).")
json_option = click.option("--json", "as_json", is_flag=True, help="Print JSON instead of a table.")
