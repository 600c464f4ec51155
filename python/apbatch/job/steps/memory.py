"""Keep freed image buffers in the process instead of returning them to the kernel.

The steps allocate and free many CCD-sized (64-130 MB) temporaries. glibc serves each of
them with a fresh ``mmap`` and unmaps it on ``free``, so every one is page-faulted (and
zeroed by the kernel) again: on a 4k x 4k CCD that is 3-4 s of *system* CPU time per job,
a third of the pipeline. :func:`keep_freed_memory` tells glibc to serve large blocks from
the heap and not to trim it, so a freed buffer is reused by the next allocation of its size
with no page fault. Peak memory is unchanged (the same buffers are live at once); the
heap is returned to the kernel when the job's process exits.

Call it once at the start of a job process (``apbatch process-ccd``), never at import: it
changes the allocator of the whole process. The same effect, from outside the process, is
the environment ``MALLOC_MMAP_MAX_=0 MALLOC_TRIM_THRESHOLD_=<large>``.

Kept buffers still cost a page fault the first time: the first ISR, warp and subtraction of a
fresh process touch some 500 MB of new heap. :func:`warm_heap`, called while the job waits for
its raw, touches that much heap once and frees it, so those faults are paid before the raw.
"""

from __future__ import annotations

import ctypes
import ctypes.util
import logging

__all__ = ["keep_freed_memory", "warm_heap"]

log = logging.getLogger(__name__)

# mallopt(3) parameters (glibc malloc.h)
_M_TRIM_THRESHOLD = -1
_M_MMAP_MAX = -4
_M_ARENA_MAX = -8
_PAGE = 4096
_STATE = {"kept": False, "warmed": False}


def keep_freed_memory(trim_threshold: int = 2**31 - 1) -> bool:
    """Make glibc keep freed large blocks for reuse (no ``mmap`` per block, no heap trimming).

    Parameters
    ----------
    trim_threshold : `int`
        Free memory at the top of the heap (bytes) above which glibc may give it back to
        the kernel; the default (2 GiB) means "not during a job".

    Returns
    -------
    applied : `bool`
        `True` if the C library accepted both settings; `False` (with a debug log) where
        there is no glibc ``mallopt`` (musl, macOS): nothing is changed then.
    """
    name = ctypes.util.find_library("c")
    try:
        libc = ctypes.CDLL(name or "libc.so.6")
        mallopt = libc.mallopt
    except (OSError, AttributeError) as exc:
        log.debug("no mallopt in the C library (%s): allocator left as is", exc)
        return False
    mallopt.argtypes = [ctypes.c_int, ctypes.c_int]
    mallopt.restype = ctypes.c_int
    # one arena: the steps' worker threads allocate from the same (kept, warm) heap as the main one
    ok = (mallopt(_M_MMAP_MAX, 0) == 1 and mallopt(_M_TRIM_THRESHOLD, int(trim_threshold)) == 1
          and mallopt(_M_ARENA_MAX, 1) == 1)
    if not ok:
        log.debug("mallopt refused the settings: allocator left as is")
    _STATE["kept"] = ok
    return ok


def warm_heap(nbytes: int) -> bool:
    """Page-fault ``nbytes`` of heap now and free them for the steps to reuse, once per process.

    Only after :func:`keep_freed_memory` succeeded (otherwise the freed block would go back to
    the kernel at once) and only the first time (a process that runs several CCDs, a pilot,
    keeps its heap warm anyway: a second call could only grow it). ``nbytes`` should stay below
    what the steps allocate beyond the process's size at the call; even then the heap's layout
    changes (a LATISS job's peak rose by ~90 MB with 24 bytes a pixel).

    Returns
    -------
    warmed : `bool`
        Whether the heap was touched by this call.
    """
    if not _STATE["kept"] or _STATE["warmed"] or nbytes < _PAGE:
        return False
    import numpy as np

    block = np.empty(int(nbytes), np.uint8)
    block[::_PAGE] = 0  # one write per page faults it in; the free keeps it (no trim, no munmap)
    del block
    _STATE["warmed"] = True
    return True
