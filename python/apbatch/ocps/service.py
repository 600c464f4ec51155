"""`Service`: the `apbatch.ocps.model.OcpsService` the HTTP front end calls.

Requests are validated here (pipeline, dataId, config overrides: `BadInputError` naming the
field) and stored (`apbatch.ocps.store.RequestStore`, in the OCPS ledger's database); the
`apbatch.ocps.runner.Runner` thread does the rest.

Modes (``ocps.mode``):

* ``async``: requests queue and up to ``ocps.max_concurrent`` execute at once; a completion
  event is published as each ends;
* ``sync``: one request at a time: queueing one (``run=True`` or :meth:`Service.run`) while
  another is QUEUED or EXECUTING raises `BusyError` (HTTP 409); the caller waits for it with
  :meth:`Service.wait`.

:meth:`Service.wait` blocks on a `threading.Condition` that the runner notifies at every
change of a request, so a UWS ``?WAIT=`` returns as soon as the phase moves.
"""

from __future__ import annotations

import dataclasses
import threading
import time
import uuid
from collections.abc import Callable, Mapping, Sequence
from typing import Any

from ..backends import make_backend
from ..config import ApbatchConfig
from ..ledger import Ledger
from .events import EventPublisher, KafkaEventPublisher, completion_event
from .model import BusyError, DataId, OcpsRequest, Phase, UnknownRequestError
from .pipelines import ExposureLookup, check_data_id, get_pipeline, request_config
from .runner import Runner
from .store import RequestStore

__all__ = ["ACTIVE", "Service", "new_request_id"]

ACTIVE = (Phase.QUEUED, Phase.EXECUTING)
"""Phases of a request that holds the service in sync mode."""


def new_request_id() -> str:
    """A short, URL-safe, unique request id (12 hex digits)."""
    return uuid.uuid4().hex[:12]


class Service:
    """The OCPS service: requests in, runner in the background; see the module docstring.

    Parameters
    ----------
    config : `ApbatchConfig`
        The service's configuration (``ocps`` section and everything the jobs need).
    publisher : `EventPublisher`, optional
        Where events go (default: Kafka, `KafkaEventPublisher.from_config`).
    ledger : `Ledger`, optional
        The OCPS ledger (default: opened from ``ocps.ledger_url``, created if missing).
    lookup : `ExposureLookup`, optional
        The butler access (default: ``job.repo``).
    backend_factory : callable, optional
        ``factory(config) -> Backend`` (default `apbatch.backends.make_backend`).

    Notes
    -----
    Lifetime: one process, from construction to :meth:`stop`; another `Service` on the same
    database later resumes its requests. Thread-safe: every method may be called from any
    thread (HTTP handlers); the jobs are driven by the runner thread only.
    """

    def __init__(self, config: ApbatchConfig, *, publisher: EventPublisher | None = None,
                 ledger: Ledger | None = None, lookup: ExposureLookup | None = None,
                 backend_factory: Callable[[ApbatchConfig], Any] = make_backend,
                 clock: Callable[[], float] = time.time):
        self.config = config
        self.mode: str = config.ocps.mode
        self.clock = clock
        self._own_ledger = ledger is None
        self.ledger = ledger or Ledger.open(config.sqlalchemy_url(config.ocps.ledger_url))
        self.store = RequestStore(self.ledger.engine)
        self.publisher = publisher if publisher is not None else KafkaEventPublisher.from_config(config)
        self._changed = threading.Condition()
        self._queue_lock = threading.Lock()
        self.runner = Runner(config, self.store, self.ledger, self.publisher, on_change=self._notify,
                             lookup=lookup, backend_factory=backend_factory, clock=clock)

    def _notify(self, request_id: str) -> None:
        with self._changed:
            self._changed.notify_all()

    # ------------------------------------------------------------------ OcpsService
    def create(self, pipeline: str, data_id: DataId, *, overrides: Mapping[str, str] = {},
               config_file: str | None = None, run: bool = False, owner: str = "anonymous") -> OcpsRequest:
        """Validate and store a request (PENDING, or QUEUED if ``run``).

        Raises
        ------
        BadInputError
            Raised, naming the field, for an unknown pipeline, a bad dataId, an unknown or
            invalid config override, or an unreadable config file.
        BusyError
            Raised in sync mode if ``run`` and another request is QUEUED or EXECUTING.
        """
        pipe = get_pipeline(pipeline)
        data_id = check_data_id(pipe, data_id)
        overrides = {str(k): str(v) for k, v in overrides.items()}
        request_config(self.config, overrides, config_file)  # refuse a bad override now, not in the runner
        req = OcpsRequest(id=new_request_id(), pipeline=pipe.name, data_id=data_id, overrides=overrides,
                          config_file=config_file, mode=self.mode, phase=Phase.PENDING,
                          created_at=self.clock(), owner=owner)
        if not run:
            return self.store.insert(req)
        with self._queue_lock:
            self._check_free(req.id)
            self.store.insert(dataclasses.replace(req, phase=Phase.QUEUED))
        self.runner.wake()
        return self.get(req.id)

    def _check_free(self, request_id: str) -> None:
        if self.mode != "sync":
            return
        busy = [r for r in self.store.list(phases=ACTIVE) if r.id != request_id]
        if busy:
            raise BusyError(f"sync mode: request {busy[0].id} is {busy[0].phase}; try again when it ends")

    def get(self, request_id: str) -> OcpsRequest:
        """One request; `UnknownRequestError` if there is none."""
        return self.store.get(request_id)

    def list(self, *, phases: Sequence[Phase] = (), after: float | None = None,
             last: int | None = None) -> list[OcpsRequest]:
        """Requests in creation order (UWS ``PHASE``, ``AFTER``, ``LAST`` filters)."""
        return self.store.list(phases=phases, after=after, last=last)

    def run(self, request_id: str) -> OcpsRequest:
        """PHASE=RUN: queue a PENDING request (a request past PENDING is returned as it is).

        Raises
        ------
        BusyError
            Raised in sync mode if another request is QUEUED or EXECUTING.
        """
        with self._queue_lock:
            req = self.get(request_id)
            if req.phase is not Phase.PENDING:
                return req
            self._check_free(request_id)
            self.store.set_phase(request_id, Phase.QUEUED, expect=[Phase.PENDING])
        self._notify(request_id)
        self.runner.wake()
        return self.get(request_id)

    def abort(self, request_id: str) -> OcpsRequest:
        """PHASE=ABORT: end the request as ABORTED (its completion event says so), cancel its jobs."""
        req = self.get(request_id)
        if req.phase.final:
            return req
        ccds = self.store.ccds(request_id)
        now = self.clock()
        jobs = [c["job_id"] for c in ccds if c.get("job_id")]
        done = sum(1 for c in ccds if c.get("ended") and c.get("state") == "COMPLETED")
        failed = sum(1 for c in ccds if c.get("ended")) - done
        event = completion_event(req, Phase.ABORTED, "aborted on request", jobs, done, failed, {}, now)
        if self.store.set_phase(request_id, Phase.ABORTED, expect=[Phase.PENDING, *ACTIVE], ended_at=now,
                                error="aborted on request", jobs=jobs, event=event):
            self.runner.cancel_later(request_id)
        self._notify(request_id)
        return self.get(request_id)

    def delete(self, request_id: str) -> None:
        """Abort the request if it is not final, then forget it (its event is still published)."""
        self.abort(request_id)
        if not self.store.delete(request_id):
            raise UnknownRequestError(request_id)
        self.runner.wake()

    def wait(self, request_id: str, timeout: float, phase: Phase | None = None) -> OcpsRequest:
        """Return once the phase differs from ``phase`` (default: the current one) or is final,
        or after ``timeout`` seconds (UWS WAIT)."""
        deadline = time.monotonic() + max(float(timeout), 0.0)
        req = self.get(request_id)
        ref = req.phase if phase is None else Phase(phase)
        with self._changed:
            while req.phase == ref and not req.phase.final:
                left = deadline - time.monotonic()
                if left <= 0:
                    break
                self._changed.wait(min(left, 1.0))  # re-read at least every second (another process)
                req = self.get(request_id)
        return req

    def start(self) -> None:
        """Start the runner thread (resumes the requests the database holds)."""
        self.runner.start()

    def stop(self) -> None:
        """Stop the runner; requests stay persisted. Releases the publisher and butler."""
        self.runner.stop()
        self.publisher.close()
        self.runner.lookup.close()
        if self._own_ledger:
            self.ledger.close()

