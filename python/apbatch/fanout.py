"""Fan-out: one event -> one `CcdWork` per CCD. Pure functions, no I/O.

What each event becomes
-----------------------
* `NextVisit` (dynamic mode, submitted ahead of the exposure): one item per science CCD, with
  the boresight (when ICRS), the rotation (when ``rotationSystem`` is SKY), the filter (when
  exactly one is acceptable), ``nimages`` (0 = unknown) and no image names: the job waits for
  the group's raws. nextVisit has no exposure time, so the *anticipated* one comes from
  ``events.anticipated_exposure_time``, looked up by survey, then instrument, then
  ``default``; the job confirms it from the raw headers.
* science `StartIntegration` (batch mode, or a nextVisit that never came): the same, with
  the exposure time of the event and, when the group's `NextVisit` is known, its pointing.
  The image name is given only for single-image groups; for several snaps the job waits for
  ``imagesInSequence`` raws of the group.
* calibration `StartIntegration` (bias, dark, flat, CBP; no nextVisit): one item per CCD
  for that image. Group id: the event's ``groupId`` if given, else ``str(exposure_id)``
  (obs_lsst's ``exposure_group`` when there is no GROUPID). Visit: the visit of the
  ``groupId`` when it is an ISO time, else the exposure id (obs_lsst's ``visit_id`` rule).
  Calibration sequences that share one ``groupId`` are thus one job per CCD, which waits
  for all ``imagesInSequence`` images, like a science visit with snaps; an image without
  ``groupId`` is its own one-image group (``nimages`` 1, its image named), whatever the
  length of its sequence.
"""

from __future__ import annotations

import os
from collections.abc import Sequence
from typing import TypedDict

from .config import ApbatchConfig
from .errors import BadInputError
from .events import CoordSys, Event, NextVisit, RotSys, StartIntegration
from .ids import day_obs_of, group_day_obs, parse_obs_id, visit_id_from_group
from .instruments import Detector, get_instrument
from .work import CcdWork

__all__ = ["anticipated_exposure_time", "event_day_obs", "fan_out", "select_detectors", "visit_day_obs"]


class _VisitFields(TypedDict):
    """The `CcdWork` fields every CCD of one event shares (all but detector and distributor)."""

    instrument: str
    group_id: str
    visit: int
    day_obs: int
    intent: str
    exposure_time: float
    nimages: int
    ra: float | None
    dec: float | None
    rotation: float | None
    physical_filter: str | None
    image_names: tuple[str, ...]
    survey: str


def anticipated_exposure_time(config: ApbatchConfig, survey: str, instrument: str) -> float:
    """Exposure time expected for a nextVisit: by survey, then instrument, then ``default``.

    Raises
    ------
    BadInputError
        Raised if none of the three is configured.
    """
    table = config.events.anticipated_exposure_time
    for key in (survey, instrument, "default"):
        if key and key in table:
            return float(table[key])
    raise BadInputError("events.anticipated_exposure_time", f"no entry for survey {survey!r}, "
                        f"instrument {instrument!r} or 'default'", "add a 'default' entry")


def select_detectors(config: ApbatchConfig, instrument: str,
                     only: Sequence[int | str] | None = None) -> list[Detector]:
    """Science CCDs to fan out to: all, or the configured subset, or ``only`` (ids or names).

    Raises
    ------
    BadInputError
        Raised if a configured or requested detector is unknown or not a science CCD.
    """
    inst = get_instrument(instrument)
    subset: Sequence[int | str] | None = config.events.detectors.get(inst.name)
    field = f"events.detectors.{inst.name}"
    chosen = inst.science_detectors
    for wanted, fld in ((subset, field), (only, "--detector")):
        if wanted is None:
            continue
        dets = [inst.detector(d, field=fld) for d in wanted]
        for det in dets:
            if not det.is_science:
                raise BadInputError(fld, f"{det.name} ({det.id}) is a {det.purpose.lower()} CCD",
                                    "AP jobs run on science CCDs only")
        ids = {d.id for d in dets}
        chosen = [d for d in chosen if d.id in ids]
    return chosen


def _distributor(config: ApbatchConfig) -> str:
    loc = config.job.distributor
    return loc if "://" in loc else os.path.abspath(config.path(loc))


def _single_filter(visit: NextVisit | None) -> str | None:
    if visit is None:
        return None
    names = visit.filter_list
    return names[0] if len(names) == 1 else None


def _pointing(visit: NextVisit | None) -> tuple[float | None, float | None, float | None]:
    if visit is None or visit.coordinateSystem != CoordSys.ICRS:
        return None, None, None
    rot = visit.cameraAngle if visit.rotationSystem == RotSys.SKY else None
    return visit.position[0], visit.position[1], rot


def fan_out(event: NextVisit | StartIntegration, config: ApbatchConfig,
            next_visit: NextVisit | None = None, only: Sequence[int | str] | None = None) -> list[CcdWork]:
    """Per-CCD work items of one event.

    Parameters
    ----------
    event : `NextVisit` or `StartIntegration`
        An accepted event (see `apbatch.events.rejection_reason`).
    config : `ApbatchConfig`
        Supplies the anticipated exposure times, detector subsets and distributor location.
    next_visit : `NextVisit`, optional
        The nextVisit of the same group, for a science startIntegration's pointing and filter.
    only : `list`, optional
        Restrict to these detectors (ids or names).

    Raises
    ------
    BadInputError
        Raised if the instrument, a detector, the group id or the image name is invalid.
    """
    dets = select_detectors(config, event.instrument, only)
    distributor = _distributor(config)
    if isinstance(event, NextVisit):
        ra, dec, rot = _pointing(event)
        common: _VisitFields = {
            "instrument": get_instrument(event.instrument).name, "group_id": event.groupId,
            "visit": visit_id_from_group(event.groupId, field="event.groupId"),
            "day_obs": visit_day_obs(event), "intent": "science",
            "exposure_time": anticipated_exposure_time(config, event.survey, event.instrument),
            "nimages": event.nimages, "ra": ra, "dec": dec, "rotation": rot,
            "physical_filter": _single_filter(event), "image_names": (), "survey": event.survey,
        }
    else:
        common = _start_integration_fields(event, next_visit)
    return [CcdWork(detector=d.id, detector_name=d.name, distributor=distributor, **common) for d in dets]


def visit_day_obs(event: NextVisit) -> int:
    """A science visit's day_obs: its group's (a planning time), else that of its start time."""
    return group_day_obs(event.groupId) or day_obs_of(event.start_datetime)


def event_day_obs(event: Event) -> int | None:
    """The day_obs an event belongs to (`None` for a nextVisitCanceled)."""
    if isinstance(event, NextVisit):
        return visit_day_obs(event)
    if isinstance(event, StartIntegration):
        return int(event.imageDate)
    return None


def _start_integration_fields(event: StartIntegration, next_visit: NextVisit | None) -> _VisitFields:
    obs = parse_obs_id(event.imageName, field="event.imageName")
    if f"{obs.day_obs:08d}" != event.imageDate:
        raise BadInputError("event.imageDate",
                            f"{event.imageDate!r} disagrees with imageName {event.imageName!r}")
    inst = get_instrument(event.instrument)
    if obs.camcode != inst.camcode:
        raise BadInputError("event.imageName", f"{event.imageName!r} is not an {inst.name} image name",
                            f"{inst.name} images start with {inst.camcode}_")
    if next_visit is not None and next_visit.groupId != event.groupId:
        next_visit = None
    if event.intent == "science":
        if not event.groupId:
            raise BadInputError("event.additionalValues", f"science image {event.imageName} has no groupId",
                                "the takeImages keyValueMap must carry groupId")
        group = event.groupId
        visit = visit_id_from_group(group, field="event.groupId")
    else:
        group = event.groupId or str(obs.exposure_id)
        try:
            visit = visit_id_from_group(group, field="event.groupId") if event.groupId else obs.exposure_id
        except BadInputError:
            visit = obs.exposure_id  # a calibration group that is not an ISO time
    ra, dec, rot = _pointing(next_visit) if event.intent == "science" else (None, None, None)
    # a calibration without a groupId is a group of its own (its exposure id): one image, whatever
    # the sequence's length (waiting for imagesInSequence raws of it would wait out the timeout)
    nimages = event.imagesInSequence if event.intent == "science" or event.groupId else 1
    return {
        "instrument": inst.name, "group_id": group, "visit": visit, "day_obs": obs.day_obs,
        "intent": event.intent, "exposure_time": event.exposureTime, "nimages": nimages, "ra": ra, "dec": dec,
        "rotation": rot, "physical_filter": _single_filter(next_visit) if event.intent == "science" else None,
        "image_names": (event.imageName,) if nimages == 1 else (),
        "survey": next_visit.survey if next_visit is not None else (event.program or ""),
    }
