"""``apbatch status``: per-visit and per-CCD job states, from the ledger and the scheduler.

The ledger holds the states the daemon last polled; unless ``live=False`` the scheduler is
asked again for every unfinished job shown, and its answer is what is reported (the
ledger itself is not written: the daemon owns it). The stage times the jobs recorded
(`apbatch.latency`) are summarised as p50/p95 per interval, raw available -> alerts sent
first among them. Each CCD that failed or is running names its job's log file
(`Backend.log_path`); :func:`watch_status` redraws the view every few seconds, like ``watch squeue``.
"""

from __future__ import annotations

import collections
import dataclasses
import datetime
import json
import sys
import time
from collections.abc import Callable
from typing import Any, TextIO

from ..backends.base import Backend
from ..config import ApbatchConfig
from ..latency import INTERVALS, REQUIREMENT, intervals_of, summarize_stages
from ..ledger import Ledger
from ..states import SubmissionState
from ..submission import Submission

__all__ = ["CLEAR", "LOGGED_STATES", "collect_status", "format_status", "latency_lines", "verdict",
           "verification_lines", "watch_status"]

LOGGED_STATES = frozenset({SubmissionState.RUNNING, SubmissionState.HELD, SubmissionState.FAILED,
                           SubmissionState.TIMEOUT, SubmissionState.UNKNOWN})
"""States whose CCDs show their job's log path (failed, or running)."""

_CCD_FIELDS = ("instrument", "group_id", "visit", "detector", "detector_name", "intent", "backend", "job_id",
               "state", "exit_code", "attempts", "reason", "command", "claimed_at", "submitted_at",
               "started_at", "finished_at", "last_polled_at")


def collect_status(config: ApbatchConfig, *, visit: int | None = None, group: str | None = None,
                   instrument: str | None = None, live: bool = True, limit: int = 50,
                   backend: Backend | None = None, ledger: Ledger | None = None,
                   now: float | None = None) -> dict[str, Any]:
    """Gather the report that :func:`format_status` prints (and ``--json`` dumps).

    Never creates a ledger: a missing one is a `BadInputError` naming where it was looked for.

    Returns
    -------
    report : `dict`
        ``{"visits": [...], "ccds": [...] (only with visit/group), "attention": [...],
        "latency": {...}, "live": bool, "live_error": str}``; each visit has ``instrument,
        group_id, visit, intent, ccds, states`` (count per state), ``claimed_at`` and
        ``last_finished_at``; each CCD has the ledger fields plus ``stages`` (the job's stage
        marks, `apbatch.latency.STAGES` -> UTC unix seconds; ``{}`` before the job recorded
        them) and ``intervals`` (`apbatch.latency.intervals_of` of them, seconds);
        ``attention`` lists the CCDs shown that need a person (`Submission.needs_attention`);
        every CCD has ``log_path``: its job's stdout/stderr file (`Backend.log_path`) when it is
        in one of `LOGGED_STATES` or needs attention, else `None`, and ``verification`` (a
        calibration's verdict, `Submission.verification`, else `None`); ``calibrations`` lists
        the verified calibration CCDs shown: ``instrument, group_id, visit, intent,
        detector_name, passed, failed_amps`` (amp -> failed metrics);
        ``latency`` is `apbatch.latency.summarize_stages` over the CCDs shown that have marks:
        interval name -> ``{n, p50, p95, max}`` seconds (``raw_to_alerts`` also has
        ``within_requirement``, the fraction within `apbatch.latency.REQUIREMENT`); ``{}``
        when no CCD shown has marks; with the pilot backend, ``pilots``
        (`apbatch.backends.pilot.PilotBackend.pilots`: each pilot's state, item, items done).
    """
    now = time.time() if now is None else now
    own_ledger = ledger is None
    ledger = ledger or Ledger.from_config(config, create=False)
    try:
        if visit is not None or group is not None:
            rows = ledger.rows(instrument=instrument, visit=visit, group_id=group)
        else:
            rows = []
            for v in ledger.visits(instrument=instrument, limit=limit):
                rows += ledger.rows(instrument=v["instrument"], group_id=v["group_id"])
        report: dict[str, Any] = {"live": False, "live_error": ""}
        backend = backend or _backend_or_none(config)
        if live and any(r.state.unfinished and r.job_id for r in rows):
            try:
                rows = _apply_live(config, rows, backend)
                report["live"] = True
            except Exception as exc:  # status must still show the ledger when the scheduler is down
                report["live_error"] = f"{type(exc).__name__}: {exc}"
        report["visits"] = _summarize(rows)
        report["latency"] = summarize_stages(r.stages for r in rows if r.stages)
        attention = [r for r in rows if r.needs_attention(max_attempts=config.events.max_attempts, now=now)]
        logged = {r.id for r in attention} | {r.id for r in rows if r.state in LOGGED_STATES}
        if visit is not None or group is not None:
            report["ccds"] = [_ccd(r, backend if r.id in logged else None) for r in rows]
        report["attention"] = [_ccd(r, backend) for r in attention]
        report["calibrations"] = [verdict(r) for r in rows if r.verification is not None]
        pilots = getattr(backend, "pilots", None)  # the pilot backend: its warm pilots and their work
        if pilots is not None:
            report["pilots"] = pilots()
        return report
    finally:
        if own_ledger:
            ledger.close()


def _ccd(r: Submission, backend: Backend | None = None) -> dict[str, Any]:
    """One CCD of the report; ``log_path`` from ``backend`` if it is the backend of the row."""
    d = r.to_dict()
    log = None
    if backend is not None and r.job_id and r.backend == (backend.kind or type(backend).__name__):
        log = backend.log_path(r.job_id, r.work)
    return {**{k: d[k] for k in _CCD_FIELDS}, "stages": dict(r.stages), "intervals": intervals_of(r.stages),
            "log_path": log, "verification": d.get("verification")}


def verdict(r: Submission) -> dict[str, Any]:
    """A calibration CCD's verification (`apbatch.job.calverify`): passed, and the failed metrics per amp."""
    v = r.verification or {}
    return {"instrument": r.instrument, "group_id": r.group_id, "visit": r.visit, "intent": r.intent,
            "detector_name": r.detector_name, "passed": bool(v.get("passed")),
            "failed_amps": dict(v.get("failed_amps") or {})}


def verification_lines(verdicts: list[dict[str, Any]], indent: str = "  ") -> list[str]:
    """One line per verified calibration CCD: ``PASS``, or ``FAIL`` with each failed amp's metrics."""
    rows = []
    for c in verdicts:
        failed = "; ".join(f"{amp}: {', '.join(m)}" for amp, m in sorted(c["failed_amps"].items()))
        rows.append([c["group_id"], c["intent"], c["detector_name"], "PASS" if c["passed"] else "FAIL",
                     failed])
    return [indent + line for line in _table(["GROUP", "INTENT", "DETECTOR", "VERDICT", "FAILED AMPS"], rows)]


def _backend_or_none(config: ApbatchConfig) -> Backend | None:
    """The configured backend (constructors do no I/O), or `None` if it cannot be made."""
    from ..backends import make_backend

    try:
        return make_backend(config)
    except Exception:
        return None


def _apply_live(config: ApbatchConfig, rows: list[Submission], backend: Backend | None) -> list[Submission]:
    """The rows with the scheduler's current answer for the unfinished ones (the ledger is not written)."""
    if backend is None:
        from ..backends import make_backend

        backend = make_backend(config)
    kind = backend.kind or type(backend).__name__
    ids = [r.job_id for r in rows if r.state.unfinished and r.job_id and r.backend == kind]
    statuses = backend.observe(ids) if ids else {}  # a viewer: nothing started or retried
    out = []
    for r in rows:
        st = statuses.get(r.job_id or "") if r.backend == kind and r.state.unfinished else None
        if st is not None:
            st = st.settled()
            r = dataclasses.replace(r, state=SubmissionState.of(st.state), exit_code=st.exit_code,
                                    reason=st.reason or r.reason)
        out.append(r)
    return out


def _summarize(rows: list[Submission]) -> list[dict[str, Any]]:
    visits: dict[tuple, dict[str, Any]] = {}
    for r in rows:
        v = visits.setdefault(r.key[:2], {"instrument": r.instrument, "group_id": r.group_id,
                                          "visit": r.visit, "intent": r.intent, "ccds": 0,
                                          "states": collections.Counter(),
                                          "claimed_at": r.claimed_at, "last_finished_at": None})
        v["ccds"] += 1
        v["states"][str(r.state)] += 1
        v["claimed_at"] = min(v["claimed_at"], r.claimed_at)
        if r.finished_at is not None:
            v["last_finished_at"] = max(v["last_finished_at"] or 0.0, r.finished_at)
    out = sorted(visits.values(), key=lambda v: v["claimed_at"], reverse=True)
    for v in out:
        v["states"] = dict(sorted(v["states"].items()))
    return out


def _when(t: float | None) -> str:
    if t is None:
        return "-"
    return datetime.datetime.fromtimestamp(t, datetime.UTC).strftime("%Y-%m-%dT%H:%M:%S")


def _secs(intervals: dict[str, float]) -> str:
    sec = intervals.get("raw_to_alerts")
    return "-" if sec is None else f"{sec:.1f} s"


def _table(header: list[str], rows: list[list[str]]) -> list[str]:
    widths = [max(len(h), *(len(r[i]) for r in rows)) if rows else len(h) for i, h in enumerate(header)]
    fmt = "  ".join(f"{{:<{w}}}" for w in widths)
    return [fmt.format(*header).rstrip()] + [fmt.format(*r).rstrip() for r in rows]


def latency_lines(summary: dict[str, dict[str, float]], indent: str = "") -> list[str]:
    """A `apbatch.latency.summarize_stages` summary as text: a table and the requirement's line.

    Parameters
    ----------
    summary : `dict`
        Interval name -> ``{n, p50, p95, max[, within_requirement]}`` seconds.
    indent : `str`
        Put before every line.

    Returns
    -------
    lines : `list` [`str`]
        One row per interval present (in `apbatch.latency.INTERVALS` order), then
        ``raw available -> alerts sent: p50 X s, p95 Y s, Z% of N within 60 s``; no lines for
        an empty summary.
    """
    if not summary:
        return []
    names = [n for n in INTERVALS if n in summary]
    lines = _table(["INTERVAL", "FROM -> TO", "N", "P50 (s)", "P95 (s)", "MAX (s)"],
                   [[n, " -> ".join(INTERVALS[n]), str(summary[n]["n"]),
                     *(f"{summary[n][k]:.1f}" for k in ("p50", "p95", "max"))] for n in names])
    r = summary.get("raw_to_alerts")
    if r is None:
        lines.append("raw available -> alerts sent: no CCD has both marks yet")
    else:
        lines.append(f"raw available -> alerts sent: p50 {r['p50']:.1f} s, p95 {r['p95']:.1f} s, "
                     f"{100 * r['within_requirement']:.2f}% of {r['n']} within {REQUIREMENT:g} s")
    return [indent + line for line in lines]


def _pilot_job(p: dict[str, Any]) -> str:
    """A pilot's batch job (``slurm 1234``) or, for a local pilot, its pid."""
    return f"{p['batch']} {p['batch_id']}" if p.get("batch_id") else f"pid {p.get('pid')}"


def format_status(report: dict[str, Any]) -> str:
    """Readable tables: one line per visit (counts per state), one per CCD if selected, then the
    stage latencies (`latency_lines`) when any job recorded its stage times."""
    lines: list[str] = []
    if not report["visits"]:
        return "no submissions recorded"
    lines += _table(["INSTRUMENT", "VISIT", "GROUP", "INTENT", "CCDS", "STATES", "CLAIMED (UTC)"],
                    [[v["instrument"], str(v["visit"]), v["group_id"], v["intent"], str(v["ccds"]),
                      " ".join(f"{s}={n}" for s, n in v["states"].items()), _when(v["claimed_at"])]
                     for v in report["visits"]])
    total: collections.Counter[str] = collections.Counter()
    for v in report["visits"]:
        total.update(v["states"])
    lines.append(f"total: {len(report['visits'])} visit(s), {sum(total.values())} CCD(s): "
                 + " ".join(f"{s}={n}" for s, n in sorted(total.items())))
    if "ccds" in report:
        lines.append("")
        lines += _table(["DETECTOR", "NAME", "JOB", "STATE", "EXIT", "ATTEMPTS", "SUBMITTED", "FINISHED",
                         "RAW->ALERTS", "REASON"],
                        [[str(c["detector"]), c["detector_name"], c["job_id"] or "-", c["state"],
                          "-" if c["exit_code"] is None else str(c["exit_code"]), str(c["attempts"]),
                          _when(c["submitted_at"]), _when(c["finished_at"]), _secs(c["intervals"]),
                          (c["reason"] or "")[:80]]
                         for c in report["ccds"]])
        logs = [c for c in report["ccds"] if c.get("log_path")]
        if logs:
            lines += ["", "job logs (failed and running CCDs):"]
            lines += [f"  {c['detector_name']:<8} {c['state']:<9} {c['log_path']}" for c in logs]
    if report.get("calibrations"):
        failed = sum(not c["passed"] for c in report["calibrations"])
        passed = len(report["calibrations"]) - failed
        lines += ["", f"calibration verification: {passed} passed, {failed} failed",
                  *verification_lines(report["calibrations"])]
    if report.get("pilots"):
        lines += ["", "pilots:"]
        lines += _table(["PILOT", "JOB", "HOST", "STATE", "ITEM", "DONE", "FAILED", "RSS MiB", "PEAK MiB",
                         "STARTED (UTC)", "REASON"],
                        [[p["pilot"], _pilot_job(p), p.get("host") or "-", p["state"], p.get("item") or "-",
                          str(p["done"]), str(p["failed"]), f"{p.get('rss_mib') or 0:.0f}",
                          f"{p.get('peak_rss_mib') or 0:.0f}", _when(p.get("started")), p.get("reason", "")]
                         for p in report["pilots"]])
    if report.get("latency"):
        lines += ["", "stage latency (CCDs shown that recorded stage times):",
                  *latency_lines(report["latency"])]
    if report.get("attention"):
        lines.append("")
        lines.append(f"needs attention: {len(report['attention'])} CCD(s) (after fixing the cause: "
                     "apbatch resubmit GROUP_OR_VISIT [DETECTORS...])")
        lines += ["  " + "  ".join([c["group_id"], c["detector_name"], c["state"],
                                    "-" if c["exit_code"] is None else f"exit {c['exit_code']}",
                                    (c["reason"] or "")[:80]]).rstrip() for c in report["attention"]]
        lines += [f"  log: {c['log_path']}" for c in report["attention"]
                  if c.get("log_path") and "ccds" not in report]
    if report.get("live_error"):
        lines.append(f"warning: scheduler not queried ({report['live_error']}); states are from the ledger")
    return "\n".join(lines)


CLEAR = "\x1b[H\x1b[2J"
"""ANSI: cursor home, clear screen (written only to a terminal)."""


def watch_status(collect: Callable[[], dict[str, Any]], interval: float = 2.0, *, as_json: bool = False,
                 out: TextIO | None = None, is_tty: bool | None = None,
                 sleep: Callable[[float], None] = time.sleep, clock: Callable[[], float] = time.time,
                 iterations: int | None = None) -> int:
    """Show the status again every ``interval`` seconds until Ctrl-C, like ``watch squeue``.

    On a terminal the screen is cleared and the view redrawn each time, under a header line
    with the time; elsewhere (a pipe, a file) a snapshot is printed only when it differs from
    the last one printed, and no escape codes are written.

    Parameters
    ----------
    collect : callable
        Returns a fresh report (:func:`collect_status` with its arguments bound).
    interval : `float`
        Seconds between refreshes.
    as_json : `bool`
        Snapshots as JSON (one document each) instead of tables.
    out : file, optional
        Default `sys.stdout`.
    is_tty : `bool`, optional
        Default: ``out.isatty()``.
    sleep, clock : callable
        Injected by tests (no real waiting).
    iterations : `int`, optional
        Stop after this many refreshes (tests); default: until Ctrl-C.

    Returns
    -------
    exit_code : `int`
        0 (Ctrl-C is the normal way out).
    """
    out = out or sys.stdout
    tty = out.isatty() if is_tty is None else is_tty
    last: str | None = None
    n = 0
    try:
        while iterations is None or n < iterations:
            if n:
                sleep(interval)
            report = collect()
            text = json.dumps(report, indent=2, default=str) if as_json else format_status(report)
            header = f"Every {interval:g}s: apbatch status    {_when(clock())} UTC"
            if tty:
                out.write(f"{CLEAR}{header}\n\n{text}\n")
            elif text != last:
                out.write(text + "\n" if as_json else f"{header}\n{text}\n\n")
            out.flush()
            last = text
            n += 1
    except KeyboardInterrupt:
        if tty:
            out.write("\n")
    return 0
