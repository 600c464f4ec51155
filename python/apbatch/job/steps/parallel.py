"""Threads inside one job, for the steps between the raw and the alert.

The heavy calls on that path (``scipy.ndimage`` resampling and filters, ``scipy.fft``) run in
C without Python's global interpreter lock, so two threads really use two cores. A job
uses ``job.threads`` of them (set once per process by `set_threads`, like
``OMP_NUM_THREADS``): the latency target counts from a raw arriving when a core is free, and
a lone job would otherwise leave the machine's second core idle for the whole critical path.
With one thread every function here is the plain serial call, and the results are the same
bit for bit either way (work is split into independent pieces, never reduced across threads).
"""

from __future__ import annotations

import concurrent.futures
from collections.abc import Callable
from typing import Any

import numpy as np
from scipy import ndimage

__all__ = ["both", "map_coordinates", "set_threads", "shutdown", "threads"]

_THREADS = 1
_POOL: concurrent.futures.ThreadPoolExecutor | None = None


def set_threads(n: int) -> None:
    """Use ``n`` threads (>= 1) in this process from now on."""
    global _THREADS, _POOL
    n = max(int(n), 1)
    if n != _THREADS and _POOL is not None:
        _POOL.shutdown(wait=True)
        _POOL = None
    _THREADS = n


def shutdown() -> None:
    """Stop the worker threads (the next parallel call starts them again).

    A job calls it when it ends: a process that forks later (a test's, the daemon's) should have
    no idle threads left, as ``fork()`` copies none of them and warns.
    """
    global _POOL
    if _POOL is not None:
        _POOL.shutdown(wait=True)
        _POOL = None


def threads() -> int:
    """How many threads the steps may use (``workers=`` of ``scipy.fft``)."""
    return _THREADS


def _pool() -> concurrent.futures.ThreadPoolExecutor:
    global _POOL
    if _POOL is None:
        _POOL = concurrent.futures.ThreadPoolExecutor(_THREADS, thread_name_prefix="apbatch-step")
    return _POOL


def both[T, U](f: Callable[[], T], g: Callable[[], U]) -> tuple[T, U]:
    """``(f(), g())``, concurrently when there are two threads or more."""
    if _THREADS < 2:
        return f(), g()
    fut = _pool().submit(g)
    a = f()
    return a, fut.result()


def map_coordinates(coef: np.ndarray, coords: np.ndarray, **kwargs: Any) -> np.ndarray:
    """`scipy.ndimage.map_coordinates` (float32 output) with the output split across the threads.

    ``coords`` is ``(2, ...)``; its second axis is split into one contiguous piece per thread.
    """
    n = coords.shape[1]
    if _THREADS < 2 or n < 2 * _THREADS:
        return ndimage.map_coordinates(coef, coords, output=np.float32, **kwargs)
    out = np.empty(coords.shape[1:], np.float32)
    edges = np.linspace(0, n, _THREADS + 1).astype(int)

    def part(k: int) -> None:
        sl = slice(edges[k], edges[k + 1])
        ndimage.map_coordinates(coef, coords[:, sl], output=out[sl], **kwargs)

    list(_pool().map(part, range(_THREADS)))
    return out
