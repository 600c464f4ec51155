"""``apbatch resubmit``: rerun CCDs of a visit that failed for good, once the cause is fixed."""

from __future__ import annotations

import collections
import time
from collections.abc import Sequence
from typing import Any

from ..backends.base import Backend
from ..config import ApbatchConfig
from ..errors import BadInputError
from ..ledger import Ledger
from ..submission import Submission
from ..submitter import Submitter

__all__ = ["resubmit_ccds", "select_rows"]


def select_rows(ledger: Ledger, target: str, detectors: Sequence[str] = (),
                instrument: str | None = None) -> list[Submission]:
    """The ledger rows of a visit (all digits) or group id, optionally only some detectors.

    Raises
    ------
    BadInputError
        Raised if nothing is recorded for ``target`` or a detector is not among its rows.
    """
    target = target.strip()
    rows = (ledger.rows(instrument=instrument, visit=int(target)) if target.isdigit()
            else ledger.rows(instrument=instrument, group_id=target))
    if not rows:
        raise BadInputError("VISIT_OR_GROUP", f"no submissions recorded for {target!r}",
                            "give a visit id or group id listed by `apbatch status`")
    if not detectors:
        return rows
    chosen = []
    for d in detectors:
        match = [r for r in rows if d.strip() in (str(r.detector), r.detector_name)]
        if not match:
            raise BadInputError("DETECTORS", f"{target!r} has no detector {d!r}",
                                "use a detector id or name listed by `apbatch status`")
        chosen += [r for r in match if r not in chosen]
    return chosen


def resubmit_ccds(config: ApbatchConfig, target: str, detectors: Sequence[str] = (), *,
                  instrument: str | None = None, dry_run: bool = False, claim_timeout: float = 300.0,
                  backend: Backend | None = None, ledger: Ledger | None = None,
                  now: float | None = None) -> dict[str, Any]:
    """Resubmit a visit's CCDs that ended without success, as a new attempt each.

    Eligible (`Submission.can_resubmit_by_hand`): FAILED (any exit code), TIMEOUT, CANCELLED,
    SUBMIT_FAILED, lost (UNKNOWN to the scheduler), or claimed ``claim_timeout`` ago and never
    submitted; ``max_attempts`` does not apply (a person decided). COMPLETED and active CCDs
    are skipped. Each row is claimed again by compare-and-set, so a CCD that a daemon, ``night
    reprocess`` or another ``resubmit`` resubmits at the same moment runs once.

    Returns
    -------
    summary : `dict`
        ``resubmitted`` (``{label, detector_name, job_id, was}``), ``skipped`` (states of
        the CCDs not eligible, counted), ``taken`` (CCDs another process claimed first),
        ``recovered`` (jobs a stopped submitter got accepted but never recorded: found at the
        scheduler by their submission token and recorded, not rerun), ``errors`` (scheduler
        refusals).

    Raises
    ------
    BadInputError
        Raised if nothing matches, or nothing that matches may be resubmitted.
    """
    now = time.time() if now is None else now
    own_ledger = ledger is None
    ledger = ledger or Ledger.from_config(config, create=False)
    try:
        rows = select_rows(ledger, target, detectors, instrument)
        eligible = [r for r in rows if r.can_resubmit_by_hand(claim_timeout, now)]
        skipped = dict(collections.Counter(str(r.state) for r in rows if r not in eligible))
        if not eligible:
            states = ", ".join(f"{n} {s}" for s, n in sorted(skipped.items()))
            raise BadInputError("VISIT_OR_GROUP", f"nothing to resubmit in {target!r} ({states})",
                                "only CCDs that ended without success can be resubmitted")
        was = {r.key: f"{r.state} exit {r.exit_code}" for r in eligible}
        summary: dict[str, Any] = {"skipped": skipped, "taken": 0, "errors": []}
        if dry_run:
            summary["resubmitted"] = [_item(r.work, None, was[r.key]) for r in eligible]
            return summary
        if backend is None:
            from ..backends import make_backend

            backend = make_backend(config)
        result = Submitter(ledger, backend, clock=lambda: now).resubmit(eligible)
        summary["resubmitted"] = [_item(j.work, j.job_id, was[j.work.key]) for j in result.jobs]
        summary["recovered"] = [_item(j.work, j.job_id, "found at the scheduler, recorded")
                                for j in result.recovered]
        summary["taken"] = len(eligible) - len(result.claimed) - len(result.recovered)
        summary["errors"] = result.errors
        return summary
    finally:
        if own_ledger:
            ledger.close()


def _item(work, job_id: str | None, was: str) -> dict[str, Any]:
    return {"label": work.label, "group_id": work.group_id, "detector_name": work.detector_name,
            "job_id": job_id, "was": was}
