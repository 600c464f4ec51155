"""One observing night in the ledger: its rows and events, what is missing, what to resubmit.

Used by ``apbatch night`` (`apbatch.script.night`), which cron runs the morning after a night.

Reprocessing policy (:func:`classify`, :func:`missing_works`)
-----------------------------------------------------------
1. Refresh: the scheduler is asked for the state of the night's unfinished jobs (this
   backend's only) and the answers are stored (`Ledger.update_states`). If the query fails,
   nothing is written and nothing is resubmitted.
2. Resubmit, below ``max_attempts`` submissions and never for a CCD whose retries were
   disabled (its nextVisit was cancelled):

   * *retry*: ended with a retriable exit code (3 raw timeout, 4 retriable), was refused by
     the scheduler (``SUBMIT_FAILED``) or was claimed and never submitted (``CLAIMED`` for
     longer than ``claim_timeout``) -- `Submission.wants_retry`, the rule the daemon uses;
   * *lost*: ``UNKNOWN`` -- the scheduler has it neither in its queue nor in its history --
     and submitted more than ``lost_after`` seconds ago. Such a job will never report an end.
     ``UNKNOWN`` because the scheduler printed a state code apbatch does not know is *not*
     lost (the job exists) and is left alone.

   Never resubmitted: COMPLETED; FAILED with exit code 2 or 5 (or another code); FAILED,
   TIMEOUT or CANCELLED without an exit code (the job may have died while storing in the
   APDB: a person decides). These are counted in the report; after fixing the cause, a
   person resubmits them with ``apbatch resubmit`` or ``apbatch night reprocess
   --include-final`` (a new attempt, claimed by compare-and-set like any other).
3. Missed CCDs: the accepted events of the night in the ledger's event table are fanned out
   again (a science startIntegration with its group's nextVisit is preferred over the
   nextVisit; nextVisit-only groups count only in ``dynamic`` mode, as in batch mode an
   exposure without a startIntegration may never have been taken; cancelled groups are
   skipped). CCDs without a ledger row are claimed (atomically: a daemon running at the same
   time cannot get them too) and submitted.

Running it twice submits nothing the second time: resubmitted rows are PENDING again, and
claimed CCDs have rows. A failed CCD is claimed again by compare-and-set before it is
resubmitted (`Ledger.reclaim`), so a daemon retrying it at the same moment and this command
cannot both resubmit it (`apbatch.submitter.Submitter.resubmit`).

Events are attributed to a night by their content (nextVisit ``startTime``, startIntegration
``imageDate``), looking at events received within a day of the night.
"""

from __future__ import annotations

import calendar
import datetime
import logging
import re
import time
from collections.abc import Sequence
from typing import Any

from .config import ApbatchConfig
from .errors import BadInputError
from .events import (
    TAI_MINUS_UTC,
    NextVisit,
    NextVisitCanceled,
    StartIntegration,
    parse_event,
    rejection_reason,
    tai_datetime,
)
from .fanout import event_day_obs, fan_out
from .ids import day_obs_of
from .ledger import Ledger
from .states import SubmissionState
from .submission import Category, Submission
from .work import CcdWork

__all__ = ["ENDED", "classify", "default_day_obs", "event_day_obs", "expected_works", "missing_works",
           "night_events", "night_rows", "night_span", "parse_day_obs", "percentile"]

_log = logging.getLogger(__name__)
ENDED = tuple(s.value for s in SubmissionState if s.ended)
"""States of a job that ran to an end (CANCELLED excluded)."""


# ----------------------------------------------------------------------------- nights
def default_day_obs(now: float | None = None) -> int:
    """The night that ended most recently when run after it: yesterday's UTC date.

    Run at 10:00 in Chile (13:00/14:00 UTC) this is the day_obs of the night that just ended.
    """
    now = time.time() if now is None else now
    return day_obs_of(tai_datetime(now + TAI_MINUS_UTC - 43200.0))


def parse_day_obs(text: str | int | None, now: float | None = None) -> int:
    """``--day-obs`` as an int (default :func:`default_day_obs`).

    Raises
    ------
    BadInputError
        Raised if it is not a valid date written YYYYMMDD.
    """
    if text is None:
        return default_day_obs(now)
    value = str(text).strip()
    try:
        if not re.fullmatch(r"\d{8}", value):
            raise ValueError
        datetime.datetime.strptime(value, "%Y%m%d")
    except ValueError:
        raise BadInputError("--day-obs", f"{value!r} is not a date YYYYMMDD",
                            "e.g. --day-obs 20250609") from None
    return int(value)


def night_span(day_obs: int) -> tuple[float, float]:
    """UTC unix times at which the day_obs begins and ends (12:00 TAI to 12:00 TAI)."""
    d = datetime.datetime.strptime(str(day_obs), "%Y%m%d")
    start = calendar.timegm((d + datetime.timedelta(hours=12)).timetuple()) - TAI_MINUS_UTC
    return start, start + 86400.0


def night_rows(ledger: Ledger, day_obs: int) -> list[Submission]:
    """The submission rows of one night, in claim order (read-only query)."""
    return ledger.rows(day_obs=day_obs)


def night_events(ledger: Ledger, day_obs: int) -> list[tuple[dict, Any]]:
    """Accepted events received within a day of the night, parsed, oldest first."""
    start, end = night_span(day_obs)
    out = []
    for row in ledger.event_rows(accepted=True, received_from=start - 86400.0, received_before=end + 86400.0,
                                 day_obs=day_obs):
        try:
            out.append((row, parse_event(row["payload"])))
        except BadInputError as exc:  # accepted once, so only a changed parser gets here
            _log.warning("stored event %d no longer parses: %s", row["id"], exc)
    return out


def expected_works(config: ApbatchConfig, ledger: Ledger, day_obs: int) -> dict[tuple, tuple[CcdWork, float]]:
    """Every CCD the night's recorded events call for: key -> (work, event received_at)."""
    found = night_events(ledger, day_obs)
    cancelled = {(ev.instrument, ev.groupId) for _, ev in found if isinstance(ev, NextVisitCanceled)}
    visits = {(ev.instrument, ev.groupId): ev for _, ev in found if isinstance(ev, NextVisit)}
    out: dict[tuple, tuple[CcdWork, float]] = {}
    # startIntegration first (exact exposure time and images), then nextVisits for what is left
    ordered = sorted(found, key=lambda f: not isinstance(f[1], StartIntegration))
    for row, ev in ordered:
        if event_day_obs(ev) != day_obs or (ev.instrument, ev.groupId) in cancelled \
                or ("", ev.groupId) in cancelled:
            continue
        if isinstance(ev, NextVisit) and config.events.mode != "dynamic":
            continue
        if rejection_reason(ev, None, time.time(), config.events.process_calibrations) is not None:
            continue
        science = isinstance(ev, StartIntegration) and not ev.is_calibration
        visit = visits.get((ev.instrument, ev.groupId)) if science else None
        try:
            works = fan_out(ev, config, next_visit=visit)
        except BadInputError as exc:
            _log.warning("event %d (%s %s) cannot be fanned out: %s", row["id"], ev.kind, ev.groupId, exc)
            continue
        for w in works:
            out.setdefault(w.key, (w, row["received_at"]))
    return out


def missing_works(ledger: Ledger,
                  expected: dict[tuple, tuple[CcdWork, float]]) -> list[tuple[CcdWork, float]]:
    """The expected CCDs that have no ledger row (never claimed), in event order."""
    present = ledger.existing_keys([k[1] for k in expected])
    return [v for k, v in expected.items() if k not in present]


def classify(row: Submission, *, max_attempts: int, claim_timeout: float, lost_after: float,
             now: float) -> Category:
    """What the night's reprocessing does with one ledger row: `Submission.category`.

    Returns
    -------
    category : `Category`
        ``retry`` or ``lost`` (resubmit), ``exhausted`` (would be resubmitted but has had
        ``max_attempts`` submissions), ``completed``, ``active`` (queued, running, held, or
        claimed / UNKNOWN too recently) or ``final`` (never resubmitted; see module docstring).
    """
    return row.category(max_attempts=max_attempts, claim_timeout=claim_timeout, lost_after=lost_after,
                        now=now)


def percentile(values: Sequence[float], q: float) -> float | None:
    """Linear-interpolation percentile (numpy's default); `None` for no values."""
    v = sorted(values)
    if not v:
        return None
    pos = (len(v) - 1) * q / 100.0
    lo = int(pos)
    return v[lo] + (v[min(lo + 1, len(v) - 1)] - v[lo]) * (pos - lo)
