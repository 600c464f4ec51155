"""Tests for ``apbatch process-ccd`` (cli/cmd_process_ccd.py, script/process_ccd.py): exit codes."""

from __future__ import annotations

import os
import time
from pathlib import Path

import pytest
from apbatch.cli import main
from apbatch.errors import ExitCode

GROUP = "2025-10-16T00:59:36.789"


def _run(argv, capsys) -> tuple[int, str]:
    with pytest.raises(SystemExit) as info:
        main(["process-ccd", *argv])
    return info.value.code, capsys.readouterr().err


def _args(distributor, **over):
    args = {"--instrument": "LSSTComCam", "--detector": "4", "--group": GROUP, "--visit": "3405059767890000",
            "--day-obs": "20251015", "--exposure-time": "30", "--distributor": str(distributor),
            "--ra": "53.0", "--dec": "-28.0", "--rotation": "10", "--filter": "r_03"}
    args.update(over)
    out = []
    for k, v in args.items():
        if v is not None:
            out += [k, v]
    return out


@pytest.fixture
def site(tmp_path, monkeypatch):
    cfg = tmp_path / "site.yaml"
    cfg.write_text(f"root: {tmp_path / 'work'}\n")
    monkeypatch.setenv("APBATCH_CONFIG", str(cfg))
    (tmp_path / "dist").mkdir()
    return tmp_path


@pytest.mark.parametrize("over, field", [
    ({"--instrument": "HSC"}, "instrument"),
    ({"--detector": "9"}, "--detector"),
    ({"--detector": "R99_S99"}, "--detector"),
    ({"--filter": "r_57"}, "--filter"),
    ({"--dec": None}, "--ra/--dec"),
    ({"--visit": "many"}, "--visit"),
    ({"--ra": "400"}, "--ra"),
    ({"--nimages": "1000"}, "--nimages"),
    ({"--nimages": "-1"}, "--nimages"),
])
def test_bad_arguments_exit_2_with_one_line(site, capsys, over, field):
    code, err = _run(_args(site / "dist", **over), capsys)
    assert code == ExitCode.BAD_INPUT
    lines = [x for x in err.strip().splitlines() if x.strip()]
    assert field in lines[-1]


@pytest.mark.parametrize("offset", [0, 1])
def test_nimages_one_rule_for_events_and_jobs(site, capsys, offset):
    """An event the daemon accepts never becomes a job that process-ccd refuses, and vice versa."""
    import copy
    import json

    from apbatch.errors import BadInputError
    from apbatch.events import parse_event
    from apbatch.work import MAX_NIMAGES

    n = MAX_NIMAGES + offset
    nv = json.loads((Path(__file__).parent / "data" / "events" / "nextVisit_LSSTComCam.json").read_text())
    nv = copy.deepcopy(nv)
    (nv["value"] if "value" in nv else nv)["nimages"] = n
    try:
        parse_event(nv)
        event_ok = True
    except BadInputError as exc:
        event_ok, event_error = False, str(exc)
    code, err = _run(_args(site / "dist", **{"--nimages": str(n)}), capsys)
    job_ok = "--nimages" not in err  # accepted: fails later, on the missing repository
    assert code == ExitCode.BAD_INPUT and event_ok == job_ok == (offset == 0)
    if not event_ok:
        assert event_error.startswith(f"event.nimages: {n} is out of range")


def test_missing_repository_is_bad_input(site, capsys):
    code, err = _run(_args(site / "dist"), capsys)
    assert code == ExitCode.BAD_INPUT
    assert "job.repo: no butler repository" in err


def _repo(site):
    from apbatch.script import repo as repo_script

    repo = site / "work" / "butler"
    repo_script.create(repo)
    repo_script.register(repo, "LSSTComCam", None, (20251015,))
    return repo


def test_missing_apdb_is_bad_input_before_waiting(site, capsys):
    _repo(site)
    t0 = time.monotonic()
    code, err = _run(_args(site / "dist", **{"--timeout": "60"}), capsys)
    assert code == ExitCode.BAD_INPUT
    assert "apdb.config_file: no APDB config" in err and "apbatch apdb create" in err
    assert time.monotonic() - t0 < 30  # did not wait for the raw


def test_raw_timeout_exits_3_and_writes_nothing(site, capsys, monkeypatch):
    from apbatch.config import load_config
    from apbatch.distributor.client import LocalDistributorClient
    from apbatch.script import apdb as apdb_script
    from lsst.daf.butler import Butler

    closed = []
    monkeypatch.setattr(LocalDistributorClient, "close", lambda self: closed.append(self), raising=False)

    repo = _repo(site)
    apdb_script.create(load_config())
    t0 = time.monotonic()
    code, err = _run(_args(site / "dist", **{"--timeout": "1.5"}), capsys)
    elapsed = time.monotonic() - t0
    assert code == ExitCode.RAW_TIMEOUT, err
    assert "R22_S11" in err
    assert elapsed < 30
    butler = Butler.from_config(str(repo))
    assert butler.query_datasets("raw", collections="*", find_first=False, explain=False) == []
    assert butler.query_datasets("preliminary_visit_image", collections="*", find_first=False,
                                 explain=False) == []
    assert not (site / "work" / "alerts").exists()
    assert len(closed) == 1  # the job closes the distributor client it opened


# ------------------------------------------------------------------ the job process: one boundary
# ``python -m apbatch process-ccd`` as a batch job runs it, against real broken inputs. For exit
# codes 2, 3 and 4 nothing may be left behind: no outputs in the butler, no APDB rows, no spool.
RAW_GROUP = "2024-11-09T06:33:55.311"  # of the real ComCam header make_raw uses


def _site(tmp_path, **sections) -> Path:
    """A config file as the daemon writes it (root + sections); the job reads only this."""
    import yaml

    data = {"root": str(tmp_path / "work"), "job": {"repo": "butler"}, **sections}
    path = tmp_path / "night-config.yaml"
    path.write_text(yaml.safe_dump(data))
    return path


def _job(tmp_path, config: Path, *extra, timeout="60", det="R22_S00", log_level="INFO"):
    import subprocess
    import sys

    from apbatch.instruments import get_instrument

    det_id = get_instrument("LSSTComCam").detector(det).id
    argv = [sys.executable, "-m", "apbatch", "--log-level", log_level, "process-ccd", "--config", str(config),
            "--instrument", "LSSTComCam", "--detector", str(det_id), "--group", RAW_GROUP,
            "--visit", "3110636353110000", "--day-obs", "20241108", "--exposure-time", "30",
            "--distributor", str(tmp_path / "dist"), "--timeout", timeout, *extra]
    env = {k: v for k, v in os.environ.items() if not k.startswith("APBATCH_")}
    proc = subprocess.run(argv, capture_output=True, text=True, timeout=300, env=env, cwd=tmp_path)
    return proc.returncode, proc.stderr


def _one_line_error(err: str) -> str:
    """The job's last stderr line: the one-line message, and no traceback anywhere."""
    assert "Traceback" not in err, err[-3000:]
    last = err.strip().splitlines()[-1]
    assert last.startswith("error: "), err[-3000:]
    return last


def _world(tmp_path, apdb=True, raw=None):
    """Butler repository (instrument and the night registered), APDB, distributor with ``raw``."""
    from apbatch.butler.repo import create_repo, register_instrument, register_output_run
    from apbatch.config import load_config
    from apbatch.distributor.store import DistributorStore
    from apbatch.raw import read_raw_header, translate_header
    from apbatch.script import apdb as apdb_script

    butler = create_repo(tmp_path / "work" / "butler")
    register_instrument(butler, "LSSTComCam")
    register_output_run(butler, "LSSTComCam", 20241108)
    if apdb:
        apdb_script.create(load_config(overrides={"root": str(tmp_path / "work")}, environ={}))
    (tmp_path / "dist").mkdir(exist_ok=True)
    if raw is not None:
        DistributorStore(tmp_path / "dist").deliver(raw, translate_header(read_raw_header(raw)))
    return tmp_path / "work" / "butler"


def _assert_nothing_written(tmp_path, repo: Path | None = None):
    import sqlalchemy as sa

    if repo is not None:
        from lsst.daf.butler import Butler

        butler = Butler.from_config(str(repo))
        for name in ("preliminary_visit_image", "difference_image", "dia_source_detector", "metrics"):
            try:
                refs = butler.query_datasets(name, collections="*", find_first=False, explain=False)
            except Exception:  # dataset type not registered: nothing of it
                refs = []
            assert refs == [], name
    db = tmp_path / "work" / "apdb.sqlite3"
    if db.exists():
        with sa.create_engine(f"sqlite:///{db}").connect() as conn:
            for table in ("DiaSource", "DiaObject", "DiaForcedSource"):
                assert conn.execute(sa.text(f'SELECT COUNT(*) FROM "{table}"')).scalar() == 0, table
    assert not list((tmp_path / "work" / "alerts").rglob("*.avro"))


@pytest.fixture(scope="module")
def good_raw(tmp_path_factory):
    from test_butler_formatters import make_raw

    return make_raw(tmp_path_factory.mktemp("raw") / "CC_O_20241108_000266_R22_S00.fits")


def test_job_corrupt_repository_config_exits_2(tmp_path):
    repo = _world(tmp_path)
    (repo / "butler.yaml").write_text("{{{ not: [a butler config\n\x00")
    code, err = _job(tmp_path, _site(tmp_path))
    assert code == ExitCode.BAD_INPUT, err[-3000:]
    assert "job.repo: cannot open the butler repository" in _one_line_error(err)
    _assert_nothing_written(tmp_path)


def test_job_missing_apdb_exits_2(tmp_path, good_raw):
    repo = _world(tmp_path, apdb=False, raw=good_raw)
    code, err = _job(tmp_path, _site(tmp_path))
    assert code == ExitCode.BAD_INPUT, err[-3000:]
    assert "apdb.config_file: no APDB config" in _one_line_error(err)
    _assert_nothing_written(tmp_path, repo)


def test_job_absent_kafka_broker_exits_4_before_any_work(tmp_path, good_raw):
    from conftest import free_port

    repo = _world(tmp_path, raw=good_raw)
    port = free_port()  # nothing listens there
    cfg = _site(tmp_path, alerts={"sink": "kafka", "send_timeout": 2.0},
                kafka={"bootstrap_servers": f"127.0.0.1:{port}"})
    code, err = _job(tmp_path, cfg)
    assert code == ExitCode.RETRIABLE, err[-3000:]
    assert f"no Kafka broker at 127.0.0.1:{port}" in _one_line_error(err)
    _assert_nothing_written(tmp_path, repo)


def test_job_truncated_raw_exits_2(tmp_path, good_raw):
    truncated = tmp_path / good_raw.name
    data = good_raw.read_bytes()
    truncated.write_bytes(data[: len(data) // 2])  # the header is intact, half the pixels are missing
    repo = _world(tmp_path, raw=truncated)
    code, err = _job(tmp_path, _site(tmp_path))
    assert code == ExitCode.BAD_INPUT, err[-3000:]
    assert "truncated or corrupt" in _one_line_error(err)
    _assert_nothing_written(tmp_path, repo)


def test_job_nan_filled_raw_exits_2(tmp_path):
    """A raw whose pixels are all NaN (float32 segments): bad data, refused without a trace left."""
    import fitsio
    import numpy as np
    from apbatch.instruments import get_instrument
    from apbatch.raw import read_raw_header, segment_header
    from test_butler_formatters import make_raw

    header = read_raw_header(make_raw(tmp_path / "src.fits"))
    inst = get_instrument("LSSTComCam")
    det = inst.detector("R22_S00")
    nan_raw = tmp_path / "CC_O_20241108_000266_R22_S00.fits"
    with fitsio.FITS(str(nan_raw), "rw", clobber=True) as f:
        f.write(None, header=header)
        for a in inst.amplifiers(det.id):
            f.write(np.full((a.raw_ny, a.raw_nx), np.nan, np.float32), header=segment_header(a, det),
                    extname=a.extname)
    repo = _world(tmp_path, raw=nan_raw)
    code, err = _job(tmp_path, _site(tmp_path))
    assert code == ExitCode.BAD_INPUT, err[-3000:]
    _one_line_error(err)
    _assert_nothing_written(tmp_path, repo)


# ------------------------------------------------------------------ the boundary's rule, in-process
def test_failure_error_rule():
    from apbatch.errors import BadInputError, NonRetriableError, RawTimeoutError, RetriableError
    from apbatch.script.process_ccd import failure_error

    bad, late = BadInputError("raw", "truncated"), RawTimeoutError("no raw")
    assert failure_error(bad, False) is bad and failure_error(late, False) is late
    err = failure_error(ValueError("two\nlines"), False)
    assert isinstance(err, RetriableError) and str(err) == "ValueError: two lines"
    try:  # a library wrapping our error (the butler around a formatter) keeps its meaning
        raise ValueError("Failure from formatter") from bad
    except ValueError as wrapped:
        assert failure_error(wrapped, False) is bad
    for exc in (ValueError("x"), bad, RetriableError("apdb read")):
        assert isinstance(failure_error(exc, True), NonRetriableError)  # at/after the APDB store
    assert failure_error(NonRetriableError("x"), False).exit_code == ExitCode.NON_RETRIABLE


class _Deps:
    """JobDeps-like: a butler I/O that records which outputs it is asked to discard, and an alert stage."""

    class _IO:
        def __init__(self):
            self.pruned = []

        def discard_outputs(self, visit, detector, run):
            self.pruned += [(name, visit, run) for name in ("calexp", "diffim", "dia", "metrics")]
            return 4

    def __init__(self):
        self.butler_io = self._IO()
        self.distributor = None
        self.alerts = type("Stage", (), {"apdb_reached": False, "closed": False,
                                         "close": lambda s: setattr(s, "closed", True)})()


def _work():
    from apbatch.work import CcdWork

    return CcdWork(instrument="LSSTComCam", detector=4, detector_name="R22_S11", group_id=GROUP,
                   visit=3405059767890000, day_obs=20251015, intent="science", exposure_time=30.0, nimages=1,
                   distributor="/nowhere", physical_filter="r_03")


@pytest.mark.parametrize("reach_apdb, code", [(False, ExitCode.RETRIABLE), (True, ExitCode.NON_RETRIABLE)])
def test_boundary_codes_and_cleanup(monkeypatch, reach_apdb, code):
    from apbatch.config import load_config
    from apbatch.errors import ApbatchError
    from apbatch.job import task
    from apbatch.script import process_ccd as script

    deps = _Deps()
    seen = {}

    def run_ccd(work, deps_, *, timeout, output_run, region_padding_arcsec, **kw):
        seen.update(timeout=timeout, output_run=output_run, padding=region_padding_arcsec)
        deps_.alerts.apdb_reached = reach_apdb
        raise ZeroDivisionError("boom")

    monkeypatch.setattr(task, "run_ccd", run_ccd)
    cfg = load_config(environ={}, overrides={"job": {"output_run": "{instrument}/night/{day_obs}",
                                                     "raw_timeout": 7},
                                             "apdb": {"region_padding_arcsec": 42.5}})
    with pytest.raises(ApbatchError) as info:
        script.process_ccd(cfg, _work(), deps=deps)
    assert info.value.exit_code == code and "ZeroDivisionError: boom" in str(info.value)
    assert isinstance(info.value.__cause__, ZeroDivisionError)
    # every setting from the config
    assert seen == {"timeout": 7.0, "output_run": "LSSTComCam/night/20251015", "padding": 42.5}
    pruned = deps.butler_io.pruned
    if code == ExitCode.RETRIABLE:  # nothing reached the APDB: the butler outputs go too
        assert len(pruned) == 4 and all(run == "LSSTComCam/night/20251015" for *_, run in pruned)
    else:
        assert pruned == []
    assert deps.alerts.closed


def test_output_run_template(tmp_path):
    from apbatch.config import load_config
    from apbatch.errors import BadInputError
    from apbatch.script.process_ccd import output_run_of

    cfg = load_config(environ={})
    assert output_run_of(cfg, _work()) == "LSSTComCam/prompt/20251015"  # = butler.datasets.output_run
    assert output_run_of(cfg, _work(), "u/me/test") == "u/me/test"
    bad = load_config(environ={}, overrides={"job": {"output_run": "{instrument}/{night}"}})
    with pytest.raises(BadInputError, match="job.output_run"):
        output_run_of(bad, _work())


def test_alert_stage_reads_its_settings_from_the_config(tmp_path, monkeypatch):
    """alerts.send_timeout, schema_version, cutouts, history and association settings reach the stage."""
    from apbatch.config import load_config
    from apbatch.errors import BadInputError
    from apbatch.job import alerts as job_alerts
    from apbatch.script import apdb as apdb_script
    from apbatch.script.process_ccd import AlertStage

    cfg = load_config(environ={}, overrides={"root": str(tmp_path), "alerts": {
        "send_timeout": 3.5, "schema_version": "11.0", "cutout_size": 16, "history_days": 30.0},
        "apdb": {"association_radius_arcsec": 0.7, "history_days": 40.0}})
    apdb_script.create(cfg)
    stage = AlertStage(cfg)
    assert stage.builder.schema_id == 1100
    assert stage.builder.cutout_size == 16 and stage.builder.history_days == 30
    assert stage.association.radius_arcsec == 0.7 and stage.association.history_days == 40
    got = {}

    def fake(ccd, *images, checkpoint, **kw):
        got.update(kw)
        checkpoint("spooled")
        return {}

    monkeypatch.setattr(job_alerts, "process_ccd_alerts", fake)
    assert not stage.apdb_reached
    stage("ccd", "dia", "sci", "tmpl", "diff", 3.0)
    assert got["send_timeout"] == 3.5 and got["psf_fwhm_pix"] == 3.0 and stage.apdb_reached
    bad = load_config(environ={}, overrides={"root": str(tmp_path), "alerts": {"schema_version": "99.0"}})
    with pytest.raises(BadInputError, match="alerts.schema_version"):
        AlertStage(bad)


def test_cli_main_maps_unexpected_errors_to_one_line(monkeypatch, capsys):
    import click
    from apbatch import cli

    @click.command("explode")
    def explode():
        raise KeyError("surprise\nsecond line")

    monkeypatch.setitem(cli.COMMANDS, "explode", "apbatch.cli:_explode_for_test")
    monkeypatch.setattr(cli, "_explode_for_test", explode, raising=False)
    for argv, traceback in ((["explode"], False), (["--log-level", "DEBUG", "explode"], True)):
        with pytest.raises(SystemExit) as info:
            cli.main(argv)
        assert info.value.code == ExitCode.NON_RETRIABLE
        err = capsys.readouterr().err
        assert err.strip().splitlines()[-1] == ("error: unexpected KeyError: 'surprise\\nsecond line' "
                                               "(rerun with --log-level DEBUG for the traceback)")
        assert ("Traceback" in err) == traceback


def test_job_reads_its_settings_from_the_nights_config_file(tmp_path, good_raw):
    """The daemon writes its resolved config once per night and passes only ``--config <file>``:
    the job takes apdb.config_file and alerts.schema_version from that file (no APBATCH_*)."""
    from apbatch.config import load_config
    from apbatch.jobconfig import write_config_snapshot
    from apbatch.script import apdb as apdb_script

    repo = _world(tmp_path, apdb=False, raw=good_raw)
    cfg = load_config(environ={}, overrides={"root": str(tmp_path / "work"), "apdb": {
        "config_file": "elsewhere/apdb.yaml"}, "alerts": {"schema_version": "8.0"}})
    apdb_script.create(cfg)
    snapshot = write_config_snapshot(cfg, 20241108)
    code, err = _job(tmp_path, snapshot)
    assert code == ExitCode.BAD_INPUT, err[-3000:]
    # not "no APDB config" (it found the APDB the file names) but the file's schema version
    assert "alerts.schema_version: schema 8.0 requires fields" in _one_line_error(err)
    _assert_nothing_written(tmp_path, repo)


def test_failed_job_removes_its_butler_outputs(tmp_path, good_raw, monkeypatch):
    """A failure after the outputs were put, before the APDB (exit 4), leaves no outputs behind."""
    import pandas as pd
    from apbatch.butler import datasets as ds
    from apbatch.butler.io import ButlerIO
    from apbatch.butler.repo import create_repo, register_exposures, register_instrument, register_output_run
    from apbatch.config import load_config
    from apbatch.errors import RetriableError
    from apbatch.job import task
    from apbatch.job.task import JobDeps
    from apbatch.raw import read_raw_header, translate_header
    from apbatch.script import process_ccd as script
    from apbatch.work import CcdWork
    from test_butler_io import ccd_image

    butler = create_repo(tmp_path / "repo")
    register_instrument(butler, "LSSTComCam")
    meta = translate_header(read_raw_header(good_raw))
    register_exposures(butler, [meta])
    run = register_output_run(butler, "LSSTComCam", 20241108)
    io = ButlerIO(butler, "LSSTComCam")
    work = CcdWork(instrument="LSSTComCam", detector=0, detector_name="R22_S00", group_id=RAW_GROUP,
                   visit=meta.visit_id, day_obs=20241108, intent="science", exposure_time=30.0, nimages=1,
                   distributor="/nowhere")

    def run_ccd(work, deps, **kw):
        img = ccd_image(detector=0)
        deps.butler_io.put_outputs(work.visit, 0, calexp=img, diffim=img, run=kw["output_run"],
                                   dia_sources=pd.DataFrame({"flux": [1.0]}), metrics={"n": 1})
        raise OSError("disk full while writing the alert spool")

    monkeypatch.setattr(task, "run_ccd", run_ccd)
    with pytest.raises(RetriableError, match="OSError: disk full"):
        script.process_ccd(load_config(environ={}), work, deps=JobDeps(io, None, None))
    for name in (ds.CALEXP, ds.DIFFIM, ds.DIA_SOURCES, ds.METRICS):
        assert butler.query_datasets(name, collections=run, explain=False) == [], name


def test_stage_times_go_into_the_jobs_ledger_row(tmp_path):
    from apbatch.config import load_config
    from apbatch.ledger import Ledger
    from apbatch.script.process_ccd import record_stages
    from apbatch.work import CcdWork

    cfg = load_config(overrides={"root": str(tmp_path / "work")}, environ={})
    work = CcdWork(instrument="LSSTComCam", detector=4, detector_name="R22_S11",
                   group_id="2025-10-16T00:59:36.789", visit=3405059767890000, day_obs=20251015,
                   intent="science", exposure_time=30.0, nimages=1, distributor="/d")
    assert not record_stages(cfg, work, {"started": 1.0})  # no ledger yet: logged, never a failure
    ledger = Ledger.from_config(cfg)
    ledger.claim([work])
    assert record_stages(cfg, work, {"started": 1.0, "prepared": 3.5})
    assert ledger.rows()[0].stages == {"started": 1.0, "prepared": 3.5}
    ledger.close()
