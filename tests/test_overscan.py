"""Tests of apbatch.job.steps.overscan: the serial overscan level of integer ADU rows."""

import numpy as np
import pytest
from apbatch.job.steps.overscan import overscan_rows
from scipy import ndimage

ROWS, COLS, READ_NOISE = 2048, 62, 4.0  # an LSSTCam-like overscan box, ADU


def _box(seed=1, offset=0.3, noise=READ_NOISE):
    """Integer overscan ADU of a slowly drifting level (truth returned) with read noise."""
    rng = np.random.default_rng(seed)
    level = 15000.0 + offset + 5.0 * np.sin(np.arange(ROWS) / 150.0)
    ovs = np.round(level[:, None] + rng.normal(0.0, noise, (ROWS, COLS))).astype(np.float32)
    return ovs, level


def _block_rms(err, rows=16):
    """Rms over blocks of ``rows`` rows of the mean error: what a PSF-sized source sees."""
    n = len(err) // rows
    return float(np.std(err[: n * rows].reshape(n, rows).mean(axis=1)))


def test_follows_the_drift_without_quantisation():
    ovs, level = _box()
    err = overscan_rows(ovs, 9) - level
    median_filtered = ndimage.median_filter(np.median(ovs, axis=1), size=9, mode="nearest") - level
    assert abs(float(np.mean(err))) < 0.05
    # read noise / sqrt(62 columns x 9 rows) = 0.17 ADU; a median of integers stays on one value
    assert np.std(err) == pytest.approx(READ_NOISE / np.sqrt(COLS * 9), rel=0.25)
    assert _block_rms(err) < 0.13
    assert _block_rms(err) < 0.7 * _block_rms(median_filtered)


def test_cosmic_ray_in_the_overscan_is_rejected():
    ovs, level = _box(seed=2)
    clean = overscan_rows(ovs, 1)
    hit = ovs.copy()
    hit[700, 10:13] += 4000.0  # a cosmic ray across three overscan columns
    out = overscan_rows(hit, 1)
    assert out[700] == pytest.approx(clean[700], abs=0.2)
    assert np.array_equal(np.delete(out, 700), np.delete(clean, 700))


def test_noise_free_rows_give_the_rounded_level():
    ovs, level = _box(noise=0.0)
    out = overscan_rows(ovs, 1)
    assert out.dtype == np.float32 and out.shape == (ROWS,)
    assert np.abs(out - level).max() <= 0.5 + 1e-3
