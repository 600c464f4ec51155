"""``apbatch process-ccd``: the per-CCD AP job every batch job runs."""

from __future__ import annotations

import json

import click

from ..errors import BadInputError
from ..work import MAX_NIMAGES, check_nimages
from .opt import config_option

__all__ = ["process_ccd"]


def _nimages(_ctx: click.Context, _param: click.Parameter, value: int) -> int:
    # The event parser applies the same rule, so the daemon never submits a job this refuses.
    return check_nimages(value, "--nimages")


@click.command("process-ccd")
@click.option("--instrument", required=True, help="LSSTCam, LSSTComCam or LATISS.")
@click.option("--detector", required=True, help="CCD id (94) or name (R22_S11).")
@click.option("--group", "group_id", required=True, help="Group id (GROUPID) of the visit's snaps.")
@click.option("--visit", required=True, type=int, help="Visit id.")
@click.option("--day-obs", required=True, type=int, help="Observing day, YYYYMMDD.")
@click.option("--intent", default="science", show_default=True, help="science, bias, dark, flat, ...")
@click.option("--exposure-time", required=True, type=float, help="Expected exposure time, s (headers win).")
@click.option("--nimages", default=1, show_default=True, type=int, callback=_nimages,
              help=f"Snaps to wait for, 0-{MAX_NIMAGES} (0 = unknown: wait for one).")
@click.option("--distributor", required=True, help="Distributor directory or http://127.0.0.1:PORT.")
@click.option("--ra", type=click.FloatRange(0, 360), help="Boresight RA, deg.")
@click.option("--dec", type=click.FloatRange(-90, 90), help="Boresight Dec, deg.")
@click.option("--rotation", type=float, help="Sky rotator angle, deg.")
@click.option("--filter", "physical_filter", help="Physical filter (compared with the header).")
@click.option("--image", "image_names", multiple=True,
              help="Image name(s) (obs ids); default: any of the group.")
@click.option("--timeout", type=click.FloatRange(min=0, min_open=True),
              help="Seconds to wait for the raw(s) [default: job.raw_timeout, 120].")
@click.option("--repo", help="Butler repository [default: job.repo].")
@click.option("--collections", help="Input collection [default: job.input_collection].")
@click.option("--output-run", help="Output RUN collection [default: job.output_run].")
@config_option
def process_ccd(config_paths, timeout, repo, collections, output_run, detector, **fields):
    """Process one CCD: raw -> ISR -> subtraction -> DIA sources -> APDB -> alerts.

    Every other setting comes from the config (--config FILE, repeatable, or $APBATCH_CONFIG):
    the daemon passes the night's resolved config file. Exit codes: 0 done, 2 bad input,
    3 raw timeout, 4 retriable (nothing reached the APDB), 5 non-retriable; 2-4 leave nothing
    written.
    """
    from ..config import load_config
    from ..instruments import get_instrument
    from ..script.process_ccd import process_ccd as run
    from ..work import CcdWork

    cfg = load_config(list(config_paths) or None)
    cam = get_instrument(fields["instrument"])
    det = cam.detector(detector, field="--detector")
    if (fields["ra"] is None) != (fields["dec"] is None):
        raise BadInputError("--ra/--dec", "give both or neither")
    if fields["physical_filter"]:
        cam.band_of(fields["physical_filter"], field="--filter")
    work = CcdWork(instrument=cam.name, detector=det.id, detector_name=det.name,
                   image_names=tuple(fields.pop("image_names")), **{k: v for k, v in fields.items()
                                                                    if k != "instrument"})
    result = run(cfg, work, timeout=timeout, repo=repo, collections=collections, output_run=output_run)
    click.echo(json.dumps(result, default=str))
