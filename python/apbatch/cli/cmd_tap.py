"""``apbatch tap``: the TAP service over the PPDB tables and ObsCore."""

from __future__ import annotations

import click

from .opt import config_option

__all__ = ["tap"]


@click.group()
def tap() -> None:
    """Sync TAP (ADQL -> PostgreSQL/pg_sphere) over the PPDB tables and ObsCore."""


@tap.command()
@config_option
@click.option("--host", default=None, help="Address to listen on [default: tap.host, 127.0.0.1].")
@click.option("--port", default=None, type=click.IntRange(0, 65535),
              help="Port [default: tap.port, 8086]; 0 picks a free one (the URL is printed).")
def serve(config_paths: tuple[str, ...], host: str | None, port: int | None) -> None:
    """Serve /sync, /tables, /capabilities, /availability until SIGTERM/SIGINT (prints the URL)."""
    from ..config import load_config  # noqa: PLC0415 (lazy CLI)
    from ..script.tap import serve as run  # noqa: PLC0415

    run(load_config(list(config_paths) or None), host=host, port=port)


@tap.command()
@config_option
def init(config_paths: tuple[str, ...]) -> None:
    """Make the spatial (GiST) and time indexes the service relies on (idempotent)."""
    from ..config import load_config  # noqa: PLC0415 (lazy CLI)
    from ..script.tap import init as run  # noqa: PLC0415

    created = run(load_config(list(config_paths) or None))
    click.echo(f"{len(created)} index(es) created" + (f": {', '.join(created)}" if created else ""))
