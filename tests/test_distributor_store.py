"""Tests for apbatch.distributor.store: atomic delivery, sidecars, listing and look-up."""

import hashlib
import json
import os

import pytest
from apbatch.distributor.store import DistributorStore, RawEntry, check_name, file_sha256, group_key
from apbatch.errors import BadInputError

GROUP = "2025-06-10T07:31:26.692#1"


def meta(obs_id="MC_O_20250610_000001", det="R22_S11", group=GROUP, index=1):
    return {
        "instrument": "LSSTCam",
        "obs_id": obs_id,
        "detector_name": det,
        "detector": 94,
        "group_id": group,
        "image_index": index,
        "images_in_sequence": 2,
    }


@pytest.fixture
def src(tmp_path):
    p = tmp_path / "incoming" / "raw.fits"
    p.parent.mkdir()
    p.write_bytes(os.urandom(300_000))
    return p


def test_group_key_is_a_safe_directory_name():
    assert group_key("2025-06-10T07:31:26.692#1") == "2025-06-10T07_31_26.692_1"
    assert group_key("2025042500031") == "2025042500031"
    with pytest.raises(BadInputError, match="group"):
        group_key("")


@pytest.mark.parametrize("bad", ["..", "../etc", "a/b", "", ".hidden", "x y"])
def test_check_name_rejects_path_tricks(bad):
    with pytest.raises(BadInputError, match="obs_id"):
        check_name(bad, "obs_id")


def test_deliver_copies_and_writes_sidecar(tmp_path, src):
    store = DistributorStore(tmp_path / "dist")
    entry = store.deliver(src, meta())
    assert entry.path == tmp_path / "dist/LSSTCam/2025-06-10T07_31_26.692_1/MC_O_20250610_000001_R22_S11.fits"
    assert entry.path.read_bytes() == src.read_bytes()
    assert src.exists()
    side = json.loads(entry.path.with_suffix(".json").read_text())
    assert side["sha256"] == hashlib.sha256(src.read_bytes()).hexdigest()
    assert side["size"] == src.stat().st_size
    assert side["group"] == GROUP and side["detector"] == 94 and side["image_index"] == 1
    assert RawEntry.from_sidecar(entry.path.with_suffix(".json")) == entry
    assert not list(entry.path.parent.glob(".*"))  # no temporary files left behind
    assert entry.is_complete(verify_checksum=True)


def test_deliver_move(tmp_path, src):
    data = src.read_bytes()
    entry = DistributorStore(tmp_path / "dist").deliver(src, meta(), move=True)
    assert not src.exists()
    assert entry.path.read_bytes() == data and entry.sha256 == hashlib.sha256(data).hexdigest()


def test_deliver_accepts_dataclass_metadata(tmp_path, src):
    import dataclasses

    @dataclasses.dataclass
    class M:
        instrument: str = "LSSTComCam"
        obs_id: str = "CC_O_20241108_000266"
        detector_name: str = "R22_S00"
        detector: int = 0
        group_id: str = "2024-11-09T06:33:55.311"
        image_index: int = 1
        images_in_sequence: int = 1

    entry = DistributorStore(tmp_path).deliver(src, M())
    assert entry.path.name == "CC_O_20241108_000266_R22_S00.fits" and entry.instrument == "LSSTComCam"


def test_deliver_bad_input_writes_nothing(tmp_path, src):
    store = DistributorStore(tmp_path / "dist")
    with pytest.raises(BadInputError, match="src_path"):
        store.deliver(tmp_path / "nope.fits", meta())
    bad = meta()
    del bad["group_id"]
    with pytest.raises(BadInputError, match="metadata.group"):
        store.deliver(src, bad)
    with pytest.raises(BadInputError, match="obs_id"):
        store.deliver(src, meta(obs_id="../../x"))
    with pytest.raises(BadInputError, match="metadata"):
        store.deliver(src, ["not", "a", "mapping"])
    assert not (tmp_path / "dist").exists() or not any((tmp_path / "dist").rglob("*.*"))


def test_list_group_find_and_order(tmp_path, src):
    store = DistributorStore(tmp_path)
    store.deliver(src, meta("MC_O_20250610_000002", index=2))
    store.deliver(src, meta("MC_O_20250610_000001", index=1))
    store.deliver(src, meta("MC_O_20250610_000001", det="R22_S10", index=1))
    assert [e.obs_id for e in store.list_group("LSSTCam", GROUP, "R22_S11")] == [
        "MC_O_20250610_000001",
        "MC_O_20250610_000002",
    ]
    assert len(store.list_group("LSSTCam", GROUP)) == 3
    assert store.list_group("LSSTCam", "2025-06-10T07:40:00.000", "R22_S11") == []
    found = store.find("LSSTCam", "MC_O_20250610_000002", "R22_S11")
    assert found is not None and found.group == GROUP and found.image_index == 2
    assert store.find("LSSTCam", "MC_O_20250610_000009", "R22_S11") is None


def test_raw_without_sidecar_is_not_listed(tmp_path, src):
    store = DistributorStore(tmp_path)
    path = store.raw_path("LSSTCam", GROUP, "MC_O_20250610_000001", "R22_S11")
    path.parent.mkdir(parents=True)
    path.write_bytes(src.read_bytes())  # a raw whose writer has not finished (no sidecar yet)
    assert store.list_group("LSSTCam", GROUP, "R22_S11") == []


def test_is_complete_detects_truncation_and_corruption(tmp_path, src):
    entry = DistributorStore(tmp_path).deliver(src, meta())
    with open(entry.path, "r+b") as f:
        f.truncate(1000)
    assert not entry.is_complete()
    entry = DistributorStore(tmp_path).deliver(src, meta())
    data = bytearray(entry.path.read_bytes())
    data[500] ^= 0xFF
    entry.path.write_bytes(bytes(data))
    assert entry.is_complete() and not entry.is_complete(verify_checksum=True)
    entry.path.unlink()
    assert not entry.is_complete()
    assert file_sha256(src) == hashlib.sha256(src.read_bytes()).hexdigest()
