"""``apbatch distributor``: the image distributor's HTTP service."""

from __future__ import annotations

import click

__all__ = ["distributor"]


@click.group()
def distributor() -> None:
    """Serve raw images to per-CCD jobs as they arrive."""


@distributor.command()
@click.option("--root", required=True, type=click.Path(file_okay=False), help="Distributor directory.")
@click.option(
    "--host", default="127.0.0.1", show_default=True, help="Address to listen on (loopback by default)."
)
@click.option(
    "--port",
    default=8470,
    show_default=True,
    type=click.IntRange(0, 65535),
    help="Port; 0 picks a free one (printed on start).",
)
def serve(root: str, host: str, port: int) -> None:
    """Serve the distributor directory ROOT over HTTP (long-poll listing + file download)."""
    from ..script.distributor import serve as run  # noqa: PLC0415 (lazy CLI)

    run(root, host=host, port=port)
