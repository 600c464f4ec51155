"""Tests for apbatch.ocps.store: persistence, compare-and-set phases, published-once events."""

from __future__ import annotations

import threading

import pytest
from apbatch.ledger import Ledger
from apbatch.ocps.model import DataId, OcpsRequest, Phase, UnknownRequestError
from apbatch.ocps.store import RequestStore


def _req(i: int, phase: Phase = Phase.PENDING, **kw) -> OcpsRequest:
    data_id = DataId("LSSTComCam", obsid="MC_O_20251015_000003", detector=4)
    return OcpsRequest(id=f"r{i:03d}", pipeline="ap", data_id=data_id,
                       overrides={"job.raw_timeout": "2"}, config_file=None, mode="async", phase=phase,
                       created_at=1000.0 + i, **kw)


@pytest.fixture
def url(tmp_path):
    return f"sqlite:///{tmp_path}/ocps.sqlite3"


def _store(url):
    return RequestStore(Ledger.open(url).engine)


def test_round_trip_survives_a_new_store(url):
    s = _store(url)
    s.insert(_req(1, results={"ccds": {"R22_S11": {"state": "COMPLETED"}}}, jobs=("local-1",),
                  telemetry=({"detector": 4, "n_sources": 10},), owner="obs"))
    again = _store(url).get("r001")  # another engine on the same file: what a restart sees
    assert again == _req(1, results={"ccds": {"R22_S11": {"state": "COMPLETED"}}}, jobs=("local-1",),
                         telemetry=({"detector": 4, "n_sources": 10},), owner="obs")
    with pytest.raises(UnknownRequestError):
        s.get("nope")


def test_list_filters_like_uws(url):
    s = _store(url)
    for i in range(6):
        s.insert(_req(i, Phase.QUEUED if i % 2 else Phase.PENDING))
    assert [r.id for r in s.list()] == [f"r{i:03d}" for i in range(6)]
    assert [r.id for r in s.list(phases=[Phase.QUEUED])] == ["r001", "r003", "r005"]
    assert [r.id for r in s.list(after=1003.0)] == ["r004", "r005"]
    assert [r.id for r in s.list(last=2)] == ["r004", "r005"]


def test_phase_compare_and_set(url):
    s = _store(url)
    s.insert(_req(1, Phase.QUEUED))
    assert s.set_phase("r001", Phase.EXECUTING, expect=[Phase.QUEUED], started_at=5.0)
    # an abort in between: the runner's later QUEUED -> EXECUTING or EXECUTING -> COMPLETED fails
    assert s.set_phase("r001", Phase.ABORTED, expect=[Phase.QUEUED, Phase.EXECUTING], error="aborted")
    assert not s.set_phase("r001", Phase.COMPLETED, expect=[Phase.EXECUTING], results={"x": 1})
    r = s.get("r001")
    assert (r.phase, r.started_at, r.error, dict(r.results)) == (Phase.ABORTED, 5.0, "aborted", {})


def test_event_marked_published_exactly_once_under_races(url):
    s = _store(url)
    s.insert(_req(1, Phase.EXECUTING))
    s.set_phase("r001", Phase.COMPLETED, expect=[Phase.EXECUTING], event={"request_id": "r001"})
    assert s.unpublished() == ["r001"]
    wins: list[bool] = []
    threads = [threading.Thread(target=lambda: wins.append(_store(url).mark_published("r001")))
               for _ in range(8)]
    for t in threads:
        t.start()
    for t in threads:
        t.join()
    assert sorted(wins) == [False] * 7 + [True]
    assert s.unpublished() == []
    event, published = s.event("r001")
    assert event == {"request_id": "r001"} and published is not None


def test_delete_hides_then_purges_after_publication(url):
    s = _store(url)
    s.insert(_req(1, Phase.EXECUTING))
    s.set_phase("r001", Phase.ABORTED, expect=[Phase.EXECUTING], event={"request_id": "r001"})
    assert s.delete("r001") and not s.delete("r001")
    with pytest.raises(UnknownRequestError):
        s.get("r001")
    assert s.list() == [] and s.unpublished() == ["r001"]  # its event still goes out
    assert s.purge() == 0
    s.mark_published("r001")
    assert s.purge() == 1 and s.unpublished() == []
