"""``apbatch demo``: a simulated night end to end on the embedded defaults."""

from __future__ import annotations

import click

__all__ = ["demo"]


@click.command("demo")
@click.option("--out", required=True, type=click.Path(file_okay=False), help="New directory for everything.")
@click.option("--instrument", default="LSSTComCam", show_default=True, help="LSSTCam, LSSTComCam or LATISS.")
@click.option("--visits", default=3, show_default=True, type=click.IntRange(1, 50), help="Science visits.")
@click.option("--detectors", default="0,4,8", show_default=True,
              help="Comma-separated detector ids or names; 'all' for every science CCD.")
@click.option("--seed", default=1, show_default=True, type=int, help="Seed of the simulated night.")
@click.option("--speed", default=10.0, show_default=True, type=click.FloatRange(min=0.1),
              help="Replay speed-up over real time.")
@click.option("--workers", type=click.IntRange(min=1), help="Concurrent jobs [default: number of cores].")
@click.option("--timeout", default=1800.0, show_default=True, type=click.FloatRange(min=1),
              help="Seconds to wait for the jobs.")
def demo(out, instrument, visits, detectors, seed, speed, workers, timeout):
    """Simulate a night and run it through daemon, local backend, jobs, APDB and alert files."""
    from ..script.demo import run_demo

    dets = () if detectors.strip().lower() == "all" else tuple(d for d in detectors.split(",") if d.strip())
    run_demo(out, instrument=instrument, visits=visits, detectors=dets, seed=seed, speed=speed,
             workers=workers, timeout=timeout, say=click.echo)
