"""``apbatch obscore``: ObsCore records of the released images (lsst-dax-obscore, pg_sphere)."""

from __future__ import annotations

import json

import click

from .opt import config_option, json_option

__all__ = ["obscore"]

_URL_HELP = "SQLAlchemy URL, postgresql://... (default: obscore.url, else ppdb.url)"


@click.group()
def obscore() -> None:
    """The ObsCore table of the images in the prompt repository (embargo.prompt_repo)."""


@obscore.command()
@config_option
@click.option("--url", default=None, help=_URL_HELP)
def create(config_paths: tuple[str, ...], url: str | None) -> None:
    """Create the ObsCore table (and pg_sphere) unless it exists; `update` does too."""
    from ..config import load_config  # noqa: PLC0415
    from ..script.obscore import create as run  # noqa: PLC0415

    click.echo(f"ObsCore table {run(load_config(list(config_paths) or None), url)}")


@obscore.command()
@config_option
@click.option("--url", default=None, help=_URL_HELP)
@click.option("--dry-run", is_flag=True, help="Show what would be added and removed; change nothing.")
@click.option("--full", is_flag=True, help="Compare every stored image with the table, not only those "
              "ingested since the last update (what notices purged images: run after --purge).")
@json_option
def update(config_paths: tuple[str, ...], url: str | None, dry_run: bool, full: bool, as_json: bool) -> None:
    """Add the records of newly released images, remove those of purged ones (one transaction).

    Run after `apbatch embargo release` (cron: ppdb replicate, embargo release, obscore update).
    """
    from ..script.obscore import update as run  # noqa: PLC0415
    from .progress import progress  # noqa: PLC0415

    with progress("recording") as step:
        out = run(url=url, dry_run=dry_run, config_paths=config_paths, progress=step, full=full)
    if as_json:
        click.echo(json.dumps(out, indent=1))
        return
    verb = "would add" if dry_run else "added"
    click.echo(f"{out['table']}: {verb} {out['added']} record(s), "
               f"{'would remove' if dry_run else 'removed'} {out['removed']}, {out['unchanged']} unchanged "
               f"({out['seconds']:.1f} s)")
    for v in out["visits"]:
        click.echo(f"  {v['instrument']} visit {v['visit']}: +{v['added']} -{v['removed']}")
