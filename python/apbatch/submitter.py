"""`Submitter`: the one way CCDs reach a batch system -- claim, one batch per visit, submit, record.

Used by the daemon (`apbatch.dispatcher`), ``apbatch submit``, ``apbatch resubmit``,
``apbatch night reprocess`` and the demo. Two entry points:

* :meth:`Submitter.submit_new`: claim never-seen CCDs (``INSERT ... ON CONFLICT DO NOTHING``:
  a CCD is claimed once, ever) and submit those this call won;
* :meth:`Submitter.resubmit`: claim rows again by compare-and-set (`Ledger.reclaim`) and
  submit those this call won, as a new attempt. Two processes resubmitting the same CCD at
  once: exactly one submits it.

Either way each visit is one ``backend.submit`` (a Slurm array, an HTCondor cluster, a set of
local processes); the ledger records the job ids and the job command, or ``SUBMIT_FAILED``
with the error (the row stays retriable). A failing visit does not stop the others.
"""

from __future__ import annotations

import dataclasses
import logging
import time
from collections.abc import Callable, Sequence

from .backends.base import Backend
from .errors import BadInputError
from .ledger import Ledger
from .states import SubmittedJob
from .submission import Submission
from .work import CcdWork

__all__ = ["SubmitResult", "Submitter", "group_by_visit"]

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
    ``jobs``: those accepted by the scheduler; ``errors``: one line per refused visit.
    """

    requested: int = 0
    claimed: list[CcdWork] = dataclasses.field(default_factory=list)
    jobs: list[SubmittedJob] = dataclasses.field(default_factory=list)
    errors: list[str] = dataclasses.field(default_factory=list)


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

    Notes
    -----
    Holds no state between calls; use from one thread at a time (the backend is not
    thread-safe). Processes coordinate through the ledger.
    """

    def __init__(self, ledger: Ledger, backend: Backend, *, clock: Callable[[], float] = time.time):
        self.ledger = ledger
        self.backend = backend
        self.clock = clock
        self.kind = backend.kind or type(backend).__name__

    def submit_new(self, works: Sequence[CcdWork], received_at: float | None = None) -> SubmitResult:
        """Claim CCDs never claimed before and submit those this call won, one batch per visit."""
        claimed = self.ledger.claim(works, received_at=received_at, now=self.clock())
        if len(claimed) < len(works):
            _log.info("%d of %d CCD(s) were already claimed", len(works) - len(claimed), len(works))
        result = self.submit_claimed(claimed)
        result.requested = len(works)
        return result

    def resubmit(self, rows: Sequence[Submission]) -> SubmitResult:
        """Claim ``rows`` again by compare-and-set and submit those won, as a new attempt each.

        A row changed since it was read (another process reclaimed or updated it) is skipped.
        """
        won = set(self.ledger.reclaim(rows, now=self.clock()))
        lost = len(rows) - len(won)
        if lost:
            _log.info("%d of %d CCD(s) were changed by another process since read: left to it",
                      lost, len(rows))
        result = self.submit_claimed([r.work for r in rows if r.id in won])
        result.requested = len(rows)
        return result

    def submit_claimed(self, works: Sequence[CcdWork]) -> SubmitResult:
        """Submit CCDs this process holds claims on, one batch per visit, and record each outcome."""
        result = SubmitResult(requested=len(works), claimed=list(works))
        for batch in group_by_visit(works):
            day_obs = batch[0].day_obs
            try:
                submitted = self.backend.submit(batch)
                command = self.backend.job_command(day_obs)  # as submit resolved it (config file written)
            except Exception as exc:  # a scheduler or backend failure must not stop the other visits
                _log.error("submission of %s (%d CCDs) failed: %s", batch[0].label, len(batch), exc,
                           exc_info=not isinstance(exc, BadInputError))
                self.ledger.record_submit_failed(batch, f"{type(exc).__name__}: {exc}", now=self.clock())
                result.errors.append(f"{batch[0].label}: {exc}")
                continue
            self.ledger.record_submitted(submitted, self.kind, now=self.clock(), command=command)
            _log.info("submitted %s: %d job(s) %s..%s", batch[0].label, len(submitted),
                      submitted[0].job_id if submitted else "-", submitted[-1].job_id if submitted else "-")
            result.jobs += submitted
        return result
