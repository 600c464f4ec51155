"""An in-memory `OcpsService` for the HTTP tests: phases move only when the test moves them.

It follows the contract of `apbatch.ocps.model.OcpsService` (sync/async rules, WAIT semantics,
BadInputError for an unknown pipeline / config key / detector) so that the app's tests run in
milliseconds; the tests against the real service are in tests/test_ocps_app.py too.
"""

from __future__ import annotations

import dataclasses
import itertools
import threading
import time

from apbatch.errors import BadInputError
from apbatch.ocps.model import BusyError, DataId, OcpsRequest, Phase, UnknownRequestError

PIPELINES = ("ap", "calib-verify", "gather")
CONFIG_KEYS = ("job.threads", "job.raw_timeout")
N_DETECTORS = {"LATISS": 1, "LSSTComCam": 9, "LSSTCam": 189}


class FakeService:
    """Thread-safe in-memory requests; `advance` is the test's hand on the runner."""

    def __init__(self, mode: str = "async"):
        self.mode = mode
        self.started = self.stopped = False
        self.waiting = 0  # calls blocked in wait() right now
        self._requests: dict[str, OcpsRequest] = {}
        self._ids = itertools.count(1)
        self._cond = threading.Condition()

    # -- the contract ---------------------------------------------------------------------
    def create(self, pipeline, data_id, *, overrides=None, config_file=None, run=False, owner="anonymous"):
        overrides = overrides or {}
        if pipeline not in PIPELINES:
            raise BadInputError("pipeline", f"unknown pipeline {pipeline!r}", f"use one of {PIPELINES}")
        for key in overrides:
            if key not in CONFIG_KEYS:
                # named as the real service names it (the app gives the HTTP parameter's name)
                raise BadInputError(f"overrides.{key}", "unknown config key", f"use one of {CONFIG_KEYS}")
        if pipeline == "gather" and not data_id.group_id:
            raise BadInputError("group_id", "the gather pipeline needs a group id", "give groupId")
        n = N_DETECTORS.get(data_id.instrument)
        if n is None:
            raise BadInputError("instrument", f"unknown instrument {data_id.instrument!r}")
        if data_id.detector is not None and data_id.detector >= n:
            raise BadInputError("detector", f"{data_id.detector} is not a {data_id.instrument} detector")
        with self._cond:
            if run:
                self._check_idle()
            rid = f"r{next(self._ids):04d}"
            self._requests[rid] = OcpsRequest(
                id=rid, pipeline=pipeline, data_id=data_id, overrides=dict(overrides),
                config_file=config_file, mode=self.mode, phase=Phase.QUEUED if run else Phase.PENDING,
                created_at=time.time(), owner=owner)
            self._cond.notify_all()
            return self._requests[rid]

    def get(self, request_id):
        with self._cond:
            try:
                return self._requests[request_id]
            except KeyError:
                raise UnknownRequestError(request_id) from None

    def list(self, *, phases=(), after=None, last=None):
        with self._cond:
            out = [r for r in self._requests.values()
                   if (not phases or r.phase in phases) and (after is None or r.created_at > after)]
        out.sort(key=lambda r: r.created_at)
        return out[-last:] if last else out

    def run(self, request_id):
        with self._cond:
            req = self.get(request_id)
            if req.phase != Phase.PENDING:
                return req
            self._check_idle()
            return self._set(request_id, phase=Phase.QUEUED)

    def abort(self, request_id):
        with self._cond:
            req = self.get(request_id)
            if req.phase.final:
                return req
            return self._set(request_id, phase=Phase.ABORTED, ended_at=time.time(),
                             error="aborted on request")

    def delete(self, request_id):
        with self._cond:
            self.abort(request_id)
            del self._requests[request_id]
            self._cond.notify_all()

    def wait(self, request_id, timeout, phase=None):
        with self._cond:
            start = self.get(request_id).phase if phase is None else phase

            def changed():
                cur = self._requests.get(request_id)
                return cur is None or cur.phase != start or cur.phase.final

            self.waiting += 1
            try:
                self._cond.wait_for(changed, timeout)
            finally:
                self.waiting -= 1
            return self.get(request_id)

    def start(self):
        self.started = True

    def stop(self):
        self.stopped = True

    # -- the test's hand ------------------------------------------------------------------
    def advance(self, request_id, phase, **changes):
        """Move a request to ``phase`` (setting start/end times) with other field changes."""
        now = time.time()
        with self._cond:
            if phase == Phase.EXECUTING:
                changes.setdefault("started_at", now)
            if phase.final:
                changes.setdefault("ended_at", now)
            return self._set(request_id, phase=phase, **changes)

    def _set(self, request_id, **changes):
        req = dataclasses.replace(self._requests[request_id], **changes)
        self._requests[request_id] = req
        self._cond.notify_all()
        return req

    def _check_idle(self):
        if self.mode == "sync":
            busy = [r.id for r in self._requests.values() if r.phase in (Phase.QUEUED, Phase.EXECUTING)]
            if busy:
                raise BusyError(f"request {busy[0]} is running")


def data_id(**kw):
    return DataId(**{"instrument": "LSSTComCam", **kw})
