"""``apbatch repo``: the butler repository jobs read from and write to."""

from __future__ import annotations

import json

import click

from .opt import json_option

__all__ = ["repo"]


def _print(result: dict, as_json: bool) -> None:
    if as_json:
        click.echo(json.dumps(result, indent=1, default=str))
    else:
        for key, value in result.items():
            click.echo(f"{key}: {', '.join(map(str, value)) if isinstance(value, list) else value}")


@click.group()
def repo() -> None:
    """Create and fill the butler repository (before any job starts)."""


@repo.command()
@click.argument("root", type=click.Path(file_okay=False))
@click.option(
    "--db-url",
    default=None,
    help="Registry database URL (default: SQLite in ROOT); "
    "e.g. postgresql://user@host/db. Passwords: use ~/.pgpass, never this option.",
)
@json_option
def create(root: str, db_url: str | None, as_json: bool) -> None:
    """Create an empty repository at ROOT with apbatch's dataset types."""
    from ..script.repo import create as run  # noqa: PLC0415

    _print(run(root, db_url), as_json)


@repo.command()
@click.argument("root", type=click.Path(file_okay=False, exists=True))
@click.option("--instrument", required=True, help="Instrument, e.g. LSSTComCam.")
@click.option(
    "--night",
    type=click.Path(file_okay=False, exists=True),
    default=None,
    help="Night directory: plan.yaml or raw files whose exposures to register.",
)
@click.option("--day-obs", type=int, multiple=True, help="Also create the output run of this day (YYYYMMDD).")
@json_option
def register(root: str, instrument: str, night: str | None, day_obs: tuple[int, ...], as_json: bool) -> None:
    """Register INSTRUMENT (detectors, filters, collections) and a night's exposures, visits and runs."""
    from ..script.repo import register as run  # noqa: PLC0415

    _print(run(root, instrument, night, day_obs), as_json)


@repo.command()
@click.argument("root", type=click.Path(file_okay=False, exists=True))
@click.option(
    "--calibs",
    type=click.Path(file_okay=False, exists=True),
    default=None,
    help="Directory with manifest.yaml listing bias/flat files.",
)
@click.option(
    "--templates",
    type=click.Path(file_okay=False, exists=True),
    default=None,
    help="Directory with manifest.yaml listing template_coadd files and the sky map.",
)
@click.option(
    "--transfer",
    type=click.Choice(["copy", "direct", "symlink", "hardlink"]),
    default="copy",
    show_default=True,
    help="How files enter the repository.",
)
@json_option
def ingest(root: str, calibs: str | None, templates: str | None, transfer: str, as_json: bool) -> None:
    """Ingest calibrations (certified with validity ranges) and templates listed by manifests."""
    from ..script.repo import ingest as run  # noqa: PLC0415
    from .progress import progress  # noqa: PLC0415

    with progress("ingesting", sum(d is not None for d in (calibs, templates))) as step:
        out = run(root, calibs, templates, transfer, progress=step)
    _print(out, as_json)
