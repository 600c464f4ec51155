"""``apbatch status``: job states per visit and per CCD."""

from __future__ import annotations

import json
import sys

import click

from .cmd_submit import load_cli_config
from .opt import config_option, json_option

__all__ = ["status"]


@click.command()
@click.option("--visit", type=int, default=None, help="Show this visit's CCDs.")
@click.option("--group", default=None, help="Show this group's CCDs.")
@click.option("--instrument", default=None, help="Only this instrument.")
@click.option("--limit", type=click.IntRange(min=1), default=50, show_default=True,
              help="Most recent visits shown.")
@click.option("--no-live", is_flag=True, help="Do not ask the scheduler; show the ledger only.")
@click.option("--watch", "watch", type=click.FloatRange(min=0.1), is_flag=False, flag_value=2.0,
              default=None, metavar="[SECONDS]",
              help="Refresh every SECONDS (default 2) until Ctrl-C, like `watch squeue`; not on a "
                   "terminal, print a snapshot only when it changed.")
@config_option
@json_option
def status(visit: int | None, group: str | None, instrument: str | None, limit: int, no_live: bool,
           watch: float | None, config_paths: tuple[str, ...], as_json: bool) -> None:
    """Per-visit counts of job states (and per-CCD rows with --visit/--group), then p50/p95 of
    the stage times the jobs shown recorded (raw available -> alerts sent among them).

    Failed and running CCDs name their job's log file. Exits 6 when CCDs shown need attention
    (failed for good, out of attempts, refused by the scheduler, lost), 2 when there is no ledger
    at ledger.url (none is created); with --watch, 0 on Ctrl-C.
    """
    from ..errors import ExitCode
    from ..script.status import collect_status, format_status, watch_status

    config, _ = load_cli_config(config_paths)

    def collect() -> dict:
        return collect_status(config, visit=visit, group=group, instrument=instrument, live=not no_live,
                              limit=limit)

    if watch is not None:
        sys.exit(watch_status(collect, watch, as_json=as_json))
    report = collect()
    click.echo(json.dumps(report, indent=2, default=str) if as_json else format_status(report))
    if report["attention"]:
        sys.exit(ExitCode.NEEDS_ATTENTION)
