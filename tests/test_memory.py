"""Tests of apbatch.job.steps.memory (run in a child process: the setting is process-wide)."""

import subprocess
import sys

import pytest

CHILD = """
import resource, sys
import numpy as np
from apbatch.job.steps.memory import keep_freed_memory
if sys.argv[1] == "tuned":
    assert keep_freed_memory() is True
def faults():
    return resource.getrusage(resource.RUSAGE_SELF).ru_minflt
a = np.ones((4000, 4000), np.float32)  # 64 MB, first touch: faults either way
del a
f0 = faults()
b = np.ones((4000, 4000), np.float32)  # reuses the freed block only when tuned
print(faults() - f0, float(b.sum()))
"""


def _refaults(mode: str) -> tuple[int, float]:
    out = subprocess.run([sys.executable, "-c", CHILD, mode], capture_output=True, text=True, check=True)
    n, total = out.stdout.split()
    return int(n), float(total)


@pytest.mark.skipif(not sys.platform.startswith("linux"), reason="glibc mallopt")
def test_freed_buffer_is_reused_without_page_faults():
    tuned, total = _refaults("tuned")
    default, _ = _refaults("default")
    assert total == 16e6  # the reused memory holds what was written, nothing stale
    assert tuned < 100  # 64 MB is >= 16000 4-kB pages (or 32 huge pages) when faulted again
    assert default > tuned


WARM = """
import resource, sys, threading
import numpy as np
from apbatch.job.steps import memory
def faults():
    return resource.getrusage(resource.RUSAGE_SELF).ru_minflt
if sys.argv[1] == "tuned":
    assert memory.keep_freed_memory() is True
first = memory.warm_heap(200_000_000)
again = memory.warm_heap(200_000_000)
f0 = faults()
out = {}
def work():  # a worker thread's buffer: the steps' threads allocate from the warmed heap too
    out["t"] = np.ones((4000, 4000), np.float32)
t = threading.Thread(target=work)
t.start(); t.join()
b = np.ones((4000, 4000), np.float32)
print(first, again, faults() - f0, float(b.sum() + out["t"].sum()))
"""


def _warm(mode: str) -> tuple[str, str, int, float]:
    out = subprocess.run([sys.executable, "-c", WARM, mode], capture_output=True, text=True, check=True)
    first, again, n, total = out.stdout.split()
    return first, again, int(n), float(total)


@pytest.mark.skipif(not sys.platform.startswith("linux"), reason="glibc mallopt")
def test_warm_heap_pays_the_first_touch_before_the_raw():
    first, again, tuned, total = _warm("tuned")
    assert (first, again) == ("True", "False")  # once per process: a pilot's heap stays warm
    assert total == 32e6
    # two 64 MB first allocations (main thread and a worker), served by the warmed heap
    assert tuned < 200
    first, again, default, _ = _warm("default")
    assert (first, again) == ("False", "False")  # the allocator keeps nothing: no point
    assert default > 10 * max(tuned, 1)
