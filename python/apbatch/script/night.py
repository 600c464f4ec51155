"""``apbatch night``: what cron runs the morning after a night -- reprocess, report (the crontab:
`apbatch.script.crontab`).

The policy (what is resubmitted, what counts as missed, which events belong to a night) is
in `apbatch.night`; these are the commands' plain functions.
"""

from __future__ import annotations

import collections
import dataclasses
import time
from pathlib import Path
from typing import Any

from ..atomic import write_atomic as _write_file
from ..backends.base import Backend
from ..config import ApbatchConfig
from ..errors import BadInputError, RetriableError
from ..latency import summarize_stages
from ..ledger import Ledger
from ..night import (
    classify,
    event_day_obs,
    expected_works,
    missing_works,
    night_events,
    night_rows,
    night_span,
    percentile,
)
from ..states import JobStatus, SubmissionState
from ..submission import Category, Submission
from ..submitter import Submitter
from ..work import CcdWork
from .status import latency_lines, verdict, verification_lines

__all__ = ["format_report", "night_report", "reprocess_night", "write_atomic"]

_REDO = (Category.RETRY, Category.LOST)
_REDO_FINAL = (*_REDO, Category.EXHAUSTED, Category.FINAL)


# ----------------------------------------------------------------------------- reprocess
def _refresh(ledger: Ledger, backend: Backend, kind: str, rows: list[Submission], write: bool,
             now: float) -> tuple[dict, list[Submission]]:
    """Ask the scheduler about the unfinished rows; store (or, in a dry run, apply in memory) what changed."""
    mine = [r for r in rows if r.job_id and r.backend == kind and r.state.unfinished]
    ids = [r.job_id for r in mine if r.job_id]
    statuses: dict[str, JobStatus] = {}
    for i in range(0, len(ids), 500):  # query everything before writing anything
        try:
            statuses.update(backend.status(ids[i:i + 500]))
        except Exception as exc:
            raise RetriableError(f"backend {kind}: status query of {len(ids)} job(s) failed ({exc}); "
                                 "the ledger was not changed and nothing was resubmitted") from exc
    changed: dict[str, JobStatus] = {}
    seen: dict[int, Submission] = {}
    for r in mine:
        st = statuses.get(r.job_id or "")
        if st is None:
            continue
        st = st.settled()
        state = SubmissionState.of(st.state)
        if (r.state, r.exit_code, r.reason) != (state, st.exit_code, st.reason):
            changed[st.job_id] = st
            seen[r.id] = dataclasses.replace(r, state=state, exit_code=st.exit_code, reason=st.reason)
    # only what changed is written
    updated = ledger.update_states(changed, kind, now=now) if write else 0
    rows = night_rows(ledger, rows[0].day_obs) if write and rows else [seen.get(r.id, r) for r in rows]
    return {"polled": len(ids), "updated": updated}, rows


def reprocess_night(config: ApbatchConfig, *, day_obs: int, dry_run: bool = False,
                    max_attempts: int | None = None, claim_timeout: float = 300.0, lost_after: float = 3600.0,
                    include_final: bool = False, backend: Backend | None = None, ledger: Ledger | None = None,
                    now: float | None = None) -> dict[str, Any]:
    """Refresh the night's job states, resubmit what failed retriably or was lost, submit what was missed.

    Parameters
    ----------
    config : `ApbatchConfig`
        The configuration (``events.max_attempts`` is the default ``max_attempts``).
    day_obs : `int`
        The night, YYYYMMDD.
    dry_run : `bool`
        Query the scheduler and report what would be submitted; write and submit nothing.
    max_attempts : `int`, optional
        Submissions per CCD, this one included.
    claim_timeout, lost_after : `float`
        Seconds after which a never-submitted claim, or a job the scheduler has no record of,
        is resubmitted.
    include_final : `bool`
        Also resubmit CCDs that failed for good (exit 2/5, no exit code, TIMEOUT) or ran out of
        attempts -- after a person fixed the cause. CANCELLED CCDs stay cancelled.
    backend, ledger, now : optional
        Injected for tests; default from the configuration and the clock.

    Returns
    -------
    summary : `dict`
        ``day_obs, dry_run, polled, updated, counts`` (rows per category), ``resubmitted``,
        ``recovered`` (found at the scheduler under a stopped submitter's token: recorded, not
        rerun) and ``missed`` (lists of ``{label, detector_name, job_id, why}``), ``errors``.

    Raises
    ------
    RetriableError
        Raised if the scheduler's status query fails (nothing is changed then).
    """
    now = time.time() if now is None else now
    max_attempts = config.events.max_attempts if max_attempts is None else max_attempts
    if max_attempts < 1:
        raise BadInputError("--max-attempts", f"{max_attempts} is not positive", "use 1 or more")
    own_ledger = ledger is None
    ledger = ledger or Ledger.from_config(config)
    try:
        if backend is None:
            from ..backends import make_backend

            backend = make_backend(config)
        submitter = Submitter(ledger, backend, clock=lambda: now)
        kind = submitter.kind
        refreshed, rows = _refresh(ledger, backend, kind, night_rows(ledger, day_obs), not dry_run, now)
        cats = {r.id: classify(r, max_attempts=max_attempts, claim_timeout=claim_timeout,
                               lost_after=lost_after, now=now) for r in rows}
        wanted = _REDO_FINAL if include_final else _REDO
        redo = [r for r in rows if cats[r.id] in wanted and r.state is not SubmissionState.CANCELLED]
        missed = missing_works(ledger, expected_works(config, ledger, day_obs))
        summary: dict[str, Any] = {"day_obs": day_obs, "dry_run": dry_run, **refreshed,
                                   "counts": dict(collections.Counter(str(c) for c in cats.values())),
                                   "errors": []}
        why = {r.key: f"{cats[r.id]}: {r.state} exit {r.exit_code}" for r in redo}
        if dry_run:
            summary["resubmitted"] = [_item(r.work, None, why[r.key]) for r in redo]
            summary["missed"] = [_item(w, None, "missed") for w, _ in missed]
            return summary
        # compare-and-set: a CCD a running daemon has just resubmitted is left to it
        res = submitter.resubmit(redo)
        summary["resubmitted"] = [_item(j.work, j.job_id, why[j.work.key]) for j in res.jobs]
        # found at the scheduler under the claim of a submitter that stopped: recorded, not rerun
        summary["recovered"] = [_item(j.work, j.job_id, "recovered") for j in res.recovered]
        by_event: dict[float, list[CcdWork]] = {}
        for w, received in missed:
            by_event.setdefault(received, []).append(w)
        new_jobs, errors = [], list(res.errors)
        for received, works in by_event.items():
            new = submitter.submit_new(works, received_at=received)
            new_jobs += new.jobs
            errors += new.errors
        summary["missed"] = [_item(j.work, j.job_id, "missed") for j in new_jobs]
        summary["errors"] = errors
        return summary
    finally:
        if own_ledger:
            ledger.close()


def _item(w: CcdWork, job_id: str | None, why: str) -> dict[str, Any]:
    return {"label": w.label, "group_id": w.group_id, "detector_name": w.detector_name, "job_id": job_id,
            "why": why}


# ----------------------------------------------------------------------------- report
def _spread(values: list[float]) -> dict[str, Any]:
    return {"n": len(values), "median": percentile(values, 50), "p95": percentile(values, 95)}


def night_report(config: ApbatchConfig, *, day_obs: int, ledger: Ledger | None = None,
                 max_attempts: int | None = None) -> dict[str, Any]:
    """Summary of one night from the ledger (the scheduler is not asked: run ``reprocess`` first).

    Returns
    -------
    report : `dict`
        ``day_obs``; ``events`` (accepted events of the night per kind); ``visits`` and ``ccds``
        (with a ledger row), ``submitted`` (with a job id); ``states``, ``exit_codes`` and
        ``attempts`` (counts; keys are strings); ``resubmissions`` (submissions beyond the
        first); ``to_resubmit`` (what ``reprocess`` would resubmit now); ``needs_attention``
        (failed for good, out of attempts, refused by the scheduler or lost;
        `Submission.needs_attention`) and ``attention`` (those CCDs); ``dead_letters``
        (received during the night);
        ``missing_ccds`` (called for by an event, never claimed);
        ``latency``: ``event_to_submit`` (first submissions only: a resubmission's time says
        nothing about the event) and ``submit_to_finish`` (latest submission; finish as seen by
        polling), each ``{n, median, p95}`` in seconds; ``stage_latency``: the stage intervals the
        night's science jobs recorded (`apbatch.latency.summarize_stages` over the science rows
        with stage marks, as ``latency`` in ``apbatch status --json``): interval name (``prepare``, ...,
        ``raw_to_alerts``) -> ``{n, p50, p95, max}`` seconds, ``raw_to_alerts`` also with
        ``within_requirement`` (fraction within `apbatch.latency.REQUIREMENT`); an interval no
        job has both marks of is absent. ``per_visit``: one dict per visit with ``instrument,
        group_id, visit, intent, ccds, states, resubmissions`` and ``raw_to_alerts``
        (``{n, p50, p95, max, within_requirement}`` over its CCDs, or `None` without marks).
        ``other_nights``: when this night has no CCDs, the ledger's latest nights that do
        (``day_obs`` as a string -> CCDs), so a report asked for the wrong day says which to ask for.
        ``calibrations``: the verified calibration CCDs (`apbatch.script.status.verdict`). ``footprint``:
        the sky covered (`apbatch.report.footprint.rows_summary`: deg^2 observed/processed, per band).
    """
    from ..report.footprint import rows_summary

    max_attempts = config.events.max_attempts if max_attempts is None else max_attempts
    own_ledger = ledger is None
    ledger = ledger or Ledger.from_config(config, create=False)
    try:
        rows = night_rows(ledger, day_obs)
        kinds = collections.Counter(ev.kind for _, ev in night_events(ledger, day_obs)
                                    if event_day_obs(ev) in (day_obs, None))
        missing = missing_works(ledger, expected_works(config, ledger, day_obs))
        dead = len(ledger.dead_letter_rows(*night_span(day_obs)))
        others = {str(d): n for d, n in ledger.nights().items() if d != day_obs} if not rows else {}
    finally:
        if own_ledger:
            ledger.close()
    now = time.time()
    cats = [classify(r, max_attempts=max_attempts, claim_timeout=300.0, lost_after=3600.0, now=now)
            for r in rows]
    attention = [r for r in rows if r.needs_attention(max_attempts=max_attempts, claim_timeout=300.0,
                                                      lost_after=3600.0, now=now)]
    first = [r.submitted_at - r.event_received_at for r in rows
             if r.attempts == 1 and r.submitted_at is not None and r.event_received_at is not None]
    ran = [r.finished_at - r.submitted_at for r in rows
           if r.state.ended and r.finished_at is not None and r.submitted_at is not None]
    timed = [r for r in rows if r.intent == "science" and r.stages]
    per_visit: dict[tuple, dict[str, Any]] = {}
    for r in rows:
        v = per_visit.setdefault((r.instrument, r.group_id), {
            "instrument": r.instrument, "group_id": r.group_id, "visit": r.visit,
            "intent": r.intent, "ccds": 0, "states": collections.Counter(), "resubmissions": 0})
        v["ccds"] += 1
        v["states"][str(r.state)] += 1
        v["resubmissions"] += max(r.attempts - 1, 0)
    marks: dict[tuple, list] = {}
    for r in timed:
        marks.setdefault(r.key[:2], []).append(r.stages)
    for key, v in per_visit.items():
        v["states"] = dict(sorted(v["states"].items()))
        v["raw_to_alerts"] = summarize_stages(marks.get(key, [])).get("raw_to_alerts")
    return {
        "day_obs": day_obs, "events": dict(sorted(kinds.items())), "visits": len(per_visit),
        "ccds": len(rows),
        "submitted": sum(1 for r in rows if r.job_id),
        "states": dict(sorted(collections.Counter(str(r.state) for r in rows).items())),
        "exit_codes": {str(k): n for k, n in sorted(collections.Counter(
            r.exit_code for r in rows if r.exit_code is not None).items())},
        "attempts": {str(k): n for k, n in sorted(collections.Counter(r.attempts for r in rows).items())},
        "resubmissions": sum(max(r.attempts - 1, 0) for r in rows),
        "to_resubmit": sum(1 for cat in cats if cat in _REDO), "needs_attention": len(attention),
        "attention": [{"label": r.label, "group_id": r.group_id, "detector_name": r.detector_name,
                       "state": str(r.state), "exit_code": r.exit_code, "reason": r.reason}
                      for r in attention],
        "dead_letters": dead, "missing_ccds": len(missing),
        "latency": {"event_to_submit": _spread(first), "submit_to_finish": _spread(ran)},
        "stage_latency": summarize_stages(r.stages for r in timed),
        "per_visit": list(per_visit.values()),
        "other_nights": others,
        "calibrations": [verdict(r) for r in rows if r.verification is not None],
        "footprint": rows_summary(rows, day_obs),
    }


def _seconds(x: float | None) -> str:
    return "-" if x is None else f"{x:.1f} s"


def _alerts(v: dict[str, Any], key: str) -> str:
    return "-" if v.get("raw_to_alerts") is None else f"{v['raw_to_alerts'][key]:.1f}"


def format_report(report: dict[str, Any]) -> str:
    """The report as readable text: totals, latency, then one line per visit."""
    def counts(d: dict) -> str:
        return " ".join(f"{k}={n}" for k, n in d.items()) or "-"

    lat = report["latency"]
    lines = [f"night {report['day_obs']}",
             f"  events          {counts(report['events'])}",
             f"  visits          {report['visits']}",
             f"  CCDs            {report['ccds']} ({report['submitted']} submitted)",
             f"  states          {counts(report['states'])}",
             f"  exit codes      {counts(report['exit_codes'])}",
             f"  attempts        {counts(report['attempts'])} ({report['resubmissions']} resubmission(s))",
             f"  to resubmit     {report['to_resubmit']}",
             f"  needs attention {report['needs_attention']}",
             f"  missing CCDs    {report['missing_ccds']}",
             f"  dead letters    {report['dead_letters']}"]
    if report.get("footprint"):
        lines.append("  sky covered     {observed_deg2:.2f} deg^2 observed, {processed_deg2:.2f} deg^2 "
                     "processed".format(**report["footprint"]))
    for name, title in (("event_to_submit", "event -> submitted"),
                        ("submit_to_finish", "submitted -> finished")):
        s = lat[name]
        lines.append(f"  {title:<22}median {_seconds(s['median'])}, p95 {_seconds(s['p95'])} (n={s['n']})")
    stages = report["stage_latency"]
    if stages:
        lines += ["", "stage latency (science CCDs that recorded stage times):", *latency_lines(stages, "  ")]
    if not report["ccds"] and report.get("other_nights"):
        lines.append("  no CCDs this night; the ledger's latest nights (--day-obs): " + ", ".join(
            f"{d} ({n} CCDs)" for d, n in report["other_nights"].items()))
    if report["per_visit"]:
        table = [["INSTRUMENT", "VISIT", "GROUP", "INTENT", "CCDS", "RESUB", "ALERT P50", "ALERT P95",
                  "STATES"]]
        table += [[v["instrument"], str(v["visit"]), v["group_id"], v["intent"], str(v["ccds"]),
                   str(v["resubmissions"]), _alerts(v, "p50"), _alerts(v, "p95"), counts(v["states"])]
                  for v in report["per_visit"]]
        widths = [max(len(r[i]) for r in table) for i in range(len(table[0]))]
        lines.append("")
        lines += ["  ".join(c.ljust(w) for c, w in zip(r, widths, strict=True)).rstrip() for r in table]
    if report.get("calibrations"):
        failed = sum(not c["passed"] for c in report["calibrations"])
        lines += ["", f"calibration verification: {len(report['calibrations']) - failed} passed, "
                  f"{failed} failed", *verification_lines(report["calibrations"])]
    if report.get("attention"):
        lines += ["", "needs attention (after fixing the cause: apbatch resubmit GROUP [DETECTORS...]"
                  " or night reprocess --include-final):"]
        lines += ["  " + "  ".join([a["group_id"], a["detector_name"], a["state"],
                                    "-" if a["exit_code"] is None else f"exit {a['exit_code']}",
                                    (a["reason"] or "")[:80]]).rstrip() for a in report["attention"]]
    return "\n".join(lines) + "\n"


def write_atomic(path: str, text: str, day_obs: int | None = None) -> Path:
    """Write ``text`` to ``path`` (``{day_obs}`` in it is replaced) via a temp file and a rename.

    Raises
    ------
    BadInputError
        Raised if the file cannot be written; no partial file is left.
    """
    target = Path(path.replace("{day_obs}", str(day_obs)) if day_obs is not None else path)
    try:
        return _write_file(target, text)
    except OSError as exc:
        raise BadInputError("--out", f"cannot write {str(target)!r}: {exc.strerror}",
                            "choose a writable path") from None
