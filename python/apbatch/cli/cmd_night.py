"""``apbatch night``: the morning-after runs -- reprocess a night, report it, map it, print a crontab."""

from __future__ import annotations

import json
import os
import sys
from pathlib import Path

import click

from .cmd_submit import load_cli_config
from .opt import config_option, json_option

__all__ = ["night"]

day_obs_option = click.option("--day-obs", default=None, metavar="YYYYMMDD",
                              help="The night (default: yesterday's UTC date, the night that ended).")


@click.group()
def night() -> None:
    """Cron-driven nightly runs: reprocess what failed or was missed, and report the night."""


@night.command()
@day_obs_option
@click.option("--dry-run", is_flag=True,
              help="Ask the scheduler and show what would be submitted; change nothing.")
@click.option("--max-attempts", type=int, default=None,
              help="Submissions per CCD, this one included (default: events.max_attempts).")
@click.option("--claim-timeout", type=click.FloatRange(min=0), default=300.0, show_default=True,
              help="Seconds after which a CCD claimed but never submitted is submitted.")
@click.option("--lost-after", type=click.FloatRange(min=0), default=3600.0, show_default=True,
              help="Seconds after submission after which a job the scheduler does not know is resubmitted.")
@click.option("--include-final", is_flag=True,
              help="Also resubmit CCDs that failed for good or ran out of attempts (after fixing the cause).")
@config_option
@json_option
def reprocess(day_obs: str | None, dry_run: bool, max_attempts: int | None, claim_timeout: float,
              lost_after: float, include_final: bool, config_paths: tuple[str, ...], as_json: bool) -> None:
    """Refresh job states; resubmit retriable (exit 3/4) and lost jobs; submit missed CCDs."""
    from ..errors import RetriableError
    from ..night import parse_day_obs
    from ..script.night import reprocess_night

    day = parse_day_obs(day_obs)
    config, _ = load_cli_config(config_paths)
    res = reprocess_night(config, day_obs=day, dry_run=dry_run, max_attempts=max_attempts,
                          claim_timeout=claim_timeout, lost_after=lost_after, include_final=include_final)
    if as_json:
        click.echo(json.dumps(res, indent=2))
    else:
        verb = "would submit" if dry_run else "submitted"
        click.echo(f"night {day}: polled {res['polled']} job(s), {res['updated']} state(s) changed; {verb} "
                   f"{len(res['resubmitted'])} resubmission(s) and {len(res['missed'])} missed CCD(s); "
                   + " ".join(f"{k}={n}" for k, n in sorted(res["counts"].items())))
        for item in res["resubmitted"] + res["missed"]:
            click.echo(f"{item['job_id'] or '-'}\t{item['label']}\t{item['detector_name']}\t{item['why']}")
    if res["errors"]:
        raise RetriableError(f"{len(res['errors'])} submission(s) failed: {res['errors'][0]}")


@night.command()
@day_obs_option
@click.option("--out", default=None, metavar="FILE",
              help="Write the report to FILE (atomically; '{day_obs}' in it is replaced) instead of stdout.")
@click.option("--html", "html_dir", default=None, metavar="DIR",
              help="Also write DIR/night-<day_obs>.html: one self-contained page with the night's plots.")
@config_option
@json_option
def report(day_obs: str | None, out: str | None, html_dir: str | None, config_paths: tuple[str, ...],
           as_json: bool) -> None:
    """The night's summary: states, exit codes, attempts, missed CCDs, dead letters, latencies.

    Exits 6 (after writing the report) when CCDs need attention, 2 when there is no ledger.
    """
    from ..errors import ExitCode
    from ..night import parse_day_obs
    from ..script.night import format_report, night_report, write_atomic

    day = parse_day_obs(day_obs)
    config, _ = load_cli_config(config_paths)
    if html_dir is not None:  # refuse a bad directory before printing anything
        from ..report.html import check_directory

        check_directory(Path(html_dir))
    rep = night_report(config, day_obs=day)
    text = json.dumps(rep, indent=2) + "\n" if as_json else format_report(rep)
    if out is None:
        click.echo(text, nl=False)
    else:
        click.echo(f"wrote {write_atomic(out, text, day)}", err=True)
    if html_dir is not None:
        from ..script.report import write_night_html

        page = write_night_html(config, day_obs=day, directory=html_dir, summary=rep)
        click.echo(f"wrote {page}", err=True)
    if rep["needs_attention"]:
        sys.exit(ExitCode.NEEDS_ATTENTION)


@night.command()
@day_obs_option
@click.option("--out", default=None, metavar="DIR",
              help="Where the files go (default: <root>/reports; created if missing).")
@click.option("--order", default=None, metavar="K",
              help="HEALPix order of the MOCs (default 14: area ~4% above the CCDs' own; 16: ~1%, 4x "
                   "the time and size).")
@config_option
@json_option
def footprint(day_obs: str | None, out: str | None, order: str | None, config_paths: tuple[str, ...],
              as_json: bool) -> None:
    """Where did we look? Write the night's coverage as MOCs (observed, processed) and a PNG.

    Writes DIR/night-<day_obs>.moc.fits, night-<day_obs>-processed.moc.fits and
    night-<day_obs>-footprint.png, and prints their paths and the areas (deg^2).
    """
    from ..night import parse_day_obs
    from ..report.footprint import check_order
    from ..script.footprint import write_night_footprint

    day = parse_day_obs(day_obs)
    k = check_order(order)
    config, _ = load_cli_config(config_paths)
    fp = write_night_footprint(config, day_obs=day, out=out, order=k)
    s = fp.summary()
    if as_json:
        click.echo(json.dumps({"day_obs": day, **s, "files": {k: str(p) for k, p in fp.files.items()}},
                              indent=2))
        return
    click.echo(f"night {day}: {s['observed_deg2']:.2f} deg^2 observed ({s['ccds_observed']} CCDs), "
               f"{s['processed_deg2']:.2f} deg^2 processed ({s['ccds_processed']} CCDs), order {s['order']}")
    for band, a in s["bands"].items():
        click.echo(f"  band {band}: {a['observed_deg2']:.2f} deg^2 observed, "
                   f"{a['processed_deg2']:.2f} processed")
    for path in fp.files.values():
        click.echo(f"wrote {path}")


@night.command()
@click.option("--reprocess-at", default="10:00", show_default=True, help="Time (HH:MM) of the reprocess run.")
@click.option("--report-at", default="10:30", show_default=True, help="Time (HH:MM) of the report.")
@click.option("--log-dir", default=None, help="Where cron output goes (default: <root>/logs).")
@click.option("--report-dir", default=None, help="Where reports are written (default: <root>/reports).")
@click.option("--products", is_flag=True,
              help="Also the prompt products: PPDB replication, embargo release and ObsCore, purge.")
@config_option
def crontab(reprocess_at: str, report_at: str, log_dir: str | None, report_dir: str | None, products: bool,
            config_paths: tuple[str, ...]) -> None:
    """Print a crontab that runs the nightly reprocessing, footprint and report with this install."""
    from ..errors import BadInputError
    from ..script.crontab import crontab_text, install_paths

    config, config_file = load_cli_config(config_paths)
    if config_file is None:
        raise BadInputError("--config", "cron jobs need one config file", "pass --config FILE (just one)")
    python, apbatch = install_paths()
    click.echo(crontab_text(python=python, apbatch=apbatch, config=config_file,
                            log_dir=os.path.abspath(log_dir or config.path("logs")),
                            report_dir=os.path.abspath(report_dir or config.path("reports")),
                            reprocess_at=reprocess_at, report_at=report_at, products=products), nl=False)
