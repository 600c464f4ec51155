"""Tests of ``apbatch tap`` (apbatch.cli.cmd_tap, apbatch.script.tap) and apbatch.tap.schema's indexes."""

from __future__ import annotations

import threading

import pytest
import requests
import sqlalchemy as sa
from apbatch.config import ApbatchConfig
from apbatch.errors import BadInputError
from apbatch.products.ppdb import create_ppdb
from apbatch.script.tap import database_url, serve
from apbatch.tap.adql import parse_adql, to_sql
from apbatch.tap.service import TapService


def _main(args):
    from apbatch.cli import main

    with pytest.raises(SystemExit) as exc:
        main(args)
    return exc.value.code


def _config(tmp_path, **tap):
    cfg = ApbatchConfig(root=str(tmp_path))
    return cfg.model_copy(update={"tap": cfg.tap.model_copy(update=tap)})


def test_sqlite_and_bad_urls_are_one_line_errors(tmp_path, monkeypatch, capsys):
    monkeypatch.chdir(tmp_path)
    monkeypatch.delenv("APBATCH_CONFIG", raising=False)
    assert _main(["tap", "serve"]) == 2  # the default ppdb.url is SQLite
    err = capsys.readouterr().err
    assert err.startswith("error: ppdb.url: is a sqlite database; TAP needs PostgreSQL with pg_sphere")
    assert err.count("\n") == 1
    config = tmp_path / "c.yaml"
    config.write_text("tap:\n  url: 'not a url'\n")
    assert _main(["tap", "init", "--config", str(config)]) == 2
    assert capsys.readouterr().err.startswith("error: tap.url: 'not a url' is not a database URL")
    with pytest.raises(BadInputError, match="tap.url: is a mysql database"):
        database_url(_config(tmp_path, url="mysql://h/db"))


def test_init_unreachable_server_hides_the_password(tmp_path, monkeypatch, capsys):
    from conftest import free_port

    config = tmp_path / "c.yaml"
    config.write_text(f"tap:\n  url: postgresql://me:secret@127.0.0.1:{free_port()}/none\n")
    assert _main(["tap", "init", "--config", str(config)]) == 2
    err = capsys.readouterr().err
    assert err.startswith("error: tap.url: cannot make the indexes: ") and "secret" not in err
    assert err.count("\n") == 1


@pytest.mark.postgres
def test_init_makes_indexes_the_cone_search_uses(tmp_path, postgres_url, capsys):
    create_ppdb(postgres_url)
    config = tmp_path / "c.yaml"
    config.write_text(f"tap:\n  url: {postgres_url}\n")
    assert _main(["tap", "init", "--config", str(config)]) == 0
    assert capsys.readouterr().out.startswith("6 index(es) created: DiaSource_tap_spoint, ")
    assert _main(["tap", "init", "--config", str(config)]) == 0
    assert capsys.readouterr().out == "0 index(es) created\n"
    engine = sa.create_engine(postgres_url)
    service = TapService(postgres_url)
    try:
        with engine.begin() as conn:  # enough rows that the planner prefers the index
            conn.execute(sa.text(
                'INSERT INTO "DiaSource" ("diaSourceId", visit, detector, "midpointMjdTai", ra, dec, x, y, '
                '"psfNdata", "trailNdata", "dipoleNdata", "timeProcessedMjdTai", "bboxSize") '
                "SELECT i, 1, 1, 61000, (i % 3600) / 10.0, ((i / 3600) % 180) - 89.5, 0, 0, 1, 1, 1, "
                "61000, 1 FROM generate_series(1, 50000) AS i"))
            conn.execute(sa.text('ANALYZE "DiaSource"'))
        registry, _ = service.registry()
        sql = to_sql(parse_adql("SELECT s.ra FROM ppdb.DiaSource AS s WHERE "
                                "CONTAINS(POINT('ICRS', s.ra, s.dec), CIRCLE('ICRS', 10.0, 0.5, 0.05)) = 1",
                                registry))
        with engine.connect() as conn:
            plan = "\n".join(r[0] for r in conn.exec_driver_sql("EXPLAIN " + sql))
        assert "DiaSource_tap_spoint" in plan
    finally:
        service.close()
        engine.dispose()


@pytest.mark.postgres
def test_serve_prints_its_url_and_stops(tmp_path, postgres_url, capsys):
    create_ppdb(postgres_url)
    cfg = _config(tmp_path, url=postgres_url)
    ready, stop = threading.Event(), threading.Event()
    thread = threading.Thread(target=serve, args=(cfg,), kwargs={"port": 0, "ready": ready, "stop": stop})
    thread.start()
    try:
        assert ready.wait(30)
        url = capsys.readouterr().out.strip()
        assert url.startswith("http://127.0.0.1:")
        query = "SELECT COUNT(*) AS n FROM ppdb.DiaSource"
        r = requests.get(url + "/sync", params={"LANG": "ADQL", "QUERY": query}, timeout=30)
        assert 'value="OK"' in r.text and "<TD>0</TD>" in r.text
        port = int(url.rsplit(":", 1)[1])
        with pytest.raises(BadInputError, match="tap.port: cannot listen on 127.0.0.1"):
            serve(cfg, port=port, stop=threading.Event())
    finally:
        stop.set()
        thread.join(30)
    assert not thread.is_alive()
