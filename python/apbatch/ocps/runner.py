"""The OCPS runner: a background thread that takes requests from QUEUED to a final phase.

One step (every ``ocps.poll_interval`` seconds, or at once when woken by the service):

1. publish the completion events stored but never acknowledged (a restart resumes here);
2. cancel the jobs of requests aborted since the last step;
3. poll each EXECUTING request: its jobs' states from the backend into the OCPS ledger
   (`apbatch.ledger.Ledger.update_states`); each CCD whose job ended gets a telemetry record
   (its ``ap_metrics`` from the butler, `apbatch.ocps.gather.telemetry_record`), published at
   once; when every CCD ended: results, final phase and completion event in one transaction,
   then the event is published and marked (`apbatch.ocps.store.RequestStore.mark_published`);
   a request executing longer than ``ocps.execution_duration`` (UWS executionDuration) has its
   unfinished jobs cancelled and ends in ERROR naming them;
4. start QUEUED requests, oldest first, while fewer than ``ocps.max_concurrent`` execute (one
   in sync mode): plan the CCDs (`apbatch.ocps.pipelines.plan_works`) and submit them through
   `apbatch.submitter.Submitter` into the OCPS ledger, or run ``gather`` here.

A CCD already in the OCPS ledger (an earlier request) is resubmitted by compare-and-set if its
job ended before this request started, else its job is adopted (a restart finds the jobs it
had submitted this way). Everything a request needs is in the database, so a new runner on
the same database completes what a stopped one left.
"""

from __future__ import annotations

import logging
import threading
import time
from collections.abc import Callable
from pathlib import Path
from typing import Any

from ..backends import make_backend
from ..backends.base import Backend
from ..config import ApbatchConfig
from ..errors import ApbatchError
from ..ledger import Ledger
from ..states import SubmissionState
from ..submission import Submission
from ..submitter import Submitter, cancel_rows
from ..work import CcdWork
from .events import EventPublisher, completion_event
from .gather import ccd_failure, gather_group, metric_runs, read_metrics, telemetry_record
from .model import OcpsRequest, Phase
from .pipelines import ExposureLookup, get_pipeline, plan_works, request_config, results_of
from .store import RequestStore

__all__ = ["Runner"]

_log = logging.getLogger(__name__)

_STALE_CLAIM = 30.0
"""Seconds after which a CCD claimed but never submitted (its process stopped) is submitted again."""

_CCD_DONE = frozenset({SubmissionState.COMPLETED, SubmissionState.FAILED, SubmissionState.TIMEOUT,
                       SubmissionState.CANCELLED, SubmissionState.SUBMIT_FAILED})


def _distributor(cfg: ApbatchConfig) -> str:
    """Where the jobs find their raws: a URL as it is, a directory made absolute (as the fan-out does)."""
    loc = cfg.job.distributor
    return loc if "://" in loc else str(cfg.path(loc).absolute())


class Runner:
    """Runs OCPS requests in a background thread; see the module docstring.

    Parameters
    ----------
    config : `ApbatchConfig`
        The service's configuration (``ocps`` section, backend, butler repository...).
    store : `RequestStore`
        The persistent requests.
    ledger : `Ledger`
        The OCPS ledger (``ocps.ledger_url``).
    publisher : `EventPublisher`
        Where completion events and telemetry go.
    on_change : callable, optional
        Called with a request id after each phase or telemetry change (the service's wait).
    lookup : `ExposureLookup`, optional
        Finds exposures and metrics in the butler (default: ``job.repo``).
    backend_factory : callable, optional
        ``factory(config) -> Backend`` (default `apbatch.backends.make_backend`).

    Notes
    -----
    Lifetime: between :meth:`start` and :meth:`stop`. The backend and butler are used by the
    runner thread only; :meth:`wake` and :meth:`cancel_later` may be called from any thread.
    """

    def __init__(self, config: ApbatchConfig, store: RequestStore, ledger: Ledger,
                 publisher: EventPublisher, *,
                 on_change: Callable[[str], None] | None = None, lookup: ExposureLookup | None = None,
                 backend_factory: Callable[[ApbatchConfig], Backend] = make_backend,
                 clock: Callable[[], float] = time.time):
        self.config = config
        self.store = store
        self.ledger = ledger
        self.publisher = publisher
        self.on_change = on_change or (lambda request_id: None)
        self.lookup = lookup or ExposureLookup(config.path(config.job.repo))
        self.backend_factory = backend_factory
        self.clock = clock
        self._backends: dict[str, Backend] = {}
        self._configs: dict[str, ApbatchConfig] = {}
        self._to_cancel: list[str] = []
        self._lock = threading.Lock()
        self._wake = threading.Event()
        self._stop = threading.Event()
        self._thread: threading.Thread | None = None
        self.timings: dict[str, dict[str, float]] = {}
        """Per request: ``started``, ``submitted``, ``ended``, ``published`` (clock), for the bench."""

    # ------------------------------------------------------------------ thread
    def start(self) -> None:
        """Start the thread (it resumes whatever the database holds)."""
        if self._thread is not None and self._thread.is_alive():
            return
        self._stop.clear()
        self._thread = threading.Thread(target=self._loop, name="ocps-runner", daemon=True)
        self._thread.start()

    def stop(self, timeout: float = 30.0) -> None:
        """Stop the thread after its current step; requests stay in the database."""
        self._stop.set()
        self._wake.set()
        if self._thread is not None:
            self._thread.join(timeout)
        self._thread = None

    def wake(self) -> None:
        """Run a step now (a request was queued or aborted)."""
        self._wake.set()

    def cancel_later(self, request_id: str) -> None:
        """Cancel the jobs of an aborted request in the runner thread's next step."""
        with self._lock:
            self._to_cancel.append(request_id)
        self._wake.set()

    def _loop(self) -> None:
        while not self._stop.is_set():
            self._wake.clear()
            try:
                self.step()
            except Exception:  # one bad step must not end the service
                _log.exception("OCPS runner step failed")
            self._wake.wait(self.config.ocps.poll_interval)

    # ------------------------------------------------------------------ one step
    def step(self) -> None:
        """One pass: publish, cancel, poll, start (module docstring)."""
        self.publish_pending()
        with self._lock:
            cancel, self._to_cancel = self._to_cancel, []
        for request_id in cancel:
            self._cancel_jobs(request_id)
        executing = self.store.list(phases=[Phase.EXECUTING])
        for req in executing:
            if self._stop.is_set():
                return
            self._poll(req)
        running = len(self.store.list(phases=[Phase.EXECUTING]))
        limit = 1 if self.config.ocps.mode == "sync" else self.config.ocps.max_concurrent
        for req in self.store.list(phases=[Phase.QUEUED]):
            if running >= limit or self._stop.is_set():
                break
            if self._start(req):
                running += 1
        self.publish_pending()
        self.store.purge()

    def publish_pending(self) -> None:
        """Publish every stored completion event not yet acknowledged, and mark it.

        The first refusal (broker away) ends the pass: the rest are tried at the next step, so an
        unreachable broker costs one publisher timeout per step, not one per event.
        """
        for request_id in self.store.unpublished():
            event, published = self.store.event(request_id)
            if event is None or published is not None:
                continue
            if not self.publisher.completion(event):
                return
            if self.store.mark_published(request_id, self.clock()):
                self.timings.setdefault(request_id, {})["published"] = self.clock()
                self.on_change(request_id)

    # ------------------------------------------------------------------ helpers
    def _config(self, req: OcpsRequest) -> ApbatchConfig:
        if req.id not in self._configs:
            self._configs[req.id] = request_config(self.config, req.overrides, req.config_file)
        return self._configs[req.id]

    def _backend(self, req: OcpsRequest) -> Backend:
        if req.id not in self._backends:
            self._backends[req.id] = self.backend_factory(self._config(req))
        return self._backends[req.id]

    def _rows(self, ccds: list[dict[str, Any]]) -> dict[tuple[str, str, int], Submission]:
        out: dict[tuple[str, str, int], Submission] = {}
        for inst, group in {(c["key"][0], c["key"][1]) for c in ccds}:
            out.update({r.key: r for r in self.ledger.rows(instrument=inst, group_id=group)})
        return out

    def _forget(self, request_id: str) -> None:
        self._backends.pop(request_id, None)
        self._configs.pop(request_id, None)

    # ------------------------------------------------------------------ start
    def _start(self, req: OcpsRequest) -> bool:
        now = self.clock()
        if not self.store.set_phase(req.id, Phase.EXECUTING, expect=[Phase.QUEUED], started_at=now):
            return False
        self.timings[req.id] = {"started": now}
        self.on_change(req.id)
        req = self.store.get(req.id)
        try:
            pipeline = get_pipeline(req.pipeline)
            cfg = self._config(req)
            if not pipeline.batch:
                self._gather(req, cfg)
                return True
            exposures = self.lookup.find(req.data_id)
            works = plan_works(pipeline, req.data_id, exposures, distributor=_distributor(cfg),
                               default_detectors=cfg.events.detectors.get(req.data_id.instrument, ()),
                               default_exposure_time=cfg.events.anticipated_exposure_time.get("default",
                                                                                               30.0))
            for day_obs in sorted({w.day_obs for w in works}):
                self.lookup.register_run(cfg.job.output_run.format(instrument=req.data_id.instrument,
                                                                   day_obs=day_obs))
            ccds = [{"key": list(w.key), "work": w.to_dict(), "job_id": None, "ended": False} for w in works]
            self.store.update(req.id, ccds=ccds)
            self._submit(req, ccds)
        except Exception as exc:
            known = isinstance(exc, ApbatchError)
            why = " ".join(str(exc).split()) if known else f"{type(exc).__name__}: {exc}"
            _log.warning("request %s failed to start: %s", req.id, why, exc_info=not known)
            self._finish(req, Phase.ERROR, why, [], 0, 0, {})
            return True
        self.timings[req.id]["submitted"] = self.clock()
        return True

    def _submit(self, req: OcpsRequest, ccds: list[dict[str, Any]]) -> None:
        """Submit the request's CCDs that have no job yet; adopt or resubmit those already in the ledger."""
        backend = self._backend(req)
        submitter = Submitter(self.ledger, backend, clock=self.clock)
        todo = [CcdWork.from_dict(c["work"]) for c in ccds if not c["job_id"] and not c["ended"]]
        if todo:
            submitter.submit_new(todo)
            rows = self._rows(ccds)
            again = [rows[w.key] for w in todo if w.key in rows and self._again(req, rows[w.key])]
            if again:
                submitter.resubmit(again)
        rows = self._rows(ccds)
        for c in ccds:
            row = rows.get(tuple(c["key"]))
            if row is not None and row.job_id and not c["job_id"]:
                c["job_id"] = row.job_id
        self.store.update(req.id, ccds=ccds, jobs=[c["job_id"] for c in ccds if c["job_id"]])

    def _again(self, req: OcpsRequest, row: Submission) -> bool:
        """Whether a CCD row this request did not claim is to be submitted again (else adopted):
        its job ended before the request started, it was refused or cancelled before it had a job,
        or it was claimed by a process that stopped before submitting (reconciled first)."""
        if row.job_id is not None:
            return row.state in _CCD_DONE and (row.finished_at or 0.0) < (req.started_at or 0.0)
        if row.state in (SubmissionState.SUBMIT_FAILED, SubmissionState.CANCELLED):
            return True
        return row.state is SubmissionState.CLAIMED and row.claimed_at < self.clock() - _STALE_CLAIM

    # ------------------------------------------------------------------ poll
    def _poll(self, req: OcpsRequest) -> None:
        ccds = self.store.ccds(req.id)
        if not ccds:  # stopped between EXECUTING and its plan: plan again
            self.store.set_phase(req.id, Phase.QUEUED, expect=[Phase.EXECUTING])
            return
        limit = self.config.ocps.execution_duration
        if limit and req.started_at is not None and self.clock() - req.started_at > limit:
            self._overrun(req, ccds, limit)
            return
        backend = self._backend(req)
        if any(not c["job_id"] and not c["ended"] for c in ccds):
            self._submit(req, ccds)
        rows = self._rows(ccds)
        kind = backend.kind or type(backend).__name__
        mine = {c["job_id"] for c in ccds if c["job_id"] and not c["ended"]}
        polled = [r.job_id for r in rows.values()
                  if r.job_id in mine and r.state.unfinished and r.backend == kind]
        if polled:
            self.ledger.update_states(backend.status([j for j in polled if j]), kind, now=self.clock())
            rows = self._rows(ccds)
        cfg = self._config(req)
        changed = False
        for c in ccds:
            row = rows.get(tuple(c["key"]))
            if c["ended"] or row is None or row.state not in _CCD_DONE:
                continue
            if row.state is SubmissionState.SUBMIT_FAILED or c["job_id"] == row.job_id or not c["job_id"]:
                c.update(ended=True, state=str(row.state), exit_code=row.exit_code, job_id=row.job_id)
                self._telemetry(req, cfg, row)
                changed = True
        if changed:
            self.store.update(req.id, ccds=ccds)
        if all(c["ended"] for c in ccds):
            self._complete(req, ccds, rows)

    def _overrun(self, req: OcpsRequest, ccds: list[dict[str, Any]], limit: float) -> None:
        """The request ran past ``ocps.execution_duration``: cancel its unfinished jobs, end in ERROR."""
        rows = self._rows(ccds)
        late = [c for c in ccds if not c["ended"]]
        states = [f"{CcdWork.from_dict(c['work']).detector_name} "
                  f"({rows[tuple(c['key'])].state if tuple(c['key']) in rows else 'not submitted'})"
                  for c in late]
        self._cancel_jobs(req.id)
        reason = (f"executionDuration {limit:g} s exceeded: {len(late)} of {len(ccds)} CCD(s) unfinished: "
                  + ", ".join(states[:5]) + (", ..." if len(states) > 5 else ""))
        done = sum(1 for c in ccds if c["ended"] and c.get("state") == str(SubmissionState.COMPLETED))
        self._finish(req, Phase.ERROR, reason, [c["job_id"] for c in ccds if c["job_id"]], done,
                     len(ccds) - done, {})

    def _runs(self, cfg: ApbatchConfig, instrument: str, day_obs: int) -> list[str]:
        return metric_runs(cfg, self.config.ocps.output_run, instrument, day_obs)

    def _telemetry(self, req: OcpsRequest, cfg: ApbatchConfig, row: Submission) -> None:
        metrics = None
        if row.state is SubmissionState.COMPLETED and row.intent == "science":
            try:
                found = read_metrics(self.lookup.butler(), self._runs(cfg, row.instrument, row.day_obs),
                                     row.instrument, row.visit, [row.detector])
                metrics = found.get(row.detector)
            except Exception as exc:
                _log.warning("no metrics for %s of %s: %s", row.detector_name, req.id, exc)
        rec = telemetry_record(req.id, row.work, str(row.state), row.exit_code, metrics, self.clock())
        cur = self.store.get(req.id)
        self.store.update(req.id, telemetry=[*map(dict, cur.telemetry), rec])
        self.publisher.telemetry(rec)
        self.on_change(req.id)

    def _complete(self, req: OcpsRequest, ccds: list[dict[str, Any]],
                  rows: dict[tuple[str, str, int], Submission]) -> None:
        mine = [rows[tuple(c["key"])] for c in ccds if tuple(c["key"]) in rows]
        failed = [r for r in mine if r.state is not SubmissionState.COMPLETED]
        results = results_of(get_pipeline(req.pipeline), [r.to_dict() for r in mine])
        cfg = self._config(req)
        results["output_run"] = sorted({cfg.job.output_run.format(instrument=r.instrument, day_obs=r.day_obs)
                                        for r in mine})
        reason = None
        if failed:
            why = "; ".join(ccd_failure(r) for r in failed[:5])
            reason = f"{len(failed)} of {len(mine)} CCD(s) failed: {why}"
        self._finish(req, Phase.ERROR if failed else Phase.COMPLETED, reason,
                     [r.job_id for r in mine if r.job_id], len(mine) - len(failed), len(failed), results)

    def _finish(self, req: OcpsRequest, phase: Phase, reason: str | None, jobs: list[str], done: int,
                failed: int, results: dict[str, Any]) -> None:
        now = self.clock()
        event = completion_event(req, phase, reason, jobs, done, failed, results, now)
        if self.store.set_phase(req.id, phase, expect=[Phase.EXECUTING], ended_at=now, error=reason,
                                results=results, jobs=jobs, event=event):
            self.timings.setdefault(req.id, {})["ended"] = now
            self.on_change(req.id)
            self.publish_pending()
        self._forget(req.id)

    # ------------------------------------------------------------------ gather, cancel
    def _gather(self, req: OcpsRequest, cfg: ApbatchConfig) -> None:
        exposures = self.lookup.find(req.data_id)
        if not exposures:
            why = f"group_id: no exposure of group {req.data_id.group_id} is registered"
            self._finish(req, Phase.ERROR, why, [], 0, 0, {})
            return
        e = exposures[0]
        rows = {r.detector: {"state": str(r.state), "exit_code": r.exit_code, "work": r.work}
                for r in self.ledger.rows(instrument=e.instrument, group_id=e.group_id)}
        results = gather_group(self.lookup.butler(), request_id=req.id, instrument=e.instrument,
                               group_id=e.group_id, visit=e.visit,
                               runs=self._runs(cfg, e.instrument, e.day_obs), rows=rows,
                               out_dir=Path(cfg.path("ocps")).absolute() / req.id)
        if not results["n_with_metrics"]:
            self._finish(req, Phase.ERROR, f"no CCD of group {e.group_id} has metrics yet: process it first",
                         [], 0, 0, results)
            return
        self._finish(req, Phase.COMPLETED, None, [], results["n_with_metrics"], 0, results)

    def _cancel_jobs(self, request_id: str) -> None:
        try:
            req = self.store.get(request_id, deleted=True)
            ccds = self.store.ccds(request_id)
        except KeyError:
            return
        rows = self._rows(ccds)
        ours = [rows[tuple(c["key"])] for c in ccds
                if tuple(c["key"]) in rows and c["job_id"] == rows[tuple(c["key"])].job_id
                and not c["ended"]]
        if ours:
            try:
                cancel_rows(self.ledger, self._backend(req), ours, f"OCPS request {request_id} aborted")
            except Exception as exc:
                _log.error("could not cancel the jobs of %s: %s", request_id, exc)
        self._forget(request_id)
