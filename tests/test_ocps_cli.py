"""Tests for apbatch.script.ocps and the ``apbatch ocps`` commands: serve, token rules, the submit client."""

import os
import threading
import time
import types

import httpx
import pytest
from apbatch.errors import BadInputError, NonRetriableError, RetriableError
from apbatch.ocps.model import Phase
from apbatch.script import ocps as script
from ocps_fake import FakeService, data_id

TOKEN_ENV = "APBATCH_OCPS_TOKEN_TEST"


def ocps_config(root, **kw):
    fields = {"host": "127.0.0.1", "port": 0, "mode": "async", "token_env": TOKEN_ENV, "token_file": None,
              "execution_duration": 3600.0, **kw}
    return types.SimpleNamespace(root=str(root), ocps=types.SimpleNamespace(**fields))


@pytest.fixture
def served(tmp_path, capsys):
    """served(service, environ={}, **ocps) -> URL of script.serve(...) running in a thread."""
    running = []

    def start(service, environ=None, **ocps):
        ready, stop = threading.Event(), threading.Event()
        errors = []

        def run():
            try:
                script.serve(ocps_config(tmp_path, **ocps), service=service, environ=environ or {},
                             ready=ready, stop=stop)
            except Exception as exc:  # reported by the test below
                errors.append(exc)
                ready.set()

        thread = threading.Thread(target=run)
        thread.start()
        running.append((stop, thread))
        assert ready.wait(15)
        if errors:
            raise errors[0]
        return capsys.readouterr().out.strip().splitlines()[-1]

    yield start
    for stop, thread in running:
        stop.set()
        thread.join(20)
        assert not thread.is_alive()


def test_is_loopback():
    assert all(script.is_loopback(h) for h in ("127.0.0.1", "127.0.0.2", "::1", "[::1]", "localhost"))
    assert not any(script.is_loopback(h) for h in ("0.0.0.0", "::", "10.0.0.5", "ocps.example.org"))


def test_non_loopback_host_needs_a_token(tmp_path):
    with pytest.raises(BadInputError) as info:
        script.check_exposure("0.0.0.0", None, TOKEN_ENV)
    msg = str(info.value)
    assert msg.startswith("ocps.host: 0.0.0.0 is not a loopback address") and "\n" not in msg
    assert f"${TOKEN_ENV}" in msg and "ocps.token_file" in msg
    script.check_exposure("0.0.0.0", "t0ken", TOKEN_ENV)
    script.check_exposure("127.0.0.1", None, TOKEN_ENV)
    service = FakeService()
    with pytest.raises(BadInputError, match="ocps.token_file"):  # serve refuses before binding or starting
        script.serve(ocps_config(tmp_path, host="0.0.0.0"), service=service, environ={})
    assert not service.started


def test_read_token_from_env_then_file(tmp_path):
    cfg = ocps_config(tmp_path, token_file="secrets/ocps-token")
    with pytest.raises(BadInputError, match=r"^ocps.token_file: cannot read .*ocps-token"):
        script.read_token(cfg.ocps, tmp_path, environ={})
    (tmp_path / "secrets").mkdir()
    (tmp_path / "secrets" / "ocps-token").write_text("")
    with pytest.raises(BadInputError, match="is empty"):
        script.read_token(cfg.ocps, tmp_path, environ={})
    (tmp_path / "secrets" / "ocps-token").write_text("from-file\n")
    assert script.read_token(cfg.ocps, tmp_path, environ={}) == "from-file"
    assert script.read_token(cfg.ocps, tmp_path, environ={TOKEN_ENV: " from-env "}) == "from-env"
    assert script.read_token(ocps_config(tmp_path).ocps, tmp_path, environ={}) is None


def test_serve_starts_and_stops_the_service_and_answers(served):
    service = FakeService(mode="sync")
    url = served(service)
    assert url.startswith("http://127.0.0.1:") and service.started
    r = httpx.get(url + "/availability")
    assert r.status_code == 200 and b"<available>true</available>" in r.content
    assert httpx.get(url + "/healthz").json() == {"status": "ok", "mode": "sync"}
    taken = int(url.rsplit(":", 1)[1])
    other = FakeService()
    with pytest.raises(BadInputError, match=rf"^ocps.port: cannot listen on 127.0.0.1:{taken}"):
        script.serve(ocps_config(url, port=taken), service=other, environ={})
    assert not other.started and other.stopped  # the runner never started; the service was closed


def test_serve_with_a_token_file_requires_it(served, tmp_path):
    (tmp_path / "tok").write_text("file-token\n")
    url = served(FakeService(), token_file="tok")
    assert httpx.get(url + "/jobs").status_code == 401
    assert httpx.get(url + "/jobs", headers={"Authorization": "Bearer file-token"}).status_code == 200


def _drive(service, final, delay=0.3, **changes):
    """In a thread: wait for the first request, then QUEUED -> EXECUTING -> ``final``."""

    def run():
        deadline = time.monotonic() + 10
        while not service.list() and time.monotonic() < deadline:
            time.sleep(0.02)
        rid = service.list()[0].id
        time.sleep(delay)
        service.advance(rid, Phase.EXECUTING)
        time.sleep(delay)
        service.advance(rid, final, **changes)

    thread = threading.Thread(target=run)
    thread.start()
    return thread


def test_submit_waits_for_completion(served):
    service = FakeService()
    url = served(service, environ={TOKEN_ENV: "tok"})
    driver = _drive(service, Phase.COMPLETED, results={"ccds": {"done": 9, "failed": 0}},
                    telemetry=({"detector": 4, "n_sources": 10},))
    params = script.request_params("ap", "LSSTComCam", obsid="CC_O_20251015_000003", detector=4,
                                   settings=["job.threads=1"])
    t0 = time.monotonic()
    job = script.submit(url, params, token="tok", wait=True, poll=5)
    driver.join()
    assert job["phase"] == "COMPLETED" and time.monotonic() - t0 >= 0.6
    assert job["parameters"] == {"pipeline": "ap", "instrument": "LSSTComCam",
                                 "obsid": "CC_O_20251015_000003", "detector": "4", "config.job.threads": "1"}
    script.check_outcome(job)
    text = script.describe(job)
    assert text.splitlines()[0] == f"job {job['jobId']}: ap COMPLETED"
    assert 'ccds: {"done":9,"failed":0}' in text and "telemetry: 1 CCD record(s)" in text
    with pytest.raises(BadInputError, match="^token: "):
        script.submit(url, params, token=None)


def test_submit_reports_errors(served):
    service = FakeService(mode="sync")
    url = served(service)
    driver = _drive(service, Phase.ERROR, error="obsid CC_O_20251015_000099: no raw after 5 s (exit 3)")
    params = script.request_params("ap", "LSSTComCam", obsid="CC_O_20251015_000099")
    job = script.submit(url, params, wait=True, poll=5)
    driver.join()
    with pytest.raises(NonRetriableError, match=r"ended ERROR: obsid CC_O_20251015_000099: no raw after 5 s"):
        script.check_outcome(job)
    busy = service.create("ap", data_id(obsid="CC_O_20251015_000005"), run=True)
    with pytest.raises(RetriableError, match=f"busy: .*{busy.id}"):
        script.submit(url, params)
    with pytest.raises(BadInputError, match="^request: pipeline: unknown pipeline 'nope'"):
        script.submit(url, {**params, "pipeline": "nope"})
    with pytest.raises(RetriableError, match="still QUEUED after 0.5 s"):
        service.advance(busy.id, Phase.COMPLETED)
        script.submit(url, params, wait=True, timeout=0.5, poll=5)
    with pytest.raises(BadInputError, match="^--url: cannot reach"):
        script.submit("http://127.0.0.1:9", params)
    with pytest.raises(BadInputError, match="^--set: 'threads=1' is not section.field=value"):
        script.request_params("ap", "LATISS", settings=["threads=1"])


def test_cli_serve_refuses_an_open_address_without_a_token(tmp_path):
    import subprocess
    import sys

    env = {k: v for k, v in os.environ.items() if not k.startswith("APBATCH_")}
    env["APBATCH_ROOT"] = str(tmp_path)
    proc = subprocess.run([sys.executable, "-m", "apbatch", "ocps", "serve", "--host", "0.0.0.0"],
                          capture_output=True, text=True, env=env, timeout=60)
    assert proc.returncode == 2 and proc.stdout == ""
    (line,) = proc.stderr.strip().splitlines()
    assert line.startswith("error: ocps.host: 0.0.0.0 is not a loopback address")
    assert "ocps.token_file" in line
    assert not (tmp_path / "ocps").exists()  # refused before the service (and its ledger) was made


@pytest.mark.kafka
def test_cli_serve_answers_and_submit_waits(tmp_path, kafka_broker):
    """``apbatch ocps serve`` in its own process (real service, local backend, broker); ``submit --wait``."""
    import json
    import signal
    import subprocess
    import sys
    import uuid

    import yaml
    from confluent_kafka.admin import AdminClient, NewTopic

    topic = f"ocps-cli-{uuid.uuid4().hex[:8]}"
    admin = AdminClient({"bootstrap.servers": kafka_broker})
    for f in admin.create_topics([NewTopic(topic, 1, 1), NewTopic(f"{topic}-telemetry", 1, 1)]).values():
        f.result(30)
    cfg = tmp_path / "apbatch.yaml"
    cfg.write_text(yaml.safe_dump({
        "root": str(tmp_path / "work"), "backend": {"kind": "local", "max_workers": 2},
        "job": {"command": [sys.executable, "-c", "import time; time.sleep(1)"], "threads": 1,
                "distributor": str(tmp_path / "distributor")},
        "events": {"detectors": {"LSSTComCam": [4]}},
        "kafka": {"bootstrap_servers": kafka_broker},
        "ocps": {"poll_interval": 0.2, "completion_topic": topic, "telemetry_topic": f"{topic}-telemetry"}}))
    env = {k: v for k, v in os.environ.items() if not k.startswith("APBATCH_")}
    apbatch = [sys.executable, "-m", "apbatch"]
    server = subprocess.Popen([*apbatch, "ocps", "serve", "--config", str(cfg), "--port", "0",
                               "--mode", "sync"], stdout=subprocess.PIPE, stderr=subprocess.PIPE, text=True,
                              env=env)
    try:
        url = server.stdout.readline().strip()
        assert url.startswith("http://127.0.0.1:"), server.stderr.read() if server.poll() is not None else url
        avail = httpx.get(url + "/availability")
        assert avail.status_code == 200 and b"<available>true</available>" in avail.content
        assert b"mode: sync" in avail.content
        submit = [*apbatch, "ocps", "submit", "--config", str(cfg), "--url", url,
                  "--instrument", "LSSTComCam", "--obsid", "CC_O_20251015_000003", "--detector", "4"]
        done = subprocess.run([*submit, "--pipeline", "ap", "--wait", "--set", "job.threads=1", "--json"],
                              capture_output=True, text=True, env=env, timeout=120)
        assert done.returncode == 0, done.stderr
        job = json.loads(done.stdout)
        assert job["phase"] == "COMPLETED" and job["parameters"]["config.job.threads"] == "1"
        assert [t["detector"] for t in job["telemetry"]] == [4]
        bad = subprocess.run([*submit, "--pipeline", "nope"], capture_output=True, text=True, env=env,
                             timeout=60)
        assert bad.returncode == 2
        assert bad.stderr.startswith("error: request: pipeline: unknown pipeline 'nope'")
        assert len(bad.stderr.strip().splitlines()) == 1
    finally:
        server.send_signal(signal.SIGTERM)
        assert server.wait(30) == 0
