"""Tests for ``apbatch process-ccd`` (cli/cmd_process_ccd.py, script/process_ccd.py): exit codes."""

from __future__ import annotations

import time

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
])
def test_bad_arguments_exit_2_with_one_line(site, capsys, over, field):
    code, err = _run(_args(site / "dist", **over), capsys)
    assert code == ExitCode.BAD_INPUT
    lines = [x for x in err.strip().splitlines() if x.strip()]
    assert field in lines[-1]


def test_missing_repository_is_bad_input(site, capsys):
    code, err = _run(_args(site / "dist"), capsys)
    assert code == ExitCode.BAD_INPUT
    assert "--repo: no butler repository" in err


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


def test_raw_timeout_exits_3_and_writes_nothing(site, capsys):
    from lsst.daf.butler import Butler

    from apbatch.config import load_config
    from apbatch.script import apdb as apdb_script

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
    assert butler.query_datasets("preliminary_visit_image", collections="*", find_first=False, explain=False) == []
    assert not (site / "work" / "alerts").exists()
