"""``apbatch sim``: simulate a night (raws, calibrations, templates, truth, events), replay it,
or render one CCD."""

from __future__ import annotations

import datetime
from collections.abc import Callable, Sequence
from pathlib import Path

from ..errors import BadInputError

__all__ = ["sim_ccd", "sim_night", "sim_replay"]


def sim_night(
    out: str | Path,
    instrument: str,
    visits: int,
    seed: int,
    detectors: Sequence[str] = (),
    day_obs: int = 20251015,
    fields: int = 2,
    snaps: Sequence[int] = (1, 2),
    templates: bool = True,
    patch_size: int = 4000,
    cancel_every: int = 0,
    calibrations: dict[str, int] | None = None,
    progress: Callable[[str], None] | None = None,
    hot_amps: Sequence[str] = (),
    bias_drift: dict[str, float] | None = None,
) -> dict:
    """Plan and render a night into ``out``; returns the manifest (see `apbatch.sim.produce`).

    ``hot_amps`` and ``bias_drift`` inject faults into the calibration raws (not the masters):
    see `apbatch.sim.night.plan_night`.
    """
    from ..sim.night import plan_night
    from ..sim.produce import simulate_night

    plan = plan_night(
        instrument,
        visits,
        seed,
        day_obs=day_obs,
        detectors=list(detectors) or None,
        n_fields=fields,
        snaps=snaps,
        cancel_every=cancel_every,
        calibrations=calibrations,
        hot_amps=hot_amps,
        bias_drift=bias_drift,
    )
    return simulate_night(plan, out, templates=templates, patch_size=patch_size, progress=progress)


def sim_replay(
    night: str | Path,
    spool: str | Path,
    distributor: str | Path,
    speed: float = 1.0,
    retime: bool = True,
    progress: Callable[[str], None] | None = None,
) -> dict:
    """Replay a simulated night: events into ``spool``, raws into ``distributor``."""
    from ..sim.events import replay

    return replay(night, spool, distributor, speed=speed, retime=retime, progress=progress)


def sim_ccd(
    out: str | Path,
    instrument: str,
    detector: str,
    seed: int,
    ra: float,
    dec: float,
    rotation: float,
    physical_filter: str | None = None,
    exptime: float = 30.0,
    day_obs: int = 20251015,
    seq_num: int = 1,
    seeing: float = 0.8,
    truth: str | Path | None = None,
) -> dict:
    """Render one on-sky CCD exposure to ``out`` (and its truth to ``truth``)."""
    from ..instruments import get_instrument
    from ..sim.night import tai_iso, tai_to_mjd
    from ..sim.raws import ExposureSpec, simulate_ccd
    from ..sim.sky import SkyModel
    from ..sim.truth import visit_truth, write_truth

    inst = get_instrument(instrument)
    if physical_filter is None:
        physical_filter = next(f for f, b in inst.filters.items() if b == "r")
    inst.band_of(physical_filter, field="--filter")
    if not -90 <= dec <= 90:
        raise BadInputError("--dec", f"{dec} is out of range", "use -90..90")
    date = datetime.datetime.strptime(str(day_obs), "%Y%m%d") + datetime.timedelta(days=1, hours=2)
    t = (date - datetime.datetime(1970, 1, 1)).total_seconds()
    spec = ExposureSpec(
        instrument=inst.name,
        day_obs=day_obs,
        seq_num=seq_num,
        controller="O",
        image_type="OBJECT",
        exptime=exptime,
        mjd_begin=tai_to_mjd(t),
        physical_filter=physical_filter,
        group_id=tai_iso(t - 25.0),
        ra=ra % 360,
        dec=dec,
        ra_start=ra % 360,
        dec_start=dec,
        rotation=rotation,
        seeing=seeing,
    )
    sky = SkyModel(seed, spec.mjd_begin)
    raw = simulate_ccd(spec, detector, sky, seed, out)
    if truth:
        write_truth(visit_truth([raw.truth]), truth)
    return {"path": str(out), "obs_id": spec.obs_id, "sources": len(raw.truth)}
