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
