"""Tests of apbatch.script.pilot (and ``apbatch pilot``): the pilot loop, per-item exit codes and
logs, warm state kept between items and dropped after a failure, the calibration cache."""

from __future__ import annotations

import json
import logging
import os
import uuid
from types import SimpleNamespace

import numpy as np
import pytest
from apbatch.backends.base import JobState
from apbatch.backends.pilot import PilotBackend
from apbatch.config import load_config
from apbatch.errors import BadInputError, ExitCode, RawTimeoutError, RetriableError
from apbatch.script import pilot as pilot_script
from apbatch.script.pilot import WarmDeps, _CachingButlerIO, exit_code_of, run_item, run_pilot
from apbatch.work import CcdWork

GROUP = "2025-06-10T07:31:26.692"


def works_of(n: int, distributor: str = "/nowhere") -> list[CcdWork]:
    return [CcdWork("LSSTComCam", d, f"R22_S{d // 3}{d % 3}", GROUP, 2025061000578, 20250610, "science",
                    30.0, 1, distributor, 10.5, -20.25, 45.0, "r_03") for d in range(n)]


def config(tmp_path, **backend):
    return load_config(environ={}, overrides={"root": str(tmp_path / "work"),
                                              "backend": {"kind": "pilot", **backend}})


def queue(cfg, works) -> tuple[PilotBackend, list[str]]:
    backend = PilotBackend(cfg)
    backend._ensure_runner = lambda: None  # type: ignore[method-assign]  # this test runs the pilot
    return backend, [j.job_id for j in backend.submit(works, token="ab" * 10)]


def test_exit_code_rule_is_the_cli_rule():
    assert exit_code_of(None) == 0
    assert exit_code_of(BadInputError("f", "bad")) == ExitCode.BAD_INPUT
    assert exit_code_of(RawTimeoutError("late")) == ExitCode.RAW_TIMEOUT
    assert exit_code_of(RetriableError("again")) == ExitCode.RETRIABLE
    assert exit_code_of(ValueError("bug")) == ExitCode.NON_RETRIABLE
    assert exit_code_of(SystemExit(4)) == 4
    assert exit_code_of(KeyboardInterrupt()) == 130


@pytest.mark.parametrize("exc", [RetriableError("again"), RawTimeoutError("late"), ValueError("bug"),
                                 KeyboardInterrupt()])
def test_cli_main_ends_with_the_same_rule(monkeypatch, capsys, exc):
    """`apbatch.cli.main` and a pilot's items share `apbatch.errors.exit_code_of`: a command that
    raises ``exc`` exits with the code an item that raised it gets."""
    import click
    from apbatch import cli

    @click.command("boom")
    def boom():
        raise exc

    monkeypatch.setattr(cli.cli, "get_command", lambda ctx, name: boom if name == "boom" else None)
    with pytest.raises(SystemExit) as info:
        cli.main(["boom"])
    assert info.value.code == exit_code_of(exc) and cli.exit_code_of is exit_code_of


def test_pilot_refuses_another_backend(tmp_path):
    cfg = load_config(environ={}, overrides={"root": str(tmp_path)})
    with pytest.raises(BadInputError, match="backend.kind"):
        run_pilot(cfg)


def test_pilot_runs_items_in_order_with_their_codes_and_logs(tmp_path, monkeypatch):
    cfg = config(tmp_path)
    backend, ids = queue(cfg, works_of(4))
    codes = {0: 0, 1: 4, 2: 3, 3: 5}
    seen = []

    def fake_item(spec, warm, configs):
        d = spec["work"]["detector"]
        seen.append((d, os.environ.get("APBATCH_JOB_ID")))
        logging.getLogger("apbatch.test").warning("working on detector %d", d)
        print(f"stdout of {d}")
        return codes[d]

    monkeypatch.setattr(pilot_script, "run_item", fake_item)
    rec = run_pilot(cfg, poll=0.01, max_items=4)
    assert [d for d, _ in seen] == [0, 1, 2, 3] and [j for _, j in seen] == ids
    statuses = backend.status(ids)
    assert [statuses[j].exit_code for j in ids] == [0, 4, 3, 5]
    assert statuses[ids[0]].state is JobState.COMPLETED and statuses[ids[1]].state is JobState.FAILED
    for d, job_id in enumerate(ids):
        text = (backend.state_dir / "jobs" / job_id / "out.log").read_text()
        assert f"working on detector {d}" in text and f"stdout of {d}" in text
        assert f"detector {d + 1}" not in text  # one item's log each
    assert (rec["done"], rec["failed"], rec["state"], rec["reason"]) == (1, 3, "ended", "item limit")
    assert [i[0] for i in rec["items"]] == ids and os.environ.get("APBATCH_JOB_ID") is None
    (shown,) = backend.pilots()
    assert shown["state"] == "ended" and shown["done"] == 1


def test_idle_pilot_ends_and_leaves_no_work_behind(tmp_path):
    cfg = config(tmp_path, idle_timeout=0.3)
    rec = run_pilot(cfg, poll=0.01)
    assert rec["state"] == "ended" and rec["reason"].startswith("idle") and rec["done"] == 0


def test_real_item_exit_codes_match_process_ccd(tmp_path):
    """Through the real process_ccd: no repository -> 2 (as `apbatch process-ccd`); a bad
    job.json -> 2; the warm state is kept after 2 and dropped after 4."""
    cfg = config(tmp_path)
    _, ids = queue(cfg, works_of(1))
    spec = json.loads((cfg.path(cfg.backend.log_dir) / "jobs" / ids[0] / "job.json").read_text())
    warm = WarmDeps()
    warm._cache[("sink", "x")] = SimpleNamespace(close=lambda: None)
    assert run_item(spec, warm, {}) == ExitCode.BAD_INPUT
    assert warm._cache  # kept: bad input breaks no connection
    assert run_item({"error": "cannot read job.json"}, warm, {}) == ExitCode.BAD_INPUT

    def unreachable(cfg, work):
        raise RetriableError("cannot reach the butler registry")

    warm.deps = unreachable  # type: ignore[method-assign]
    assert run_item(spec, warm, {}) == ExitCode.RETRIABLE
    assert not warm._cache  # dropped: the next CCD opens everything again


def test_warm_deps_keep_butler_and_apdb_and_renew_per_ccd_parts(tmp_path):
    from apbatch.script import apdb as apdb_script
    from apbatch.script import repo as repo_script

    cfg = load_config(environ={}, overrides={"root": str(tmp_path / "work"), "alerts": {"sink": "file"},
                                              "backend": {"kind": "pilot"}})
    repo_script.create(cfg.path(cfg.job.repo))
    repo_script.register(cfg.path(cfg.job.repo), "LSSTComCam", None, (20250610,))
    apdb_script.create(cfg)
    (tmp_path / "d").mkdir()
    a, b = works_of(2, distributor=str(tmp_path / "d"))
    warm = WarmDeps()
    one, two = warm.deps(cfg, a), warm.deps(cfg, b)
    assert one.butler_io is two.butler_io  # warm: the same butler and calibration cache
    assert one.alerts.sink is two.alerts.sink and one.alerts.builder is two.alerts.builder
    assert one.alerts.association.apdb is two.alerts.association.apdb
    assert one.alerts.association is not two.alerts.association  # per CCD: its preloaded region
    assert one.distributor is not two.distributor
    one.alerts.close()  # the job closes its alert stage; the pilot's sink stays open
    assert warm.deps(cfg, a).alerts.sink is one.alerts.sink
    warm.close()
    assert warm.deps(cfg, a).butler_io is not one.butler_io


class _Ref:
    def __init__(self):
        self.id = uuid.uuid4()


def test_calibration_cache_reuses_by_dataset_id_bounded_and_copies():
    reads = []

    class Inner:
        def read_calib(self, ref):
            reads.append(ref.id)
            image = np.arange(256 * 256, dtype=np.float32).reshape(256, 256) + len(reads)
            variance = np.broadcast_to(np.float32(0), (256, 256))
            return SimpleNamespace(image=image, mask=np.ones((256, 256), np.uint16), variance=variance,
                                   metadata={"n": len(reads)})

        def calib_ref(self, *a):
            return "delegated"

    io = _CachingButlerIO(Inner(), size=2)
    r1, r2, r3 = _Ref(), _Ref(), _Ref()
    c1 = io.read_calib(r1)
    again = io.read_calib(r1)
    assert reads == [r1.id] and io.calib_hits == 1
    assert again is not c1 and again.image is not c1.image and np.array_equal(again.image, c1.image)
    assert np.array_equal(again.mask, c1.mask) and again.mask.dtype == np.uint16
    c1.metadata["n"] = 7  # the first CCD changes what it read: the cache kept its own
    assert again.metadata == {"n": 1}
    assert again.variance.strides == (0, 0)  # the variance of zeros stays a view: no memory
    again.image += 1  # each CCD's own copy: changing it changes nothing for the next
    again.metadata["n"] = 99
    third = io.read_calib(r1)
    assert np.array_equal(third.image, c1.image) and third.metadata == {"n": 1}
    # the pixels are kept in files, not in memory: 2 planes of 256 x 256 (float32 + uint16)
    assert io.calibs.nbytes == 256 * 256 * 6 and len(list(io.calibs._directory().iterdir())) == 2
    io.read_calib(r2)
    io.read_calib(r3)  # evicts r1 (least recently used)
    io.read_calib(r1)
    assert reads == [r1.id, r2.id, r3.id, r1.id]
    assert io.calib_hits == 2 and len(io.calibs) == 2
    assert io.calib_ref() == "delegated"
    folder = io.calibs._directory()
    io.close()
    assert not folder.exists()
    # nothing kept without a count, or over the MiB budget (256 x 256 x 6 B = 0.375 MiB each)
    none = _CachingButlerIO(Inner(), size=0)
    none.read_calib(r1)
    assert len(none.calibs) == 0
    small = _CachingButlerIO(Inner(), size=4, budget_mib=0.8)
    for ref in (r1, r2, r3):
        small.read_calib(ref)
    assert len(small.calibs) == 2 and small.calibs.nbytes <= 0.8 * (1 << 20)
    small.close()


def test_calibration_cache_reads_again_when_its_files_are_gone():
    class Inner:
        n = 0

        def read_calib(self, ref):
            Inner.n += 1
            return SimpleNamespace(image=np.full((256, 256), Inner.n, np.float32), mask=None)

    io = _CachingButlerIO(Inner(), size=2)
    ref = _Ref()
    io.read_calib(ref)
    for path in io.calibs._directory().iterdir():
        path.unlink()
    assert io.read_calib(ref).image[0, 0] == 2 and Inner.n == 2  # read from the butler again
    io.close()


def test_cli_pilot_command(tmp_path, monkeypatch, capsys):
    from apbatch.cli import main

    cfg_file = tmp_path / "c.yaml"
    cfg_file.write_text(f"root: {tmp_path}\nbackend: {{kind: pilot, idle_timeout: 0.2}}\n")
    with pytest.raises(SystemExit) as info:
        main(["pilot", "--config", str(cfg_file)])
    assert info.value.code == 0
    assert json.loads(capsys.readouterr().out.strip().splitlines()[-1])["done"] == 0
    cfg_file.write_text(f"root: {tmp_path}\n")
    with pytest.raises(SystemExit) as info:
        main(["pilot", "--config", str(cfg_file)])
    assert info.value.code == ExitCode.BAD_INPUT and "backend.kind" in capsys.readouterr().err


def test_bad_batch_pilot_id_is_one_line_exit_2_and_nothing_written(tmp_path, monkeypatch, capsys):
    from apbatch.cli import main

    cfg_file = tmp_path / "c.yaml"
    cfg_file.write_text(f"root: {tmp_path}\nbackend: {{kind: pilot, idle_timeout: 0.2}}\n")
    monkeypatch.setenv("APBATCH_PILOT_ID", "slurm-12;x")
    with pytest.raises(SystemExit) as info:
        main(["pilot", "--config", str(cfg_file)])
    err = capsys.readouterr().err.strip()
    assert info.value.code == ExitCode.BAD_INPUT and len(err.splitlines()) == 1
    assert err.startswith("error: APBATCH_PILOT_ID:") and "slurm-<job id>" in err
    assert not (tmp_path / "logs").exists()
    # a batch pilot's own id names its record and its claims
    monkeypatch.setenv("APBATCH_PILOT_ID", "slurm-12")
    rec = run_pilot(load_config([str(cfg_file)], environ={}), poll=0.01)
    assert (rec["pilot"], rec["batch"], rec["batch_id"], rec["state"]) == ("slurm-12", "slurm", "12", "ended")
    assert (tmp_path / "logs" / "pilot" / "pilots" / "slurm-12.json").exists()


def test_pilot_over_its_memory_bound_hands_the_queue_to_a_fresh_pilot(tmp_path, monkeypatch):
    cfg = config(tmp_path, max_rss_mib=100)
    backend, ids = queue(cfg, works_of(3))
    monkeypatch.setattr(pilot_script, "run_item", lambda spec, warm, configs: 0)
    monkeypatch.setattr(pilot_script, "rss_mib", lambda: 150.0)
    started = []
    monkeypatch.setattr(PilotBackend, "_ensure_runner", lambda self: started.append(self.kind))
    rec = run_pilot(cfg, poll=0.01)
    assert rec["done"] == 1 and "max_rss_mib" in rec["reason"]  # ended after one CCD...
    assert started == ["pilot"]  # ...and started a fresh pilot for the two still queued
    assert [s.state for s in backend.status(ids[1:]).values()] == [JobState.PENDING] * 2
