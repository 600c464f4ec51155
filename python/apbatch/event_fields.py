"""Typed, validated access to an event's fields: every failure names ``event.<field>``."""

from __future__ import annotations

import math
from enum import IntEnum
from typing import Any

from .errors import BadInputError

__all__ = ["Fields"]

_REQUIRED = object()


class Fields:
    """Typed access to a mapping; every failure names ``event.<field>``."""

    def __init__(self, data: dict[str, Any]):
        self.data = data

    def get(self, name: str, kind: type, default: Any = _REQUIRED, lo: float | None = None,
            nonblank: bool = False) -> Any:
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
        return value

    def enum[E: IntEnum](self, name: str, cls: type[E]) -> E:
        value = self.get(name, int)
        try:
            return cls(value)
        except ValueError:
            allowed = ", ".join(f"{m.value}={m.name}" for m in cls)
            raise BadInputError(f"event.{name}", f"{value} is not a {cls.__name__}",
                                f"use one of {allowed}") from None

    def position(self) -> tuple[float, float]:
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
