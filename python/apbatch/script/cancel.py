"""``apbatch cancel``: cancel the unfinished jobs of a group or visit (optionally one CCD)."""

from __future__ import annotations

from ..backends.base import Backend
from ..config import ApbatchConfig
from ..errors import BadInputError
from ..ledger import CLAIMED, SUBMIT_FAILED, Ledger
from ..submission import Submission
from ..submitter import cancel_rows

__all__ = ["cancel_jobs"]


def cancel_jobs(config: ApbatchConfig, *, group: str | None = None, visit: int | None = None,
                detector: str | None = None, instrument: str | None = None,
                backend: Backend | None = None, ledger: Ledger | None = None) -> list[Submission]:
    """Cancel unfinished jobs at the scheduler and mark them CANCELLED (never retried).

    Parameters
    ----------
    group, visit : optional
        Which visit; exactly one is required.
    detector : `str`, optional
        A detector id (``94``) or name (``R22_S11``) within it.
    instrument : `str`, optional
        Restrict to one instrument.
    backend, ledger : optional
        Injected for tests; default from the configuration.

    Returns
    -------
    cancelled : `list` [`Submission`]
        The ledger rows of the cancelled jobs.

    Raises
    ------
    BadInputError
        Raised if neither or both of group and visit are given, or nothing matches.
    """
    if (group is None) == (visit is None):
        raise BadInputError("--group/--visit", "give exactly one", "e.g. --visit 3294702866920000")
    own_ledger = ledger is None
    ledger = ledger or Ledger.from_config(config)
    try:
        rows = ledger.rows(instrument=instrument, group_id=group, visit=visit)
        what = f"group {group!r}" if group is not None else f"visit {visit}"
        if not rows:
            raise BadInputError("--group" if group is not None else "--visit",
                                f"no submissions recorded for {what}", "see `apbatch status`")
        if detector is not None:
            key = detector.strip()
            rows = [r for r in rows if str(r.detector) == key or r.detector_name == key]
            if not rows:
                raise BadInputError("--detector", f"{what} has no detector {detector!r}",
                                    "use a detector id or name listed by `apbatch status`")
        live = [r for r in rows if r.state.unfinished or r.state in (CLAIMED, SUBMIT_FAILED)]
        if not live:
            return []
        if backend is None:
            from ..backends import make_backend

            backend = make_backend(config)
        return cancel_rows(ledger, backend, live, "cancelled by apbatch cancel")
    finally:
        if own_ledger:
            ledger.close()
