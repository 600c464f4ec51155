"""``apbatch render-job``: print the exact script / submit description of an event's jobs."""

from __future__ import annotations

from typing import TextIO

from ..backends.base import Backend
from ..config import ApbatchConfig
from ..errors import BadInputError
from ..events import NextVisit, NextVisitCanceled
from ..fanout import fan_out
from .submit import read_events

__all__ = ["render_job"]


def render_job(config: ApbatchConfig, path: str, *, detector: str | None = None,
               backend: Backend | None = None, stdin: TextIO | None = None) -> str:
    """What ``backend.submit`` would use for the first event of ``path`` that makes jobs.

    Nothing is claimed or submitted. A science startIntegration uses the nextVisit of the
    same group when the file holds it (for the pointing and filter). The job command is
    shown as submission resolves it (this install's ``apbatch``, ``--config`` with the night's
    config file, which is written only when jobs are submitted).

    Raises
    ------
    BadInputError
        Raised if an event is invalid, the detector is unknown, or no event makes jobs.
    """
    events = read_events(path, stdin)
    visits: dict[tuple[str, str | None], NextVisit] = {}
    for event, _, _ in events:
        if isinstance(event, NextVisitCanceled):
            continue
        if isinstance(event, NextVisit):
            visits[(event.instrument, event.groupId)] = event
        only = [detector] if detector is not None else None
        works = fan_out(event, config, next_visit=visits.get((event.instrument, event.groupId)), only=only)
        if works:
            if backend is None:
                from ..backends import make_backend

                backend = make_backend(config)
            return backend.render(works)
    raise BadInputError("EVENT_FILE", f"no event in {path!r} makes jobs",
                        "give a nextVisit or startIntegration")
