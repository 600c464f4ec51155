"""Observatory events that trigger AP jobs, their validation, and the accept/reject policy.

Three events matter (field lists from lsst-ts/ts_xml, see ``shared/data/events/README.md``):

* `NextVisit` (``ScriptQueue logevent_nextVisit``): a script is about to take images of a
  group; carries the boresight, rotation, acceptable filters, predicted number of images,
  but no exposure time;
* `NextVisitCanceled`: that group id will not be used;
* `StartIntegration` (``MTCamera``/``CCCamera``/``ATCamera logevent_startIntegration``): one
  image is being exposed; ``additionalKeys``/``additionalValues`` carry its ``groupId`` and
  ``imageType``, from which the *intent* (science, bias, dark, flat, ...) follows.

:func:`parse_event` turns a JSON text or a decoded mapping into one of these, raising
`BadInputError` naming the offending field. The input is either the bare topic fields, or an
envelope holding them under ``"value"``, with the kind given by ``"kind"`` (``nextVisit``,
``nextVisitCanceled``, ``startIntegration``) or by the Kafka ``"topic"``
(``lsst.sal.MTCamera.logevent_startIntegration``); failing both, the kind is guessed from the
fields present. The camera of a startIntegration comes from ``"instrument"``, else from the
topic's component, else from ``imageSource`` (``MC``/``CC``/``AT``).

Beyond types, an event is refused (never submitted) if it would only fail later: a ``groupId``
that is not the one spelling of its visit's group (`apbatch.ids.check_group_id`: the ledger
keys submissions on it), ``nimages``/``imagesInSequence`` beyond what a job waits for
(`apbatch.work.check_nimages`, the rule ``process-ccd`` applies too), a time past 2100
(`apbatch.event_fields.MAX_TAI`), a science image with no exposure time.

:func:`rejection_reason` is the pure accept/reject policy, as Rubin's fan-out applies it.
"""

from __future__ import annotations

import dataclasses
import datetime
import enum
import json
import re
from typing import Any, ClassVar

from .errors import BadInputError
from .event_fields import Fields, instrument_of_start, kind_of, known_or_verbatim, split_key_values
from .ids import check_group_id
from .instruments import instrument_names
from .timeutil import TAI_MINUS_UTC, tai_datetime
from .work import check_nimages

__all__ = [
    "CALIBRATION_INTENTS",
    "TAI_MINUS_UTC",
    "CoordSys",
    "Dome",
    "Event",
    "NextVisit",
    "NextVisitCanceled",
    "RotSys",
    "StartIntegration",
    "intent_of",
    "parse_event",
    "rejection_reason",
    "tai_datetime",
]

CALIBRATION_INTENTS = frozenset({"bias", "dark", "flat", "cbp"})
# imageType (IMGTYPE) -> intent; anything else is its lower-case self ("cwfs", "acq", "unknown"...).
_INTENTS = {"OBJECT": "science", "SKYEXP": "science", "ENGTEST": "science", "BIAS": "bias",
            "DARK": "dark", "FLAT": "flat", "CBP": "cbp"}


class CoordSys(enum.IntEnum):
    """``MetadataCoordSys`` of ts_xml: the system of ``nextVisit.position``."""

    NONE = 1
    ICRS = 2
    OBSERVED = 3
    MOUNT = 4


class RotSys(enum.IntEnum):
    """``MetadataRotSys`` of ts_xml: the system of ``nextVisit.cameraAngle``."""

    NONE = 1
    SKY = 2
    HORIZON = 3
    MOUNT = 4


class Dome(enum.IntEnum):
    """``MetadataDome`` of ts_xml: the desired dome state."""

    CLOSED = 1
    OPEN = 2
    EITHER = 3


@dataclasses.dataclass(frozen=True)
class NextVisit:
    """``ScriptQueue logevent_nextVisit``: the next script's group, pointing and filters."""

    kind: ClassVar[str] = "nextVisit"
    salIndex: int
    scriptSalIndex: int
    groupId: str
    coordinateSystem: CoordSys
    position: tuple[float, float]
    startTime: float
    rotationSystem: RotSys
    cameraAngle: float
    filters: str
    dome: Dome
    duration: float
    nimages: int
    instrument: str
    survey: str
    totalCheckpoints: int
    private_sndStamp: float | None = None

    @property
    def filter_list(self) -> list[str]:
        """The acceptable physical filters (empty: any)."""
        return [f.strip() for f in self.filters.split(",") if f.strip()]

    @property
    def start_datetime(self) -> datetime.datetime:
        """``startTime`` as a naive TAI datetime."""
        return tai_datetime(self.startTime)


@dataclasses.dataclass(frozen=True)
class NextVisitCanceled:
    """``ScriptQueue logevent_nextVisitCanceled``: ``groupId`` will not be used."""

    kind: ClassVar[str] = "nextVisitCanceled"
    salIndex: int
    scriptSalIndex: int
    groupId: str
    private_sndStamp: float | None = None
    instrument: str = ""


@dataclasses.dataclass(frozen=True)
class StartIntegration:
    """``<Camera> logevent_startIntegration`` for one image, with its parsed key/value list.

    ``instrument`` is the butler name of the camera that sent it; ``groupId``,
    ``imageType``, ``reason`` and ``program`` come from ``additionalKeys``/``additionalValues``
    (`None` when absent); ``intent`` follows from ``imageType`` (see :func:`intent_of`).
    """

    kind: ClassVar[str] = "startIntegration"
    instrument: str
    imageName: str
    imageIndex: int
    imagesInSequence: int
    exposureTime: float
    mode: str
    timeout: float
    imageSource: str
    imageController: str
    imageDate: str
    imageNumber: int
    timestampAcquisitionStart: float
    additionalKeys: str
    additionalValues: str
    private_sndStamp: float | None = None
    groupId: str | None = None
    imageType: str | None = None
    reason: str | None = None
    program: str | None = None
    additional: tuple[tuple[str, str], ...] = ()

    @property
    def intent(self) -> str:
        """What the image is for: ``science``, ``bias``, ``dark``, ``flat``, ``cbp``, ``cwfs``..."""
        return intent_of(self.imageType)

    @property
    def is_calibration(self) -> bool:
        """`True` for bias, dark, flat and CBP images (no nextVisit; submitted at startIntegration)."""
        return self.intent in CALIBRATION_INTENTS


Event = NextVisit | NextVisitCanceled | StartIntegration


def intent_of(image_type: str | None) -> str:
    """Intent of an ``imageType``: ``OBJECT``/``SKYEXP``/``ENGTEST`` -> ``science``, ``BIAS`` ->
    ``bias``, ...; missing -> ``unknown``; any other type -> its lower-case name."""
    if not image_type or not image_type.strip():
        return "unknown"
    key = image_type.strip().upper()
    return _INTENTS.get(key, key.lower())


# ------------------------------------------------------------------------------------- parsing
def parse_event(obj: Any, topic: str | None = None) -> Event:
    """Validate and convert one event.

    Parameters
    ----------
    obj : `str`, `bytes` or `dict`
        The event as JSON text or as a decoded mapping (bare fields or an envelope).
    topic : `str`, optional
        Kafka topic it came from, when not in the envelope.

    Raises
    ------
    BadInputError
        Raised if the JSON is malformed, a field is missing, of the wrong type or out of
        range; the message names the field.
    """
    if isinstance(obj, bytes | bytearray):
        try:
            obj = obj.decode("utf-8")
        except UnicodeDecodeError as exc:
            raise BadInputError("event", f"not UTF-8 text: {exc}") from None
    if isinstance(obj, str):
        try:
            obj = json.loads(obj)
        except RecursionError:
            raise BadInputError("event", "JSON nested too deeply", "send one flat JSON object") from None
        except ValueError as exc:  # JSONDecodeError, or an integer of more than 4300 digits
            raise BadInputError("event", f"malformed JSON: {exc}", "send one JSON object per event") from None
    if not isinstance(obj, dict):
        raise BadInputError("event", f"expected a JSON object, got {type(obj).__name__}")
    data = obj
    topic = obj.get("topic", topic)
    if topic is not None and not isinstance(topic, str):
        raise BadInputError("event.topic", f"expected a string, got {topic!r}")
    if isinstance(obj.get("value"), dict):
        data = {**obj["value"], **{k: v for k, v in obj.items() if k in ("kind", "instrument")}}
    kind = kind_of(data, topic)
    f = Fields(data)
    snd = f.tai("private_sndStamp", None)
    if kind == "nextVisitCanceled":
        return NextVisitCanceled(
            salIndex=f.get("salIndex", int, 0), scriptSalIndex=f.get("scriptSalIndex", int, 0),
            groupId=_group(f.get("groupId", str, nonblank=True), time_required=True),
            private_sndStamp=snd, instrument=known_or_verbatim(f.get("instrument", str, "")),
        )
    if kind == "nextVisit":
        return NextVisit(
            salIndex=f.get("salIndex", int, lo=0), scriptSalIndex=f.get("scriptSalIndex", int),
            groupId=_group(f.get("groupId", str, nonblank=True), time_required=True),
            coordinateSystem=f.enum("coordinateSystem", CoordSys), position=f.position(),
            startTime=f.tai("startTime"), rotationSystem=f.enum("rotationSystem", RotSys),
            cameraAngle=f.get("cameraAngle", float), filters=f.get("filters", str),
            dome=f.enum("dome", Dome), duration=f.get("duration", float, lo=0.0),
            nimages=check_nimages(f.get("nimages", int), "event.nimages"),
            instrument=known_or_verbatim(f.get("instrument", str)),
            survey=f.get("survey", str), totalCheckpoints=f.get("totalCheckpoints", int, lo=0),
            private_sndStamp=snd,
        )
    return _start_integration(f, data, topic, snd)


def _group(group_id: str, time_required: bool) -> str:
    return check_group_id(group_id, "event.groupId", time_required=time_required)


def _start_integration(f: Fields, data: dict, topic: str | None, snd: float | None) -> StartIntegration:
    keys, values = f.get("additionalKeys", str, ""), f.get("additionalValues", str, "")
    pairs = split_key_values(keys, values)
    extra = dict(pairs)
    image_date = f.get("imageDate", str)
    if not re.fullmatch(r"\d{8}", image_date, re.ASCII):
        raise BadInputError("event.imageDate", f"{image_date!r} is not YYYYMMDD")
    image_type = extra.get("imageType") or None
    science = intent_of(image_type) == "science"
    group = extra.get("groupId") or None
    if group is not None:
        group = _group(group, time_required=science)  # a science image's visit id is its group's time
    sequence = check_nimages(f.get("imagesInSequence", int), "event.imagesInSequence", lo=1)
    index = f.get("imageIndex", int, lo=1, hi=sequence)
    exposure = f.get("exposureTime", float, lo=0.0)
    if science and exposure <= 0.0:
        raise BadInputError("event.exposureTime", f"{exposure:g} s for a science image",
                            "a science image has a positive exposure time")
    return StartIntegration(
        instrument=instrument_of_start(data, topic),
        imageName=f.get("imageName", str, nonblank=True), imageIndex=index, imagesInSequence=sequence,
        exposureTime=exposure, mode=f.get("mode", str, ""),
        timeout=f.get("timeout", float, 0.0, lo=0.0), imageSource=f.get("imageSource", str, ""),
        imageController=f.get("imageController", str, ""), imageDate=image_date,
        imageNumber=f.get("imageNumber", int, lo=0),
        timestampAcquisitionStart=f.tai("timestampAcquisitionStart", 0.0),
        additionalKeys=keys, additionalValues=values, private_sndStamp=snd, groupId=group,
        imageType=image_type, reason=extra.get("reason") or None,
        program=extra.get("program") or None, additional=pairs,
    )


# -------------------------------------------------------------------------------------- policy
def rejection_reason(event: Event, max_age: float | None, now_utc: float,
                     process_calibrations: bool = True) -> str | None:
    """Why an event must be ignored, or `None` to accept it (pure; no I/O).

    Parameters
    ----------
    event : `Event`
        A parsed event.
    max_age : `float` or `None`
        Events whose ``private_sndStamp`` (TAI) is older than this many seconds are stale,
        and those stamped more than this far in the future are suspect (a wrong clock or a
        made-up stamp: never stale, they would otherwise always pass); `None` skips both
        checks (``apbatch submit`` of an old event on purpose).
    now_utc : `float`
        Current UTC unix time.
    process_calibrations : `bool`
        Whether bias/dark/flat/CBP images get jobs.
    """
    if max_age is not None and event.private_sndStamp is not None:
        age = now_utc + TAI_MINUS_UTC - event.private_sndStamp
        if age > max_age:
            return f"stale: sent {age:.0f} s ago (events.max_age = {max_age:g} s)"
        if -age > max_age:
            return (f"suspect: private_sndStamp is {-age:.0f} s in the future "
                    f"(events.max_age = {max_age:g} s); check the sender's clock")
    if isinstance(event, NextVisitCanceled):
        return None
    if event.instrument not in instrument_names():
        return f"unknown instrument {event.instrument!r} (known: {', '.join(instrument_names())})"
    if isinstance(event, NextVisit):
        if event.coordinateSystem != CoordSys.ICRS:
            return f"coordinateSystem is {event.coordinateSystem.name}, not ICRS: no sky position to process"
        if event.dome == Dome.CLOSED:
            return "dome CLOSED: no sky images"
        return None
    intent = event.intent
    if intent in CALIBRATION_INTENTS:
        return None if process_calibrations else f"{intent} image and events.process_calibrations is off"
    if intent != "science":
        return f"imageType {event.imageType!r} (intent {intent!r}) is not processed"
    return None
