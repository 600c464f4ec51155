"""``apbatch resubmit``: rerun a visit's CCDs that failed for good, after the cause was fixed."""

from __future__ import annotations

import json

import click

from .cmd_submit import load_cli_config
from .opt import config_option, json_option

__all__ = ["resubmit"]


@click.command()
@click.argument("visit_or_group")
@click.argument("detectors", nargs=-1)
@click.option("--instrument", default=None, help="Only this instrument.")
@click.option("--dry-run", is_flag=True, help="Show what would be resubmitted; change nothing.")
@config_option
@json_option
def resubmit(visit_or_group: str, detectors: tuple[str, ...], instrument: str | None, dry_run: bool,
             config_paths: tuple[str, ...], as_json: bool) -> None:
    """Resubmit the CCDs of VISIT_OR_GROUP (only DETECTORS, ids or names, if given) that ended
    without success: FAILED, TIMEOUT, CANCELLED, SUBMIT_FAILED or lost. Each is a new attempt;
    a CCD resubmitted by another process at the same moment runs once. Prints the job ids.
    """
    from ..errors import RetriableError
    from ..script.resubmit import resubmit_ccds

    config, _ = load_cli_config(config_paths)
    res = resubmit_ccds(config, visit_or_group, detectors, instrument=instrument, dry_run=dry_run)
    if as_json:
        click.echo(json.dumps(res, indent=2))
    else:
        for item in res["resubmitted"]:
            click.echo("\t".join([item["job_id"] or "-", item["label"], item["detector_name"],
                                  f"was {item['was']}"]))
        if res["skipped"]:
            skipped = " ".join(f"{s}={n}" for s, n in sorted(res["skipped"].items()))
            click.echo(f"skipped: {skipped}", err=True)
        if res["taken"]:
            click.echo(f"{res['taken']} CCD(s) were resubmitted by another process first", err=True)
    if res["errors"]:
        raise RetriableError(f"{len(res['errors'])} submission(s) failed: {res['errors'][0]}")
