"""Serial overscan level per row of an amplifier's raw segment (ISR step 3, :mod:`.isr`)."""

from __future__ import annotations

import numpy as np
from scipy import ndimage

__all__ = ["overscan_rows"]


def overscan_rows(ovs: np.ndarray, smooth: int, clip: float = 4.0) -> np.ndarray:
    """Serial overscan level of each row: clipped row means, then a running mean over ``smooth`` rows.

    Not the row median: the median of integer ADU is itself an integer (or a half), so it sits on
    one value for tens of rows, and its error (up to 0.5 ADU) is common to every pixel of those
    rows. At the PSF's scale in 2" seeing that added ~4% to the difference's noise variance. The
    mean of a row's pixels within ``clip`` robust sigmas of its median (cosmic rays and trails
    left out) is not quantised: on 62 columns of 4 ADU read noise, the error of a 16-row block
    is 0.11 ADU rms against 0.19-0.22 for a median filtered over 9 rows.

    Parameters
    ----------
    ovs : `numpy.ndarray`
        Overscan box (rows x columns), ADU.
    smooth : `int`
        Rows of the running mean (1: none).
    clip : `float`
        Rejection threshold, in robust sigmas of the whole box (at least 0.5 ADU).

    Returns
    -------
    row : `numpy.ndarray`
        float32 level per row, ADU.
    """
    med = np.median(ovs, axis=1, keepdims=True)
    dev = np.abs(ovs - med)
    sig = max(1.4826 * float(np.median(dev[::8])), 0.5)
    keep = dev <= clip * sig
    row = np.where(keep, ovs, 0).sum(axis=1) / np.maximum(keep.sum(axis=1), 1)
    if smooth > 1:
        row = ndimage.uniform_filter1d(row, size=smooth, mode="nearest")
    return row.astype(np.float32)
