"""A simulated night: the plan (visits, snaps, calibration sequences) and everything it produces.

:func:`plan_night` makes a seeded plan: afternoon calibrations taken by the camera alone
(CCS, controller ``C``, no group id: biases, darks, flats), then science visits cycling over
a few fields near the meridian, each of 1 or 2 snaps. Times are TAI unix seconds:

* ``nextVisit`` is sent ``lead`` (20-30 s) before the visit's shutter opens;
* snap k opens at ``t_open + k * (exptime + readout)``; its ``startIntegration`` is sent then;
* the image is read out ``readout`` (2 s) after the shutter closes and each CCD arrives at
  the distributor 0.5-3 s later.

:func:`simulate_night` renders the plan into a directory::

    night.json                      the plan (NightPlan.to_dict)
    skymap.yaml                     the template sky map (apbatch.skymap)
    timeline.jsonl                  events and raw arrivals, in time order (see sim.events)
    raw/<instrument>/<obs_id>/<obs_id>_<detector>.fits
    calibs/<instrument>/{bias,flat}/...fits   (apbatch.image files)
    templates/<skymap>/<tract>/<patch>/template_<band>.fits
    truth/<instrument>/<visit>/truth_<visit>_<detector>.parquet
"""

from __future__ import annotations

import dataclasses
import datetime
import json
import math
from collections.abc import Callable, Sequence
from pathlib import Path

import numpy as np

from .. import ids
from ..errors import BadInputError
from ..instruments import get_instrument
from ..timeutil import local_sidereal_deg
from .raws import ExposureSpec
from .sky import MovingObject, SkyModel, rate_to_mag, snr_to_rate

__all__ = ["NightPlan", "VisitPlan", "plan_night", "tai_iso", "tai_to_mjd"]

_EPOCH_MJD = 40587.0  # MJD of 1970-01-01
READOUT = 2.0


def tai_to_mjd(t: float) -> float:
    """MJD (TAI) of a TAI unix time."""
    return _EPOCH_MJD + t / 86400.0


def tai_iso(t: float) -> str:
    """ISO string with milliseconds of a TAI unix time (the group-id format)."""
    d = datetime.datetime(1970, 1, 1) + datetime.timedelta(seconds=round(t, 3))
    return d.strftime("%Y-%m-%dT%H:%M:%S.") + f"{d.microsecond // 1000:03d}"


@dataclasses.dataclass
class VisitPlan:
    """One science visit (group): pointing, filter, snaps and event times."""

    group_id: str
    visit_id: int
    field: int
    ra: float
    dec: float
    rotation: float
    physical_filter: str
    next_visit_time: float
    exposures: list[ExposureSpec]
    survey: str = "PP-SURVEY"
    canceled: bool = False

    def to_dict(self) -> dict:
        """Plain-JSON form."""
        d = dataclasses.asdict(self)
        d["exposures"] = [e.to_dict() for e in self.exposures]
        return d

    @classmethod
    def from_dict(cls, d: dict) -> VisitPlan:
        """Inverse of :meth:`to_dict`."""
        return cls(**{**d, "exposures": [ExposureSpec.from_dict(e) for e in d["exposures"]]})


@dataclasses.dataclass
class NightPlan:
    """Everything about a simulated night except its pixels."""

    instrument: str
    day_obs: int
    seed: int
    detectors: list[int]
    fields: list[tuple[float, float]]
    calibrations: list[ExposureSpec]
    visits: list[VisitPlan]
    movers: list[MovingObject]
    epoch_mjd: float
    span_days: float

    def sky(self) -> SkyModel:
        """The night's sky (same seed, epoch and moving objects)."""
        return SkyModel(self.seed, self.epoch_mjd, self.span_days, movers=self.movers)

    def to_dict(self) -> dict:
        """Plain-JSON form."""
        return {
            "instrument": self.instrument,
            "day_obs": self.day_obs,
            "seed": self.seed,
            "detectors": list(self.detectors),
            "fields": [list(f) for f in self.fields],
            "calibrations": [c.to_dict() for c in self.calibrations],
            "visits": [v.to_dict() for v in self.visits],
            "movers": [m.to_dict() for m in self.movers],
            "epoch_mjd": self.epoch_mjd,
            "span_days": self.span_days,
        }

    @classmethod
    def from_dict(cls, d: dict) -> NightPlan:
        """Inverse of :meth:`to_dict`."""
        return cls(
            instrument=d["instrument"],
            day_obs=d["day_obs"],
            seed=d["seed"],
            detectors=d["detectors"],
            fields=[tuple(f) for f in d["fields"]],
            calibrations=[ExposureSpec.from_dict(c) for c in d["calibrations"]],
            visits=[VisitPlan.from_dict(v) for v in d["visits"]],
            movers=[MovingObject(**m) for m in d["movers"]],
            epoch_mjd=d["epoch_mjd"],
            span_days=d["span_days"],
        )

    def save(self, path: str | Path) -> None:
        """Write as JSON."""
        Path(path).write_text(json.dumps(self.to_dict(), indent=1))

    @classmethod
    def load(cls, path: str | Path) -> NightPlan:
        """Read a plan written by :meth:`save`.

        Raises
        ------
        BadInputError
            Raised if the file is missing or not a plan.
        """
        try:
            return cls.from_dict(json.loads(Path(path).read_text()))
        except FileNotFoundError:
            raise BadInputError(
                "--night", f"no night plan at {path}", "run `apbatch sim night` first"
            ) from None
        except (ValueError, KeyError, TypeError) as exc:
            raise BadInputError("--night", f"{path} is not a night plan: {exc}") from None


def _filters(instrument: str) -> list[str]:
    inst = get_instrument(instrument)
    by_band = {b: f for f, b in inst.filters.items()}
    return [by_band[b] for b in ("r", "g", "i") if b in by_band]


def plan_night(
    instrument: str,
    n_visits: int,
    seed: int,
    day_obs: int = 20251015,
    detectors: Sequence[int | str] | None = None,
    n_fields: int = 2,
    snaps: Sequence[int] = (1, 2),
    calibrations: dict[str, int] | None = None,
    cancel_every: int = 0,
    hot_amps: Sequence[str] = (),
    bias_drift: dict[str, float] | None = None,
) -> NightPlan:
    """Make a seeded night plan.

    Parameters
    ----------
    instrument : `str`
        ``LSSTCam``, ``LSSTComCam`` or ``LATISS``.
    n_visits : `int`
        Number of science visits.
    seed : `int`
        Seed of the plan and of the sky.
    day_obs : `int`
        Observing day (YYYYMMDD); science starts at 01:00 TAI the next date.
    detectors : sequence, optional
        CCDs to simulate (ids or names); default every science CCD.
    n_fields : `int`
        Fields the visits cycle over (one tract each in the sky map).
    snaps : sequence of `int`
        Allowed snap counts per visit (30 s split evenly between the snaps).
    calibrations : `dict`, optional
        Number of CCS images per type, default ``{"BIAS": 2, "DARK": 1, "FLAT": 2}``.
    cancel_every : `int`
        If > 0, every n-th nextVisit is cancelled (``nextVisitCanceled``, no images).
    hot_amps : sequence of `str`
        Amplifiers (names, e.g. ``C03``) that are hot in every calibration image of every CCD
        (`apbatch.sim.raws.HOT_AMP_E`, ``HOT_AMP_RATE``); the master calibrations stay clean.
    bias_drift : `dict` [`str`, `float`], optional
        Amplifier name -> ADU by which its bias level has drifted in the calibration images.

    Raises
    ------
    BadInputError
        Raised for a non-positive visit or field count or an unknown detector.
    """
    inst = get_instrument(instrument)
    if n_visits < 0 or n_fields < 1:
        raise BadInputError(
            "--visits", f"{n_visits} visits over {n_fields} fields", "use >= 0 visits, >= 1 field"
        )
    if not snaps or any(s not in (1, 2) for s in snaps):
        raise BadInputError("snaps", f"{list(snaps)}", "snap counts are 1 or 2")
    dets = (
        [inst.detector(d, field="--detectors").id for d in detectors]
        if detectors
        else [d.id for d in inst.science_detectors]
    )
    rng = np.random.default_rng([int(seed), 23])
    date = datetime.datetime.strptime(str(day_obs), "%Y%m%d")
    t_night = (date + datetime.timedelta(days=1, hours=1) - datetime.datetime(1970, 1, 1)).total_seconds()
    calibrations = calibrations if calibrations is not None else {"BIAS": 2, "DARK": 1, "FLAT": 2}
    filters = _filters(inst.name)
    seq = 1
    cals = []
    t = t_night - 900.0  # afternoon calibrations, shortly before the science visits
    for image_type, count in calibrations.items():
        exptime = {"BIAS": 0.0, "DARK": 30.0, "FLAT": 5.0}.get(image_type, 1.0)
        for k in range(count):
            cals.append(
                ExposureSpec(
                    instrument=inst.name,
                    day_obs=day_obs,
                    seq_num=seq,
                    controller="C",
                    image_type=image_type,
                    exptime=exptime,
                    mjd_begin=tai_to_mjd(t),
                    physical_filter=filters[0],
                    image_index=k + 1,
                    images_in_sequence=count,
                    reason="calibration",
                    program="",
                    object_name="",
                    hot_amps=tuple(hot_amps),
                    bias_drift=tuple((bias_drift or {}).items()),
                )
            )
            seq += 1
            t += exptime + READOUT + 3.0
    lst = local_sidereal_deg(t_night)
    fields = []
    for f in range(n_fields):
        fields.append((float((lst - 10 + 12 * f + rng.uniform(-2, 2)) % 360), float(rng.uniform(-40, -20))))
    field_rot = rng.uniform(0, 360, n_fields)
    field_filter = [filters[f % len(filters)] for f in range(n_fields)]
    visits = []
    t_open = t_night
    for k in range(n_visits):
        f = k % n_fields
        lead = float(rng.uniform(20.0, 30.0))
        nsnap = int(rng.choice(list(snaps)))
        exptime = 30.0 / nsnap
        t_nv = t_open - lead
        group = tai_iso(t_nv)
        ra0, dec0 = fields[f]
        ra = float((ra0 + rng.uniform(-0.02, 0.02) / math.cos(math.radians(dec0))) % 360)
        dec = float(dec0 + rng.uniform(-0.02, 0.02))
        rot = float((field_rot[f] + rng.uniform(-3, 3)) % 360)
        canceled = cancel_every > 0 and (k + 1) % cancel_every == 0
        exposures = []
        if not canceled:
            # the telescope points a few arcsec away from the commanded position, then tracks:
            # the snaps of a visit share that pointing (jitter ~0.02") and nearly the same seeing
            ra_v, dec_v = float(ra + rng.normal(0, 2e-4)), float(dec + rng.normal(0, 2e-4))
            seeing_v = float(rng.uniform(0.6, 1.2))
            for s in range(nsnap):
                t_s = t_open + s * (exptime + READOUT)
                exposures.append(
                    ExposureSpec(
                        instrument=inst.name,
                        day_obs=day_obs,
                        seq_num=seq,
                        controller="O",
                        image_type="OBJECT",
                        exptime=exptime,
                        mjd_begin=tai_to_mjd(t_s),
                        physical_filter=field_filter[f],
                        group_id=group,
                        image_index=s + 1,
                        images_in_sequence=nsnap,
                        ra=ra,
                        dec=dec,
                        ra_start=ra_v + float(rng.normal(0, 5e-6)),
                        dec_start=dec_v + float(rng.normal(0, 5e-6)),
                        rotation=rot,
                        seeing=seeing_v * float(rng.uniform(0.97, 1.03)),
                        sky_offset=float(rng.normal(0, 0.1)),
                        transparency=float(-abs(rng.normal(0, 0.05))),
                        object_name=f"field_{f}",
                    )
                )
                seq += 1
            t_open += nsnap * (exptime + READOUT) + 5.0
        visits.append(
            VisitPlan(
                group_id=group,
                visit_id=ids.visit_id_from_group(group),
                field=f,
                ra=ra,
                dec=dec,
                rotation=rot,
                physical_filter=field_filter[f],
                next_visit_time=t_nv,
                exposures=exposures,
                canceled=canceled,
            )
        )
    epoch = tai_to_mjd(t_night)
    span = max((t_open - t_night) / 86400.0, 1e-3)
    movers = []
    for f in range(min(n_fields, n_visits)):
        first = next((v for v in visits if v.field == f and v.exposures), None)
        if first is None:
            continue
        e = first.exposures[0]
        det = inst.detector(dets[int(rng.integers(len(dets)))])
        x, y = rng.uniform(0.3, 0.7) * det.nx, rng.uniform(0.3, 0.7) * det.ny
        ra_m, dec_m = inst.sky_wcs(det, *e.pointing()).pixel_to_world_values(x, y)
        speed, ang = rng.uniform(0.5, 2.0), rng.uniform(0, 2 * math.pi)
        mag = float(rate_to_mag(snr_to_rate(rng.uniform(15, 50))))
        movers.append(
            MovingObject(
                id=9_000_000_000_000 + f,
                ra0=float(ra_m),
                dec0=float(dec_m),
                mjd0=e.mjd_begin,
                rate_ra=speed * math.cos(ang),
                rate_dec=speed * math.sin(ang),
                mag=mag,
            )
        )
    return NightPlan(
        instrument=inst.name,
        day_obs=day_obs,
        seed=int(seed),
        detectors=dets,
        fields=fields,
        calibrations=cals,
        visits=visits,
        movers=movers,
        epoch_mjd=epoch,
        span_days=span,
    )


ProgressFn = Callable[[str], None]
