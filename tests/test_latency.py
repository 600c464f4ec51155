"""Tests of apbatch.latency: stage marks, intervals, p50/p95 summaries, the process start time."""

from __future__ import annotations

import subprocess
import sys
import time

import pytest
from apbatch.latency import INTERVALS, STAGES, StageClock, intervals_of, process_start_time, summarize_stages


def test_clock_marks_in_stage_order_and_refuses_unknown_stages():
    t = iter([5.0, 6.0])
    clock = StageClock(clock=lambda: next(t))
    clock.mark("prepared")
    clock.mark("started", 1.0)
    clock.mark("raw_read")
    assert clock.to_dict() == {"started": 1.0, "prepared": 5.0, "raw_read": 6.0}
    assert list(clock.to_dict()) == [s for s in STAGES if s in clock.marks]
    with pytest.raises(ValueError, match="unknown stage 'alert_sent'"):
        clock.mark("alert_sent")


def test_intervals_need_both_marks():
    marks = {"started": 0.0, "prepared": 8.0, "raw_available": 30.0, "raw_read": 30.4, "alerts_sent": 36.5}
    got = intervals_of(marks)
    assert got == {"prepare": 8.0, "raw_to_read": 0.4, "raw_to_alerts": 6.5}
    assert set(got) <= set(INTERVALS)


def test_summary_percentiles_and_the_requirement():
    rows = [{"raw_available": 0.0, "alerts_sent": float(s)} for s in range(1, 21)]  # 1..20 s
    rows.append({"raw_available": 0.0, "alerts_sent": 90.0})  # one late alert
    rows.append({"started": 0.0})  # a job that never got its raw: no interval, not counted
    s = summarize_stages(rows)
    r = s["raw_to_alerts"]
    assert r["n"] == 21 and r["p50"] == 11.0 and r["max"] == 90.0
    assert r["p95"] == pytest.approx(20.0)  # numpy's linear percentile over 21 values: index 19
    assert r["within_requirement"] == pytest.approx(20 / 21, abs=1e-4)
    assert "prepare" not in s and summarize_stages([]) == {}


def test_process_start_time_is_this_process_start():
    code = ("import time; t0 = time.time(); from apbatch.latency import process_start_time; "
            "print(t0 - process_start_time())")
    before = time.time()
    out = subprocess.run([sys.executable, "-c", code], capture_output=True, text=True, check=True).stdout
    lag = float(out)
    assert 0.0 <= lag < 5.0  # interpreter start-up before the first line, not zero and not the boot
    assert process_start_time() < before
