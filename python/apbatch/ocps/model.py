"""The OCPS request model: phases, data ids, requests, errors and the service protocol.

This module is the contract between the service (`apbatch.ocps.service`) and the HTTP/UWS
front end (`apbatch.ocps.app`): the app calls only the methods of `OcpsService` and reads only
the fields of `OcpsRequest`.

Telemetry record (one per CCD when its job ends; also published to Kafka)::

    {"request_id", "instrument", "visit", "detector", "detector_name", "status", "exit_code",
     "psf_fwhm_arcsec", "zero_point", "sky_level", "n_sources", "n_dia_sources",
     "centroid_ra", "centroid_dec", "time"}

(None where the job's ``ap_metrics`` lack a value.)

Completion event (one per request, exactly once)::

    {"request_id", "pipeline", "data_id": {...}, "phase": "COMPLETED"|"ERROR"|"ABORTED",
     "success": bool, "reason": str|None, "jobs": [...], "ccds": {"done": n, "failed": n},
     "results": {...}, "time"}
"""

from __future__ import annotations

import dataclasses
import enum
from collections.abc import Mapping, Sequence
from typing import Any, Protocol

__all__ = [
    "BusyError",
    "DataId",
    "OcpsRequest",
    "OcpsService",
    "Phase",
    "UnknownRequestError",
]


class Phase(enum.StrEnum):
    """UWS 1.1 execution phases used by OCPS requests."""

    PENDING = "PENDING"
    QUEUED = "QUEUED"
    EXECUTING = "EXECUTING"
    COMPLETED = "COMPLETED"
    ERROR = "ERROR"
    ABORTED = "ABORTED"

    @property
    def final(self) -> bool:
        """`True` for the phases a request never leaves (COMPLETED, ERROR, ABORTED)."""
        return self in (Phase.COMPLETED, Phase.ERROR, Phase.ABORTED)


@dataclasses.dataclass(frozen=True)
class DataId:
    """What a request processes.

    Attributes
    ----------
    instrument : `str`
        Instrument name (``LATISS``, ``LSSTComCam``, ``LSSTCam``).
    obsid : `str` or `None`
        An image name, e.g. ``MC_O_20251015_000003``.
    group_id : `str` or `None`
        A group id (the exposure group of a visit).
    detector : `int` or `None`
        One CCD; `None` for every CCD of the exposure/group.
    """

    instrument: str
    obsid: str | None = None
    group_id: str | None = None
    detector: int | None = None


@dataclasses.dataclass(frozen=True)
class OcpsRequest:
    """One ``processData`` request and where it stands (an immutable snapshot).

    Attributes
    ----------
    id : `str`
        Short, URL-safe, unique id.
    pipeline : `str`
        ``"ap"``, ``"calib-verify"`` or ``"gather"``.
    data_id : `DataId`
        What to process.
    overrides : `~collections.abc.Mapping` [`str`, `str`]
        Validated config overrides, ``"section.field"`` -> value.
    config_file : `str` or `None`
        A config file given with the request.
    mode : `str`
        ``"sync"`` or ``"async"``: the service's mode when the request was created.
    phase : `Phase`
        Current phase.
    created_at, started_at, ended_at : `float` or `None`
        Unix times.
    error : `str` or `None`
        One line, for the UWS error summary.
    results : `~collections.abc.Mapping` [`str`, `~typing.Any`]
        Result name -> value or absolute file path (the UWS results).
    jobs : `tuple` [`str`, ...]
        Batch job ids.
    telemetry : `tuple` [`~collections.abc.Mapping`, ...]
        Per-CCD telemetry records (module docstring).
    owner : `str`
        Who created it.
    """

    id: str
    pipeline: str
    data_id: DataId
    overrides: Mapping[str, str]
    config_file: str | None
    mode: str
    phase: Phase
    created_at: float
    started_at: float | None = None
    ended_at: float | None = None
    error: str | None = None
    results: Mapping[str, Any] = dataclasses.field(default_factory=dict)
    jobs: tuple[str, ...] = ()
    telemetry: tuple[Mapping[str, Any], ...] = ()
    owner: str = "anonymous"


class BusyError(Exception):
    """Sync mode: another request is running (HTTP 409)."""


class UnknownRequestError(KeyError):
    """No request has this id (HTTP 404)."""


class OcpsService(Protocol):
    """What the HTTP front end calls; implemented by `apbatch.ocps.service.Service`."""

    mode: str

    def create(
        self,
        pipeline: str,
        data_id: DataId,
        *,
        overrides: Mapping[str, str] = {},
        config_file: str | None = None,
        run: bool = False,
        owner: str = "anonymous",
    ) -> OcpsRequest:
        """Create a request (PENDING, or QUEUED if ``run``).

        Raises `~apbatch.errors.BadInputError` for an unknown pipeline, config key or a bad
        dataId, `BusyError` in sync mode if ``run`` and another request is QUEUED/EXECUTING.
        """
        ...

    def get(self, request_id: str) -> OcpsRequest:
        """Return one request; `UnknownRequestError` if there is none with that id."""
        ...

    def list(
        self,
        *,
        phases: Sequence[Phase] = (),
        after: float | None = None,
        last: int | None = None,
    ) -> list[OcpsRequest]:
        """Return requests, oldest first, filtered as UWS job lists are."""
        ...

    def run(self, request_id: str) -> OcpsRequest:
        """PHASE=RUN on a PENDING request (`BusyError` in sync mode)."""
        ...

    def abort(self, request_id: str) -> OcpsRequest:
        """PHASE=ABORT: cancel the request's jobs."""
        ...

    def delete(self, request_id: str) -> None:
        """Abort if running, then forget the request."""
        ...

    def wait(self, request_id: str, timeout: float, phase: Phase | None = None) -> OcpsRequest:
        """UWS WAIT: return when the phase differs from ``phase`` (default the current one)
        or is final, or after ``timeout`` seconds."""
        ...

    def start(self) -> None:
        """Start the background runner (resumes persisted requests)."""
        ...

    def stop(self) -> None:
        """Stop the background runner (requests stay persisted)."""
        ...
