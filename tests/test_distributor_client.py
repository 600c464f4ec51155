"""Tests for apbatch.distributor.client on a local distributor directory.

Writers run in threads: one delivers late, one never delivers, one leaves a truncated or
corrupted file; nine readers wait at once, as the nine jobs of a ComCam visit do.
"""

import os
import threading
import time

import pytest
from apbatch.distributor.client import (
    DistributorClient,
    HttpDistributorClient,
    LocalDistributorClient,
    select_raws,
)
from apbatch.distributor.store import DistributorStore, group_key
from apbatch.errors import BadInputError, RawTimeoutError

GROUP = "2024-11-09T06:33:55.311"
DETS = [f"R22_S{i}{j}" for i in range(3) for j in range(3)]


def meta(seq=266, det="R22_S11", index=1, group=GROUP):
    return {
        "instrument": "LSSTComCam",
        "obs_id": f"CC_O_20241108_{seq:06d}",
        "detector_name": det,
        "detector": DETS.index(det),
        "group_id": group,
        "image_index": index,
        "images_in_sequence": 2,
    }


@pytest.fixture
def raw(tmp_path):
    p = tmp_path / "raw.fits"
    p.write_bytes(os.urandom(200_000))
    return p


@pytest.fixture
def store(tmp_path):
    return DistributorStore(tmp_path / "dist")


def later(delay, fn, *args, **kwargs):
    t = threading.Timer(delay, fn, args, kwargs)
    t.start()
    return t


def test_from_location(tmp_path):
    assert isinstance(DistributorClient.from_location(tmp_path), LocalDistributorClient)
    http = DistributorClient.from_location("http://127.0.0.1:9", cache_dir=tmp_path)
    assert isinstance(http, HttpDistributorClient) and http.base_url == "http://127.0.0.1:9"
    with pytest.raises(BadInputError, match="--distributor"):
        DistributorClient.from_location("s3://bucket/raws")


def test_bad_arguments(store):
    client = LocalDistributorClient(store.root)
    with pytest.raises(BadInputError, match="nimages"):
        client.wait_for_raws("LSSTComCam", GROUP, "R22_S11", 0, timeout=0.1)
    with pytest.raises(BadInputError, match="detector"):
        client.wait_for_raws("LSSTComCam", GROUP, "../R22_S11", 1, timeout=0.1)
    with pytest.raises(BadInputError, match="image name"):
        client.wait_for_raws("LSSTComCam", GROUP, "R22_S11", 1, image_names=["a/b"], timeout=0.1)


def test_already_there_returns_at_once(store, raw):
    entry = store.deliver(raw, meta())
    t0 = time.monotonic()
    paths = LocalDistributorClient(store.root).wait_for_raws("LSSTComCam", GROUP, "R22_S11", 1, timeout=5)
    assert paths == [entry.path] and time.monotonic() - t0 < 0.5


def test_delivery_time_is_the_distributors_not_the_readers(store, raw):
    """The raw -> alert latency starts when the distributor had the raw, not when the job looked."""
    entry = store.deliver(raw, meta())
    time.sleep(0.3)
    client = LocalDistributorClient(store.root)
    paths = client.wait_for_raws("LSSTComCam", GROUP, "R22_S11", 1, timeout=5)
    assert client.delivered_at(paths) == entry.delivered
    assert time.time() - client.delivered_at(paths) >= 0.3
    assert client.delivered_at([raw]) is None  # never returned by this client


def test_late_writer(store, raw):
    t0 = time.monotonic()
    later(0.6, store.deliver, raw, meta())
    paths = LocalDistributorClient(store.root).wait_for_raws("LSSTComCam", GROUP, "R22_S11", 1, timeout=10)
    elapsed = time.monotonic() - t0
    assert paths[0].read_bytes() == raw.read_bytes()
    assert 0.6 <= elapsed < 1.2  # returns within one poll interval (<= 0.2 s) of delivery


@pytest.mark.parametrize("timeout", [0.5, 2.0])
def test_writer_that_never_delivers_times_out_on_time(store, raw, timeout):
    store.deliver(raw, meta(det="R22_S10"))  # another CCD's raw must not satisfy this one
    t0 = time.monotonic()
    with pytest.raises(RawTimeoutError, match=r"R22_S11: 0 of 1 image\(s\) complete after"):
        LocalDistributorClient(store.root).wait_for_raws("LSSTComCam", GROUP, "R22_S11", 1, timeout=timeout)
    assert abs(time.monotonic() - t0 - timeout) < 0.25


def test_half_written_raw_without_sidecar_is_never_returned(store, raw):
    path = store.raw_path("LSSTComCam", GROUP, "CC_O_20241108_000266", "R22_S11")
    path.parent.mkdir(parents=True)
    path.write_bytes(raw.read_bytes()[:50_000])  # a writer that died mid-file, non-atomically
    with pytest.raises(RawTimeoutError):
        LocalDistributorClient(store.root).wait_for_raws("LSSTComCam", GROUP, "R22_S11", 1, timeout=0.5)


def test_truncated_raw_is_never_returned(store, raw):
    entry = store.deliver(raw, meta())
    with open(entry.path, "r+b") as f:
        f.truncate(entry.size // 2)
    with pytest.raises(RawTimeoutError):
        LocalDistributorClient(store.root).wait_for_raws("LSSTComCam", GROUP, "R22_S11", 1, timeout=0.5)
    # ... until a complete copy is delivered again
    later(0.3, store.deliver, raw, meta())
    paths = LocalDistributorClient(store.root).wait_for_raws("LSSTComCam", GROUP, "R22_S11", 1, timeout=5)
    assert paths[0].stat().st_size == entry.size


def test_corrupted_raw_fails_checksum(store, raw):
    entry = store.deliver(raw, meta())
    data = bytearray(entry.path.read_bytes())
    data[-1] ^= 0x01
    entry.path.write_bytes(bytes(data))
    with pytest.raises(RawTimeoutError):
        LocalDistributorClient(store.root).wait_for_raws("LSSTComCam", GROUP, "R22_S11", 1, timeout=0.5)
    # size-only checking accepts it: the checksum is what caught it
    fast = LocalDistributorClient(store.root, verify_checksum=False)
    assert fast.wait_for_raws("LSSTComCam", GROUP, "R22_S11", 1, timeout=0.5) == [entry.path]


def test_two_snaps_in_order_and_partial(store, raw):
    client = LocalDistributorClient(store.root)
    store.deliver(raw, meta(seq=267, index=2))
    with pytest.raises(RawTimeoutError, match="0 of 1"):
        # the first snap is named but has not arrived
        client.wait_for_raws(
            "LSSTComCam", GROUP, "R22_S11", image_names=["CC_O_20241108_000266"], timeout=0.3
        )
    t0 = time.monotonic()
    part = client.wait_for_raws("LSSTComCam", GROUP, "R22_S11", 2, timeout=0.5, allow_partial=True)
    assert [p.name for p in part] == ["CC_O_20241108_000267_R22_S11.fits"]
    assert abs(time.monotonic() - t0 - 0.5) < 0.25
    store.deliver(raw, meta(seq=266, index=1))
    both = client.wait_for_raws("LSSTComCam", GROUP, "R22_S11", 2, timeout=1)
    assert [p.name[:20] for p in both] == ["CC_O_20241108_000266", "CC_O_20241108_000267"]


def test_on_ready_gets_each_early_raw_once(store, raw):
    """The first snap is handed over while the second is awaited; the last one only returned."""
    client = LocalDistributorClient(store.root)
    store.deliver(raw, meta(seq=266, index=1))
    seen = []
    later(0.4, store.deliver, raw, meta(seq=267, index=2))
    paths = client.wait_for_raws("LSSTComCam", GROUP, "R22_S11", 2, timeout=5, on_ready=seen.append)
    assert [p.name[:20] for p in paths] == ["CC_O_20241108_000266", "CC_O_20241108_000267"]
    assert seen == paths[:1]
    # all there at the first look (a rerun): nothing early
    seen.clear()
    assert client.wait_for_raws("LSSTComCam", GROUP, "R22_S11", 2, timeout=1, on_ready=seen.append) == paths
    assert seen == []


def test_on_ready_error_ends_the_wait(store, raw):
    store.deliver(raw, meta(seq=266, index=1))

    def bad(path):
        raise BadInputError("raw", "is from another detector", "check the distributor")

    t0 = time.monotonic()
    with pytest.raises(BadInputError, match="another detector"):
        LocalDistributorClient(store.root).wait_for_raws("LSSTComCam", GROUP, "R22_S11", 2, timeout=5,
                                                        on_ready=bad)
    assert time.monotonic() - t0 < 1


def test_partial_with_nothing_still_raises(store):
    with pytest.raises(RawTimeoutError, match="0 of 2"):
        LocalDistributorClient(store.root).wait_for_raws(
            "LSSTComCam", GROUP, "R22_S11", 2, timeout=0.3, allow_partial=True
        )


def test_named_image_found_under_another_group(store, raw):
    """A job told the image name finds it even if the camera wrote a different GROUPID."""
    store.deliver(raw, meta(group="2024-11-09T06:33:55.311#1"))
    paths = LocalDistributorClient(store.root).wait_for_raws(
        "LSSTComCam", GROUP, "R22_S11", image_names=["CC_O_20241108_000266"], timeout=1
    )
    assert paths[0].parent.name == group_key("2024-11-09T06:33:55.311#1")


def test_select_raws():
    class E:
        def __init__(self, obs_id):
            self.obs_id = obs_id

    es = [E("a"), E("b"), E("c")]
    assert [e.obs_id for e in select_raws(es, 2)] == ["a", "b"]
    assert [e.obs_id for e in select_raws(es, 1, ["c", "a", "z"])] == ["c", "a"]


def test_nine_concurrent_readers(store, raw):
    client = LocalDistributorClient(store.root)
    results, errors = {}, []

    def reader(det):
        try:
            results[det] = (client.wait_for_raws("LSSTComCam", GROUP, det, 1, timeout=10), time.monotonic())
        except Exception as exc:  # collected and asserted below
            errors.append(exc)

    threads = [threading.Thread(target=reader, args=(d,)) for d in DETS]
    for t in threads:
        t.start()
    time.sleep(0.3)
    delivered = {}
    for det in DETS:
        store.deliver(raw, meta(det=det))
        delivered[det] = time.monotonic()
    for t in threads:
        t.join(15)
    assert not errors
    assert sorted(results) == sorted(DETS)
    for det, (paths, t_ret) in results.items():
        assert paths[0].name == f"CC_O_20241108_000266_{det}.fits"
        assert 0 <= t_ret - delivered[det] < 1.0


def test_http_client_removes_only_the_download_dir_it_made(tmp_path):
    """A client without cache_dir makes a temporary one: close() (or the with block) removes it,
    raws included; a cache_dir it was given is never removed; closing twice is harmless."""
    made = HttpDistributorClient("http://127.0.0.1:9")
    (made.cache_dir / "LSSTComCam").mkdir()
    (made.cache_dir / "LSSTComCam" / "raw.fits").write_bytes(b"x")
    made.close()
    assert not made.cache_dir.exists()
    made.close()
    given = tmp_path / "cache"
    given.mkdir()
    with DistributorClient.from_location("http://127.0.0.1:9", cache_dir=given) as client:
        (client.cache_dir / "raw.fits").write_bytes(b"x")
    assert (given / "raw.fits").exists()
    with DistributorClient.from_location("http://127.0.0.1:9") as client:
        own = client.cache_dir
        assert own.is_dir()
    assert not own.exists()
    LocalDistributorClient(tmp_path).close()  # nothing to remove; the directory stays
    assert tmp_path.is_dir()


def test_http_client_dir_goes_when_the_client_is_collected():
    import gc

    client = HttpDistributorClient("http://127.0.0.1:9")
    path = client.cache_dir
    del client
    gc.collect()
    assert not path.exists()
