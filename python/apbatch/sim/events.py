"""The night's observatory events and raw arrivals, and their replay in (scaled) real time.

Events are JSON objects with the ts_xml field names of ``shared/data/events/README.md``
plus an envelope key ``"topic"`` (``lsst.sal.ScriptQueue.logevent_nextVisit``,
``lsst.sal.<MTCamera|CCCamera|ATCamera>.logevent_startIntegration``, ...), the form
:func:`apbatch.events.parse_event` reads. ``additionalKeys``/``additionalValues`` are
``:``-separated with ``\\:`` escaping a colon inside a value (CAP-572), e.g. the group id.

The *timeline* (``timeline.jsonl``) holds one record per line, in time order::

    {"time": <TAI unix s>, "type": "event", "event": {...}}
    {"time": <TAI unix s>, "type": "raw", "path": "raw/...fits", "obs_id": ..., "detector": ...,
     "detector_name": ..., "group": ...}

:func:`replay` plays a timeline: events become files in a spool directory, raws are handed
to a ``deliver(path, obs_id, detector_name)`` callable (default: into an
:class:`apbatch.distributor.store.DistributorStore`), each at
``start + (time - first_time) / speed`` of the wall clock.
"""

from __future__ import annotations

import copy
import json
import logging
import time
from collections.abc import Callable
from pathlib import Path

from ..atomic import write_atomic
from ..errors import BadInputError
from ..ids import exposure_id
from ..instruments import get_instrument
from ..timeutil import TAI_MINUS_UTC
from .night import READOUT, NightPlan
from .raws import ExposureSpec

__all__ = [
    "CAMERA_COMPONENTS",
    "raw_relpath",
    "read_timeline",
    "replay",
    "spec_exposure_id",
    "store_deliver",
    "timeline",
    "write_timeline",
]

_log = logging.getLogger(__name__)
CAMERA_COMPONENTS = {"LSSTCam": "MTCamera", "LSSTComCam": "CCCamera", "LATISS": "ATCamera"}
_SAL_INDEX = {"LSSTCam": 1, "LSSTComCam": 1, "LATISS": 2}  # ScriptQueue: 1 MainTel, 2 AuxTel
_TIME_FIELDS = (
    "private_sndStamp",
    "private_rcvStamp",
    "private_kafkaStamp",
    "startTime",
    "timestampAcquisitionStart",
)
Deliver = Callable[[Path, str, str], object]


def raw_relpath(spec: ExposureSpec, detector_name: str) -> str:
    """Path of a raw inside a night directory."""
    return f"raw/{spec.instrument}/{spec.obs_id}/{spec.obs_id}_{detector_name}.fits"


def _private(t: float, seq: int, identity: str) -> dict:
    return {
        "private_sndStamp": t,
        "private_rcvStamp": t + 0.002,
        "private_efdStamp": t - TAI_MINUS_UTC,
        "private_kafkaStamp": t + 0.001,
        "private_seqNum": seq,
        "private_revCode": "apbatch-sim",
        "private_identity": identity,
        "private_origin": 4242,
    }


def _escape(v: object) -> str:
    return str(v).replace("\\", "\\\\").replace(":", "\\:")


def _start_integration(spec: ExposureSpec, t: float, seq: int) -> dict:
    component = CAMERA_COMPONENTS[spec.instrument]
    if spec.group_id:
        kv = {
            "imageType": spec.image_type,
            "groupId": spec.group_id,
            "testType": spec.image_type,
            "stutterRows": 0,
            "stutterNShifts": 0,
            "stutterDelay": 0.0,
            "reason": spec.reason,
            "program": spec.program,
        }
    else:  # CCS calibrations: no group id
        kv = {"imageType": spec.image_type, "testType": spec.image_type}
    camcode = spec.obs_id.split("_")[0]
    return {
        "topic": f"lsst.sal.{component}.logevent_startIntegration",
        **_private(t, seq, component),
        "additionalKeys": ":".join(kv),
        "additionalValues": ":".join(_escape(v) for v in kv.values()),
        "imagesInSequence": spec.images_in_sequence,
        "imageName": spec.obs_id,
        "imageIndex": spec.image_index,
        "imageSource": camcode,
        "imageController": spec.controller,
        "imageDate": f"{spec.day_obs:08d}",
        "imageNumber": spec.seq_num,
        "timestampAcquisitionStart": t - 0.1,
        "exposureTime": spec.exptime,
        "mode": "normal",
        "timeout": spec.exptime + 30.0,
    }


def timeline(plan: NightPlan) -> list[dict]:
    """Every event and raw arrival of a night, sorted by time (TAI unix seconds)."""
    items: list[dict] = []
    seq = 0
    sal = _SAL_INDEX[plan.instrument]
    inst = get_instrument(plan.instrument)
    det_names = {d: inst.detector(d).name for d in plan.detectors}

    def unix(mjd: float) -> float:
        return (mjd - 40587.0) * 86400.0

    def add_exposure(spec: ExposureSpec) -> None:
        nonlocal seq
        t_open = unix(spec.mjd_begin)
        seq += 1
        items.append({"time": t_open, "type": "event", "event": _start_integration(spec, t_open, seq)})
        t_done = t_open + spec.exptime + READOUT
        for _k, det in enumerate(plan.detectors):
            arrival = t_done + 0.5 + ((spec.seq_num * 7919 + det * 104729) % 2500) / 1000.0
            items.append(
                {
                    "time": arrival,
                    "type": "raw",
                    "path": raw_relpath(spec, det_names[det]),
                    "obs_id": spec.obs_id,
                    "detector": det,
                    "detector_name": det_names[det],
                    "group": spec.group_id or str(spec_exposure_id(spec)),
                }
            )

    for spec in plan.calibrations:
        add_exposure(spec)
    for v in plan.visits:
        seq += 1
        nv = {
            "topic": "lsst.sal.ScriptQueue.logevent_nextVisit",
            "salIndex": sal,
            **_private(v.next_visit_time, seq, f"ScriptQueue:{sal}"),
            "scriptSalIndex": 100000 + seq,
            "groupId": v.group_id,
            "coordinateSystem": 2,
            "position": [v.ra, v.dec],
            "startTime": unix(v.exposures[0].mjd_begin) if v.exposures else v.next_visit_time + 25.0,
            "rotationSystem": 2,
            "cameraAngle": v.rotation,
            "filters": v.physical_filter,
            "dome": 2,
            "duration": sum(e.exptime + READOUT for e in v.exposures) or 32.0,
            "nimages": len(v.exposures) or 1,
            "instrument": plan.instrument,
            "survey": v.survey,
            "totalCheckpoints": 0,
        }
        items.append({"time": v.next_visit_time, "type": "event", "event": nv})
        if v.canceled:
            seq += 1
            t = v.next_visit_time + 5.0
            items.append(
                {
                    "time": t,
                    "type": "event",
                    "event": {
                        "topic": "lsst.sal.ScriptQueue.logevent_nextVisitCanceled",
                        "salIndex": sal,
                        **_private(t, seq, f"ScriptQueue:{sal}"),
                        "scriptSalIndex": nv["scriptSalIndex"],
                        "groupId": v.group_id,
                    },
                }
            )
        for spec in v.exposures:
            add_exposure(spec)
    items.sort(key=lambda r: (r["time"], r["type"] != "event"))
    return items


def spec_exposure_id(spec: ExposureSpec) -> int:
    """Exposure id of an exposure (obs_lsst rule)."""
    return exposure_id(spec.day_obs, spec.seq_num, spec.controller)


def write_timeline(items: list[dict], path: str | Path) -> None:
    """Write a timeline as JSON lines (atomically)."""
    write_atomic(Path(path), "".join(json.dumps(r) + "\n" for r in items))


def read_timeline(path: str | Path) -> list[dict]:
    """Read a timeline.

    Raises
    ------
    BadInputError
        Raised if the file is missing or a line is not JSON.
    """
    try:
        lines = Path(path).read_text().splitlines()
        return [json.loads(ln) for ln in lines if ln.strip()]
    except FileNotFoundError:
        raise BadInputError("--night", f"no timeline at {path}", "run `apbatch sim night` first") from None
    except json.JSONDecodeError as exc:
        raise BadInputError("--night", f"{path}: bad JSON line: {exc}") from None


def store_deliver(distributor_dir: str | Path) -> Deliver:
    """A ``deliver`` that copies raws into a distributor directory (header read for the metadata)."""
    from ..distributor.store import DistributorStore

    store = DistributorStore(distributor_dir)

    def deliver(path: Path, obs_id: str, detector_name: str):
        return store.deliver(path)

    return deliver


def _retimed(event: dict, t0: float, now_tai: float, speed: float) -> dict:
    ev = copy.deepcopy(event)
    for key in _TIME_FIELDS:
        if isinstance(ev.get(key), int | float):
            ev[key] = now_tai + (ev[key] - t0) / speed
    if "private_sndStamp" in ev:
        ev["private_efdStamp"] = ev["private_sndStamp"] - TAI_MINUS_UTC
    return ev


def replay(
    night_dir: str | Path,
    spool_dir: str | Path,
    distributor_dir: str | Path | None = None,
    speed: float = 1.0,
    deliver: Deliver | None = None,
    retime: bool = True,
    clock: Callable[[], float] = time.time,
    sleep: Callable[[float], None] = time.sleep,
    progress: Callable[[str], None] | None = None,
) -> dict:
    """Play a simulated night: events into ``spool_dir``, raws to the distributor.

    Parameters
    ----------
    night_dir : `str` or `Path`
        Output of ``apbatch sim night`` (``timeline.jsonl`` and ``raw/``).
    spool_dir : `str` or `Path`
        Events are written here as ``<n>-<kind>.json`` (temporary name, then rename).
    distributor_dir : `str` or `Path`, optional
        Distributor directory for the default ``deliver``.
    speed : `float`
        Replay ``speed`` times faster than real time.
    deliver : callable, optional
        ``deliver(path, obs_id, detector_name)``; default copies into ``distributor_dir``.
    retime : `bool`
        Shift event times (``private_*Stamp``, ``startTime``, ``timestampAcquisitionStart``)
        so that the night starts now (TAI) and runs ``speed`` times faster; group ids and image
        names are kept.
    clock, sleep : callable
        Wall clock (UTC unix seconds) and sleep (injected for tests).

    Returns
    -------
    summary : `dict`
        ``events``, ``raws`` counts and ``wall_seconds``.

    Raises
    ------
    BadInputError
        Raised for a non-positive speed, no deliver target, or a missing raw file.
    """
    if not speed > 0:
        raise BadInputError("--speed", f"{speed} is not positive", "use e.g. 1 or 10")
    night = Path(night_dir)
    items = read_timeline(night / "timeline.jsonl")
    if deliver is None:
        if distributor_dir is None:
            raise BadInputError(
                "--distributor", "missing", "give a distributor directory or a deliver function"
            )
        deliver = store_deliver(distributor_dir)
    spool = Path(spool_dir)
    spool.mkdir(parents=True, exist_ok=True)
    start = clock()
    t0 = items[0]["time"] if items else 0.0
    n_events = n_raws = 0
    for n, item in enumerate(items):
        due = start + (item["time"] - t0) / speed
        wait = due - clock()
        if wait > 0:
            sleep(wait)
        if item["type"] == "event":
            ev = _retimed(item["event"], t0, start + TAI_MINUS_UTC, speed) if retime else item["event"]
            kind = ev["topic"].rsplit("_", 1)[-1]
            write_atomic(spool / f"{n:07d}-{kind}.json", json.dumps(ev), durable=False)
            n_events += 1
        else:
            path = night / item["path"]
            if not path.is_file():
                raise BadInputError("timeline", f"raw {path} is missing", "re-run `apbatch sim night`")
            deliver(path, item["obs_id"], item["detector_name"])
            n_raws += 1
        if progress:
            progress(f"{item['type']} {item.get('obs_id') or item['event'].get('groupId', '')}")
    return {"events": n_events, "raws": n_raws, "wall_seconds": clock() - start}
