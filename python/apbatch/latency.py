"""Stage times of a job on the path from raw to alert, and their summaries.

Every science job marks the UTC time (unix seconds) at which it reached each of `STAGES`;
the job writes them into its ledger row (``submissions.stages``, JSON) and its ``ap_metrics``
dataset, and ``apbatch status --json`` and ``apbatch night report`` summarise them per
interval (`INTERVALS`) as p50/p95 over the CCDs.

``raw_available`` is when the *distributor* had the last raw of the CCD (its delivery time),
not when the job first looked: the requirement (98% of alerts within 60 s of the end of
readout) counts from there, so time the job spends noticing a raw is counted against it.
"""

from __future__ import annotations

import os
import time
from collections.abc import Iterable, Mapping

import numpy as np

__all__ = ["INTERVALS", "REQUIREMENT", "STAGES", "StageClock", "intervals_of", "process_start_time",
           "summarize_stages"]

STAGES = ("started", "prepared", "raw_available", "raw_read", "isr_done", "difference_done",
          "apdb_stored", "alerts_sent", "finished")
"""Stage marks, in the order a science job reaches them."""

INTERVALS = {
    "prepare": ("started", "prepared"),
    "raw_to_read": ("raw_available", "raw_read"),
    "read_to_isr": ("raw_read", "isr_done"),
    "isr_to_difference": ("isr_done", "difference_done"),
    "difference_to_apdb": ("difference_done", "apdb_stored"),
    "apdb_to_alerts": ("apdb_stored", "alerts_sent"),
    "raw_to_alerts": ("raw_available", "alerts_sent"),
    "alerts_to_finished": ("alerts_sent", "finished"),
}
"""Named intervals between two marks; ``raw_to_alerts`` is the one the requirement is about."""

REQUIREMENT = 60.0
"""Seconds from the end of readout to the alert (OSS: 98% of alerts)."""


class StageClock:
    """Marks of one job, in UTC unix seconds. Lifetime: one job; not thread-safe.

    Parameters
    ----------
    clock : callable
        Returns the time now (default `time.time`); tests inject their own.
    """

    def __init__(self, clock=time.time):
        self.clock = clock
        self.marks: dict[str, float] = {}

    def mark(self, stage: str, when: float | None = None) -> float:
        """Record ``stage`` at ``when`` (default: now); returns the time recorded.

        Raises
        ------
        ValueError
            Raised if ``stage`` is not one of `STAGES` (a typo would silently vanish otherwise).
        """
        if stage not in STAGES:
            raise ValueError(f"unknown stage {stage!r}; one of {', '.join(STAGES)}")
        t = float(self.clock() if when is None else when)
        self.marks[stage] = round(t, 4)
        return t

    def to_dict(self) -> dict[str, float]:
        """The marks in stage order (plain JSON)."""
        return {s: self.marks[s] for s in STAGES if s in self.marks}


def process_start_time() -> float:
    """When this process started (UTC unix seconds; Linux ``/proc``), else now.

    A job's ``started`` mark is its process's start, so that interpreter start-up and imports
    count in the prepare phase.
    """
    try:
        with open("/proc/self/stat") as f:
            ticks = int(f.read().rsplit(")", 1)[1].split()[19])  # field 22: starttime, clock ticks after boot
        # the kernel counts it on the boot clock (whole seconds of /proc/stat btime would be too coarse)
        age = time.clock_gettime(time.CLOCK_BOOTTIME) - ticks / os.sysconf("SC_CLK_TCK")
        return time.time() - age
    except (OSError, ValueError, IndexError):
        return time.time()


def intervals_of(marks: Mapping[str, float]) -> dict[str, float]:
    """Seconds of each interval of `INTERVALS` whose two marks are both present."""
    out = {}
    for name, (a, b) in INTERVALS.items():
        if marks.get(a) is not None and marks.get(b) is not None:
            out[name] = round(float(marks[b]) - float(marks[a]), 3)
    return out


def summarize_stages(all_marks: Iterable[Mapping[str, float]]) -> dict[str, dict[str, float]]:
    """Per interval: ``n``, ``p50``, ``p95`` and ``max`` seconds over the jobs that have it.

    ``raw_to_alerts`` also gets ``within_requirement``: the fraction within `REQUIREMENT`.
    """
    values: dict[str, list[float]] = {}
    for marks in all_marks:
        for name, sec in intervals_of(marks or {}).items():
            values.setdefault(name, []).append(sec)
    out = {}
    for name in INTERVALS:
        v = values.get(name)
        if not v:
            continue
        arr = np.asarray(v, float)
        out[name] = {"n": len(v), "p50": round(float(np.percentile(arr, 50)), 3),
                     "p95": round(float(np.percentile(arr, 95)), 3), "max": round(float(arr.max()), 3)}
        if name == "raw_to_alerts":
            out[name]["within_requirement"] = round(float((arr <= REQUIREMENT).mean()), 4)
    return out
