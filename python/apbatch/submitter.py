"""`Submitter`: the one way CCDs reach a batch system -- claim, one batch per visit, submit, record.

Used by the daemon (`apbatch.dispatcher`), ``apbatch submit``, ``apbatch resubmit``,
``apbatch night reprocess`` and the demo. Two entry points (and `cancel_rows`, the one way
jobs are cancelled: ``apbatch cancel`` and nextVisitCanceled):

* :meth:`Submitter.submit_new`: claim never-seen CCDs (``INSERT ... ON CONFLICT DO NOTHING``:
  a CCD is claimed once, ever) and submit those this call won;
* :meth:`Submitter.resubmit`: claim rows again by compare-and-set (`Ledger.reclaim`) and
  submit those this call won, as a new attempt. Two processes resubmitting the same CCD at
  once: exactly one submits it.

Either way each visit is one ``backend.submit`` (a Slurm array, an HTCondor cluster, a set of
local processes); the ledger records the job ids and the job command, or ``SUBMIT_FAILED``
with the error (the row stays retriable). A failing visit does not stop the others.

Nothing runs twice after a crash: every claim of a visit gets a new submission token
(`apbatch.backends.base.new_token`), stored in its ledger rows in the claim's transaction,
before the scheduler call, and written with the jobs (Slurm ``--comment``, HTCondor
``ApSubmitToken``, the local ``job.json``). A row still ``CLAIMED`` (or ``SUBMIT_FAILED``:
the submit command may have failed after the scheduler accepted the jobs) under a token is
*unconfirmed*; :meth:`Submitter.reconcile` asks the scheduler for jobs with its token and
records those it finds as submitted (a compare-and-set on the token: never counted twice).
:meth:`Submitter.resubmit` reconciles its rows before claiming them again, and the daemon
reconciles every unconfirmed row when it starts; a row whose scheduler cannot be asked is
not resubmitted until it can.
"""

from __future__ import annotations

import dataclasses
import logging
import time
from collections.abc import Callable, Iterable, Mapping, Sequence

from .backends.base import Backend, new_token
from .errors import BadInputError
from .ledger import Ledger
from .states import JobState, SubmittedJob
from .submission import Submission
from .work import CcdWork

__all__ = ["CANCELLABLE", "FAULT_POINTS", "NOT_STARTED_JOBS", "SubmitResult", "Submitter", "cancel_rows",
           "group_by_visit"]

FAULT_POINTS = ("claimed", "submitted", "recorded")
"""Where the ``fault`` hook of `Submitter` is called, per visit: after the claim (or reclaim)
transaction, after the scheduler accepted the batch (before the ledger records it), after the
ledger recorded it. Fault-injection tests kill the process there."""

_log = logging.getLogger(__name__)


def group_by_visit(works: Sequence[CcdWork]) -> list[list[CcdWork]]:
    """``works`` split into one list per (instrument, group), in first-seen order."""
    batches: dict[tuple[str, str], list[CcdWork]] = {}
    for w in works:
        batches.setdefault((w.instrument, w.group_id), []).append(w)
    return list(batches.values())


@dataclasses.dataclass
class SubmitResult:
    """What one submission call did.

    ``claimed``: CCDs this call won (the others were claimed by someone else before);
    ``jobs``: those accepted by the scheduler; ``errors``: one line per refused visit;
    ``recovered``: jobs found at the scheduler under an unconfirmed claim's token and recorded
    (:meth:`Submitter.reconcile`) instead of being submitted again.
    """

    requested: int = 0
    claimed: list[CcdWork] = dataclasses.field(default_factory=list)
    jobs: list[SubmittedJob] = dataclasses.field(default_factory=list)
    errors: list[str] = dataclasses.field(default_factory=list)
    recovered: list[SubmittedJob] = dataclasses.field(default_factory=list)


def _tokens(works: Iterable[CcdWork]) -> dict[tuple[str, str], str]:
    """A new submission token per visit (instrument, group) of ``works``."""
    return {key: new_token() for key in dict.fromkeys((w.instrument, w.group_id) for w in works)}


class Submitter:
    """Claims and submits CCDs and records the outcome; see the module docstring.

    Parameters
    ----------
    ledger : `Ledger`
        Where claims and outcomes are recorded.
    backend : `Backend`
        Where jobs go.
    clock : callable, optional
        UTC unix time; injectable for tests.
    fault : callable, optional
        Called with each of `FAULT_POINTS` as it is passed (fault-injection tests).

    Notes
    -----
    Holds no state between calls; use from one thread at a time (the backend is not
    thread-safe). Processes coordinate through the ledger.
    """

    def __init__(self, ledger: Ledger, backend: Backend, *, clock: Callable[[], float] = time.time,
                 fault: Callable[[str], None] | None = None):
        self.ledger = ledger
        self.backend = backend
        self.clock = clock
        self.kind = backend.kind or type(backend).__name__
        self.fault = fault or (lambda point: None)

    def submit_new(self, works: Sequence[CcdWork], received_at: float | None = None) -> SubmitResult:
        """Claim CCDs never claimed before and submit those this call won, one batch per visit."""
        tokens = _tokens(works)
        claimed = self.ledger.claim(works, received_at=received_at, now=self.clock(), tokens=tokens)
        if len(claimed) < len(works):
            _log.info("%d of %d CCD(s) were already claimed", len(works) - len(claimed), len(works))
        result = self.submit_claimed(claimed, tokens)
        result.requested = len(works)
        return result

    def resubmit(self, rows: Sequence[Submission]) -> SubmitResult:
        """Reconcile ``rows`` (:meth:`reconcile`), then claim the rest again by compare-and-set
        and submit those won, as a new attempt each.

        A row changed since it was read (another process reclaimed or updated it) is skipped;
        so is a row whose jobs the scheduler already has, or cannot say (asked again next time).
        """
        recovered, held = self.reconcile(rows)
        rows = [r for r in rows if r.id not in held]
        tokens = _tokens(r.work for r in rows)
        won = set(self.ledger.reclaim(rows, now=self.clock(), tokens=tokens))
        lost = len(rows) - len(won)
        if lost:
            _log.info("%d of %d CCD(s) were changed by another process since read: left to it",
                      lost, len(rows))
        result = self.submit_claimed([r.work for r in rows if r.id in won], tokens)
        result.requested = len(rows) + len(held)
        result.recovered = recovered
        return result

    def reconcile(self, rows: Sequence[Submission] | None = None) -> tuple[list[SubmittedJob], set[int]]:
        """Record the jobs the scheduler accepted for unconfirmed claims (`Submission.unconfirmed`).

        For each visit's token among ``rows`` (default: every unconfirmed row of the ledger),
        `Backend.find_submitted`; what it finds is recorded as submitted (one attempt), under a
        compare-and-set on the token.

        Returns
        -------
        recovered : `list` [`SubmittedJob`]
            The jobs found and recorded.
        held : `set` [`int`]
            Ids of rows not to resubmit now: their jobs were found, or the scheduler could not
            be asked (they stay unconfirmed and are asked about again next time).
        """
        rows = self.ledger.unconfirmed() if rows is None else [r for r in rows if r.unconfirmed]
        claims: dict[tuple[str, str, str], list[Submission]] = {}
        for r in rows:
            claims.setdefault((r.instrument, r.group_id, r.submit_token or ""), []).append(r)
        recovered: list[SubmittedJob] = []
        held: set[int] = set()
        for (_, _, token), batch in claims.items():
            label = batch[0].label
            try:
                found = self.backend.find_submitted([r.work for r in batch], token,
                                                    since=min(r.claimed_at for r in batch))
            except Exception as exc:  # cannot tell: resubmitting could run it twice
                _log.error("cannot ask the scheduler for %s's jobs of token %s (%s): not resubmitted now",
                           label, token, exc)
                held.update(r.id for r in batch)
                continue
            if not found:
                continue
            keys = {j.work.key for j in found}
            held.update(r.id for r in batch if r.key in keys)
            n = self.ledger.record_submitted(found, self.kind, now=self.clock(),
                                             command=self.backend.job_command(batch[0].day_obs), token=token)
            _log.warning("%s: %d job(s) accepted by the scheduler under token %s but not recorded (the "
                         "submitter stopped): %d recorded now, not resubmitted", label, len(found), token, n)
            recovered += found
        return recovered, held

    def _drop_orphans(self, submitted: list[SubmittedJob]) -> list[SubmittedJob]:
        """Cancel the jobs of ``submitted`` that the ledger did not take (their rows changed while
        the scheduler call ran: cancelled, say); return those it holds."""
        first = submitted[0].work
        held = {r.job_id for r in self.ledger.rows(instrument=first.instrument, group_id=first.group_id)}
        orphans = [j.job_id for j in submitted if j.job_id not in held]
        if orphans:
            _log.warning("%s: %d job(s) submitted for rows that changed meanwhile: cancelling them",
                         first.label, len(orphans))
            try:
                self.backend.cancel(orphans)
            except Exception as exc:
                _log.error("could not cancel %s: %s", ", ".join(orphans), exc)
        return [j for j in submitted if j.job_id in held]

    def submit_claimed(self, works: Sequence[CcdWork],
                       tokens: Mapping[tuple[str, str], str] | None = None) -> SubmitResult:
        """Submit CCDs this process holds claims on, one batch per visit, and record each outcome.

        ``tokens``: the submission token each visit was claimed with (`Ledger.claim`).
        """
        tokens = tokens or {}
        result = SubmitResult(requested=len(works), claimed=list(works))
        if works:
            self.fault("claimed")
        for batch in group_by_visit(works):
            day_obs = batch[0].day_obs
            token = tokens.get((batch[0].instrument, batch[0].group_id))
            try:
                submitted = self.backend.submit(batch, token=token)
                command = self.backend.job_command(day_obs)  # as submit resolved it (config file written)
            except Exception as exc:  # a scheduler or backend failure must not stop the other visits
                _log.error("submission of %s (%d CCDs) failed: %s", batch[0].label, len(batch), exc,
                           exc_info=not isinstance(exc, BadInputError))
                self.ledger.record_submit_failed(batch, f"{type(exc).__name__}: {exc}", now=self.clock())
                result.errors.append(f"{batch[0].label}: {exc}")
                continue
            self.fault("submitted")
            n = self.ledger.record_submitted(submitted, self.kind, now=self.clock(), command=command,
                                             token=token)
            self.fault("recorded")
            if token and n < len(submitted):
                submitted = self._drop_orphans(submitted)
            _log.info("submitted %s: %d job(s) %s..%s", batch[0].label, len(submitted),
                      submitted[0].job_id if submitted else "-", submitted[-1].job_id if submitted else "-")
            result.jobs += submitted
        return result


CANCELLABLE = frozenset({JobState.PENDING, JobState.RUNNING, JobState.HELD, JobState.UNKNOWN})
"""Scheduler states `cancel_rows` cancels by default (``apbatch cancel``); a nextVisitCanceled
cancels only what has not started (`NOT_STARTED_JOBS`)."""
NOT_STARTED_JOBS = frozenset({JobState.PENDING, JobState.HELD, JobState.UNKNOWN})


def cancel_rows(ledger: Ledger, backend: Backend, rows: Sequence[Submission], reason: str,
                only: frozenset[JobState] = CANCELLABLE) -> list[Submission]:
    """Cancel what is unfinished *per the scheduler* among ledger rows and mark those CANCELLED.

    Unconfirmed claims are reconciled first (`Submitter.reconcile`: their jobs are recorded).
    The scheduler is then asked for the state of every job: a job that already ended is stored
    as it ended (never relabelled CANCELLED), one in a state of ``only`` is cancelled there,
    and rows without a job (claimed, refused) are marked CANCELLED; the ledger's compare-and-set
    (`Ledger.mark_cancelled`) never changes a finished row.

    Returns
    -------
    cancelled : `list` [`Submission`]
        The rows marked CANCELLED (as they were read).

    Raises
    ------
    SchedulerError
        Raised if the scheduler cannot be asked or refuses; the ledger is then left unchanged
        (apart from reconciled claims).
    """
    kind = backend.kind or type(backend).__name__
    if any(r.unconfirmed for r in rows):
        Submitter(ledger, backend).reconcile([r for r in rows if r.unconfirmed])
        fresh = {r.id: r for inst, group in {(r.instrument, r.group_id) for r in rows}
                 for r in ledger.rows(instrument=inst, group_id=group)}
        rows = [fresh.get(r.id, r) for r in rows]
    other = [r for r in rows if r.job_id and r.backend != kind]
    for r in other:
        _log.warning("job %s of %s was submitted with backend %r, not %r: not cancelled there",
                     r.job_id, r.detector_name, r.backend, kind)
    mine = [r for r in rows if r.job_id and r.backend == kind]
    statuses = backend.status([r.job_id for r in mine if r.job_id]) if mine else {}
    ended = {j: st for j, st in statuses.items() if st.state.finished}
    if ended:  # the scheduler's word is stored; such a row is not cancelled
        ledger.update_states(ended, kind)
    to_cancel = [r for r in mine if r.job_id and statuses[r.job_id].state in only
                 and statuses[r.job_id].state is not JobState.UNKNOWN]
    if to_cancel:
        backend.cancel([r.job_id for r in to_cancel if r.job_id])
    done = [r for r in rows if r.job_id is None and not r.state.ended] + [
        r for r in mine if r.job_id and statuses[r.job_id].state in only]
    marked = set(ledger.mark_cancelled([r.id for r in done], reason))
    return [r for r in done if r.id in marked]
