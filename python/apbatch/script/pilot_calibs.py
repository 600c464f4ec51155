"""A warm pilot's calibration cache, kept out of the pilot's memory (`apbatch.script.pilot`).

Why not keep the calibrations read: a per-CCD job drops its bias and flat once ISR is done,
before the warp and the subtraction, where its memory peaks. A pilot that kept them in memory
held them through that peak too: on LATISS (a bias and the flats of two filters, 279 MiB as
read) its peak RSS was 250-300 MiB above a per-CCD job's, over the 1.5 GB target.

What is kept instead: the planes of each calibration as it was read (decompressed, variance
dropped, `apbatch.butler.io.ButlerIO.read_calib`) in raw files of a private temporary directory,
and the rest (WCS, metadata) in memory. A hit reads each plane back into a new array: 0.03-0.05 s
of CPU for 186 MiB from the page cache, against ~1.1 s to read and decompress the FITS files
again (LATISS), and the CCD gets arrays of its own, which it may change (nothing is shared
between CCDs) and frees after ISR exactly as a per-CCD job does; the new arrays reuse heap the
pilot already holds (`apbatch.job.steps.memory`). (Mapping the files instead was tried: the
mapped pages came on top of that heap, and the peak grew by ~300 MiB in 5 CCDs.) The files live
in the page cache, which the kernel may reclaim (a hit then reads the local disk); they are bounded by
``backend.calib_cache`` calibrations and ``backend.calib_cache_mib`` MiB, least recently used
first, and removed when the pilot ends (or the cache is closed).

Lifetime: one pilot; not thread-safe.
"""

from __future__ import annotations

import collections
import copy
import logging
import shutil
import tempfile
import uuid
import weakref
from pathlib import Path
from typing import Any

import numpy as np

__all__ = ["SpilledCalibCache"]

log = logging.getLogger(__name__)

_PLANES = ("image", "mask", "variance")
_MIN_SPILL = 1 << 16
"""Planes smaller than this (bytes) stay in memory with the rest of the object."""


def _views(obj: Any) -> dict[int, Any]:
    """A `copy.deepcopy` memo that shares ``obj``'s planes still in it (zero-strided views)."""
    return {id(a): a for n in _PLANES if isinstance(a := getattr(obj, n, None), np.ndarray)}


class SpilledCalibCache:
    """Calibrations by dataset id, their pixel planes in files (see the module docstring).

    Parameters
    ----------
    size : `int`
        Calibrations kept at most (0: none).
    budget_mib : `float`
        Bytes of plane files kept at most, MiB; a calibration larger than this is not kept.
    directory : `str`, optional
        Where the private directory is made (default: the system's temporary directory).
    """

    def __init__(self, size: int, budget_mib: float, directory: str | None = None):
        self.size, self.budget = size, int(budget_mib * (1 << 20))
        self._dir: Path | None = None
        self._cleanup: weakref.finalize | None = None
        self._where = directory
        self._entries: collections.OrderedDict[Any, tuple[Any, dict[str, tuple[Path, Any, tuple]], int]] = \
            collections.OrderedDict()
        self.nbytes = 0

    def __len__(self) -> int:
        return len(self._entries)

    def get(self, key: Any) -> Any | None:
        """A new copy of the calibration kept under ``key``, or `None` if none is (or its files went)."""
        entry = self._entries.get(key)
        if entry is None:
            return None
        skeleton, planes, _ = entry
        # the big arrays are out of it (WCS and metadata are small); a zero-strided view (the
        # variance of zeros) is shared, read-only, as read_calib made it: a deep copy would
        # make it a full array
        calib = copy.deepcopy(skeleton, _views(skeleton))
        try:
            for name, (path, dtype, shape) in planes.items():
                arr = np.empty(shape, dtype=dtype)
                with open(path, "rb") as f:
                    if f.readinto(memoryview(arr).cast("B")) != arr.nbytes:
                        raise OSError(f"{path}: short read")
                setattr(calib, name, arr)
        except OSError as exc:  # removed behind our back (a tmp cleaner): read it again
            log.warning("calibration cache: %s; reading the calibration again", exc)
            self._drop(key)
            return None
        self._entries.move_to_end(key)
        return calib

    def put(self, key: Any, calib: Any) -> None:
        """Keep ``calib`` (its large planes written to files); the caller keeps using ``calib``."""
        if self.size <= 0 or key in self._entries:
            return
        big = {n: a for n in _PLANES if isinstance(a := getattr(calib, n, None), np.ndarray)
               and a.nbytes >= _MIN_SPILL and 0 not in a.strides}  # a zero-strided view holds no memory
        nbytes = sum(a.nbytes for a in big.values())
        if nbytes > self.budget:
            return
        while self._entries and (len(self._entries) >= self.size or self.nbytes + nbytes > self.budget):
            self._drop(next(iter(self._entries)))
        skeleton = copy.copy(calib)
        planes: dict[str, tuple[Path, Any, tuple]] = {}
        try:
            for name, arr in big.items():
                path = self._directory() / f"{uuid.uuid4().hex}.{name}"
                np.ascontiguousarray(arr).tofile(path)
                planes[name] = (path, arr.dtype, arr.shape)
                setattr(skeleton, name, None)
        except OSError as exc:  # a full disk costs the cache, never the CCD
            log.warning("calibration cache: cannot keep a calibration: %s", exc)
            for path, _, _ in planes.values():
                path.unlink(missing_ok=True)
            return
        # independent of ``calib``, which the CCD that read it may still change (its metadata)
        self._entries[key] = (copy.deepcopy(skeleton, _views(skeleton)), planes, nbytes)
        self.nbytes += nbytes

    def close(self) -> None:
        """Forget every calibration and remove the directory."""
        self._entries.clear()
        self.nbytes = 0
        if self._cleanup is not None:
            self._cleanup()
        self._dir = self._cleanup = None

    def _directory(self) -> Path:
        if self._dir is None:
            self._dir = Path(tempfile.mkdtemp(prefix="apbatch-pilot-calibs-", dir=self._where))
            self._cleanup = weakref.finalize(self, shutil.rmtree, self._dir, True)
        return self._dir

    def _drop(self, key: Any) -> None:
        _, planes, nbytes = self._entries.pop(key)
        self.nbytes -= nbytes
        for path, _, _ in planes.values():
            path.unlink(missing_ok=True)
