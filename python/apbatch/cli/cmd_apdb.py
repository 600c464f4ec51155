"""``apbatch apdb``: manage the Alert Production Database."""

from __future__ import annotations

import click

from .opt import config_option

__all__ = ["apdb"]


@click.group()
def apdb() -> None:
    """Alert Production Database (APDB) commands."""


@apdb.command()
@config_option
@click.option("--url", default=None,
              help="SQLAlchemy URL (default: apdb.url); sqlite:///... or postgresql+psycopg2://...")
@click.option("--config-file", default=None,
              help="dax_apdb config file to write (default: apdb.config_file).")
def create(config_paths: tuple[str, ...], url: str | None, config_file: str | None) -> None:
    """Create an empty APDB with the lsst-sdm-schemas schema."""
    from ..config import load_config
    from ..script.apdb import create as create_apdb

    db_url, path = create_apdb(load_config(list(config_paths) or None), url, config_file)
    click.echo(f"created APDB {db_url.split('?')[0]}; config {path}")
