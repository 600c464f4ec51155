"""``apbatch sim``: the summit simulator."""

from __future__ import annotations

import json
from pathlib import Path

import click

from .progress import progress

__all__ = ["sim"]


@click.group()
def sim() -> None:
    """Simulate a night at the summit: raws, calibrations, templates, truth and events."""


@sim.command()
@click.option("--out", required=True, type=click.Path(file_okay=False), help="Output directory.")
@click.option("--instrument", default="LSSTComCam", show_default=True, help="LSSTCam, LSSTComCam or LATISS.")
@click.option("--visits", default=4, show_default=True, type=click.IntRange(0), help="Science visits.")
@click.option("--seed", default=1, show_default=True, type=int, help="Seed of everything.")
@click.option(
    "--detectors", default="", help="Comma-separated detector ids or names (default: all science CCDs)."
)
@click.option("--day-obs", default=20251015, show_default=True, type=int, help="Observing day YYYYMMDD.")
@click.option("--fields", default=2, show_default=True, type=click.IntRange(1), help="Fields visited.")
@click.option("--snaps", default="1,2", show_default=True, help="Allowed snap counts per visit.")
@click.option(
    "--patch-size",
    default=4000,
    show_default=True,
    type=click.IntRange(300),
    help="Template patch size (pixels).",
)
@click.option("--no-templates", is_flag=True, help="Skip the template coadds.")
@click.option("--cancel-every", default=0, type=click.IntRange(0), help="Cancel every n-th nextVisit.")
@click.option(
    "--calibrations",
    default="BIAS=2,DARK=1,FLAT=2",
    show_default=True,
    help="CCS calibration images per type ('' for none).",
)
@click.option("--hot-amp", "hot_amps", multiple=True, metavar="AMP",
              help="Make this amplifier (e.g. C03) hot in every calibration raw (repeatable).")
@click.option("--bias-drift", "bias_drifts", multiple=True, metavar="AMP=ADU",
              help="Shift this amplifier's bias level in the calibration raws (repeatable).")
def night(
    out,
    instrument,
    visits,
    seed,
    detectors,
    day_obs,
    fields,
    snaps,
    patch_size,
    no_templates,
    cancel_every,
    calibrations,
    hot_amps,
    bias_drifts,
) -> None:
    """Plan and render a night into OUT."""
    from ..errors import BadInputError
    from ..script.sim import sim_night

    try:
        snap_counts = [int(s) for s in snaps.split(",") if s.strip()]
    except ValueError:
        raise BadInputError("--snaps", f"{snaps!r} is not a list of integers", "use e.g. 1,2") from None
    try:
        cals = {
            k.strip().upper(): int(v) for k, v in (p.split("=") for p in calibrations.split(",") if p.strip())
        }
    except ValueError:
        raise BadInputError(
            "--calibrations", f"{calibrations!r} is not TYPE=N,...", "use e.g. BIAS=2,FLAT=1"
        ) from None
    if set(cals) - {"BIAS", "DARK", "FLAT"} or any(n < 0 for n in cals.values()):
        raise BadInputError(
            "--calibrations", f"{calibrations!r}", "types are BIAS, DARK, FLAT with counts >= 0"
        )
    drift: dict[str, float] = {}
    for item in bias_drifts:
        amp, _, adu = item.partition("=")
        try:
            drift[amp.strip()] = float(adu)
        except ValueError:
            raise BadInputError("--bias-drift", f"{item!r} is not AMP=ADU",
                                "use e.g. --bias-drift C14=40") from None
    _check_amps(instrument, {"--hot-amp": hot_amps, "--bias-drift": drift})
    dets = [d.strip() for d in detectors.split(",") if d.strip()]
    with progress("simulating: files written") as step:
        manifest = sim_night(
            out,
            instrument,
            visits,
            seed,
            dets,
            day_obs=day_obs,
            fields=fields,
            snaps=snap_counts,
            templates=not no_templates,
            patch_size=patch_size,
            cancel_every=cancel_every,
            calibrations=cals,
            progress=step,
            hot_amps=hot_amps,
            bias_drift=drift,
        )
    click.echo(json.dumps(manifest))


def _check_amps(instrument: str, named: dict) -> None:
    """Refuse amplifier names the camera does not have, before anything is written."""
    from ..errors import BadInputError
    from ..instruments import get_instrument

    cam = get_instrument(instrument)
    known = {a.name for d in cam.detectors for a in cam.amplifiers(d.id)}
    for option, names in named.items():
        bad = sorted(set(names) - known)
        if bad:
            raise BadInputError(option, f"{cam.name} has no amplifier {', '.join(bad)}",
                                f"use one of {', '.join(sorted(known))}")


@sim.command()
@click.option(
    "--night",
    "night_dir",
    required=True,
    type=click.Path(file_okay=False, exists=True),
    help="Directory written by `apbatch sim night`.",
)
@click.option("--spool", required=True, type=click.Path(file_okay=False), help="Event spool directory.")
@click.option("--distributor", required=True, type=click.Path(file_okay=False), help="Distributor directory.")
@click.option("--speed", default=1.0, show_default=True, type=float, help="Replay this many times faster.")
@click.option("--keep-times", is_flag=True, help="Keep the simulated event times instead of starting now.")
def replay(night_dir, spool, distributor, speed, keep_times) -> None:
    """Replay a simulated night in (scaled) real time."""
    from ..script.sim import sim_replay
    from ..sim.events import read_timeline

    total = len(read_timeline(Path(night_dir) / "timeline.jsonl"))
    with progress("replaying: events and raws", total) as step:
        summary = sim_replay(night_dir, spool, distributor, speed=speed, retime=not keep_times, progress=step)
    click.echo(json.dumps(summary))


@sim.command()
@click.option("--out", required=True, type=click.Path(dir_okay=False), help="Raw FITS file to write.")
@click.option("--instrument", default="LSSTComCam", show_default=True)
@click.option("--detector", default="R22_S11", show_default=True, help="Detector id or name.")
@click.option("--seed", default=1, show_default=True, type=int)
@click.option("--ra", default=53.0, show_default=True, type=float)
@click.option("--dec", default=-28.0, show_default=True, type=float)
@click.option("--rotation", default=0.0, show_default=True, type=float, help="ROTPA, degrees.")
@click.option("--filter", "physical_filter", default=None, help="Physical filter (default: the r filter).")
@click.option("--exptime", default=30.0, show_default=True, type=click.FloatRange(0, min_open=True))
@click.option("--seeing", default=0.8, show_default=True, type=click.FloatRange(0.2, 5.0))
@click.option("--truth", default=None, type=click.Path(dir_okay=False), help="Truth Parquet file to write.")
def ccd(out, instrument, detector, seed, ra, dec, rotation, physical_filter, exptime, seeing, truth) -> None:
    """Render one CCD of one exposure."""
    from ..script.sim import sim_ccd

    click.echo(
        json.dumps(
            sim_ccd(
                out,
                instrument,
                detector,
                seed,
                ra,
                dec,
                rotation,
                physical_filter,
                exptime,
                seeing=seeing,
                truth=truth,
            )
        )
    )
