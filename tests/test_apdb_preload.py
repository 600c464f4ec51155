"""Tests of apbatch.job.apdb_preload: history read before the raw, objects re-read after it."""

from __future__ import annotations

import numpy as np
import pandas as pd
import pytest
from alert_synth import SMALL, make_ccd, make_images, make_sources, visit_id
from apbatch.job.apdb import Association, create_apdb, open_apdb
from apbatch.job.apdb_preload import PreloadingAssociation


@pytest.fixture
def apdb(tmp_path):
    create_apdb(f"sqlite:///{tmp_path}/apdb.sqlite3", tmp_path / "apdb.yaml")
    return open_apdb(tmp_path / "apdb.yaml")


def _run(assoc, n, cat):
    imgs = make_images(np.random.default_rng(n), shape=(SMALL, SMALL))
    return assoc.run(make_ccd(n), cat, imgs["difference"], imgs["science"], 3.0)


class _Counting:
    """The APDB, counting the history reads (what a preload saves after the raw)."""

    def __init__(self, apdb):
        self.apdb, self.history_reads = apdb, []

    def __getattr__(self, name):
        return getattr(self.apdb, name)

    def getDiaSources(self, region, ids, *a, **k):  # noqa: N802 (the APDB's API)
        self.history_reads.append(sorted(ids))
        return self.apdb.getDiaSources(region, ids, *a, **k)


def test_preloaded_history_gives_the_same_association_as_reading_after_the_raw(apdb):
    cat = make_sources(4, np.random.default_rng(3), nx=SMALL, ny=SMALL)
    plain = Association(apdb)
    for n in range(2):
        plain.store(_run(plain, n, cat))
    counting = _Counting(apdb)
    pre = PreloadingAssociation(counting)
    ccd = make_ccd(2)
    assert pre.preload(ccd.region, ccd.visit_time) == 4
    preload_reads = len(counting.history_reads)
    got, want = _run(pre, 2, cat), _run(plain, 2, cat)
    assert len(counting.history_reads) == preload_reads  # no history read after the raw
    cols = ["diaObjectId", "diaSourceId", "visit", "psfFlux"]
    pd.testing.assert_frame_equal(got.prv_sources.sort_values("diaSourceId")[cols].reset_index(drop=True),
                                  want.prv_sources.sort_values("diaSourceId")[cols].reset_index(drop=True))
    assert len(got.prv_sources) == 8 and got.n_new_objects == 0
    assert (got.objects["nDiaSources"] == 3).all()


def test_objects_stored_after_the_preload_are_associated_not_split(apdb):
    """Another visit of the field stores new objects between preload and raw: the job re-reads the
    objects, so its sources join them instead of making duplicates."""
    cat = make_sources(3, np.random.default_rng(4), nx=SMALL, ny=SMALL)
    pre = PreloadingAssociation(apdb)
    ccd = make_ccd(1)
    assert pre.preload(ccd.region, ccd.visit_time) == 0  # empty APDB at prepare time
    other = Association(apdb)
    other.store(_run(other, 0, cat))  # visit 0's job stores while ours waits for its raw
    res = _run(pre, 1, cat)
    assert res.n_new_objects == 0 and len(res.prv_sources) == 3
    assert sorted(res.prv_sources["visit"].unique()) == [visit_id(0)]


def test_history_outside_the_preloaded_window_is_read_from_the_apdb(apdb):
    cat = make_sources(2, np.random.default_rng(5), nx=SMALL, ny=SMALL)
    plain = Association(apdb)
    plain.store(_run(plain, 0, cat))
    counting = _Counting(apdb)
    pre = PreloadingAssociation(counting)
    early = make_ccd(0)
    pre.preload(early.region, early.visit_time, slack_days=0.1)  # a preload for a time long before
    n = len(counting.history_reads)
    res = _run(pre, 2, cat)  # two days later: beyond the preload's window
    assert len(counting.history_reads) == n + 1 and len(res.prv_sources) == 2
