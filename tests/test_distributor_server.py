"""Tests for apbatch.distributor.server and the HTTP client, on loopback with an ephemeral port."""

import json
import os
import threading
import time
import urllib.error
import urllib.request

import pytest
from apbatch.distributor.client import DistributorClient
from apbatch.distributor.server import make_server
from apbatch.distributor.store import DistributorStore
from apbatch.errors import BadInputError, RawTimeoutError

GROUP = "2024-11-09T06:33:55.311#1"
DETS = [f"R22_S{i}{j}" for i in range(3) for j in range(3)]


def meta(seq=266, det="R22_S11", index=1):
    return {
        "instrument": "LSSTComCam",
        "obs_id": f"CC_O_20241108_{seq:06d}",
        "detector_name": det,
        "detector": DETS.index(det),
        "group_id": GROUP,
        "image_index": index,
        "images_in_sequence": 1,
    }


@pytest.fixture
def raw(tmp_path):
    p = tmp_path / "raw.fits"
    p.write_bytes(os.urandom(3_000_000))
    return p


@pytest.fixture
def store(tmp_path):
    (tmp_path / "dist").mkdir()
    return DistributorStore(tmp_path / "dist")


@pytest.fixture
def server(store):
    srv = make_server(store.root, "127.0.0.1", 0).start()
    yield srv
    srv.stop()


@pytest.fixture
def client(server, tmp_path):
    return DistributorClient.from_location(server.url, cache_dir=tmp_path / "cache")


def get(url):
    with urllib.request.urlopen(url, timeout=10) as r:
        return r.status, dict(r.headers), r.read()


def test_listens_on_loopback_only(server):
    assert server.server_address[0] == "127.0.0.1" and server.server_address[1] > 0
    status, _, body = get(server.url + "/health")
    assert status == 200 and json.loads(body) == {"status": "ok"}


def test_make_server_bad_input(tmp_path, server):
    with pytest.raises(BadInputError, match="--root"):
        make_server(tmp_path / "missing")
    with pytest.raises(BadInputError, match="--port"):
        make_server(tmp_path, "127.0.0.1", server.server_address[1])


def test_listing_and_file_endpoints(server, store, raw):
    entry = store.deliver(raw, meta())
    status, _, body = get(f"{server.url}/raw/LSSTComCam/2024-11-09T06%3A33%3A55.311%231/R22_S11?n=1&wait=0")
    listing = json.loads(body)
    assert listing["complete"] and listing["raws"][0]["file"] == entry.path.name
    status, headers, data = get(f"{server.url}/file/LSSTComCam/{entry.path.parent.name}/{entry.path.name}")
    assert data == raw.read_bytes()
    assert int(headers["Content-Length"]) == entry.size and headers["X-Checksum-SHA256"] == entry.sha256


@pytest.mark.parametrize(
    "path, code",
    [
        ("/file/LSSTComCam/..%2F..%2Fetc/passwd.fits", 400),
        ("/file/LSSTComCam/g/x.json", 400),
        ("/file/LSSTComCam/g/missing.fits", 404),
        ("/raw/LSSTComCam/g/R22_S11?n=x", 400),
        ("/nothing", 404),
    ],
)
def test_bad_requests(server, path, code):
    with pytest.raises(urllib.error.HTTPError) as info:
        get(server.url + path)
    assert info.value.code == code and "error" in json.loads(info.value.read())


@pytest.mark.parametrize(("query", "field"), [
    ("n=1&wait=nan", "wait"),  # would escape the 60 s cap: no comparison with NaN is ever true
    ("n=1&wait=-inf", "wait"),
    ("n=1&wait=inf", "wait"),
    ("n=1&wait=-1", "wait"),
    ("n=-5&wait=0", "n"),
    ("n=0&wait=0", "n"),
    ("n=1.5&wait=0", "n"),
])
def test_long_poll_arguments_are_checked_before_waiting(server, query, field):
    start = time.monotonic()
    with pytest.raises(urllib.error.HTTPError) as info:
        get(f"{server.url}/raw/LSSTComCam/g/R22_S11?{query}")
    assert info.value.code == 400 and time.monotonic() - start < 5
    assert json.loads(info.value.read())["error"].startswith(f"{field}: ")


def test_long_poll_answers_when_raw_arrives(server, store, raw):
    threading.Timer(0.5, store.deliver, (raw, meta())).start()
    t0 = time.monotonic()
    _, _, body = get(f"{server.url}/raw/LSSTComCam/{GROUP.replace('#', '%23')}/R22_S11?n=1&wait=5")
    assert json.loads(body)["complete"] and 0.5 <= time.monotonic() - t0 < 1.0


def test_late_writer_over_http(client, store, raw):
    t0 = time.monotonic()
    threading.Timer(0.5, store.deliver, (raw, meta())).start()
    paths = client.wait_for_raws("LSSTComCam", GROUP, "R22_S11", 1, timeout=10)
    assert paths[0].read_bytes() == raw.read_bytes()
    assert paths[0].is_relative_to(client.cache_dir)
    assert 0.5 <= time.monotonic() - t0 < 1.5
    # when the distributor had it (its sidecar's time), as the job's raw -> alert latency counts
    (entry,) = store.list_group("LSSTComCam", GROUP, "R22_S11")
    assert client.delivered_at(paths) == entry.delivered


def test_on_ready_over_http_gets_the_first_snap_early(client, store, raw):
    store.deliver(raw, meta(seq=266, index=1))
    seen = []
    threading.Timer(0.6, store.deliver, (raw, meta(seq=267, index=2))).start()
    t0 = time.monotonic()
    paths = client.wait_for_raws("LSSTComCam", GROUP, "R22_S11", 2, timeout=10,
                                 on_ready=lambda p: seen.append((p, time.monotonic() - t0)))
    assert [p.name[:20] for p in paths] == ["CC_O_20241108_000266", "CC_O_20241108_000267"]
    assert [p for p, _ in seen] == paths[:1] and seen[0][1] < 0.5  # before the second was delivered
    assert paths[0].read_bytes() == raw.read_bytes() and paths[1].read_bytes() == raw.read_bytes()


def test_timeout_over_http_is_on_time(client):
    t0 = time.monotonic()
    with pytest.raises(RawTimeoutError, match="0 of 1"):
        client.wait_for_raws("LSSTComCam", GROUP, "R22_S11", 1, timeout=1.5)
    assert abs(time.monotonic() - t0 - 1.5) < 0.3


def test_timeout_when_server_is_down(tmp_path):
    client = DistributorClient.from_location("http://127.0.0.1:9", cache_dir=tmp_path)  # discard port
    t0 = time.monotonic()
    with pytest.raises(RawTimeoutError):
        client.wait_for_raws("LSSTComCam", GROUP, "R22_S11", 1, timeout=1.0)
    assert abs(time.monotonic() - t0 - 1.0) < 0.5


def test_truncated_raw_never_returned_over_http(client, store, raw):
    entry = store.deliver(raw, meta())
    with open(entry.path, "r+b") as f:
        f.truncate(1000)
    with pytest.raises(RawTimeoutError):
        client.wait_for_raws("LSSTComCam", GROUP, "R22_S11", 1, timeout=0.6)
    assert not any(client.cache_dir.rglob("*.fits"))


def test_corrupted_raw_rejected_by_client_checksum(client, store, raw):
    entry = store.deliver(raw, meta())
    data = bytearray(entry.path.read_bytes())
    data[0] ^= 0xFF
    entry.path.write_bytes(bytes(data))  # same size: only the SHA-256 can tell
    with pytest.raises(RawTimeoutError):
        client.wait_for_raws("LSSTComCam", GROUP, "R22_S11", 1, timeout=0.6)
    assert not any(client.cache_dir.rglob("*.fits"))


def test_partial_over_http(client, store, raw):
    store.deliver(raw, meta(seq=267, index=2))
    paths = client.wait_for_raws("LSSTComCam", GROUP, "R22_S11", 2, timeout=0.5, allow_partial=True)
    assert [p.name for p in paths] == ["CC_O_20241108_000267_R22_S11.fits"]


def test_nine_concurrent_http_readers(client, store, raw):
    results, errors = {}, []

    def reader(det):
        try:
            results[det] = client.wait_for_raws("LSSTComCam", GROUP, det, 1, timeout=15)
        except Exception as exc:  # asserted below
            errors.append(exc)

    threads = [threading.Thread(target=reader, args=(d,)) for d in DETS]
    for t in threads:
        t.start()
    time.sleep(0.3)
    for det in DETS:
        store.deliver(raw, meta(det=det))
    for t in threads:
        t.join(20)
    assert not errors and sorted(results) == sorted(DETS)
    for det, paths in results.items():
        assert paths[0].name.endswith(f"_{det}.fits") and paths[0].read_bytes() == raw.read_bytes()


def test_cli_serve_command(store, raw):
    from apbatch.script.distributor import serve

    ready, stop = threading.Event(), threading.Event()
    th = threading.Thread(target=serve, args=(store.root,), kwargs={"port": 0, "ready": ready, "stop": stop})
    th.start()
    try:
        assert ready.wait(5)
    finally:
        stop.set()
        th.join(5)
    assert not th.is_alive()


def test_cli_serve_rejects_missing_root(tmp_path):
    from apbatch.cli import cli
    from click.testing import CliRunner

    result = CliRunner().invoke(
        cli, ["distributor", "serve", "--root", str(tmp_path / "nope"), "--port", "0"]
    )
    assert result.exit_code != 0 and isinstance(result.exception, BadInputError)
