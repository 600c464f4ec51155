"""``apbatch alerts``: flush the spool to the configured sink, decode alert files."""

from __future__ import annotations

import json

import click

from .opt import config_option, json_option

__all__ = ["alerts"]


@click.group()
def alerts() -> None:
    """Alert spool and alert file commands."""


@alerts.command()
@config_option
@click.option("--timeout", type=float, default=None,
              help="s to wait per CCD-visit (default: alerts.send_timeout).")
def flush(config_paths: tuple[str, ...], timeout: float | None) -> None:
    """Send spooled, undelivered alerts, oldest first; exit 4 if some are still pending."""
    from ..config import load_config
    from ..errors import RetriableError
    from ..script.alerts import flush as flush_alerts

    done = flush_alerts(load_config(list(config_paths) or None), timeout)
    for name, total, delivered in done:
        click.echo(f"{name}: {delivered}/{total} delivered")
    pending = sum(t - d for _, t, d in done)
    if pending:
        raise RetriableError(f"{pending} alerts still spooled (sink unavailable?); run flush again")
    click.echo(f"flushed {len(done)} spool file(s)")


@alerts.command()
@click.argument("file", type=click.Path(dir_okay=False))
@json_option
@click.option("--limit", type=int, default=20, show_default=True, help="Rows to print (table form).")
def dump(file: str, as_json: bool, limit: int) -> None:
    """Decode an alert Avro file (file sink or spool) and print a summary."""
    from ..script.alerts import dump as dump_alerts

    summary = dump_alerts(file)
    if as_json:
        click.echo(json.dumps(summary, default=str))
        return
    click.echo(f"{summary['file']}: {summary['alerts']} alerts, {summary['diaObjects']} diaObjects, "
               f"visits {summary['visits']}, detectors {summary['detectors']}")
    click.echo(f"{'diaSourceId':>20} {'diaObjectId':>20} {'ra':>11} {'dec':>10} {'psfFlux':>10} band "
               f"{'nSrc':>4} {'prv':>4} {'prvF':>4} {'cutoutB':>8}")
    for r in summary["rows"][:limit]:
        click.echo(f"{r['diaSourceId']:>20} {r['diaObjectId']:>20} {r['ra']:>11.6f} {r['dec']:>10.6f} "
                   f"{(r['psfFlux'] or float('nan')):>10.1f} {r['band'] or '-':>4} "
                   f"{r['nDiaSources'] or 0:>4} {r['prvDiaSources']:>4} {r['prvDiaForcedSources']:>4} "
                   f"{r['cutoutBytes']:>8}")
