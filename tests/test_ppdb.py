"""Tests of apbatch.products.ppdb (and its script and CLI): APDB -> PPDB replication with lsst-dax-ppdb.

The APDB is filled the way jobs fill it (`apbatch.job.apdb.Association.store`), with replication
enabled; the PPDB is read back with SQLAlchemy and compared with the APDB field for field.
"""

from __future__ import annotations

import numpy as np
import pandas as pd
import pytest
import sqlalchemy as sa
from alert_synth import SMALL, make_ccd, make_images, make_sources
from apbatch.errors import BadInputError
from apbatch.job.apdb import Association, create_apdb, open_apdb
from apbatch.products.ppdb import Replicator, create_ppdb, open_apdb_replica, open_ppdb
from fixtures_postgres import new_database

KEYS = {"DiaObject": ["diaObjectId", "validityStartMjdTai"], "DiaSource": ["diaSourceId"],
        "DiaForcedSource": ["diaObjectId", "visit", "detector"]}


class KilledError(Exception):
    """Stands for the process being killed between two chunks."""


@pytest.fixture
def second_postgres_url(postgres_server):
    """A second new database on the same server (the PPDB beside the APDB of ``postgres_url``)."""
    with new_database(postgres_server, "p") as url:
        yield url


def _fill(config_path, visits, detectors=(94, 93), n_sources=4, seed=0):
    """Store ``visits`` x ``detectors`` CCD-visits as jobs do (load, associate, store)."""
    assoc = Association(open_apdb(config_path), radius_arcsec=1.0)
    for n in visits:
        for det in detectors:
            cat = make_sources(n_sources, np.random.default_rng(seed + det), detector=det, nx=SMALL, ny=SMALL)
            cat["psfFlux"] *= 1 + n  # same transients, new fluxes
            ccd = make_ccd(n, detector=det)
            imgs = make_images(np.random.default_rng(seed + 100 * n + det), sources=cat, shape=(SMALL, SMALL))
            assoc.store(assoc.run(ccd, cat, imgs["difference"], imgs["science"], psf_fwhm_pix=3.0))


def _apdb(tmp_path, url=None):
    path = tmp_path / "apdb.yaml"
    create_apdb(url or f"sqlite:///{tmp_path}/apdb.sqlite3", path, replication=True)
    return path


def _ppdb(tmp_path, url=None):
    url = url or f"sqlite:///{tmp_path}/ppdb.sqlite3"
    create_ppdb(url)
    return url


def _table(url, table):
    engine = sa.create_engine(url)
    try:
        with engine.connect() as conn:
            return pd.read_sql_table(table, conn).sort_values(KEYS[table], ignore_index=True)
    finally:
        engine.dispose()


def _apdb_url(config_path):
    import yaml

    return yaml.safe_load(open(config_path))["db_url"]


def _assert_same_rows(apdb_url, ppdb_url, table):
    """The PPDB holds the APDB's rows of ``table``, every APDB column equal (NaN == NaN)."""
    apdb, ppdb = _table(apdb_url, table), _table(ppdb_url, table)
    assert len(ppdb) == len(apdb) > 0
    assert not ppdb.duplicated(KEYS[table]).any()
    columns = [c for c in apdb.columns if c in ppdb.columns and c != "validityEndMjdTai"]
    assert len(columns) >= len(apdb.columns) - 2  # the schemas agree but for bookkeeping columns
    pd.testing.assert_frame_equal(ppdb[columns], apdb[columns], check_dtype=False)


def _chunk_ids(ppdb_url):
    engine = sa.create_engine(ppdb_url)
    try:
        with engine.connect() as conn:
            rows = conn.execute(sa.text('SELECT apdb_replica_chunk, replica_time FROM "PpdbReplicaChunk" '
                                        "ORDER BY replica_time, apdb_replica_chunk")).all()
    finally:
        engine.dispose()
    return [r[0] for r in rows]


def _replicator(config_path, ppdb_url, **kw):
    return Replicator.open(config_path, ppdb_url, **kw)


@pytest.mark.postgres
def test_postgresql_replicate_field_for_field_then_nothing(tmp_path, postgres_url, second_postgres_url):
    config = _apdb(tmp_path, postgres_url)
    _fill(config, range(3))
    ppdb_url = _ppdb(tmp_path, second_postgres_url)
    report = _replicator(config, ppdb_url).run_once()
    apdb_chunks = sorted(c.id for c in open_apdb_replica(config).getReplicaChunks())
    assert len(apdb_chunks) == 3  # visits are a day apart: one chunk each, two CCDs in it
    assert [c.chunk_id for c in report.copied] == apdb_chunks and report.waiting == 0
    assert report.copied[0].rows["DiaSource"] == 8 and report.rows == sum(
        len(_table(postgres_url, t)) for t in KEYS)
    for table in KEYS:
        _assert_same_rows(postgres_url, ppdb_url, table)
    assert _chunk_ids(ppdb_url) == apdb_chunks  # committed in order
    again = _replicator(config, ppdb_url).run_once()
    assert again.copied == [] and again.already == 3
    # a new night's visit: only its chunk is copied
    _fill(config, [5])
    third = _replicator(config, ppdb_url).run_once()
    assert len(third.copied) == 1 and third.already == 3
    for table in KEYS:
        _assert_same_rows(postgres_url, ppdb_url, table)


@pytest.mark.postgres
def test_postgresql_kill_after_two_chunks_then_resume(tmp_path, postgres_url, second_postgres_url):
    config = _apdb(tmp_path, postgres_url)
    _fill(config, range(5), detectors=(94,))
    ppdb_url = _ppdb(tmp_path, second_postgres_url)

    def kill_after_two(copy, seen=[]):  # noqa: B006 - a counter across calls
        seen.append(copy.chunk_id)
        if len(seen) == 2:
            raise KilledError

    with pytest.raises(KilledError):
        _replicator(config, ppdb_url, on_chunk=kill_after_two).run_once()
    apdb_chunks = sorted(c.id for c in open_apdb_replica(config).getReplicaChunks())
    assert _chunk_ids(ppdb_url) == apdb_chunks[:2]
    resumed = _replicator(config, ppdb_url).run_once()
    assert [c.chunk_id for c in resumed.copied] == apdb_chunks[2:] and resumed.already == 2
    assert _chunk_ids(ppdb_url) == apdb_chunks
    for table in KEYS:
        _assert_same_rows(postgres_url, ppdb_url, table)


def test_failure_inside_a_chunk_rolls_it_back(tmp_path, monkeypatch):
    """A failure between a chunk's DiaObjects and its DiaSources leaves nothing of that chunk."""
    from lsst.dax.ppdb.sql import PpdbSql

    config = _apdb(tmp_path)
    _fill(config, range(3), detectors=(94,))
    ppdb_url = _ppdb(tmp_path)
    original = PpdbSql._store_table_data
    calls = []

    def failing(self, table_data, connection, update, table_name, chunk_size):
        calls.append(table_name)
        if table_name == "DiaSource" and calls.count("DiaSource") == 2:
            raise RuntimeError("server went away")
        return original(self, table_data, connection, update, table_name, chunk_size)

    monkeypatch.setattr(PpdbSql, "_store_table_data", failing)
    with pytest.raises(RuntimeError, match="went away"):
        _replicator(config, ppdb_url).run_once()
    first = sorted(c.id for c in open_apdb_replica(config).getReplicaChunks())[0]
    assert _chunk_ids(ppdb_url) == [first]
    assert len(_table(ppdb_url, "DiaObject")) == 4  # the first visit's only
    monkeypatch.setattr(PpdbSql, "_store_table_data", original)
    assert len(_replicator(config, ppdb_url).run_once().copied) == 2
    for table in KEYS:
        _assert_same_rows(_apdb_url(config), ppdb_url, table)


def test_recent_chunks_wait_and_order_is_kept(tmp_path):
    config = _apdb(tmp_path)
    _fill(config, range(3), detectors=(94,))
    ppdb_url = _ppdb(tmp_path)
    last = make_ccd(2).visit_time.unix
    # 30 s after the last visit: the two older chunks have newer ones and are a day old; the
    # newest waits for max_wait_seconds
    rep = _replicator(config, ppdb_url, clock=lambda: last + 30, min_wait_seconds=60,
                      max_wait_seconds=600).run_once()
    assert len(rep.copied) == 2 and rep.waiting == 1
    # chunk batch: one chunk per pass
    assert _replicator(config, ppdb_url, clock=lambda: last + 30, max_chunks=1).run_once().copied == []
    rep = _replicator(config, ppdb_url, clock=lambda: last + 601, max_chunks=1).run_once()
    assert len(rep.copied) == 1 and rep.waiting == 0
    chunks = sorted(c.id for c in open_apdb_replica(config).getReplicaChunks())
    assert _chunk_ids(ppdb_url) == chunks


def test_delete_from_apdb_and_late_rows(tmp_path):
    """Deleting committed chunks from the APDB; a CCD stored late into a copied window."""
    config = _apdb(tmp_path)
    _fill(config, range(2), detectors=(94,))
    ppdb_url = _ppdb(tmp_path)
    first = _replicator(config, ppdb_url, max_chunks=1).run_once()  # chunk 1 committed, not deleted
    assert len(first.copied) == 1 and first.deleted == 0
    assert len(open_apdb_replica(config).getReplicaChunks()) == 2
    rep = _replicator(config, ppdb_url, delete_from_apdb=True).run_once()
    assert len(rep.copied) == 1 and rep.already == 1 and rep.deleted == 2  # the earlier commit too
    assert open_apdb_replica(config).getReplicaChunks() == []
    _fill(config, [0], detectors=(93,))  # a late CCD of visit 0: its window's chunk comes back
    late = _replicator(config, ppdb_url, delete_from_apdb=True).run_once()
    assert [c.late for c in late.copied] == [True] and late.copied[0].rows["DiaSource"] == 4
    for table in KEYS:
        _assert_same_rows(_apdb_url(config), ppdb_url, table)


def test_late_rows_without_delete_are_copied_once(tmp_path):
    """Without deletion the late chunk holds its old rows too: only the new ones are copied."""
    config = _apdb(tmp_path)
    _fill(config, range(2), detectors=(94,))
    ppdb_url = _ppdb(tmp_path)
    _replicator(config, ppdb_url).run_once()
    before = {t: len(_table(ppdb_url, t)) for t in KEYS}
    _fill(config, [0], detectors=(93,))
    late = _replicator(config, ppdb_url).run_once()
    assert [c.late for c in late.copied] == [True] and late.already == 1
    assert late.copied[0].rows["DiaSource"] == 4
    assert len(_table(ppdb_url, "DiaSource")) == before["DiaSource"] + 4
    for table in KEYS:
        _assert_same_rows(_apdb_url(config), ppdb_url, table)
    assert _replicator(config, ppdb_url).run_once().copied == []


def test_apdb_without_replication_and_missing_ppdb(tmp_path):
    create_apdb(f"sqlite:///{tmp_path}/plain.sqlite3", tmp_path / "plain.yaml")
    ppdb_url = _ppdb(tmp_path)
    with pytest.raises(BadInputError, match="apdb.replication"):
        _replicator(tmp_path / "plain.yaml", ppdb_url).run_once()
    with pytest.raises(BadInputError, match="no PPDB at"):
        open_ppdb(f"sqlite:///{tmp_path}/none.sqlite3")
    with pytest.raises(BadInputError, match="already holds a PPDB"):
        create_ppdb(ppdb_url)
    with pytest.raises(BadInputError, match="not supported"):
        create_ppdb("mysql://host/db")


def _main(args):
    from apbatch.cli import main

    with pytest.raises(SystemExit) as exc:
        main(args)
    return exc.value.code


def test_cli_create_and_replicate(tmp_path, monkeypatch, capsys):
    from conftest import free_port

    monkeypatch.chdir(tmp_path)
    monkeypatch.delenv("APBATCH_CONFIG", raising=False)
    assert _main(["apdb", "create"]) == 0  # apdb.replication defaults to true
    assert _main(["ppdb", "replicate"]) == 2  # no PPDB yet
    assert "ppdb.url: no PPDB at" in capsys.readouterr().err
    assert _main(["ppdb", "create"]) == 0
    _fill(tmp_path / "apbatch-work" / "apdb-config.yaml", range(2), detectors=(94,))
    capsys.readouterr()
    assert _main(["ppdb", "replicate"]) == 0
    assert capsys.readouterr().out.startswith("2 chunk(s), ")
    assert _main(["ppdb", "replicate"]) == 0
    assert capsys.readouterr().out.startswith("0 chunk(s), 0 row(s) copied; 2 already")
    for bad in ("mysql://h/db", f"postgresql://nobody:secret@127.0.0.1:{free_port()}/none"):
        assert _main(["ppdb", "create", "--url", bad]) == 2
        err = capsys.readouterr().err
        assert err.startswith("error: ppdb.url: ") and err.count("\n") == 1 and "secret" not in err


def test_follow_loops_until_stopped(tmp_path):
    from apbatch.config import ApbatchConfig
    from apbatch.script.ppdb import replicate

    cfg = ApbatchConfig(root=str(tmp_path))
    config = _apdb(tmp_path)
    cfg = cfg.model_copy(update={"apdb": cfg.apdb.model_copy(update={"config_file": str(config)})})
    _ppdb(tmp_path, cfg.sqlalchemy_url(cfg.ppdb.url))
    passes, sleeps = [], []

    def sleep(seconds):
        sleeps.append(seconds)
        if len(sleeps) == 1:
            _fill(config, range(2), detectors=(94,))  # the night goes on while we sleep

    copied = replicate(cfg, follow=True, sleep=sleep, on_pass=passes.append, stop=lambda: len(passes) >= 3)
    assert copied == 2
    assert [len(p.copied) for p in passes] == [0, 2, 0] and sleeps == [cfg.ppdb.follow_interval]
