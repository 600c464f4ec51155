"""``apbatch ppdb``: the Prompt Products Database."""

from __future__ import annotations

import click

from .opt import config_option

__all__ = ["ppdb"]

_URL_HELP = "SQLAlchemy URL (default: ppdb.url); sqlite:///... or postgresql+psycopg2://..."


@click.group()
def ppdb() -> None:
    """Prompt Products Database (PPDB) commands."""


@ppdb.command()
@config_option
@click.option("--url", default=None, help=_URL_HELP)
def create(config_paths: tuple[str, ...], url: str | None) -> None:
    """Create an empty PPDB (lsst-dax-ppdb, schema from lsst-sdm-schemas)."""
    from ..config import load_config
    from ..script.ppdb import create as create_ppdb

    click.echo(f"created PPDB {create_ppdb(load_config(list(config_paths) or None), url)}")


@ppdb.command()
@config_option
@click.option("--url", default=None, help=_URL_HELP)
@click.option("--follow", is_flag=True, help="Keep replicating (every ppdb.follow_interval s when idle).")
@click.option("--max-chunks", type=click.IntRange(min=1), default=None,
              help="Chunks per pass (default: ppdb.chunk_batch).")
def replicate(config_paths: tuple[str, ...], url: str | None, follow: bool, max_chunks: int | None) -> None:
    """Copy the APDB's replica chunks into the PPDB: in order, each once, resumable."""
    from ..config import load_config
    from ..products.ppdb import ReplicationReport
    from ..script.ppdb import replicate as run

    def show(report: ReplicationReport) -> None:
        if report.copied or not follow:  # --follow: quiet while idle
            click.echo(report.summary())

    copied = run(load_config(list(config_paths) or None), url, follow=follow, max_chunks=max_chunks,
                 on_pass=show)
    if follow:
        click.echo(f"stopped; {copied} chunk(s) copied")
