"""``apbatch submit``: submit the jobs of one event or a file of events."""

from __future__ import annotations

import json
import os

import click

from .opt import config_option, json_option

__all__ = ["load_cli_config", "submit"]


def load_cli_config(config_paths: tuple[str, ...]):
    """The configuration of ``--config`` (or ``$APBATCH_CONFIG``), and its one file if there is one.

    Jobs do not read that file: submission writes the resolved configuration for them
    (`apbatch.jobconfig.write_config_snapshot`); cron lines need the one file.
    """
    from ..config import load_config

    config = load_config(list(config_paths) or None)
    if len(config_paths) > 1:
        return config, None  # jobs read one file only: they get the defaults + environment
    single = config_paths[0] if config_paths else os.environ.get("APBATCH_CONFIG")
    return config, (os.path.abspath(single) if single else None)


@click.command()
@click.argument("event_file")
@click.option("--dry-run", is_flag=True, help="Fan out and print the jobs, but submit nothing.")
@click.option("--check-age", is_flag=True,
              help="Reject events older than events.max_age, as the daemon does.")
@config_option
@json_option
def submit(event_file: str, dry_run: bool, check_age: bool, config_paths: tuple[str, ...],
           as_json: bool) -> None:
    """Submit one job per CCD for the events in EVENT_FILE ('-' for stdin); print the job ids.

    EVENT_FILE holds one JSON event, a JSON list, or JSON lines. Every event is validated
    before anything is submitted; CCDs submitted before (by the daemon or an earlier
    submit) are not submitted again. The daemon's input limits hold (source.max_file_bytes,
    source.max_event_bytes, 32 levels of nesting, UTF-8): anything bad exits 2 with one line
    naming the event, the field and the problem, and nothing is submitted.
    """
    from ..errors import BadInputError, RetriableError
    from ..script.submit import submit_events

    config, _ = load_cli_config(config_paths)
    results = submit_events(config, event_file, dry_run=dry_run, check_age=check_age)
    if as_json:
        click.echo(json.dumps(results, indent=2))
    else:
        for res in results:
            for job in res["jobs"]:
                click.echo(f"{job['job_id'] or '-'}\t{job['label']}\t{job['detector_name']}")
            if res["action"] not in ("submitted", "dry-run"):
                click.echo(f"{res['origin']}: {res['action']}: {res['reason']}", err=True)
    bad = [r for r in results if r["action"] in ("rejected", "bad")]
    if bad:
        raise BadInputError(bad[0]["origin"], f"{bad[0]['action']}: {bad[0]['reason']}",
                            f"{len(bad)} of {len(results)} event(s) not submitted")
    failed = [r for r in results if r["action"] in ("submit-failed", "already-failed")]
    if failed:
        raise RetriableError(f"{failed[0]['origin']}: submission failed: {failed[0]['reason']}")
