"""``apbatch embargo``: release job outputs from the embargo repository to the prompt repository."""

from __future__ import annotations

import json

import click

from .opt import config_option, json_option

__all__ = ["embargo"]


@click.group()
def embargo() -> None:
    """The embargo repository (job.repo) and its release to the public one (embargo.prompt_repo)."""


@embargo.command()
@config_option
@click.option("--now", default=None, help="Current time, ISO 8601 (UTC unless given); default: the clock.")
@click.option("--dry-run", is_flag=True, help="Show what would be released (and purged); change nothing.")
@click.option("--purge", is_flag=True,
              help="Then remove prompt-repository images older than embargo.cache_days.")
@click.option("--full", is_flag=True,
              help="Look at every output dataset, not only those new since the last completed release.")
@json_option
def release(
    config_paths: tuple[str, ...], now: str | None, dry_run: bool, purge: bool, full: bool, as_json: bool
) -> None:
    """Transfer every output whose visit ended more than embargo.period_hours ago (idempotent)."""
    from ..script.embargo import release as run  # noqa: PLC0415
    from .progress import progress  # noqa: PLC0415

    with progress("releasing") as step:
        out = run(now=now, dry_run=dry_run, purge=purge, config_paths=config_paths, progress=step, full=full)
    if as_json:
        click.echo(json.dumps(out, indent=1))
        return
    verb = "would release" if dry_run else "released"
    click.echo(f"now {out['now']}, embargo until {out['cutoff']}: {verb} {out['released']} dataset(s) "
               f"of {len(out['visits'])} visit(s); {out['already_public']} already public, "
               f"{out['embargoed']} still embargoed"
               + (f"; {out['replaced']} replaced by a rerun's" if out["replaced"] else ""))
    for v in out["visits"]:
        click.echo(f"  {v['instrument']} {v['element']} {v['id']} (ended {v['end']}): {v['datasets']} "
                   f"dataset(s), {v['ccds_with_diffim']}/{v['ccds']} CCDs with a difference image")
    if out["purged"] is not None:
        click.echo(f"{'would purge' if dry_run else 'purged'} {out['purged']} image(s) "
                   "older than embargo.cache_days")
