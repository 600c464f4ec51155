"""The parameters of OCPS HTTP requests: ``POST /jobs`` (:func:`parse_job_parameters`) and the
case-insensitive lookup every endpoint uses (:class:`Params`); errors name the parameter."""

from __future__ import annotations

import dataclasses
import re
from collections.abc import Sequence

from ..errors import BadInputError
from .model import DataId

__all__ = ["JobParameters", "Params", "parse_job_parameters"]

_OVERRIDE = re.compile(r"config\.(?P<key>[A-Za-z_]\w*(?:\.[A-Za-z_]\w*)+)\Z", re.IGNORECASE)
_CREATE_NAMES = ("pipeline", "instrument", "obsid", "groupId", "detector", "config", "PHASE")


@dataclasses.dataclass(frozen=True)
class JobParameters:
    """What ``POST /jobs`` asks for, checked for form (the service checks the meaning).

    Immutable, made per HTTP request.
    """

    pipeline: str
    data_id: DataId
    overrides: dict[str, str]
    config_file: str | None
    run: bool


class Params:
    """Request parameters (query + form), looked up case-insensitively; one per HTTP request."""

    def __init__(self, items: Sequence[tuple[str, str]]):
        self.items = list(items)

    def all(self, name: str) -> list[str]:
        return [v for k, v in self.items if k.lower() == name.lower()]

    def one(self, name: str, *, label: str | None = None) -> str | None:
        values = self.all(name)
        if len(values) > 1:
            raise BadInputError(label or name, f"given {len(values)} times", "give it once")
        if values and not values[0].strip():
            raise BadInputError(label or name, "is empty", "give a value or leave it out")
        return values[0].strip() if values else None

    def unknown(self, allowed: Sequence[str]) -> None:
        names = {a.lower() for a in allowed}
        for k, _ in self.items:
            if k.lower() not in names:
                raise BadInputError(k, "unknown parameter", f"use one of {', '.join(allowed)}")


def parse_job_parameters(items: Sequence[tuple[str, str]]) -> JobParameters:
    """Read the parameters of ``POST /jobs``.

    Parameters
    ----------
    items : `~collections.abc.Sequence` [`tuple` [`str`, `str`]]
        (name, value) pairs from the query string and the form body.

    Returns
    -------
    params : `JobParameters`
        The request to create.

    Raises
    ------
    BadInputError
        Raised, naming the parameter, if one is unknown, missing (``pipeline``,
        ``instrument``), repeated or empty, ``detector`` is not an integer >= 0, or ``PHASE``
        is not ``RUN``.
    """
    p = Params([(k, v) for k, v in items if not _OVERRIDE.match(k)])
    p.unknown([*_CREATE_NAMES, "config.<section>.<field>"])
    pipeline = p.one("pipeline")
    instrument = p.one("instrument")
    if pipeline is None:
        raise BadInputError("pipeline", "missing", "give pipeline=ap, calib-verify or gather")
    if instrument is None:
        raise BadInputError("instrument", "missing", "give instrument=LATISS, LSSTComCam or LSSTCam")
    detector_text = p.one("detector")
    detector = None
    if detector_text is not None:
        try:
            detector = int(detector_text)
        except ValueError:
            raise BadInputError("detector", f"{detector_text!r} is not an integer",
                                "give the detector number, e.g. detector=4") from None
        if detector < 0:
            raise BadInputError("detector", f"{detector} is negative", "give the detector number, e.g. 4")
    phase = p.one("phase", label="PHASE")
    if phase is not None and phase.upper() != "RUN":
        raise BadInputError("PHASE", f"{phase!r} cannot start a job", "give PHASE=RUN or leave it out")
    overrides: dict[str, str] = {}
    for k, v in items:
        m = _OVERRIDE.match(k)
        if m:
            key = m["key"]
            if key in overrides:
                raise BadInputError(k, "given more than once", "give it once")
            overrides[key] = v
    data_id = DataId(instrument=instrument, obsid=p.one("obsid"), group_id=p.one("groupId"),
                     detector=detector)
    return JobParameters(pipeline, data_id, overrides, p.one("config"), phase is not None)
