"""The daemon loop: events in, one batch job per CCD out, job states polled back.

For each raw event from the source: parse (a bad event is dead-lettered -- ledger table
and ``events.dead_letter`` JSON-lines file -- logged, and the loop goes on) -> policy
(`apbatch.events.rejection_reason`) -> fan-out -> `apbatch.submitter.Submitter` (`Ledger.claim`: a CCD is
submitted once, ever -> ``backend.submit``, one batch per visit -> `Ledger.record_submitted`). Every
``status_interval`` seconds the states of unfinished jobs are polled and stored, and CCDs
that failed with a retriable exit code (3 raw timeout, 4 retriable) are resubmitted until
``events.max_attempts`` submissions.

When jobs are submitted: in ``dynamic`` mode at nextVisit (ahead of the exposure; the job
waits for its raws); in ``batch`` mode at the first startIntegration of the group, using the
group's nextVisit (remembered here and in the ledger's event table) for the pointing and
filter. Calibrations (bias, dark, flat, CBP) have no nextVisit and are always submitted at
startIntegration. A nextVisitCanceled cancels the group's jobs that have not started and
stops retries of the others (a running job may already have images to process).

A `Dispatcher` is used from one thread; :meth:`Dispatcher.run` stops on its ``stop_event``
(set by SIGTERM/SIGINT in ``apbatch daemon``), after finishing the event at hand. Intake never
waits on a poll: in :meth:`Dispatcher.run` the slow part of a poll -- asking the scheduler for
the states of every unfinished job and storing them -- runs in a background thread (the
`Ledger` is thread-safe: its own connection), while claims, submissions and resubmissions
stay in the loop's thread; a backend whose status query cannot run next to a submission
(``Backend.concurrent_status`` false: HTCondor's schedd client) is polled in the loop as before.
"""

from __future__ import annotations

import collections
import dataclasses
import json
import logging
import threading
import time
from collections.abc import Callable, Sequence
from pathlib import Path
from typing import Any

from .backends.base import Backend
from .config import ApbatchConfig
from .errors import BadInputError
from .events import Event, NextVisit, NextVisitCanceled, StartIntegration, parse_event, rejection_reason
from .fanout import event_day_obs, fan_out
from .ledger import NOT_STARTED, Ledger
from .monitoring.prometheus import NullMetrics
from .sources.base import EventSource, RawEvent
from .states import JobStatus, SubmissionState, SubmittedJob
from .submitter import NOT_STARTED_JOBS, Submitter, cancel_rows
from .work import CcdWork

__all__ = ["Dispatcher", "Outcome", "cancel_rows"]

_log = logging.getLogger(__name__)


def _day_obs(event: Event) -> int | None:
    """The night an event is filed under in the ledger (`None` if its fields do not say)."""
    try:
        return event_day_obs(event)
    except (ValueError, BadInputError):
        return None


@dataclasses.dataclass
class Outcome:
    """What became of one event.

    ``action`` is one of ``submitted``, ``duplicate`` (every CCD already claimed),
    ``deferred`` (nextVisit in batch mode), ``cancelled``, ``rejected`` (policy),
    ``bad`` (invalid; dead-lettered), ``submit-failed`` (the scheduler refused; retried later),
    ``already-failed`` (every CCD claimed before, and the scheduler refused some of them then).
    """

    action: str
    reason: str = ""
    jobs: list[SubmittedJob] = dataclasses.field(default_factory=list)
    event: Event | None = None


class Dispatcher:
    """Turns events into submissions; see the module docstring.

    Parameters
    ----------
    config : `ApbatchConfig`
        ``events`` (mode, max_age, max_attempts, ...) and ``job`` sections are used.
    ledger : `Ledger`
        Where events, submissions and states are recorded.
    backend : `Backend`
        Where jobs are submitted.
    source : `EventSource`, optional
        Needed only by :meth:`run`.
    clock : callable, optional
        UTC unix time; injectable for tests.
    mode : `str`, optional
        Overrides ``events.mode`` (``apbatch submit`` uses ``dynamic``: submit now).
    check_age : `bool`
        Reject events older than ``events.max_age``.
    status_interval : `float`
        Seconds between polls of the scheduler.
    claim_timeout : `float`
        A CCD claimed this long ago but never submitted (daemon died in between) is submitted again.
    metrics : `apbatch.monitoring.DaemonMetrics`, optional
        Told of events, dead letters, submissions and job endings; default: nothing is counted.
    """

    def __init__(self, config: ApbatchConfig, ledger: Ledger, backend: Backend,
                 source: EventSource | None = None, *, clock: Callable[[], float] = time.time,
                 mode: str | None = None, check_age: bool = True, status_interval: float = 5.0,
                 claim_timeout: float = 300.0, metrics: NullMetrics | None = None):
        self.config = config
        self.ledger = ledger
        self.backend = backend
        self.source = source
        self.clock = clock
        self.mode = mode or config.events.mode
        self.check_age = check_age
        self.status_interval = status_interval
        self.claim_timeout = claim_timeout
        self.metrics = metrics or NullMetrics()
        self.kind = backend.kind or type(backend).__name__
        self.submitter = Submitter(ledger, backend, clock=clock)
        self.dead_letter_path = Path(config.path(config.events.dead_letter))
        self._visits: collections.OrderedDict[tuple[str, str], NextVisit] = collections.OrderedDict()

    # ----------------------------------------------------------------- one event
    def handle_raw(self, raw: RawEvent) -> Outcome:
        """Decode, parse and handle one raw event; a bad one is dead-lettered, never raised.

        Text and bytes are decoded by `apbatch.sources.base.decode_json` (the limits of every
        intake: ``source.max_event_bytes``, nesting depth, UTF-8); an event the source already
        found bad (``raw.error``) is dead-lettered as it is.
        """
        from .sources.base import decode_json

        received = self.clock()
        payload, error = raw.payload, raw.error
        if error is None and isinstance(payload, str | bytes | bytearray):
            payload, bad = decode_json(payload, self.config.source.max_event_bytes)
            error = None if bad is None else str(bad)
        if error is None:
            try:
                event = parse_event(payload, topic=raw.topic)
            except BadInputError as exc:
                error = str(exc)
            except (ValueError, TypeError, RecursionError) as exc:  # a value no validator foresaw
                error = str(BadInputError("event", f"cannot be read: {type(exc).__name__}: {exc}"))
        if error is not None:
            self.metrics.event_received("invalid")
            self.dead_letter(payload, error, raw.origin, received)
            return Outcome("bad", error)
        return self.handle(event, payload, raw.origin, received)

    def handle(self, event: Event, payload: Any = None, origin: str = "",
               received_at: float | None = None) -> Outcome:
        """Judge, fan out, claim and submit one parsed event."""
        received_at = self.clock() if received_at is None else received_at
        if payload is None:
            payload = {"kind": event.kind, **dataclasses.asdict(event)}
        group = event.groupId or ""
        self.metrics.event_received(event.kind)
        reason = rejection_reason(event, self.config.events.max_age if self.check_age else None, self.clock(),
                                  self.config.events.process_calibrations)
        if reason is None:
            try:
                works = self._works(event)
            except BadInputError as exc:
                self.dead_letter(payload, str(exc), origin, received_at)
                self.ledger.record_event(event.kind, payload, instrument=event.instrument, group_id=group,
                                         source=origin, accepted=False, reason=str(exc),
                                         received_at=received_at, day_obs=_day_obs(event))
                return Outcome("bad", str(exc), event=event)
        self.ledger.record_event(event.kind, payload, instrument=event.instrument, group_id=group,
                                 source=origin, accepted=reason is None, reason=reason or "",
                                 received_at=received_at, day_obs=_day_obs(event))
        if reason is not None:
            _log.info("ignored %s %s (%s): %s", event.kind, group, origin, reason)
            return Outcome("rejected", reason, event=event)
        if isinstance(event, NextVisitCanceled):
            n = self.cancel_group(event.instrument, event.groupId, f"nextVisitCanceled for {event.groupId}")
            return Outcome("cancelled", f"{n} job(s) cancelled", event=event)
        if works is None:
            _log.info("deferred %s %s until startIntegration (batch mode)", event.kind, group)
            return Outcome("deferred", "batch mode: submitted at startIntegration", event=event)
        outcome = self.submit(works, received_at)
        outcome.event = event
        return outcome

    def _works(self, event: Event) -> list[CcdWork] | None:
        """Work items to submit now (`None`: nothing to submit for this event yet)."""
        if isinstance(event, NextVisitCanceled):
            return None
        if isinstance(event, NextVisit):
            self._visits[(event.instrument, event.groupId)] = event
            while len(self._visits) > 1000:
                self._visits.popitem(last=False)
            return fan_out(event, self.config) if self.mode == "dynamic" else None
        visit = self._next_visit(event) if not event.is_calibration else None
        return fan_out(event, self.config, next_visit=visit)

    def _next_visit(self, event: StartIntegration) -> NextVisit | None:
        if not event.groupId:
            return None
        key = (event.instrument, event.groupId)
        if key in self._visits:
            return self._visits[key]
        stored = self.ledger.find_event("nextVisit", *key)
        if stored is None:
            return None
        try:
            visit = parse_event(stored)
        except BadInputError:
            return None
        return visit if isinstance(visit, NextVisit) else None

    def submit(self, works: Sequence[CcdWork], received_at: float | None = None) -> Outcome:
        """Claim the CCDs and submit the newly claimed ones, one batch per visit (`Submitter`)."""
        result = self.submitter.submit_new(works, received_at)
        self.metrics.submitted(self.kind, len(result.jobs), len(result.errors))
        if not result.claimed:
            return self._duplicate(works)
        if result.errors:
            return Outcome("submit-failed", "; ".join(result.errors), result.jobs)
        return Outcome("submitted", f"{len(result.jobs)} job(s)", result.jobs)

    def _duplicate(self, works: Sequence[CcdWork]) -> Outcome:
        """Every CCD was claimed before: say in which states, and whether submitting failed then."""
        wanted = {(w.instrument, w.group_id, w.detector) for w in works}
        groups = {(w.instrument, w.group_id) for w in works}
        states = collections.Counter(
            str(r.state) for inst, group in groups for r in self.ledger.rows(instrument=inst, group_id=group)
            if (r.instrument, r.group_id, r.detector) in wanted)
        summary = " ".join(f"{s}={n}" for s, n in sorted(states.items()))
        if states.get(str(SubmissionState.SUBMIT_FAILED)):
            group = next(iter(groups))[1]
            return Outcome("already-failed", f"all {len(works)} CCD(s) claimed before ({summary}): the "
                           f"scheduler refused them; the daemon retries them, or `apbatch resubmit {group}`")
        return Outcome("duplicate", f"all {len(works)} CCD(s) already submitted ({summary})")

    def cancel_group(self, instrument: str, group_id: str, reason: str) -> int:
        """Cancel a group's not-yet-started jobs; never retry any of its CCDs. Returns the count."""
        rows = self.ledger.rows(instrument=instrument or None, group_id=group_id, states=NOT_STARTED)
        self.ledger.disable_retry(group_id, instrument or None)
        try:
            return len(cancel_rows(self.ledger, self.backend, rows, reason, only=NOT_STARTED_JOBS))
        except Exception as exc:
            _log.error("could not cancel jobs of group %s: %s", group_id, exc)
            return 0

    def dead_letter(self, payload: Any, error: str, origin: str, received_at: float) -> None:
        """Record a bad event in the ledger and append it to the dead-letter file (mode 0600).

        The error is kept as one line; the payload as text, undecodable bytes escaped and cut
        at ``source.max_event_bytes`` characters (`apbatch.sources.base.payload_text`).
        """
        from .sources.base import payload_text

        error = " ".join(error.split())
        self.metrics.dead_lettered()
        _log.warning("bad event from %s: %s", origin or "?", error)
        text = payload_text(payload, self.config.source.max_event_bytes)
        try:
            self.ledger.record_dead_letter(text, error, origin, received_at)
        except Exception as exc:
            _log.error("could not store dead letter in the ledger: %s", exc)
        cut = len(text) > self.config.source.max_event_bytes
        kept = payload if isinstance(payload, dict | list) and not cut else text  # JSON stays JSON
        line = json.dumps({"received_at": received_at, "origin": origin, "error": error, "payload": kept},
                          default=str)
        try:
            self.dead_letter_path.parent.mkdir(parents=True, exist_ok=True)
            self.dead_letter_path.touch(mode=0o600, exist_ok=True)  # event payloads: owner only
            self.dead_letter_path.chmod(0o600)
            with open(self.dead_letter_path, "a", encoding="utf-8") as fh:
                fh.write(line + "\n")
        except OSError as exc:
            _log.error("could not append to %s: %s", self.dead_letter_path, exc)

    # ----------------------------------------------------------------- polling
    def poll_jobs(self) -> dict[str, int]:
        """Store the scheduler's view of unfinished jobs, then resubmit retriable failures."""
        counts = self.refresh_states()
        retried = self.retry_failed()
        return {**counts, "resubmitted": len(retried)}

    def refresh_states(self) -> dict[str, int]:
        """Store the scheduler's view of unfinished jobs (the slow part of a poll; it submits
        nothing, so :meth:`run` does it in a background thread)."""
        ids = self.ledger.unfinished_job_ids(self.kind)
        updated = 0
        ended: dict[str, JobStatus] = {}
        for i in range(0, len(ids), 500):
            chunk = ids[i:i + 500]
            try:
                statuses = self.backend.status(chunk)
            except Exception as exc:
                _log.warning("status query of %d job(s) failed: %s", len(chunk), exc)
                continue
            updated += self.ledger.update_states(statuses, self.kind, now=self.clock())
            settled = {j: st.settled() for j, st in statuses.items()}
            ended.update({j: st for j, st in settled.items() if st.state.finished})
        self.metrics.jobs_polled(self.ledger, self.kind, ended)
        return {"polled": len(ids), "updated": updated}

    def _poll_in_background(self, stop: threading.Event, refreshed: threading.Event) -> None:
        """Every ``status_interval`` s until ``stop``: :meth:`refresh_states`, then set ``refreshed``
        (the loop then resubmits what failed retriably)."""
        while not stop.wait(self.status_interval):
            try:
                self.refresh_states()
            except Exception:
                _log.exception("polling job states failed")
            refreshed.set()

    def retry_failed(self) -> list[SubmittedJob]:
        """Resubmit CCDs that failed retriably (or were never submitted), up to ``max_attempts``."""
        rows = self.ledger.retriable(self.config.events.max_attempts, self.claim_timeout, now=self.clock())
        if not rows:
            return []
        _log.info("resubmitting %d CCD(s) that failed retriably", len(rows))
        result = self.submitter.resubmit(rows)
        self.metrics.submitted(self.kind, len(result.jobs), len(result.errors))
        return result.jobs

    # ----------------------------------------------------------------- the loop
    def run(self, max_events: int | None = None, max_seconds: float | None = None,
            stop_event: threading.Event | None = None) -> dict[str, int]:
        """Handle events until stopped; returns the count of each outcome.

        Stops when ``stop_event`` is set, after ``max_events`` events or ``max_seconds``
        seconds, or when the source is exhausted (end of stdin). First reconciles the claims
        that a stopped process left unconfirmed (`Submitter.reconcile`: jobs the scheduler
        accepted are recorded, never submitted again); polls the scheduler every
        ``status_interval`` seconds (in a background thread, see the module docstring) and once
        more before returning.
        """
        if self.source is None:
            raise BadInputError("source", "the dispatcher has no event source")
        try:
            recovered, _ = self.submitter.reconcile()
            if recovered:
                _log.warning("start-up: %d job(s) of unconfirmed claims found at the scheduler and recorded",
                             len(recovered))
        except Exception:  # the ledger or scheduler is down: retries reconcile their rows again
            _log.exception("start-up reconciliation of unconfirmed claims failed")
        stop_event = stop_event or threading.Event()
        counts: collections.Counter[str] = collections.Counter()
        start = last_poll = time.monotonic()
        background = bool(getattr(self.backend, "concurrent_status", True))
        stop_poller, refreshed = threading.Event(), threading.Event()
        poller = threading.Thread(target=self._poll_in_background, args=(stop_poller, refreshed),
                                  name="apbatch-poll", daemon=True)
        if background:
            poller.start()
        interval = self.config.source.poll_interval
        handled = 0

        def done() -> bool:
            return (stop_event.is_set() or (max_events is not None and handled >= max_events)
                    or (max_seconds is not None and time.monotonic() - start >= max_seconds))

        while not done() and not self.source.exhausted:
            timeout = interval if max_seconds is None else max(0.0, min(interval, start + max_seconds
                                                                         - time.monotonic()))
            for raw in self.source.poll(timeout):
                try:
                    outcome = self.handle_raw(raw)
                except Exception:  # e.g. the database is unreachable: keep the event for a restart
                    _log.exception("could not handle event from %s; it stays unacknowledged", raw.origin)
                    counts["error"] += 1
                else:
                    self.source.ack([raw], ok=outcome.action != "bad")
                    counts[outcome.action] += 1
                handled += 1
                if done():
                    break
            if background and refreshed.is_set():  # states are fresh: resubmit from this thread
                refreshed.clear()
                self._safe_retry()
            elif not background and time.monotonic() - last_poll >= self.status_interval:
                self._safe_poll()
                last_poll = time.monotonic()
        if background:
            stop_poller.set()
            poller.join()
        self._safe_poll()
        return dict(counts)

    def _safe_retry(self) -> None:
        try:
            self.retry_failed()
        except Exception:
            _log.exception("resubmitting failed jobs failed")

    def _safe_poll(self) -> None:
        try:
            self.poll_jobs()
        except Exception:
            _log.exception("polling job states failed")
