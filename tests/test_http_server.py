"""Tests for apbatch.http_server: uvicorn in a thread on a socket bound first, errors naming the
config section whose address it is (OCPS or TAP)."""

import socket

import pytest
import requests
from apbatch.errors import BadInputError
from apbatch.http_server import ServerThread


async def hello(scope, receive, send):
    """The smallest ASGI app: 200 'hello' to any HTTP request."""
    if scope["type"] != "http":
        return
    await send({"type": "http.response.start", "status": 200, "headers": [(b"content-type", b"text/plain")]})
    await send({"type": "http.response.body", "body": b"hello"})


def test_serves_on_a_free_port_and_stops():
    server = ServerThread(hello, "127.0.0.1", 0, section="tap").start()
    try:
        assert server.url.startswith("http://127.0.0.1:") and not server.url.endswith(":0")
        with requests.Session() as s:  # keep-alive: the second request reuses the connection
            assert [s.get(server.url, timeout=10).text for _ in range(2)] == ["hello", "hello"]
    finally:
        server.stop()
    with pytest.raises(requests.ConnectionError):
        requests.get(server.url, timeout=5)


@pytest.mark.parametrize("section", ["ocps", "tap"])
def test_a_taken_port_names_the_section(section):
    with socket.socket() as taken:
        taken.bind(("127.0.0.1", 0))
        taken.listen()
        port = taken.getsockname()[1]
        with pytest.raises(BadInputError) as info:
            ServerThread(hello, "127.0.0.1", port, section=section).start()
    msg = str(info.value)
    assert msg.startswith(f"{section}.port: cannot listen on 127.0.0.1:{port}") and "\n" not in msg
    assert f"another {section}.host" in msg


def test_stop_on_signals_sets_the_event_on_sigterm_and_leaves_other_threads_alone():
    import os
    import signal
    import threading

    from apbatch.http_server import stop_on_signals

    saved = {s: signal.getsignal(s) for s in (signal.SIGTERM, signal.SIGINT)}
    try:
        given = threading.Event()
        assert stop_on_signals(given) is given and not given.is_set()
        os.kill(os.getpid(), signal.SIGTERM)
        assert given.wait(5)
        # from another thread no handler is installed (Python allows it only in the main thread)
        signal.signal(signal.SIGTERM, saved[signal.SIGTERM])
        made: list = []
        t = threading.Thread(target=lambda: made.append(stop_on_signals()))
        t.start()
        t.join(10)
        assert isinstance(made[0], threading.Event)
        assert signal.getsignal(signal.SIGTERM) is saved[signal.SIGTERM]
    finally:
        for s, h in saved.items():
            signal.signal(s, h)
