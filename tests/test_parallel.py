"""Tests of apbatch.job.steps.parallel: the same results with one thread or two, and real concurrency."""

from __future__ import annotations

import threading
import time

import numpy as np
import pytest
from apbatch.job.steps import parallel
from apbatch.job.steps.dia_detect import filtered_snr
from scipy import ndimage


@pytest.fixture
def two_threads():
    parallel.set_threads(2)
    yield
    parallel.set_threads(1)


def test_map_coordinates_is_identical_with_two_threads(two_threads):
    rng = np.random.default_rng(1)
    coef = rng.normal(size=(300, 280)).astype(np.float32)
    coords = (rng.uniform(5, 270, size=(2, 211, 190))).astype(np.float32)
    kw = {"order": 3, "mode": "mirror", "prefilter": False}
    want = ndimage.map_coordinates(coef, coords, output=np.float32, **kw)
    assert np.array_equal(parallel.map_coordinates(coef, coords, **kw), want)
    flat = coords.reshape(2, -1)  # the warp's partial-coverage form
    assert np.array_equal(parallel.map_coordinates(coef, flat, **kw), want.ravel())


def test_filtered_snr_is_identical_with_two_threads():
    rng = np.random.default_rng(2)
    img = rng.normal(size=(256, 240)).astype(np.float32)
    var = np.ones_like(img)
    zero = np.zeros(img.shape, bool)
    zero[:10] = True
    one = filtered_snr(img, var, zero, 1.7)
    parallel.set_threads(2)
    try:
        two = filtered_snr(img, var, zero, 1.7)
    finally:
        parallel.set_threads(1)
    assert np.array_equal(one[0], two[0]) and one[1:] == two[1:]


def test_both_runs_concurrently_and_returns_in_order(two_threads):
    started = threading.Event()

    def first():
        assert started.wait(5), "the second callable never started while the first ran"
        return "f"

    def second():
        started.set()
        return "g"

    assert parallel.both(first, second) == ("f", "g")


def test_one_thread_is_serial_and_threads_are_at_least_one():
    parallel.set_threads(0)
    assert parallel.threads() == 1
    order = []
    parallel.both(lambda: order.append(1), lambda: order.append(2))
    assert order == [1, 2]


def test_ndimage_releases_the_gil_so_two_threads_use_two_cores(two_threads):
    """The reason this module exists: a pure-Python thread keeps running during a resampling."""
    coef = np.random.default_rng(3).normal(size=(1500, 1500)).astype(np.float32)
    coords = np.stack(np.mgrid[0:1400, 0:1400].astype(np.float32)) + np.float32(20.3)
    ticks = [0]
    stop = threading.Event()

    def spin():
        while not stop.is_set():
            ticks[0] += 1

    th = threading.Thread(target=spin)
    th.start()
    try:
        time.sleep(0.05)
        before = ticks[0]
        ndimage.map_coordinates(coef, coords, order=3, output=np.float32)
        during = ticks[0] - before
    finally:
        stop.set()
        th.join()
    assert during > 1000  # with the GIL held it could not have run at all


def test_shutdown_leaves_no_worker_thread(two_threads):
    parallel.both(lambda: 1, lambda: 2)
    assert any(t.name.startswith("apbatch-step") for t in threading.enumerate())
    parallel.shutdown()
    assert not any(t.name.startswith("apbatch-step") for t in threading.enumerate())
    assert parallel.both(lambda: 1, lambda: 2) == (1, 2)  # started again on demand
    parallel.shutdown()


def test_for_each_spreads_items_and_nested_calls_run_serially(two_threads):
    """Items run on the pool; a parallel call made on a pool thread runs in place (a nested call
    that waited for the pool it occupies could wait for ever with two threads)."""
    seen: dict[int, str] = {}
    coef = np.arange(400, dtype=np.float32).reshape(20, 20)
    coords = np.full((2, 6, 4), 3.5, np.float32)

    def item(k: int) -> None:
        a, b = parallel.both(lambda: k, lambda: -k)  # nested: must not deadlock
        seen[k] = threading.current_thread().name
        assert (a, b) == (k, -k)
        assert parallel.map_coordinates(coef, coords, order=1).shape == (6, 4)

    parallel.for_each(item, range(8))
    assert sorted(seen) == list(range(8))
    assert all(name.startswith("apbatch-step") for name in seen.values())


def test_for_each_reraises_after_every_item_ended(two_threads):
    done = []

    def item(k: int) -> None:
        if k == 0:
            raise ValueError("item 0")
        time.sleep(0.05)
        done.append(k)

    with pytest.raises(ValueError, match="item 0"):
        parallel.for_each(item, range(4))
    assert sorted(done) == [1, 2, 3]


def test_for_each_with_one_thread_is_a_loop():
    order: list[int] = []
    parallel.for_each(order.append, range(5))
    assert order == [0, 1, 2, 3, 4]
