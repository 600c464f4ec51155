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
import threading
from collections.abc import Callable, Iterable
from typing import Any

import numpy as np
from scipy import ndimage

__all__ = ["both", "for_each", "map_coordinates", "set_threads", "shutdown", "threads"]

_THREADS = 1
_POOL: concurrent.futures.ThreadPoolExecutor | None = None
_PREFIX = "apbatch-step"


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
        _POOL = concurrent.futures.ThreadPoolExecutor(_THREADS, thread_name_prefix=_PREFIX)
    return _POOL


def _serial() -> bool:
    """Whether calls here run serially: one thread, or already on one of the pool's threads
    (a nested call waiting for the pool it runs on could wait for ever)."""
    return _THREADS < 2 or threading.current_thread().name.startswith(_PREFIX)


def both[T, U](f: Callable[[], T], g: Callable[[], U]) -> tuple[T, U]:
    """``(f(), g())``, concurrently when there are two threads or more."""
    if _serial():
        return f(), g()
    fut = _pool().submit(g)
    a = f()
    return a, fut.result()


def map_coordinates(coef: np.ndarray, coords: np.ndarray, **kwargs: Any) -> np.ndarray:
    """`scipy.ndimage.map_coordinates` (float32 output) with the output split across the threads.

    ``coords`` is ``(2, ...)``; its second axis is split into one contiguous piece per thread.
    """
    n = coords.shape[1]
    if _serial() or n < 2 * _THREADS:
        return ndimage.map_coordinates(coef, coords, output=np.float32, **kwargs)
    out = np.empty(coords.shape[1:], np.float32)
    edges = np.linspace(0, n, _THREADS + 1).astype(int)

    def part(k: int) -> None:
        sl = slice(edges[k], edges[k + 1])
        ndimage.map_coordinates(coef, coords[:, sl], output=out[sl], **kwargs)

    list(_pool().map(part, range(_THREADS)))
    return out


def for_each[T](f: Callable[[T], None], items: Iterable[T]) -> None:
    """``f(item)`` for every item, spread over the threads (``f`` must write disjoint outputs).

    Items are taken in order as threads free up; the first exception raised is re-raised after
    every started call has ended. Serial with one thread or on a pool thread (`_serial`).
    """
    if _serial():
        for item in items:
            f(item)
        return
    futures = [_pool().submit(f, item) for item in items]
    concurrent.futures.wait(futures)
    for fut in futures:
        fut.result()
