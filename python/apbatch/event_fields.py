"""Reading an event's fields: typed, validated access, the envelope, the key/value list.

Every failure is a `BadInputError` naming ``event.<field>``. `apbatch.events.parse_event` builds
the event dataclasses with these helpers:

* `Fields`: one typed, range-checked field at a time (times are TAI unix seconds before
  `MAX_TAI`, so no later conversion to a datetime can overflow);
* :func:`kind_of`: which event an envelope holds (``kind``, Kafka ``topic``, or the fields);
* :func:`instrument_of_start`: which camera sent a startIntegration;
* :func:`split_key_values`: ``additionalKeys``/``additionalValues`` as pairs.
"""

from __future__ import annotations

import math
import re
from enum import IntEnum
from typing import Any

from .errors import BadInputError
from .instruments import normalize_instrument

__all__ = ["MAX_TAI", "Fields", "instrument_of_start", "kind_of", "known_or_verbatim", "split_key_values"]

_REQUIRED = object()

MAX_TAI = 4_102_444_837.0
"""2100-01-01T00:00:00 TAI as TAI unix seconds: no event time is later."""

_CAMERAS = {"MTCamera": "LSSTCam", "CCCamera": "LSSTComCam", "ATCamera": "LATISS"}
_CAMCODES = {"MC": "LSSTCam", "CC": "LSSTComCam", "AT": "LATISS"}
_KINDS = {"logevent_nextVisit": "nextVisit", "logevent_nextVisitCanceled": "nextVisitCanceled",
          "logevent_startIntegration": "startIntegration"}
# Pieces of an ISO time that a ':'-split cut apart: "2025-06-10T07", "31", "26.692#1".
_ISO_HEAD = re.compile(r"\d{4}-\d{2}-\d{2}T\d{2}", re.ASCII)
_ISO_MIN = re.compile(r"\d{2}", re.ASCII)
_ISO_SEC = re.compile(r"\d{2}(\.\d+)?([#+]\d{1,4})?", re.ASCII)


class Fields:
    """Typed access to a mapping; every failure names ``event.<field>``.

    Parameters
    ----------
    data : `dict`
        The event's fields (the envelope's ``value``, or the bare topic fields).
    """

    def __init__(self, data: dict[str, Any]):
        self.data = data

    def get(self, name: str, kind: type, default: Any = _REQUIRED, lo: float | None = None,
            nonblank: bool = False, hi: float | None = None) -> Any:
        """Field ``name`` as ``kind`` (`int`, `float` or `str`), ``default`` if absent.

        Raises
        ------
        BadInputError
            Raised if the field is missing (and has no default), of the wrong type, not finite,
            outside ``[lo, hi]``, blank when ``nonblank``, or a string with a NUL character.
        """
        raw = self.data.get(name)
        fld = f"event.{name}"
        if raw is None:
            if default is _REQUIRED:
                raise BadInputError(fld, "missing", "every event of this kind must carry it")
            return default
        value = raw
        if kind is int:
            if isinstance(value, float) and value.is_integer():
                value = int(value)
            if isinstance(value, bool) or not isinstance(value, int):
                raise BadInputError(fld, f"expected an integer, got {raw!r}")
        elif kind is float:
            if isinstance(value, bool) or not isinstance(value, int | float) or not math.isfinite(value):
                raise BadInputError(fld, f"expected a finite number, got {raw!r}")
            value = float(value)
        elif not isinstance(value, str):
            raise BadInputError(fld, f"expected a string, got {raw!r}")
        elif nonblank and not value.strip():
            raise BadInputError(fld, "is blank")
        elif "\x00" in value:
            raise BadInputError(fld, "contains a NUL character")
        if lo is not None and value < lo:
            raise BadInputError(fld, f"{raw} is out of range", f"must be >= {lo}")
        if hi is not None and value > hi:
            raise BadInputError(fld, f"{raw} is out of range", f"must be <= {hi}")
        return value

    def tai(self, name: str, default: Any = _REQUIRED) -> Any:
        """A time field: TAI unix seconds, from 0 to `MAX_TAI` (2100).

        Raises
        ------
        BadInputError
            Raised if the field is not a number in that range (``1e18`` would overflow every
            later conversion to a date).
        """
        value = self.get(name, float, default)
        if value is not None and not 0.0 <= value <= MAX_TAI:
            raise BadInputError(f"event.{name}", f"{value:g} is out of range",
                                "a TAI unix time in seconds since 1970, before 2100")
        return value

    def enum[E: IntEnum](self, name: str, cls: type[E]) -> E:
        """Field ``name`` as a member of ``cls``.

        Raises
        ------
        BadInputError
            Raised if it is missing or not the value of a member.
        """
        value = self.get(name, int)
        try:
            return cls(value)
        except ValueError:
            allowed = ", ".join(f"{m.value}={m.name}" for m in cls)
            raise BadInputError(f"event.{name}", f"{value} is not a {cls.__name__}",
                                f"use one of {allowed}") from None

    def position(self) -> tuple[float, float]:
        """``position`` as ``(ra, dec)`` in degrees.

        Raises
        ------
        BadInputError
            Raised if it is missing, not two finite numbers, or out of range.
        """
        value = self.data.get("position")
        if value is None:
            raise BadInputError("event.position", "missing", "every event of this kind must carry it")
        fix = "expected [ra, dec] in degrees, 0 <= ra < 360, -90 <= dec <= 90"
        if (not isinstance(value, list | tuple) or len(value) != 2
                or any(isinstance(v, bool) or not isinstance(v, int | float) or not math.isfinite(v)
                       for v in value)):
            raise BadInputError("event.position", f"expected [ra, dec], got {value!r}", fix)
        ra, dec = float(value[0]), float(value[1])
        if not (0.0 <= ra < 360.0 and -90.0 <= dec <= 90.0):
            raise BadInputError("event.position", f"[{ra}, {dec}] is out of range", fix)
        return ra, dec


def split_key_values(keys: str, values: str) -> tuple[tuple[str, str], ...]:
    """Pair ``additionalKeys`` with ``additionalValues`` (both ':'-separated).

    ``\\:`` is read as a literal colon (assumed: ts_xml cites CAP-572 but does not spell it
    out). An unescaped ISO time such as ``2025-06-10T07:31:26.692`` in the values is always put
    back together (group ids are ISO times and are sent that way), so that a count mismatch is
    reported here, under ``event.additionalValues``, and not later as a cut-off group id.

    Raises
    ------
    BadInputError
        Raised if the numbers of keys and values differ, or a key is blank or repeated.
    """
    def split(text: str) -> list[str]:
        return [part.replace("\\:", ":") for part in re.split(r"(?<!\\):", text)]

    key_list = [k.strip() for k in split(keys)] if keys.strip() else []
    raw = split(values) if values.strip() or key_list else []
    merged: list[str] = []
    i = 0
    while i < len(raw):
        if (i + 2 < len(raw) and _ISO_HEAD.fullmatch(raw[i].lstrip()) and _ISO_MIN.fullmatch(raw[i + 1])
                and _ISO_SEC.fullmatch(raw[i + 2].rstrip())):
            merged.append(":".join(raw[i:i + 3]))
            i += 3
        else:
            merged.append(raw[i])
            i += 1
    if len(merged) != len(key_list):
        raise BadInputError("event.additionalValues", f"{len(merged)} values for {len(key_list)} keys",
                            "additionalKeys and additionalValues must be ':'-separated lists of equal length")
    seen: set[str] = set()
    for key in key_list:
        if not key or key in seen:
            raise BadInputError("event.additionalKeys", f"key {key!r} is blank or repeated",
                                "every key names one value, once")
        seen.add(key)
    return tuple(zip(key_list, (v.strip() for v in merged), strict=True))


def instrument_of_start(data: dict, topic: str | None) -> str:
    """Camera of a startIntegration: explicit field, else topic component, else imageSource.

    Raises
    ------
    BadInputError
        Raised if ``instrument`` is not a string, or nothing tells the camera.
    """
    name = data.get("instrument")
    if name is not None:
        if not isinstance(name, str):
            raise BadInputError("event.instrument", f"expected a string, got {name!r}")
        return known_or_verbatim(name)
    if topic:
        parts = topic.split(".")
        if len(parts) >= 3:
            if parts[-2] in _CAMERAS:
                return _CAMERAS[parts[-2]]
            return parts[-2]  # an unknown camera: the policy rejects it with a reason
    source = data.get("imageSource")
    if isinstance(source, str) and source in _CAMCODES:
        return _CAMCODES[source]
    raise BadInputError("event.instrument", "cannot tell which camera sent this startIntegration",
                        "give \"instrument\" or the Kafka \"topic\" in the event envelope")


def known_or_verbatim(name: str) -> str:
    """The butler name of a known instrument (any accepted alias), else ``name`` stripped."""
    try:
        return normalize_instrument(name)
    except BadInputError:
        return name.strip()


def kind_of(data: dict, topic: str | None) -> str:
    """Which event ``data`` is: ``nextVisit``, ``nextVisitCanceled`` or ``startIntegration``.

    Raises
    ------
    BadInputError
        Raised if ``kind`` or ``topic`` names another event, or nothing tells the kind.
    """
    kind = data.get("kind")
    if kind is not None:
        if kind not in _KINDS.values():
            raise BadInputError("event.kind", f"unknown kind {kind!r}",
                                f"use one of {', '.join(_KINDS.values())}")
        return kind
    if topic:
        for suffix, name in _KINDS.items():
            if topic.endswith("." + suffix):
                return name
        raise BadInputError("event.topic", f"{topic!r} is not an event apbatch handles",
                            "expected a ScriptQueue nextVisit(Canceled) or a camera startIntegration topic")
    if "imageName" in data:
        return "startIntegration"
    if "position" in data or "coordinateSystem" in data:
        return "nextVisit"
    if "groupId" in data:
        return "nextVisitCanceled"
    raise BadInputError("event", "cannot tell the kind of event", "add \"kind\" or \"topic\" to the envelope")
